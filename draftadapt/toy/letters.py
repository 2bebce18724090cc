"""A second small task with its own tokenizer, built from code: reverse a letter sequence.

    prompt  "reverse : d a c b ."      answer  "b c a d"   (or, in the rare upper-case style, "B C A D")

It exists to make a drift that brings tokens OUTSIDE a reduced draft vocabulary into the policy's outputs: the
policy (a tiny TIED Qwen2 from a config, as docs/own_model.md builds one) is supervised on answers that are mostly
lower-case; its first EAGLE-3 draft comes from its own samples through `offline.train_from_own_samples` with a draft
vocabulary of the 27 most frequent completion tokens (a-z and <eos>), so no upper-case letter is in it; a GRPO
reward that pays only upper-case answers (`reward(..., upper_only=True)`) then moves the policy to tokens the draft
cannot propose. Built once per config (hash in the directory name) under $DRAFTADAPT_CACHE, in a pinned child process
(`toy.build`), like the toy. It knows nothing of RL loops or engines beyond the one build call.
"""
from __future__ import annotations

import hashlib
import json
import random
import string
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
WORDS = ["reverse", ":", "."]
LOWER, UPPER = list(string.ascii_lowercase), list(string.ascii_uppercase)
AUX_LAYER_IDS = (1, 2, 3)  # the draft's aux layers; vLLM's default (2, L//2, L-3) needs L >= 7


@dataclass(frozen=True)
class LettersConfig:
    min_letters: int = 3  # letters per problem (distinct, drawn from a-z)
    max_letters: int = 6
    upper_share: float = 0.1  # share of upper-case answers in the supervised data (the style GRPO grows)
    hidden_size: int = 128  # the tied Qwen2 policy
    num_hidden_layers: int = 4
    max_position_embeddings: int = 512  # >= the engine's max_model_len (vLLM refuses a longer one)
    sft_steps: int = 1500  # supervised steps, 32 examples each (one length per batch: no padding)
    sft_lr: float = 3e-3
    draft_vocab_size: int = 27  # the first draft's vocab: the most frequent completion tokens (a-z + <eos>)
    draft_prompts: int = 128  # prompts x draft_samples of the policy's own samples for the first draft
    draft_samples: int = 4
    draft_steps: int = 300  # TTT steps of the first draft
    seed: int = 0


class Problem(NamedTuple):
    prompt: str  # "reverse : d a c b ."
    answer: str  # "b c a d" (lower case; the upper-case style is answer.upper())


def vocabulary() -> list[str]:
    return SPECIALS + WORDS + LOWER + UPPER


