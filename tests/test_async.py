"""Async GRPO (policy lag 1): the rollout schedule with a fake engine, then the recipe on the real one."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from draftadapt.grpo.async_loop import Generated, RolloutSource
from draftadapt.grpo.loop import Rollouts
from draftadapt.metrics import SpecCounters


class FakeEngine:
    """Records which weights version sampled which step's batch, and refuses concurrent use."""

    def __init__(self):
        self.version, self.calls, self.busy = 0, [], threading.Lock()

    def generate(self, batch_step: int, version: int) -> Generated:
        assert self.busy.acquire(blocking=False), "two threads used the engine at once"
        try:
            assert version == self.version, f"asked for version {version}, the engine serves {self.version}"
            self.calls.append((batch_step, version, threading.current_thread().name))
            r = Rollouts([[1]], [[2, 3]], [[-0.5, -0.5]], torch.zeros(1), ["x"], 1, version, seconds=0.25)
            return Generated(r, SpecCounters(1, 3, 2, (1, 1, 0)))
        finally:
            self.busy.release()

    def refit(self, version: int) -> None:
        assert self.busy.acquire(blocking=False), "refit while a generation is in flight"
        self.version = version
        self.busy.release()


def drive(lag: int, steps: int = 4, fail_at: int | None = None):
    engine = FakeEngine()
    gen = engine.generate
    if fail_at is not None:
        def gen(s, v):
            if s == fail_at:
                raise OSError("engine died")
            return engine.generate(s, v)
    source = RolloutSource(gen, lag, steps)
    taken, spec = [], []
    try:
        for step in range(steps):
            taken.append(source.take(step).rollouts.policy_version)
            source.boundary()
            spec.append(source.spec.drafts)
            engine.refit(step + 1)  # the policy update made version step + 1
    finally:
        source.close()
    return engine.calls, taken, spec


def test_lag_one_trains_step_t_on_rollouts_of_version_t_minus_1_sampled_in_a_thread():
    calls, taken, spec = drive(lag=1)
    assert taken == [0, 0, 1, 2], "the first step has nothing sampled ahead; then every batch is one version behind"
    assert [(s, v) for s, v, _ in calls] == [(0, 0), (1, 0), (2, 1), (3, 2)]
    assert calls[0][2] == threading.current_thread().name and all("rollouts" in t for _, _, t in calls[1:])
    assert spec == [2, 1, 1, 0], "counters belong to the step in which their generation finished"


def test_lag_zero_is_the_synchronous_loop():
    calls, taken, spec = drive(lag=0)
    assert taken == [0, 1, 2, 3] and spec == [1, 1, 1, 1]
    assert {t for _, _, t in calls} == {threading.current_thread().name}


def test_a_failed_generation_is_raised_at_the_boundary_and_a_bad_lag_names_the_choices():
    with pytest.raises(OSError, match="engine died"):
        drive(lag=1, fail_at=2)
    with pytest.raises(ValueError, match="use 0 .* or 1"):
        RolloutSource(lambda s, v: None, 2, 4)


@pytest.mark.vllm
@pytest.mark.slow
def test_async_recipe_runs_with_lag_one_and_a_background_draft_worker(toy_policy_dir, toy_draft_dir, tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
    from grpo_toy import main

    res = main([f"run.out_dir={tmp_path}", "run.steps=3", "run.async_lag=1", "run.draft_worker=thread",
                "run.checkpoint_every=0", "run.eval_prompts=8", "rollout.prompts_per_step=4", "rollout.group_size=4",
                "adapter.min_tokens=256", "adapter.batch_tokens=1024", "adapter.train_steps=2"])
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # every batch trained at step t was sampled by version t-1 (step 0: nothing was sampled ahead)
    assert [r["version/rollouts"] for r in rows] == [0, 0, 1]
    assert [r["version/rollout_lag"] for r in rows] == [0, 1, 1]
    # features are made by the policy being trained (its recompute), so they are as fresh as in sync mode
    assert [r["version/features"] for r in rows] == [0, 1, 2]
    assert [r["draft/cache_lag_newest"] for r in rows] == [1, 1, 1]
    # the background worker: nothing finished at boundary 1; then each boundary pushes the previous run
    assert [r["draft/pushed"] for r in rows] == [0, 1, 1] and rows[-1]["draft/pushed_version"] == 3
    for r in rows[1:]:
        assert r["time/generation_exposed"] <= r["time/generation"], "a wait never outlasts the generation"
    assert rows[-1]["time/generation"] == 0.0, "nothing is sampled ahead of the last step"
    # the initial draft already drafts well (AL ~2.7): what must hold is that training and pushing
    # from the thread did not break it (a zeroed or NaN draft sits at 1.0); AL spread at this
    # sample size is <= 0.3 (DESIGN.md)
    frozen, adapted = res["frozen"]["spec_acceptance_length"], res["adapted"]["spec_acceptance_length"]
    assert adapted > frozen - 0.3, f"the adapted draft lost acceptance: {adapted:.2f} vs frozen {frozen:.2f}"
