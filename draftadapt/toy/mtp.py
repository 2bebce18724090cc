"""The toy MTP policy: the toy Llama policy as a MiMo checkpoint (`MiMoForCausalLM`, Qwen2-style)
with one MTP layer appended, so vLLM serves it with `speculative_config={"method": "mtp"}`.

1) conversion: Qwen2's decoder is Llama's plus q/k/v biases, so the Llama weights with ZERO q/k/v
   biases, the same rope (neox, theta 10000), rms eps and untied head compute the same function
   (`tests/test_mtp.py` checks the logits against the Llama's; the vLLM test checks greedy outputs).
2) the MTP layer: a short supervised phase with the trunk frozen - features from the policy's
   forward on the toy SFT mixture (the policy's own log-probs as the teacher, its pre-norm last
   state as the input), the same 3-step training-time test the online path uses. It is a
   distilled head, not one pre-trained with the trunk as MiMo's are; 150 steps, 324-376 s on one
   thread of 2 cores shared with a test run (two fresh builds).
3) the checkpoint, cached beside the toy policy: `config.json` (model_type qwen2,
   `num_nextn_predict_layers`), `model.safetensors` (trunk + `model.mtp_layers.*`), and the
   tokenizer in a directory of its own (with model_type qwen2 AutoTokenizer would load the
   WordLevel tokenizer as Qwen2Tokenizer and encode to nothing): pass it as `EngineConfig.tokenizer`.
   It carries a one-line `config.json` (`model_type: llama`): without one vLLM sleeps 2 s per start.
"""
from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from ..trainer import TrainerConfig

TOKENIZER_DIR = "tokenizer"  # the tokenizer's own subdirectory of a toy MTP checkpoint


@dataclass(frozen=True)
class ToyMTPConfig:
    num_mtp_layers: int = 1  # num_nextn_predict_layers (vLLM 0.32 runs only layer 0)
    steps: int = 150  # optimizer steps of the MTP phase (trunk frozen)
    rows: int = 8  # packed SFT rows per step
    row_len: int = 256  # tokens per row
    seed: int = 7  # SFT data stream (the policy's own SFT used seed 0)
    threads: int = 1  # torch threads while training
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(lr=3e-3, ttt_steps=3, warmup_steps=10))


class ToyMTP(NamedTuple):
    model_dir: Path  # MiMo checkpoint: EngineConfig(model=...)
    tokenizer_dir: Path  # EngineConfig(tokenizer=...)


