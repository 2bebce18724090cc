"""Where each GRPO step's rollouts come from: sampled at the step's start (sync), or sampled during
the previous step by the previous weights (async, policy lag 1: one-step off-policy).

    source = RolloutSource(generate, lag=1, steps=N)   # generate(batch_step, version) -> Generated
    for step in range(N):
        g = source.take(step)          # this step's rollouts; lag 1: starts sampling step+1's in a thread
        ...                            # policy update on g.rollouts (the engine keeps sampling meanwhile)
        source.boundary()              # wait for that sampling: from here on the engine is idle
        ...                            # refit the policy, push the draft, checkpoint (source.ready)

The same shape as verl's one-step-off-policy recipe, NeMo-RL's async GRPO with
`max_trajectory_age_steps: 1` and PRIME-RL's `max_async_level: 1`: a batch sampled by version
t-1 trains version t; the importance ratio of the GRPO loss is taken against the rollout
log-probs, i.e. against the behaviour policy that sampled them. The engine is never used by two
threads at once: between `take` and `boundary` only the sampling thread calls it, so refits and
pushes (which are not safe while a generate call runs) belong after `boundary`. Lag 0 runs
everything on the caller's thread and is the plain synchronous loop. It knows nothing of the
policy update or of drafts.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, NamedTuple

from ..metrics import SpecCounters
from .loop import Rollouts

LAGS = (0, 1)


class Generated(NamedTuple):
    rollouts: Rollouts  # .policy_version: the engine's policy version that sampled them
    spec: SpecCounters  # spec-decode counters of this generation (a delta)


class RolloutSource:
    """Rollouts for each step, generated now (lag 0) or one step ahead in a thread (lag 1)."""

    def __init__(self, generate: Callable[[int, int], Generated], lag: int, steps: int, ready: Generated | None = None):
        """generate(batch_step, version): sample the rollouts of step `batch_step` with the engine,
        which serves policy `version`. ready: rollouts already generated for the first step taken
        (a resumed async run restores them from its checkpoint)."""
        if lag not in LAGS:
            raise ValueError(f"async lag {lag!r}: use 0 (synchronous) or 1 (one-step off-policy); a larger lag "
                             "needs a second engine to sample on while the first one is refitted")
        self.generate, self.lag, self.steps = generate, lag, steps
        self.ready = ready  # rollouts generated for the next step, not yet taken
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="draftadapt-rollouts") if lag else None
        self._future: Future | None = None
        self.exposed_seconds = 0.0  # this step: time the caller waited for generation
        self.generation_seconds = 0.0  # this step: wall time of the generation that finished in it
        self.spec = SpecCounters()  # this step: counters of the generation that finished in it

    def take(self, step: int) -> Generated:
        """Step `step`'s rollouts (the engine serves policy version `step`); lag 1 also starts
        sampling step+1's with these weights, which the caller must not touch until boundary()."""
        if self._future is not None:
            raise RuntimeError("take() while a generation is in flight: call boundary() at the end of each step")
        self.exposed_seconds, self.generation_seconds, self.spec = 0.0, 0.0, SpecCounters()
        if self.ready is None:  # sync: every step; async: the first step of a run
            t0 = time.perf_counter()
            g = self.generate(step, step)
            self._account(g, time.perf_counter() - t0)
        else:
            g, self.ready = self.ready, None
        if self.lag and step + 1 < self.steps:
            self._future = self._pool.submit(self.generate, step + 1, step)
        return g

    def boundary(self) -> None:
        """Wait for the generation in flight; the engine is idle when this returns."""
        if self._future is None:
            return
        t0 = time.perf_counter()
        future, self._future = self._future, None
        self.ready = future.result()  # a failure in the sampling thread is raised here
        self._account(self.ready, time.perf_counter() - t0)

    def _account(self, g: Generated, waited: float) -> None:
        self.exposed_seconds += waited
        self.generation_seconds += g.rollouts.seconds
        self.spec = self.spec + g.spec

    def close(self) -> None:
        """Wait for a generation still in flight (never leave one running into a shutdown)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
