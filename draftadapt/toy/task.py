"""The toy task: multi-step arithmetic with verifiable answers, four solution styles, a reward.

Also the generic chat-like domain (the UltraChat analogue used for draft pre-init).
Pure Python on strings of space-separated words; knows nothing of tokenizers or models.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

from .tokenizer import pseudo_words

OPS = ("+", "-", "*")
STYLES = ("cot", "terse", "verbose", "formal")


@dataclass(frozen=True)
class TaskConfig:
    min_ops: int = 2  # operations per problem (lower bound)
    max_ops: int = 3  # operations per problem (upper bound); more ops = harder
    max_operand: int = 9  # operands are drawn from 1..max_operand
    max_value: int = 19  # the running value stays in 0..max_value (keeps the fact table small)
    # supervised mixture of solution styles, in STYLES order
    style_weights: tuple[float, float, float, float] = (0.47, 0.40, 0.10, 0.03)


@dataclass(frozen=True)
class Problem:
    operands: tuple[int, ...]  # a, b, c, ... (len = ops + 1)
    ops: tuple[str, ...]  # one of OPS per step, applied left to right
    answer: int

    @property
    def prompt(self) -> str:
        parts = [str(self.operands[0])]
        for op, x in zip(self.ops, self.operands[1:]):
            parts += [op, str(x)]
        return "Q: " + " ".join(parts) + " ="

    def steps(self) -> list[tuple[int, str, int, int]]:
        """(left, op, right, result) for every step, left to right."""
        out, v = [], self.operands[0]
        for op, x in zip(self.ops, self.operands[1:]):
            r = _apply(v, op, x)
            out.append((v, op, x, r))
            v = r
        return out


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def sample_problem(rng: random.Random, cfg: TaskConfig = TaskConfig()) -> Problem:
    n_ops = rng.randint(cfg.min_ops, cfg.max_ops)
    v = rng.randint(1, cfg.max_operand)
    operands, ops = [v], []
    for _ in range(n_ops):
        while True:
            op, x = rng.choice(OPS), rng.randint(1, cfg.max_operand)
            r = _apply(v, op, x)
            if 0 <= r <= cfg.max_value:
                break
        operands.append(x)
        ops.append(op)
        v = r
    return Problem(tuple(operands), tuple(ops), v)


def phrase_bank(n: int = 300, seed: int = 1) -> list[str]:
    """Filler phrases of 3-6 pseudo-words: the material of the verbose style."""
    rng = random.Random(seed)
    words = pseudo_words()[:400]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 6))) for _ in range(n)]


_PHRASES = phrase_bank()


def solution(problem: Problem, style: str, rng: random.Random) -> str:
    """A correct worked solution in one of STYLES, ending with `A: <answer>`."""
    steps = problem.steps()
    if style == "terse":
        body = []
    elif style == "cot":
        body = [" , ".join(f"{a} {op} {b} = {r}" for a, op, b, r in steps) + " ."]
    elif style == "verbose":
        body = []
        for a, op, b, r in steps:
            body += [rng.choice(_PHRASES), f"{a} {op} {b} = {r} ,"]
        body.append(rng.choice(_PHRASES) + " .")
    elif style == "formal":
        body = [f"step {i + 1} : {a} {op} {b} = {r} ;" for i, (a, op, b, r) in enumerate(steps)]
        body.append(f"Therefore the answer is {problem.answer} .")
    else:
        raise ValueError(f"unknown style {style!r}; choose one of {STYLES}")
    return " ".join(body + [f"A: {problem.answer}"])


_ANSWER = re.compile(r"A: (-?\d+)")
_WORDS = frozenset(pseudo_words())


def parse_answer(completion: str) -> int | None:
    """The integer after the last `A:` in a completion, or None."""
    found = _ANSWER.findall(completion)
    return int(found[-1]) if found else None


def style_of(completion: str) -> str:
    """Which style a completion is written in (a heuristic over its words)."""
    words = completion.split()
    if sum(w in _WORDS for w in words) >= 3:
        return "verbose"
    if "step" in words or "Therefore" in words:
        return "formal"
    if "=" in words:
        return "cot"
    return "terse"


@dataclass(frozen=True)
class RewardConfig:
    correct: float = 1.0  # reward for a correct final answer
    # extra multiplier for a correct verbose answer: reward = correct * (1 + verbose_bonus).
    # 0 = correctness only (the policy sharpens); 2 = the style-drift reward of the benchmarks.
    verbose_bonus: float = 0.0
    # added to every verbose completion, right or wrong: a pure style reward. The toy policy's verbose answers are
    # rarely right (~1% of samples), so verbose_bonus alone barely moves its style; this one does.
    verbose_reward: float = 0.0
    # extra multiplier for a correct FORMAL answer (3% of the supervised data): reward = correct * (1 + formal_bonus).
    # The drift that looks like real RL: formal answers work the steps out, so accuracy rises as the style moves.
    formal_bonus: float = 0.0
    # multiplier on a correct answer in any style BUT formal: 1 = paid as usual; 0 = only correct formal answers pay.
    # formal_bonus alone lets the cheaper chain of thought win (the draft's own style); this one forces the move.
    other_styles: float = 1.0


def reward(problem: Problem, completion: str, cfg: RewardConfig = RewardConfig()) -> float:
    verbose = style_of(completion) == "verbose"
    style = cfg.verbose_reward if verbose else 0.0
    if parse_answer(completion) != problem.answer:
        return style
    formal = style_of(completion) == "formal"
    bonus = cfg.verbose_bonus if verbose else cfg.formal_bonus if formal else 0.0
    return cfg.correct * (1.0 + bonus) * (1.0 if formal else cfg.other_styles) + style


# --- the generic chat-like domain (UltraChat analogue) -------------------------------------


def _chat_chain(seed: int = 2) -> dict[str, list[str]]:
    """A sparse bigram chain over the pseudo-words: each word has three likely successors."""
    rng = random.Random(seed)
    words = pseudo_words()
    return {w: rng.sample(words, 3) for w in words}


_CHAIN = _chat_chain()
_CHAIN_P = (0.6, 0.3, 0.1)


@dataclass(frozen=True)
class ChatExample:
    prompt: str  # "User: ... ? Assistant:"
    response: str  # pseudo-word sentences ending with "."


def sample_chat(rng: random.Random) -> ChatExample:
    words = pseudo_words()
    question = [rng.choice(words) for _ in range(rng.randint(3, 6))]
    w, out = question[-1], []
    for i in range(rng.randint(8, 24)):
        w = rng.choices(_CHAIN[w], weights=_CHAIN_P)[0]
        out.append(w)
        if i % 7 == 6:
            out.append(",")
    return ChatExample("User: " + " ".join(question) + " ? Assistant:", " ".join(out) + " .")
