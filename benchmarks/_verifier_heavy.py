"""A verifier-heavy configuration for CPU speed measurements: a random Llama target >= 100M parameters
and an EAGLE-3 draft trained on the target's own GREEDY outputs of the training prompts.

Greedy, not temperature 1: a random target's T=1 distribution is close to flat over the vocabulary,
so no draft can predict its samples; its greedy paths are deterministic and learnable. A random target
also does not generalise, so speed is measured on the training prompts (AL ~1 on held-out ones). Built
once into ~/.cache/draftadapt/verifier-heavy-<hash>/ (target/, draft/, prompts.json).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class HeavyConfig:
    hidden: int = 512  # target hidden (head_dim 64)
    layers: int = 26  # 26 x 3.9M + embeddings = 103M parameters
    intermediate: int = 2048
    heads: int = 8
    kv_heads: int = 4
    prompts: int = 64  # training prompts (also the measurement prompts)
    max_tokens: int = 64  # greedy completion length the draft is trained on
    steps: int = 240  # TTT optimizer steps
    batch_size: int = 8  # sequences per TTT step
    lr: float = 2e-3
    seed: int = 0


def build(cfg: HeavyConfig = HeavyConfig(), root: str | os.PathLike | None = None) -> Path:
    """Directory holding target/, draft/, prompts.json and build.json; built when missing."""
    key = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()[:10]
    base = Path(root or Path.home() / ".cache" / "draftadapt") / f"verifier-heavy-{key}"
    if (base / "build.json").exists():
        return base
    base.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    target, n_params = _save_target(cfg, base / "target")
    prompts = _prompts(cfg, base / "target")
    seqs, gen_s = _greedy(base / "target", prompts, cfg.max_tokens)
    t1 = time.perf_counter()
    _train_draft(cfg, target, prompts, seqs, base / "draft")
    (base / "prompts.json").write_text(json.dumps(prompts))
    (base / "build.json").write_text(json.dumps({"config": asdict(cfg), "target_params": n_params,
                                                 "greedy_seconds": gen_s, "train_seconds": time.perf_counter() - t1,
                                                 "total_seconds": time.perf_counter() - t0}, indent=1))
    return base


def _save_target(cfg: HeavyConfig, out: Path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from draftadapt.toy.tokenizer import save_tokenizer, vocabulary

    v = vocabulary()
    lc = LlamaConfig(vocab_size=len(v), hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                     num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                     max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=v.index("<bos>"),
                     eos_token_id=v.index("<eos>"), pad_token_id=v.index("<pad>"))
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(lc).eval()
    model.save_pretrained(out, safe_serialization=True)
    save_tokenizer(out)
    return model, sum(p.numel() for p in model.parameters())


def _prompts(cfg: HeavyConfig, tok_dir: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    from draftadapt.toy.draft import domain_prompts

    return domain_prompts(AutoTokenizer.from_pretrained(tok_dir), "task", cfg.prompts, seed=cfg.seed + 7)


def _greedy(target_dir: Path, prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], float]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from draftadapt.engine.vllm import Engine, EngineConfig

    t0 = time.perf_counter()
    with Engine(EngineConfig(model=str(target_dir), max_num_seqs=64, worker_extension=None)) as eng:
        outs = eng.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                                SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
    return [p + list(o.outputs[0].token_ids) for p, o in zip(prompts, outs)], time.perf_counter() - t0


def _train_draft(cfg: HeavyConfig, target, prompts, seqs, out: Path) -> None:
    from draftadapt.offline import train_offline
    from draftadapt.trainer import TrainerConfig

    random.seed(cfg.seed)
    masks = [[i + 1 >= len(p) for i in range(len(s))] for p, s in zip(prompts, seqs)]
    tc = TrainerConfig(lr=cfg.lr, ttt_steps=3, warmup_steps=20)
    train_offline(target, seqs, cfg.steps, draft_vocab_size=None, config=tc, loss_masks=masks,
                  batch_size=cfg.batch_size, out_dir=out, progress=True)


if __name__ == "__main__":
    print(build())
