"""How long does a push take into one vs two vLLM engine actors (Ray), beside an in-process engine?

The toy policy with its EAGLE-3 draft (k=3) is served by two engine actors for the whole run.
Rounds alternate, so all arms see the same machine load: a draft push and a policy refit
(verified: validate, serialize, one object-store put, RPC, in-place reload, read-back checksum)
into an in-process engine in the driver (no Ray: the floor), into engine 0 alone, into both at
once (the pool's path: the RPCs in flight together), and into both one after another (what a
swapper without the concurrent path does). `draft_worker_ms` is the worker's receive + validate +
load + verify of engine 0, `draft_transport_ms` what is left after it and the driver's
validate + serialize (put, RPC, result, prefix-cache reset). Medians; the first push of each arm
(it also reads the start-up weights back as the rollback copy) is left out.

    RAY_AUTH_MODE=disabled OMP_NUM_THREADS=1 .venv/bin/python benchmarks/push_latency_ray.py [--rounds 8]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402


class Sequential:
    """An engine handle without `collective_rpc_async`: EngineSwapper pushes it in turn."""

    def __init__(self, handle):
        self.handle = handle

    def collective_rpc(self, method, args=(), kwargs=None):
        return self.handle.collective_rpc(method, args, kwargs)

    def reset_prefix_cache(self):
        return self.handle.reset_prefix_cache()

    def spec_counters(self):
        return self.handle.spec_counters()


def states(policy_dir, draft_dir, n: int):
    """`n` slightly different (draft, policy) states to alternate between, so every push changes weights."""
    from transformers import AutoModelForCausalLM

    from draftadapt.checkpoint import draft_state_for_push, load_eagle3

    draft = draft_state_for_push(load_eagle3(draft_dir))
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).state_dict()
    noisy = lambda s, i: {k: v + 1e-3 * i if v.is_floating_point() else v for k, v in s.items()}  # noqa: E731
    return [(noisy(draft, i), noisy(policy, i)) for i in range(n)]


def push_round(swapper, version: int, pair) -> dict[str, float]:
    """Seconds of one verified draft push and one policy refit, and the draft push's parts."""
    d = swapper.push_draft(pair[0], version)
    p = swapper.refit_policy(pair[1], version)
    assert d.pushed and d.verified and p.pushed and p.verified
    worker = sum(v for k, v in d.phases.items() if k.startswith("worker_"))
    return {"draft": d.seconds, "policy": p.seconds, "draft_worker": worker,
            "draft_transport": d.seconds - d.phases["validate"] - d.phases["serialize"] - worker}


def measure(cfg, pairs, rounds: int) -> dict[str, list[dict[str, float]]]:
    """Every arm once per round, in turn, so all see the same load; the in-process engine lives
    in this (driver) process beside the two actors."""
    from draftadapt.engine.ray_pool import RayEnginePool
    from draftadapt.engine.swap import EngineSwapper
    from draftadapt.engine.vllm import Engine
    from draftadapt.ray_utils import RayConfig

    with RayEnginePool(cfg, 2, RayConfig(actor_cpus=0.5)) as pool, Engine(cfg) as local:
        e0, e1 = pool.engines
        arms = {"in_process": [local], "ray_1_engine": [e0], "ray_2_engines": [e0, e1],
                "ray_2_engines_in_turn": [Sequential(e0), Sequential(e1)]}
        times: dict[str, list] = {name: [] for name in arms}
        version = 0
        for _ in range(rounds + 1):
            for name, engines in arms.items():
                version += 1
                times[name].append(push_round(EngineSwapper(engines), version, pairs[version % len(pairs)]))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=8, help="measured pushes per arm (one more is run and left out)")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # else a first ray.init writes a token under ~/.ray
    import ray

    from draftadapt.engine.vllm import EngineConfig, SpecConfig
    from draftadapt.ray_utils import RayConfig, init_ray
    from draftadapt.toy.draft import toy_draft
    from draftadapt.toy.policy import toy_policy

    policy_dir = toy_policy(progress=False)
    draft_dir = toy_draft(policy_dir, progress=False)
    cfg = EngineConfig(model=str(policy_dir), spec=SpecConfig("eagle3", 3, model=str(draft_dir)), max_num_seqs=8)
    pairs = states(policy_dir, draft_dir, 3)
    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's unix sockets live under it
    try:
        init_ray(RayConfig(num_cpus=2, temp_dir=tmp))
        times = measure(cfg, pairs, args.rounds)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    ms = lambda ts, key: 1e3 * statistics.median(t[key] for t in ts[1:])  # noqa: E731
    rows = [{"arm": name, "draft_push_ms": ms(ts, "draft"), "policy_refit_ms": ms(ts, "policy"),
             "draft_worker_ms": ms(ts, "draft_worker"), "draft_transport_ms": ms(ts, "draft_transport"),
             "first_draft_push_ms": 1e3 * ts[0]["draft"]} for name, ts in times.items()]
    base = {r["arm"]: r for r in rows}["ray_1_engine"]
    for r in rows:
        r["draft_vs_1_actor"] = r["draft_push_ms"] / base["draft_push_ms"]
        r["refit_vs_1_actor"] = r["policy_refit_ms"] / base["policy_refit_ms"]
    cols = ["arm", "draft_push_ms", "draft_worker_ms", "draft_transport_ms", "policy_refit_ms", "draft_vs_1_actor",
            "refit_vs_1_actor", "first_draft_push_ms"]
    print(f"\npush latency, toy policy (2.25M params) + EAGLE-3 draft, verified, medians of {args.rounds}; "
          f"torch threads 1 per engine, {os.cpu_count()} cores, load avg {os.getloadavg()[0]:.1f}")
    print_table(cols, [[r[c] for c in cols] for r in rows])
    write_json("push_latency_ray", {"args": vars(args), "load_avg_1min": os.getloadavg()[0], "rows": rows,
                                    "raw_seconds": times})


if __name__ == "__main__":
    main()
