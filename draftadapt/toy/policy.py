"""The toy policy: a small Llama supervised-trained on the toy task, cached on disk.

`toy_policy()` returns the directory of a trained checkpoint (HF `save_pretrained`, safetensors,
tokenizer beside it), training it first when the cache has none. The build is reproducible: a
fixed number of steps over seeded data (not a time budget), run in a child process whose kernels are
pinned (`toy.build`), so every x86-64 machine with AVX2 builds the same bytes: `weights_hash(dir)`
names the build.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .task import STYLES, TaskConfig, sample_chat, sample_problem, solution
from .tokenizer import save_tokenizer, vocabulary


@dataclass(frozen=True)
class PolicyConfig:
    num_hidden_layers: int = 8  # >= 8 so the EAGLE-3 aux layers (1, L/2-1, L-4) are distinct
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 512
    max_position_embeddings: int = 512


@dataclass(frozen=True)
class SFTConfig:
    steps: int = 400  # optimizer steps (a fixed budget: 538-678 s on 2 shared cores, 2,400-3,000 tok/s)
    rows: int = 16  # packed rows per step
    row_len: int = 256  # tokens per packed row
    lr: float = 4e-3  # peak AdamW lr, cosine to 10% after a short warm-up
    warmup: int = 20  # warm-up steps
    chat_fraction: float = 0.1  # share of generic chat examples in the mixture
    seed: int = 0
    threads: int = 2  # torch intra-op threads while training (see DESIGN: thread traps)
    task: TaskConfig = field(default_factory=TaskConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)


def llama_config(cfg: PolicyConfig):
    from transformers import LlamaConfig

    v = vocabulary()
    return LlamaConfig(
        vocab_size=len(v),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=v.index("<bos>"),
        eos_token_id=v.index("<eos>"),
        pad_token_id=v.index("<pad>"),
    )


def sft_example(rng: random.Random, cfg: SFTConfig) -> tuple[str, str]:
    """(prompt, completion) from the supervised mixture: task problems in four styles + chat."""
    if rng.random() < cfg.chat_fraction:
        ex = sample_chat(rng)
        return ex.prompt, ex.response
    p = sample_problem(rng, cfg.task)
    style = rng.choices(STYLES, weights=cfg.task.style_weights)[0]
    return p.prompt, solution(p, style, rng)


def packed_batch(tok, rng: random.Random, cfg: SFTConfig):
    """Rows of several whole examples back to back; labels only on completions (+ eos)."""
    ids = torch.full((cfg.rows, cfg.row_len), tok.pad_token_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    for r in range(cfg.rows):
        pos = 0
        while True:
            prompt, completion = sft_example(rng, cfg)
            p = [tok.bos_token_id] + tok.encode(prompt, add_special_tokens=False)
            c = tok.encode(completion, add_special_tokens=False) + [tok.eos_token_id]
            if pos + len(p) + len(c) > cfg.row_len:
                break
            ids[r, pos : pos + len(p) + len(c)] = torch.tensor(p + c)
            labels[r, pos + len(p) : pos + len(p) + len(c)] = torch.tensor(c)
            pos += len(p) + len(c)
    return ids, labels


def train_policy(out_dir: str | Path, cfg: SFTConfig = SFTConfig(), progress: bool = True) -> dict:
    """Supervised-train the toy policy from scratch and save it (atomically) to `out_dir`."""
    from transformers import LlamaForCausalLM
    from tqdm import tqdm

    out_dir = Path(out_dir)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    from ..atomic import readable_tempdir

    tmp = readable_tempdir(out_dir)
    try:
        tok = save_tokenizer(tmp)
        model = LlamaForCausalLM(llama_config(cfg.policy))
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.95))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
        t0, tokens, bar = time.time(), 0, tqdm(range(cfg.steps), desc="toy policy SFT", disable=not progress)
        for _ in bar:
            ids, labels = packed_batch(tok, rng, cfg)
            loss = model(input_ids=ids, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            tokens += ids.numel()
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens / (time.time() - t0):.0f}")
        stats = {"final_loss": loss.item(), "train_seconds": time.time() - t0,
                 "train_tokens": tokens, "threads": cfg.threads, "config": asdict(cfg)}
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "draftadapt_sft.json").write_text(json.dumps(stats, indent=1))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        torch.set_num_threads(prev_threads)
        shutil.rmtree(tmp, ignore_errors=True)
    return stats


def _lr_factor(step: int, cfg: SFTConfig) -> float:
    import math

    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


def cache_root() -> Path:
    """Where built toy artefacts live: $DRAFTADAPT_CACHE, else ~/.cache/draftadapt."""
    return Path(os.environ.get("DRAFTADAPT_CACHE", Path.home() / ".cache" / "draftadapt"))


def toy_policy(cfg: SFTConfig = SFTConfig(), root: str | Path | None = None, progress: bool = True) -> Path:
    """Directory of the trained toy policy for `cfg`, training it first if it is not cached.

    The directory name carries a hash of the config, so a changed config never reuses a stale
    checkpoint.
    """
    from .build import build_once, weights_hash

    out = toy_policy_path(cfg, root)
    if build_once(out, train_policy, out, cfg, progress=progress):
        if progress:
            print(f"toy policy built: {out} (weights {weights_hash(out)})")
    return out


def toy_policy_path(cfg: SFTConfig = SFTConfig(), root: str | Path | None = None) -> Path:
    """Where `toy_policy(cfg, root)` keeps its checkpoint (built or not)."""
    from .build import BUILD_VERSION

    key = hashlib.sha256(json.dumps([asdict(cfg), BUILD_VERSION], sort_keys=True).encode()).hexdigest()[:10]
    return Path(root or cache_root()) / f"toy-policy-{key}"


def perturbed_copy(policy_dir: str | Path, out_dir: str | Path, noise: float = 0.3, seed: int = 0) -> Path:
    """A copy of a checkpoint with multiplicative weight noise: a draft model that is accepted
    often but not always (exercises accept, reject-and-resample and bonus paths)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    model = AutoModelForCausalLM.from_pretrained(policy_dir)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + noise * torch.randn(p.shape, generator=g))
    model.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(policy_dir).save_pretrained(str(out_dir))
    return out_dir
