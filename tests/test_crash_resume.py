"""[N] item 5: a GRPO run SIGKILLed at each named crash point resumes with nothing lost and no corrupt file.

Each kill is exact (draftadapt/faults.py: `DRAFTADAPT_KILL_AT=<point>:<n>`, the process SIGKILLs itself
the n-th time it reaches the point), placed in step 2 of a 3-step run so the resume starts from the
step-1 checkpoint. One uninterrupted reference run; per point: the killed run, then `--resume`, whose
logged rows must equal the reference's (every key that is not a wall time), whose files must all
load, and whose out dir must hold the reference's entries and nothing else (no temp dir either).
13 recipe processes (1 reference, 6 killed, 6 resumed): 250 CPU-s, ~9 min wall on 2 cores shared at load 6-8
(~4-5 min on an idle 2-core machine).
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "grpo_toy.py"
ARGS = ["run.steps=3", "run.checkpoint_every=1", "rollout.prompts_per_step=8", "rollout.group_size=4",
        "run.eval_prompts=16", "adapter.min_tokens=256", "adapter.batch_tokens=1024", "adapter.train_steps=2",
        "run.final_compare=false"]
# point -> hit that lands in step 2 (step 1 checkpointed): generate calls are the "before" measurement,
# step 1, step 2; one capture and one push per step; 2 draft optimizer steps per step; the first save
# has no old checkpoint to park, so the first swap is step 2's
KILLS = {"generation": 3, "capture": 2, "draft_train": 3, "push": 2, "checkpoint": 2, "checkpoint_swap": 1}
TIMED = ("time/", "seconds", "_per_s")  # wall times differ run to run; everything else must not


def _run(out: Path, *extra: str, kill: str | None = None) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "DRAFTADAPT_KILL_AT"}
    if kill:
        env["DRAFTADAPT_KILL_AT"] = kill
    p = subprocess.run([sys.executable, str(RECIPE), f"run.out_dir={out}", *extra, *ARGS], env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    return p.returncode, p.stdout


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _check_files_load(out: Path) -> None:
    """Every file the run left (temp dirs aside) opens with the reader its format has."""
    from safetensors.torch import load_file

    for f in out.rglob("*"):
        if not f.is_file() or any(part.startswith(".") for part in f.relative_to(out).parts):
            continue
        try:
            if f.suffix == ".safetensors":
                load_file(f)
            elif f.suffix == ".json":
                json.loads(f.read_text())
            elif f.suffix == ".jsonl":
                [json.loads(x) for x in f.read_text().splitlines()]
            elif f.suffix == ".pt":
                torch.load(f, weights_only=False)
        except Exception as exc:  # noqa: BLE001 - any failure to read is the finding
            raise AssertionError(f"{f.relative_to(out)} does not load: {exc}") from exc


@pytest.fixture(scope="module")
def reference(toy_policy_dir, toy_draft_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("crash") / "ref"
    rc, log = _run(out)
    assert rc == 0, log[-3000:]
    return out


@pytest.mark.parametrize("point", list(KILLS))
def test_a_run_killed_at_a_crash_point_resumes_with_nothing_lost(point, reference, tmp_path):
    out = tmp_path / "run"
    rc, log = _run(out, kill=f"{point}:{KILLS[point]}")
    assert rc == -signal.SIGKILL and f"SIGKILL at {point}" in log, f"rc {rc}; the kill did not land:\n{log[-3000:]}"
    logged = [1, 2] if point.startswith("checkpoint") else [1]  # a step's row is logged before its checkpoint
    assert [r["step"] for r in _rows(out)] == logged, "the kill was meant for step 2"
    rc, log = _run(out, "--resume")
    assert rc == 0, log[-3000:]
    assert "resumed at step 1" in log, f"the step-1 checkpoint did not survive the kill:\n{log[-3000:]}"
    rows, ref = _rows(out), _rows(reference)
    assert [r["step"] for r in rows] == [1, 2, 3]
    keys = sorted(k for k in ref[-1] if not any(t in k for t in TIMED))
    assert len(keys) > 30
    for got, want in zip(rows, ref):
        diff = {k: (got.get(k), want[k]) for k in keys if k in want and got.get(k) != want[k]}
        assert not diff, f"step {want['step']} after the resume differs from the uninterrupted run: {diff}"
    assert json.loads((out / "result.json").read_text()) == json.loads((reference / "result.json").read_text())
    _check_files_load(out)
    assert torch.load(out / "checkpoint" / "run_state.pt", weights_only=False)["step"] == 3
    names = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    assert names == {p.name for p in reference.iterdir()}, "stray or missing files after the resume"
    hidden = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert not hidden, f"a killed writer's leftovers outlived the resume: {hidden}"
