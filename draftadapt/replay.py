"""Record an RL run's trajectory once, replay it for any number of draft-adaptation strategies.

A trajectory directory holds, per policy step v, the policy that produced step v's features (the
weights BEFORE update v, HF `save_pretrained`, safetensors) and the rollouts it trained on (token
ids, masks, rewards, advantages), plus the final policy. Features are not stored: a replay
recomputes them with `features(...)` from the saved policy and ids (a few MB per step instead of
~25 KB per token at real sizes). Replaying every strategy over the SAME trajectory makes the
draft the only thing that differs between arms: the policy, its rollouts and the measurement
prompts are identical, so arms compare pairwise.

    rec = TrajectoryRecorder(root, meta={"reward": ...})
    for v in range(steps):
        rec.record(v, policy, batch, rewards, advantages)   # before the policy update of step v
        ... update ...
    rec.finish(steps, policy)

    traj = Trajectory(root)
    for v in traj.versions:                                  # 0 .. steps-1
        for rb in features(policy_at(v), adapter, traj.rollouts(v), v): ...

It knows nothing of engines or of how drafts are trained.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .batch import RolloutBatch
from .atomic import atomic_write_dir

FORMAT = "draftadapt.trajectory/1"
META = "trajectory.json"
ROLLOUTS = "rollouts.safetensors"


@dataclass
class StepRollouts:
    """The rollouts of one policy step, as the policy's log-prob recompute saw them."""

    input_ids: torch.Tensor  # [B, T] int64, right-padded prompt + completion
    attention_mask: torch.Tensor  # [B, T] int64
    completion_mask: torch.Tensor  # [B, T] bool: completion tokens
    rewards: torch.Tensor  # [B] float
    advantages: torch.Tensor  # [B] float: group-normalised, as the policy update used them

    @property
    def completion_tokens(self) -> int:
        return int(self.completion_mask.sum())


def _step_dir(root: Path, version: int) -> Path:
    return root / f"v{version:04d}"


class TrajectoryRecorder:
    """Writes a trajectory directory step by step; each step is written atomically."""

    def __init__(self, root: str | os.PathLike, meta: dict | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.meta = {"format": FORMAT, "steps": None, **(meta or {})}
        self._write_meta()

    def _write_meta(self) -> None:
        (self.root / META).write_text(json.dumps(self.meta, indent=1, default=str))

    def record(self, version: int, policy, rollouts: StepRollouts, extra: dict | None = None) -> Path:
        """Save `policy` (the weights that produce step `version`'s features) and its rollouts."""
        from safetensors.torch import save_file

        def write(tmp: Path) -> None:
            policy.save_pretrained(tmp / "policy", safe_serialization=True)
            save_file({k: v.contiguous().cpu() for k, v in vars(rollouts).items()}, str(tmp / ROLLOUTS))
            (tmp / "step.json").write_text(json.dumps({"version": version, **(extra or {})}, default=str))

        return atomic_write_dir(_step_dir(self.root, version), write)

    def finish(self, version: int, policy) -> None:
        """Save the policy after the last update (the one the last step's draft is measured on)."""
        atomic_write_dir(_step_dir(self.root, version), lambda tmp: policy.save_pretrained(tmp / "policy",
                                                                                            safe_serialization=True))
        self.meta["steps"] = version
        self._write_meta()


class Trajectory:
    """A finished trajectory directory (read-only)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        path = self.root / META
        if not path.is_file():
            raise ValueError(f"{self.root} holds no {META}; record it with TrajectoryRecorder first")
        self.meta = json.loads(path.read_text())
        if self.meta.get("format") != FORMAT or self.meta.get("steps") is None:
            raise ValueError(f"{path} is not a finished trajectory (format {self.meta.get('format')!r}, steps "
                             f"{self.meta.get('steps')}); record it again (TrajectoryRecorder.finish was not reached)")

    @property
    def steps(self) -> int:
        return int(self.meta["steps"])

    @property
    def versions(self) -> range:
        """Versions with rollouts: 0 .. steps-1 (version `steps` is the final policy)."""
        return range(self.steps)

    def policy_dir(self, version: int) -> Path:
        d = _step_dir(self.root, version) / "policy"
        if not (d / "config.json").is_file():
            raise ValueError(f"{d} is missing; this trajectory has versions 0..{self.steps}")
        return d

    def policy_state(self, version: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return {k: v for f in sorted(self.policy_dir(version).glob("*.safetensors")) for k, v in load_file(str(f)).items()}

    def rollouts(self, version: int) -> StepRollouts:
        from safetensors.torch import load_file

        return StepRollouts(**load_file(str(_step_dir(self.root, version) / ROLLOUTS)))

    def step_info(self, version: int) -> dict:
        return json.loads((_step_dir(self.root, version) / "step.json").read_text())


@torch.no_grad()
def features(policy, adapter, rollouts: StepRollouts, version: int, micro_batch: int = 64,
             min_advantage: float | None = None) -> Iterator[RolloutBatch]:
    """Captured features of `rollouts` under `policy` (tagged `version`), micro-batch by micro-batch,
    exactly as the log-prob recompute of the live run captures them (`adapter.capture`).
    min_advantage: keep only sequences whose advantage is >= this (None keeps all)."""
    keep = torch.ones_like(rollouts.rewards, dtype=torch.bool)
    if min_advantage is not None:
        keep = rollouts.advantages >= min_advantage
    idx = keep.nonzero().flatten()
    for s in range(0, idx.numel(), micro_batch):
        sl = idx[s:s + micro_batch]
        ids, am, cm = rollouts.input_ids[sl], rollouts.attention_mask[sl], rollouts.completion_mask[sl]
        with adapter.capture(policy) as cap:
            policy(input_ids=ids, attention_mask=am)
        yield cap.rollout_batch(input_ids=ids, attention_mask=am, completion_mask=cm, policy_version=version)