def save_tokenizer(out: str | Path):
    """A word-level tokenizer over `vocabulary()` (whitespace-split), saved to `out` (its own directory: see
    examples/own_model.py for why it must not sit beside a qwen2 config)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(vocabulary())}, unk_token="<unk>"))
    core.pre_tokenizer, core.decoder = pre_tokenizers.WhitespaceSplit(), decoders.WordPiece(prefix="##", cleanup=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                  pad_token="<pad>")
    tok.save_pretrained(str(out))
    return tok


def sample_problem(rng: random.Random, cfg: LettersConfig = LettersConfig()) -> Problem:
    letters = rng.sample(LOWER, rng.randint(cfg.min_letters, cfg.max_letters))
    return Problem(f"reverse : {' '.join(letters)} .", " ".join(reversed(letters)))


def encode_prompt(tok, prompt: str) -> list[int]:
    return [tok.bos_token_id, *tok(prompt, add_special_tokens=False)["input_ids"]]


def is_upper(text: str) -> bool:
    """The answer is written in the upper-case style (every letter upper case, at least one letter)."""
    letters = text.split()
    return bool(letters) and all(t in UPPER for t in letters)


def reward(problem: Problem, text: str, upper_only: bool = False) -> float:
    """Share of answer positions right, case-insensitive (a partial credit GRPO can climb);
    upper_only: 0 unless the answer is in the upper-case style (the drift's reward)."""
    if upper_only and not is_upper(text):
        return 0.0
    want, got = problem.answer.split(), text.lower().split()
    return sum(a == b for a, b in zip(want, got)) / max(len(want), len(got), 1)


def correct(problem: Problem, text: str) -> bool:
    return text.lower().split() == problem.answer.split()


# the build -------------------------------------------------------------------------------------
class LettersArtefacts(NamedTuple):
    root: Path
    policy: Path  # HF checkpoint of the SFT'd policy (no tokenizer beside it)
    tokenizer: Path  # the tokenizer's own directory (EngineConfig(tokenizer=...))
    draft: Path  # the first EAGLE-3 draft (vLLM's checkpoint format)


def config_hash(cfg: LettersConfig) -> str:
    return hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()[:10]


def letters_artefacts(cfg: LettersConfig = LettersConfig(), root: str | Path | None = None) -> LettersArtefacts:
    """The policy, tokenizer and first draft for `cfg`, built when not cached (in a pinned child process)."""
    from .build import build_once
    from .policy import cache_root

    base = Path(root) if root is not None else cache_root()
    out = base / f"letters-{config_hash(cfg)}"
    art = LettersArtefacts(out, out / "policy", out / "tokenizer", out / "draft")
    build_once(art.draft, _build, cfg, art)  # the draft is written last: its checkpoint marks the whole build
    return art


def _build(cfg: LettersConfig, art: LettersArtefacts) -> None:
    from transformers import AutoModelForCausalLM, Qwen2Config

    from ..offline import train_from_own_samples
    from ..trainer import TrainerConfig
    from .build import TorchSampler

    torch.set_num_threads(1)
    tok = save_tokenizer(art.tokenizer)
    # 1) the policy: a tied Qwen2 from a config, supervised on mostly lower-case answers
    qc = Qwen2Config(vocab_size=len(tok), hidden_size=cfg.hidden_size, intermediate_size=2 * cfg.hidden_size,
                     num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=4, num_key_value_heads=2,
                     max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(cfg.seed)
    policy = AutoModelForCausalLM.from_config(qc)
    opt, rng = torch.optim.AdamW(policy.parameters(), lr=cfg.sft_lr), random.Random(cfg.seed)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.1, 1 - s / cfg.sft_steps))
    for _ in range(cfg.sft_steps):
        n = rng.randint(cfg.min_letters, cfg.max_letters)
        rows = []
        for _ in range(32):
            p = sample_problem(random.Random(rng.random()), LettersConfig(min_letters=n, max_letters=n))
            ans = p.answer.upper() if rng.random() < cfg.upper_share else p.answer
            rows.append((encode_prompt(tok, p.prompt), tok(ans, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]))
        ids = torch.tensor([p + a for p, a in rows])  # [32, T]
        target = ids[:, 1:].clone()
        target[:, : len(rows[0][0]) - 1] = -100  # loss on the answer only
        loss = F.cross_entropy(policy(input_ids=ids).logits[:, :-1].transpose(1, 2), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    policy.eval().save_pretrained(art.policy)
    # 2) the first draft from the policy's own samples, its vocab the most frequent completion tokens
    drng = random.Random(cfg.seed + 1)
    prompts = [encode_prompt(tok, sample_problem(drng, cfg).prompt) for _ in range(cfg.draft_prompts)]
    train_from_own_samples(TorchSampler(policy), policy, prompts, cfg.draft_steps, n=cfg.draft_samples,
                           max_tokens=cfg.max_letters + 1, stop_token_ids=[tok.eos_token_id], seed=cfg.seed,
                           draft_vocab_size=cfg.draft_vocab_size, aux_layer_ids=AUX_LAYER_IDS,
                           config=TrainerConfig(lr=3e-3, warmup_steps=10, lr_schedule="cosine",
                                                lr_decay_steps=max(1, cfg.draft_steps - 10)),
                           batch_size=32, out_dir=art.draft, progress=False)
