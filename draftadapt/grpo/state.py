"""Checkpoint and resume of a whole GRPO run: policy, optimizer, draft adapter, step, RNG.

One directory per checkpoint, written atomically (temp dir + rename), so a run killed at any
moment leaves either the previous checkpoint or the new one, never half of one.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import NamedTuple

import torch

from .. import faults
from ..atomic import atomic_write_dir, recover_parked, sweep_leftovers

STATE = "run_state.pt"


class RunState(NamedTuple):
    step: int  # policy steps completed (= the policy version in the engines)
    extra: dict  # whatever the recipe stored (e.g. accuracy before RL)


def save_run(ckpt_dir: str | Path, step: int, policy, optimizer, adapter=None, extra: dict | None = None) -> Path:
    def write(tmp: Path) -> None:
        policy.save_pretrained(tmp / "policy", safe_serialization=True)
        faults.kill_point("checkpoint")
        state = {"step": step, "optimizer": optimizer.state_dict(), "extra": extra or {},
                 "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                 "adapter": adapter.state_dict(cache_dir=tmp / "cache") if adapter is not None else None}
        torch.save(state, tmp / STATE)

    return atomic_write_dir(ckpt_dir, write)


def has_checkpoint(ckpt_dir: str | Path) -> bool:
    """True when ckpt_dir holds a run checkpoint - after moving back the previous one if a writer was
    killed between parking it and moving the new one in (else a resume would start from scratch)."""
    recover_parked(ckpt_dir)
    return (Path(ckpt_dir) / STATE).exists()


def load_run(ckpt_dir: str | Path, policy, optimizer, adapter=None) -> RunState:
    """Restore everything `save_run` wrote into live objects built with the same config."""
    from safetensors.torch import load_file

    ckpt_dir = Path(ckpt_dir)
    if not has_checkpoint(ckpt_dir):
        raise FileNotFoundError(f"{ckpt_dir} holds no run checkpoint ({STATE}); start without resume")
    sweep_leftovers(ckpt_dir)  # a resume is the run's only writer: a killed save's temp dir is garbage
    state = torch.load(ckpt_dir / STATE, weights_only=False)
    missing, unexpected = policy.load_state_dict(load_file(ckpt_dir / "policy" / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise ValueError(f"policy checkpoint does not fit: missing {missing}, unexpected {unexpected}")
    optimizer.load_state_dict(state["optimizer"])
    if adapter is not None:
        if state["adapter"] is None:
            raise ValueError(f"{ckpt_dir} was saved without a draft adapter; resume without one")
        _rebase_cache_dir(state["adapter"]["worker"], ckpt_dir)
        adapter.load_state_dict(state["adapter"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    return RunState(state["step"], state["extra"])


def _rebase_cache_dir(worker: dict | None, ckpt_dir: Path) -> None:
    """The features were written inside the temp dir that was renamed to ckpt_dir; a wrapping
    worker (BackgroundDraftWorker) keeps the local worker's state under "inner"."""
    while worker is not None:
        if worker.get("cache_dir"):
            worker["cache_dir"] = str((ckpt_dir / "cache").absolute())
        worker = worker.get("inner")
