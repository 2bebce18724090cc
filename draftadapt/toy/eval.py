"""Score the toy policy through any engine exposing `generate(prompts, n=, temperature=, ...)`.

Knows the task and the tokenizer; knows nothing of vLLM (the engine is passed in).
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from .task import STYLES, Problem, RewardConfig, TaskConfig, reward, sample_problem, style_of


@dataclass(frozen=True)
class EvalResult:
    accuracy: float  # share of samples whose final answer is right
    mean_reward: float  # under the given RewardConfig
    style_shares: dict[str, float]  # share of samples in each solution style
    mean_completion_tokens: float
    samples: int


def eval_problems(n: int, seed: int = 1234, cfg: TaskConfig = TaskConfig()) -> list[Problem]:
    """A fixed held-out problem set (a seed disjoint from training streams by convention)."""
    rng = random.Random(seed)
    return [sample_problem(rng, cfg) for _ in range(n)]


def encode_prompt(tok, text: str) -> list[int]:
    return [tok.bos_token_id] + tok.encode(text, add_special_tokens=False)


def evaluate(engine, tok, problems: list[Problem], *, temperature: float = 1.0, n: int = 1,
             max_tokens: int = 96, reward_cfg: RewardConfig = RewardConfig(), seed: int | None = None) -> EvalResult:
    prompts = [encode_prompt(tok, p.prompt) for p in problems]
    outs = engine.generate(prompts, n=n, temperature=temperature, max_tokens=max_tokens,
                           logprobs=False, seed=seed, stop_token_ids=[tok.eos_token_id])
    correct, rewards, lengths, styles = 0, 0.0, 0, Counter()
    for p, group in zip(problems, outs):
        for c in group:
            text = tok.decode(c.token_ids, skip_special_tokens=True)
            r = reward(p, text, reward_cfg)
            correct += r > 0
            rewards += r
            lengths += len(c.token_ids)
            styles[style_of(text)] += 1
    total = sum(len(g) for g in outs)
    return EvalResult(correct / total, rewards / total, {s: styles[s] / total for s in STYLES},
                      lengths / total, total)
