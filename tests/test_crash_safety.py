"""Crash safety under SIGKILL (no exception handler runs): what was written before stays loadable.

Covered here: a draft export killed at random instants mid-write (atomic_write_dir: temp dir,
fsync, os.replace), and the GRPO recipe killed at six exact places (draftadapt/faults.py:
mid-generation, mid-capture, mid-draft-train, mid-push, mid-checkpoint-write, between parking the
old checkpoint and moving the new one in), each resumed with `--resume` and compared row for row
with an uninterrupted run (tests/test_crash_resume.py). The preinit pipeline's resume after
injected exceptions is tested in tests/test_preinit_pipeline.py.
"""
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

WRITER = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, sys.argv[1])
    from conftest import tiny_config
    from draftadapt.checkpoint import save_eagle3
    from draftadapt.drafts.eagle3 import Eagle3Draft
    cfg = tiny_config("llama", layers=8, hidden=256, vocab=4096)
    draft = Eagle3Draft.from_target(cfg)
    i = 0
    while True:
        i += 1
        with torch.no_grad():
            for p in draft.parameters():
                p.fill_(float(i))
        save_eagle3(draft, sys.argv[2], cfg)
        print(i, flush=True)
""")


@pytest.mark.slow  # 5 writer processes (~5 s each idle, a minute on a loaded machine)
def test_a_draft_export_killed_mid_write_leaves_the_previous_version_loadable(tmp_path):
    from draftadapt.checkpoint import load_eagle3

    out, rng = tmp_path / "draft", random.Random(0)
    tests = os.path.dirname(os.path.abspath(__file__))
    for kill in range(5):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, tests, str(out)], stdout=subprocess.PIPE, text=True,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
        written = [int(proc.stdout.readline())]  # at least one complete export before the kill
        time.sleep(rng.uniform(0.0, 0.3))  # a write takes ~10-100 ms: land anywhere in one
        proc.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate(timeout=60)
        written += [int(x) for x in rest.split()]
        assert proc.returncode == -signal.SIGKILL
        draft = load_eagle3(out)  # never a half-written file
        values = {float(p.flatten()[0]) for p in draft.parameters()}
        assert len(values) == 1, f"kill {kill}: tensors of different versions in one checkpoint: {values}"
        v = values.pop()
        assert v in (written[-1], written[-1] + 1), f"kill {kill}: loaded version {v}, last finished {written[-1]}"
        assert all(torch.isfinite(p).all() for p in draft.parameters())
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "draft"]
    assert all(n.startswith(".draft.") for n in leftovers), leftovers  # hidden temp dirs only, never the target


def test_a_kill_between_park_and_swap_is_recovered_on_the_next_load_or_write(tmp_path):
    """The one window rename-based atomicity leaves: the old dir parked, the new one not yet in."""
    from conftest import tiny_config

    from draftadapt.checkpoint import load_eagle3, save_eagle3
    from draftadapt.drafts.eagle3 import Eagle3Draft

    cfg = tiny_config("llama", layers=8, hidden=64)
    draft = Eagle3Draft.from_target(cfg)
    out = save_eagle3(draft, tmp_path / "draft", cfg)
    os.replace(out, tmp_path / ".draft.old-deadbeef")  # killed right after parking
    with pytest.warns(UserWarning, match="restored the previous checkpoint"):
        back = load_eagle3(out)
    assert torch.equal(back.fc.weight, draft.fc.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["draft"]


def test_a_kill_point_fires_exactly_at_its_nth_hit_and_is_inert_unset():
    code = ("import draftadapt.faults as f\n"
            "for i in range(3):\n"
            "    f.kill_point('draft_train'); f.kill_point('capture'); print(i, flush=True)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    armed = subprocess.run([sys.executable, "-c", code], env={**env, "DRAFTADAPT_KILL_AT": "capture:2"},
                           capture_output=True, text=True, timeout=60)
    assert armed.returncode == -signal.SIGKILL and armed.stdout.split() == ["0"], armed
    assert "SIGKILL at capture (hit 2)" in armed.stderr
    env.pop("DRAFTADAPT_KILL_AT", None)
    unset = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert unset.returncode == 0 and unset.stdout.split() == ["0", "1", "2"], unset
    bad = subprocess.run([sys.executable, "-c", code], env={**env, "DRAFTADAPT_KILL_AT": "capturing:1"},
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "use <point>:<n>" in bad.stderr and "'draft_train'" in bad.stderr


def test_a_resume_finds_the_checkpoint_a_killed_save_left_parked(tmp_path):
    """Killed between parking checkpoint v and moving v+1 in: has_checkpoint restores v (it used to
    answer False, and a --resume silently started the run over)."""
    from conftest import tiny_model

    from draftadapt.grpo.state import has_checkpoint, load_run, save_run

    policy = tiny_model(layers=2, hidden=32)
    opt = torch.optim.AdamW(policy.parameters())
    ckpt = tmp_path / "checkpoint"
    save_run(ckpt, 1, policy, opt)
    os.replace(ckpt, tmp_path / ".checkpoint.old-0123abcd")
    with pytest.warns(UserWarning, match="restored the previous checkpoint"):
        assert has_checkpoint(ckpt)
    assert load_run(ckpt, policy, opt).step == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_a_resume_removes_what_killed_saves_left_beside_the_checkpoint(tmp_path):
    """A save killed mid-write leaves its temp dir; one killed after the swap, the parked old
    version. At real sizes each is a whole checkpoint: load_run (a resume) removes both."""
    from conftest import tiny_model

    from draftadapt.grpo.state import load_run, save_run

    policy = tiny_model(layers=2, hidden=32)
    opt = torch.optim.AdamW(policy.parameters())
    ckpt = tmp_path / "checkpoint"
    save_run(ckpt, 1, policy, opt)
    for junk in (".checkpoint.tmp-abc123", ".checkpoint.old-0123abcd"):
        (tmp_path / junk / "policy").mkdir(parents=True)
    (tmp_path / ".other.tmp-x").mkdir()  # another writer's: not ours to remove
    assert load_run(ckpt, policy, opt).step == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-x", "checkpoint"]


def test_the_run_log_survives_a_torn_last_line_and_truncates_atomically(tmp_path):
    from draftadapt.grpo.runlog import RunLogger

    log = RunLogger(tmp_path, tensorboard=False)
    for step in (1, 2, 3):
        log.log(step, {"reward": float(step)})
    with log.path.open("a") as f:
        f.write('{"step": 4, "rew')  # the write a SIGKILL cut short
    assert [r["step"] for r in log.rows()] == [1, 2, 3]
    log.truncate_after(2)
    assert [r["step"] for r in log.rows()] == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temp file left
    log.path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        log.rows()


def test_every_kill_point_sits_in_the_library_once():
    """A point named in faults.POINTS but placed nowhere (or misspelt at its call site) would make its
    crash test kill nothing: each appears exactly once as a literal in the library's code."""
    import re
    from pathlib import Path

    from draftadapt.faults import POINTS

    src = Path(__file__).resolve().parents[1] / "draftadapt"
    calls = [m for f in src.rglob("*.py") if f.name != "faults.py"
             for m in re.findall(r"(?:kill_point|killing_after_first|progress_factory)\(([^)]*)\)", f.read_text())]
    named = [re.search(r"\"(\w+)\"", c).group(1) for c in calls]
    assert sorted(named) == sorted(POINTS), named