def mimo_config(llama_config: dict, num_mtp_layers: int) -> dict:
    """config.json of the MiMo equivalent of a Llama config dict (no attention/MLP biases there)."""
    from transformers import Qwen2Config

    if llama_config.get("attention_bias") or llama_config.get("mlp_bias"):
        raise ValueError("the Llama config has attention/MLP biases; only bias-free Llama converts to Qwen2 exactly")
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_parameters",
            "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
    cfg = Qwen2Config(**{k: llama_config[k] for k in keys if k in llama_config}, use_sliding_window=False,
                      hidden_act=llama_config.get("hidden_act", "silu")).to_dict()
    if cfg.get("head_dim", llama_config["hidden_size"] // llama_config["num_attention_heads"]) != \
            llama_config.get("head_dim", llama_config["hidden_size"] // llama_config["num_attention_heads"]):
        raise ValueError("Qwen2 derives head_dim = hidden_size / heads; the Llama config uses another head_dim")
    cfg.update(architectures=["MiMoForCausalLM"], model_type="qwen2", num_nextn_predict_layers=num_mtp_layers,
               dtype="float32")
    return cfg


def qwen2_trunk(llama_state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """The Llama tensors under their (identical) Qwen2 names, plus zero q/k/v biases."""
    out = dict(llama_state)
    for i in range(num_layers):
        for proj in ("q_proj", "k_proj", "v_proj"):
            w = llama_state[f"model.layers.{i}.self_attn.{proj}.weight"]
            out[f"model.layers.{i}.self_attn.{proj}.bias"] = torch.zeros(w.shape[0], dtype=w.dtype)
    return out


def write_mimo(out_dir: str | Path, config: dict, trunk: dict[str, torch.Tensor],
               mtp: dict[str, torch.Tensor], tokenizer_src: str | Path) -> ToyMTP:
    """Write a MiMo checkpoint (config, trunk + MTP tensors, tokenizer subdir) atomically."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from ..atomic import atomic_write_dir

    bad = [k for k in mtp if not k.startswith("model.mtp_layers.")]
    if bad:
        raise ValueError(f"MTP tensors must be named model.mtp_layers.*; got {bad[:3]}")

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tensors = {k: v.detach().contiguous().cpu() for k, v in {**trunk, **mtp}.items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        AutoTokenizer.from_pretrained(str(tokenizer_src)).save_pretrained(str(tmp / TOKENIZER_DIR))
        # vLLM parses a config in the tokenizer dir too; without one it logs an error and sleeps 2 s
        # per engine start (repo_utils.with_retry). tokenizer_config.json still picks the class.
        (tmp / TOKENIZER_DIR / "config.json").write_text(json.dumps({"model_type": "llama"}) + "\n")

    out = atomic_write_dir(out_dir, write)
    return ToyMTP(out, out / TOKENIZER_DIR)


def train_mtp_head(policy, tok, cfg: ToyMTPConfig, progress: bool = True):
    """An MTPDraft for `policy` (an HF causal LM, frozen; `tok` its tokenizer) trained on the toy
    SFT mixture; returns (draft, per-step TrainStats)."""
    from ..capture import FeatureCapture
    from ..drafts.mtp import MTPDraft
    from ..trainer import DraftTrainer
    from .policy import SFTConfig, packed_batch

    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    sft = SFTConfig(rows=cfg.rows, row_len=cfg.row_len)
    draft = MTPDraft.from_target(policy.config, policy.get_output_embeddings(), cfg.num_mtp_layers)
    trainer = DraftTrainer(draft, policy.get_input_embeddings(), cfg.trainer)
    history = []
    for step in range(cfg.steps):
        ids, labels = packed_batch(tok, rng, sft)
        with FeatureCapture(policy, aux_layer_ids=(), final_prenorm=True) as cap, torch.no_grad():
            policy(input_ids=ids)
        batch = cap.rollout_batch(input_ids=ids, completion_mask=labels != -100).to_draft_batch()
        history.append(trainer.step(batch))
        if progress and (step + 1) % 25 == 0:
            s = history[-1]
            print(f"toy MTP step {step + 1}/{cfg.steps}: loss {s.loss:.3f} acc {[round(a, 2) for a in s.step_acc]}")
    return draft.eval(), history


def toy_mtp_policy(policy_dir: str | Path | None = None, cfg: ToyMTPConfig = ToyMTPConfig(),
                   progress: bool = True) -> ToyMTP:
    """The toy policy as a MiMo checkpoint with trained MTP layer(s), built when not cached."""
    from .build import BUILD_VERSION, build_once, weights_hash
    from .policy import toy_policy

    policy_dir = Path(policy_dir or toy_policy(progress=progress))
    key = hashlib.sha256(json.dumps([asdict(cfg), BUILD_VERSION], sort_keys=True, default=str).encode()).hexdigest()[:10]
    out = policy_dir.parent / f"{policy_dir.name}-mimo-mtp-{key}"
    if build_once(out, build_toy_mtp, policy_dir, out, cfg, progress):
        if progress:
            print(f"toy MTP policy built: {out} (weights {weights_hash(out)})")
    return ToyMTP(out, out / TOKENIZER_DIR)


def build_toy_mtp(policy_dir: Path, out: Path, cfg: ToyMTPConfig, progress: bool) -> None:
    """Train the MTP layer on the frozen policy and write the MiMo checkpoint to `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..drafts.mtp import mtp_state_for_push
    from .build import TorchThreads

    with TorchThreads(cfg.threads):
        policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval().requires_grad_(False)
        t0 = time.perf_counter()
        draft, history = train_mtp_head(policy, AutoTokenizer.from_pretrained(policy_dir), cfg, progress)
        seconds = time.perf_counter() - t0
    llama = json.loads((policy_dir / "config.json").read_text())
    trunk = qwen2_trunk(policy.state_dict(), llama["num_hidden_layers"])
    write_mimo(out, mimo_config(llama, cfg.num_mtp_layers), trunk, mtp_state_for_push(draft), policy_dir)
    stats = {"train_seconds": seconds, "threads": cfg.threads, "final": history[-1].as_dict(), "config": asdict(cfg)}
    (out / "draftadapt_mtp.json").write_text(json.dumps(stats, indent=1, default=str))
