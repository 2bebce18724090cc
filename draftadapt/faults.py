"""Deterministic crash points for crash-safety tests; knows nothing of the code that calls it.

`DRAFTADAPT_KILL_AT=<point>:<n>` makes the process SIGKILL itself the n-th time (1-based) it
reaches the named point, so a test can crash a run at an exact place - mid-capture, mid-draft-
train, mid-push, mid-checkpoint-write, mid-generation - with no exception handler, `finally` or
atexit running: the crash a preempted node or the OOM killer gives. The variable is read once,
at import; unset (always, outside such tests) `kill_point` is one global test and a return.

Hits are counted per process: with vLLM's multiprocessing on, the engine's worker process (where
the push point sits) counts its own and dies alone; the crash-safety test runs engines in-process,
so every point takes the whole run down.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Iterable, Iterator, TypeVar

ENV = "DRAFTADAPT_KILL_AT"
POINTS = {  # name -> where it sits, what has happened when it fires
    "capture": "capture.FeatureCapture.rollout_batch: features hooked out of the policy forward, not yet cached",
    "draft_train": "trainer.DraftTrainer.step: one draft optimizer step taken, the next not",
    "push": "engine/swap_worker.py: inside a draft push, the first new tensor loaded into the engine, the rest not",
    "checkpoint": "grpo/state.save_run: inside the checkpoint write, the policy written, the run state not",
    "checkpoint_swap": "atomic.atomic_write_dir: the old checkpoint parked, the new one not yet moved in",
    "generation": "engine/vllm.Engine.generate: the first request of the call finished, the others still running",
}
T = TypeVar("T")


def _parse(raw: str | None) -> tuple[str, int] | None:
    if not raw:
        return None
    point, _, n = raw.partition(":")
    if point not in POINTS or not n.isdigit() or int(n) < 1:
        raise ValueError(f"{ENV}={raw!r}: use <point>:<n> with n >= 1 and a point of {sorted(POINTS)}")
    return point, int(n)


_ARMED = _parse(os.environ.get(ENV))
_hits = 0


def armed(point: str) -> bool:
    """True when this process is set to die at `point` (callers use it to skip wrapping work)."""
    return _ARMED is not None and _ARMED[0] == point


def kill_point(point: str) -> None:
    """SIGKILL this process if `point` is the armed one and this is its n-th hit; else nothing."""
    global _hits
    if _ARMED is None or _ARMED[0] != point:
        return
    assert point in POINTS, point
    _hits += 1
    if _hits == _ARMED[1]:
        sys.stderr.write(f"draftadapt.faults: SIGKILL at {point} (hit {_hits})\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def killing_after_first(items: Iterable[T], point: str) -> Iterable[T]:
    """`items` unchanged unless `point` is armed; then a stream that hits it after its first item."""
    return _after_first(items, point) if armed(point) else items


def _after_first(items: Iterable[T], point: str) -> Iterator[T]:
    for i, item in enumerate(items):
        if i == 1:
            kill_point(point)
        yield item


class FirstUpdateKills:
    """A stand-in for a tqdm bar (what vLLM's `LLM.generate(use_tqdm=<factory>)` drives): it hits
    `point` at its first update - in vLLM, when the first request of the call has finished."""

    def __init__(self, point: str, total: int = 0, **_):
        self.point, self.total, self.n, self.postfix = point, total, 0, ""
        self.format_dict = {"elapsed": 1.0}  # vLLM divides by it for its speed estimate

    def update(self, n: int = 1) -> None:
        first, self.n = self.n == 0, self.n + n
        if first:
            kill_point(self.point)

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass


def progress_factory(point: str):
    """What to pass as `use_tqdm`: False unless `point` is armed, else a FirstUpdateKills factory."""
    if not armed(point):
        return False

    def make(iterable=None, **kw):  # vLLM also wraps the prompts it adds: pass those through untouched
        return iterable if iterable is not None else FirstUpdateKills(point, **kw)

    return make
