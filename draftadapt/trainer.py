"""`DraftTrainer`: one optimizer step of a draft on a `DraftBatch` - the one step every draft kind and
adaptation strategy trains with - with its own AdamW, warm-up and grad clipping, and a state that
resumes exactly.

The loss is handed in (a `LossFn`): by default the draft kind's (`drafts/kinds.py`: the TTT loss for
EAGLE-3 / MTP heads, distillation for a draft LM), or a strategy's (`strategy.py`). The guards live
here once, for all of them: autocast, the non-finite skip (a NaN/Inf loss or gradient keeps the last
good weights), clipping and the crash-test kill point. A `Collective` (`distributed.py`) turns the
step into a data-parallel one: it agrees on the loss normaliser before the loss and sums the
gradients before clipping. It trains the draft only: the target embedding is read detached, nothing
reaches the policy. It does not fetch features, schedule itself or push weights; callers do.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Protocol

import torch
from torch import nn

from . import faults
from .allocator import limit_heap_growth
from .batch import DraftBatch
from .drafts.kinds import kind_of
from .ttt import LOSSES, TTTResult

AUTOCAST = ("auto", "off", "bf16")
LR_SCHEDULES = ("constant", "cosine", "linear")


@dataclass(frozen=True)
class TrainerConfig:
    lr: float = 3e-4  # peak AdamW learning rate
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    ttt_steps: int = 3  # K: draft steps unrolled per position (match the engine's k)
    decay: float = 0.8  # weight of step k is decay^(k-1)
    warmup_steps: int = 0  # linear lr warm-up from lr/warmup_steps to lr
    lr_schedule: str = "constant"  # after warm-up: "constant", or "cosine" / "linear" decay to lr * lr_min_ratio
    lr_decay_steps: int = 0  # steps of the decay after warm-up (then lr stays at lr * lr_min_ratio); > 0 to decay
    lr_min_ratio: float = 0.1  # final lr of a decaying schedule, as a fraction of lr
    loss: str = "kl"  # "kl" | "tv" | "kl+tv": divergence to the teacher over the draft vocab (ttt_loss)
    tv_weight: float = 1.0  # weight of the TV term in "kl+tv"
    device: str = "auto"  # where the draft and its batches live; "auto" = CUDA when present, else CPU
    autocast: str = "auto"  # "bf16": bf16 autocast, fp32 master weights; "off": fp32; "auto" = bf16 on CUDA, fp32 on CPU
    recompute: bool = True  # recompute the draft layer in backward (activation memory ~12x smaller, ~10% more time)

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.weight_decay < 0 or self.grad_clip < 0 or self.warmup_steps < 0:
            raise ValueError(f"TrainerConfig needs lr > 0 and weight_decay, grad_clip, warmup_steps >= 0; got {self}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"TrainerConfig.lr_schedule={self.lr_schedule!r}; choose one of {LR_SCHEDULES}")
        if self.lr_schedule != "constant" and self.lr_decay_steps < 1:
            raise ValueError(f"TrainerConfig.lr_schedule={self.lr_schedule!r} needs lr_decay_steps >= 1 (the steps "
                             "over which lr decays, e.g. RL steps x AdapterConfig.train_steps)")
        if not 0 <= self.lr_min_ratio <= 1:
            raise ValueError(f"TrainerConfig.lr_min_ratio={self.lr_min_ratio!r}; use a value in [0, 1]")
        if self.ttt_steps < 1 or not 0 < self.decay <= 1:
            raise ValueError(f"TrainerConfig needs ttt_steps >= 1 and 0 < decay <= 1; got {self}")
        if self.loss not in LOSSES or self.tv_weight < 0:
            raise ValueError(f"TrainerConfig.loss={self.loss!r} must be one of {LOSSES} and tv_weight >= 0")
        if self.autocast not in AUTOCAST:
            raise ValueError(f"TrainerConfig.autocast={self.autocast!r}; choose one of {AUTOCAST} (fp16 needs a"
                             " grad scaler and is not offered)")
        object.__setattr__(self, "betas", tuple(self.betas))

    def resolve_device(self, current: torch.device) -> torch.device:
        """The device to train on; "auto" keeps a draft already on CUDA where it is."""
        if self.device != "auto":
            return torch.device(self.device)
        if current.type == "cuda":
            return current
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        """bf16 or None (fp32). On CPU "auto" keeps fp32: the toy demo and parity tests are fp32, and
        bf16 autocast, though faster on this avx512_bf16 CPU (one TTT-3 step at H=1024, 2k tokens:
        101 s vs 217 s, contended, not tightly interleaved; benchmarks/ttt_scaling.py), changes the
        numbers; ask for it with autocast="bf16"."""
        if self.autocast == "bf16" or (self.autocast == "auto" and device.type == "cuda"):
            return torch.bfloat16
        return None


@dataclass(frozen=True)
class TrainStats:
    step: int  # optimizer steps done, this one included
    loss: float  # weighted TTT loss
    step_loss: tuple[float, ...]  # [K] mean KL per draft step
    step_acc: tuple[float, ...]  # [K] top-1 agreement with the teacher per draft step
    tokens: int  # positions scored at step 1
    grad_norm: float  # global grad norm before clipping (NaN when the update was skipped)
    lr: float  # learning rate used for this step
    skipped: bool = False  # the loss or the gradient was NaN/Inf: no update, the weights are the previous step's

    def as_dict(self) -> dict[str, float]:
        """Flat floats for loggers: loss, acc_1..acc_K, loss_1..loss_K, ..."""
        out = {"step": float(self.step), "loss": self.loss, "tokens": float(self.tokens),
               "grad_norm": self.grad_norm, "lr": self.lr}
        out.update({f"loss_{k}": v for k, v in enumerate(self.step_loss, start=1)})
        out.update({f"acc_{k}": v for k, v in enumerate(self.step_acc, start=1)})
        return out


def _cosine(done: float) -> float:
    """Cosine decay from 1 (done=0) to 0 (done=1)."""
    return 0.5 * (1 + math.cos(math.pi * done))


# (draft, batch on the trainer's device, embed, normalizer [K] or None) -> TTTResult (loss, step_loss [K],
# step_acc [K], step_tokens [K]); normalizer: a collective's token counts over all ranks (None: the batch's own)
LossFn = Callable[[nn.Module, DraftBatch, "nn.Embedding | torch.Tensor | None", "torch.Tensor | None"], TTTResult]


class Collective(Protocol):
    """What makes a step data-parallel (`distributed.GradAllReduce`): called by every rank, in this order."""

    def normalizer(self, batch: DraftBatch | None, device: torch.device) -> torch.Tensor: ...  # [K] over all ranks
    def reduce(self, params: list[nn.Parameter], result: TTTResult | None, device: torch.device) -> TTTResult: ...


class DraftTrainer:
    """Owns the draft's optimizer; `step(batch)` is one update of `loss` (None: the draft kind's)."""

    def __init__(self, draft: nn.Module, embed: nn.Embedding | torch.Tensor | None,
                 config: TrainerConfig = TrainerConfig(), loss: LossFn | None = None,
                 collective: Collective | None = None):
        limit_heap_growth()  # glibc: a CPU step's RSS linear in the batch, not in its history (allocator.py)
        self.device = config.resolve_device(next(draft.parameters()).device)
        draft.to(self.device)  # fp32 master weights; the optimizer state follows them
        self.draft, self.embed, self.config, self.collective = draft, embed, config, collective
        self._loss = loss  # None: the draft kind's, looked up at the first step
        params = [p for p in draft.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, eps=config.eps,
                                           weight_decay=config.weight_decay)
        self.steps_done = 0
        self.skipped_nonfinite = 0  # updates skipped because the loss or the gradient was NaN/Inf
        self._burst: tuple[int, int, float] | None = None  # (first step, steps, peak factor): `lr_burst`

    @property
    def loss(self) -> LossFn:
        if self._loss is None:
            self._loss = kind_of(self.draft).make_loss(self.config)
        return self._loss

    def lr_at(self, step: int) -> float:
        """Learning rate of the optimizer step with 0-based index `step`: linear warm-up over
        `warmup_steps`, then constant or a cosine / linear decay to lr * lr_min_ratio."""
        cfg = self.config
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return cfg.lr
        done = min(1.0, (step - cfg.warmup_steps) / cfg.lr_decay_steps)  # 0 at the peak, 1 at the end
        left = _cosine(done) if cfg.lr_schedule == "cosine" else 1 - done
        return cfg.lr * (cfg.lr_min_ratio + (1 - cfg.lr_min_ratio) * left)

    @contextmanager
    def lr_burst(self, steps: int, factor: float) -> Iterator[None]:
        """Within the block, the next `steps` updates run at the schedule's lr x a factor that falls (cosine) from
        `factor` to 0.1 x `factor` (the post-refresh burst: AdapterConfig.vocab_refresh_lr); factor 1: unchanged."""
        if not factor > 0:
            raise ValueError(f"DraftTrainer.lr_burst(factor={factor!r}); use a factor > 0 on the schedule's lr")
        if factor != 1 and steps > 0:
            self._burst = (self.steps_done, steps, factor)
        try:
            yield
        finally:
            self._burst = None

    def burst_scale(self, step: int) -> float:
        """The lr multiplier `lr_burst` puts on update `step` (1 outside a burst)."""
        if self._burst is None or not 0 <= step - self._burst[0] < self._burst[1]:
            return 1.0
        first, n, factor = self._burst
        return factor * (0.1 + 0.9 * _cosine((step - first) / n))

    def step(self, batch: DraftBatch | None) -> TrainStats:
        """One update. `batch=None` only with a collective: this rank contributes nothing this step."""
        device, cfg, coll = self.device, self.config, self.collective
        if batch is None and coll is None:
            raise ValueError("DraftTrainer.step(None): only a data-parallel trainer (collective=...) takes a step "
                             "without a batch; pass a DraftBatch")
        # 1) learning rate; the normaliser every rank agrees on (data-parallel)
        self.draft.train()
        lr = self.lr_at(self.steps_done) * self.burst_scale(self.steps_done)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        normalizer = coll.normalizer(batch, device) if coll is not None else None
        # 2) the loss, handed in; backward only where it is finite
        result = None
        if batch is not None:
            dtype = cfg.autocast_dtype(device)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                result = self.loss(self.draft, batch.to(device), self.embed, normalizer)
        self.optimizer.zero_grad(set_to_none=True)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if result is not None and bool(torch.isfinite(result.loss)):
            result.loss.backward()
        # 3) a collective sums the gradients and the stats over ranks (a non-finite rank's loss poisons the sum)
        if coll is not None:
            result = coll.reduce(params, result, device)
        # 4) clip and step, or skip a non-finite update
        grad_norm = float("nan")
        if bool(torch.isfinite(result.loss)):
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf")))
        skipped = not math.isfinite(grad_norm)
        if not skipped:
            self.optimizer.step()
            self.steps_done += 1
            faults.kill_point("draft_train")
        else:  # NaN/Inf features or loss: one update would make every weight NaN; keep the last good ones
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_nonfinite += 1
            warnings.warn(f"DraftTrainer.step: non-finite loss {float(result.loss.detach())} or gradient norm {grad_norm}: "
                          f"update skipped, weights kept ({self.skipped_nonfinite} skipped so far); check the captured "
                          "features (RolloutBatch.aux_hidden / teacher) for NaN/Inf", stacklevel=2)
        return TrainStats(step=self.steps_done, loss=float(result.loss.detach()),
                          step_loss=tuple(result.step_loss.tolist()), step_acc=tuple(result.step_acc.tolist()),
                          tokens=int(result.step_tokens[0]), grad_norm=grad_norm, lr=lr, skipped=skipped)

    def fit(self, batches: Iterable[DraftBatch], steps: int, progress: bool = True) -> list[TrainStats]:
        """Run `steps` updates, cycling over `batches` when it can be iterated again (a list);
        an iterator ends the run early when it is exhausted."""
        from tqdm.auto import tqdm

        history: list[TrainStats] = []
        bar = tqdm(total=steps, disable=not progress, desc="draft")
        while len(history) < steps:
            before = len(history)
            for batch in batches:
                history.append(self.step(batch))
                bar.update(1)
                bar.set_postfix(loss=f"{history[-1].loss:.3f}", acc=" ".join(f"{a:.2f}" for a in history[-1].step_acc))
                if len(history) == steps:
                    break
            if len(history) == before or iter(batches) is batches:
                break
        bar.close()
        return history

    def state_dict(self) -> dict:
        return {"draft": self.draft.state_dict(), "optimizer": self.optimizer.state_dict(),
                "steps_done": self.steps_done, "config": asdict(self.config)}

    def load_state_dict(self, state: dict) -> None:
        saved = {**asdict(TrainerConfig()), **state["config"]}  # fields added later take their defaults
        if saved != asdict(self.config):
            raise ValueError(f"trainer state was saved with config {state['config']},"
                             f" this trainer has {asdict(self.config)}")
        self.draft.load_state_dict(state["draft"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps_done = int(state["steps_done"])
