"""How much of the draft's training does the RL driver still wait for when the trainer is a Ray actor?

Per RL step the driver runs the policy's log-prob forward (captured for the draft) and backward on
one batch of sequences, hands the features to the adapter (`on_rollouts`), and calls
`on_step_end` (drop stale, train `train_steps` steps, no engine: no push). Exposed cost = driver
wall time inside the adapter's two calls. Arms: the in-process `LocalDraftWorker`, a synchronous
`RayDraftWorker`, and an asynchronous one (training overlaps the next step's policy work). On
this 2-core machine the actor shares the cores with the driver, so the overlap is bounded by
them. Medians over the steps after the first.

    RAY_AUTH_MODE=disabled OMP_NUM_THREADS=1 .venv/bin/python benchmarks/draft_actor_cost.py [--steps 6]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402


def run_arm(name: str, policy, draft_dir, args, ray_cfg) -> dict:
    from draftadapt.adapter import AdapterConfig, DraftAdapter
    from draftadapt.cache import CacheConfig
    from draftadapt.checkpoint import load_eagle3
    from draftadapt.ray_worker import RayDraftWorker
    from draftadapt.trainer import TrainerConfig

    acfg = AdapterConfig(train_steps=args.train_steps, batch_tokens=args.batch_tokens, min_tokens=0)
    tcfg, ccfg, embed = TrainerConfig(lr=5e-4), CacheConfig(max_tokens=200_000), policy.get_input_embeddings()
    worker = None
    if name == "local":
        adapter = DraftAdapter(load_eagle3(draft_dir), embed, acfg, tcfg, ccfg)
    else:
        worker = RayDraftWorker(load_eagle3(draft_dir), embed, tcfg, ccfg, acfg.batch_tokens, ray_cfg=ray_cfg,
                                asynchronous=name == "ray_async")
        adapter = DraftAdapter.with_worker(worker, acfg)
    g = torch.Generator().manual_seed(0)
    exposed, step_s, trained = [], [], 0
    for v in range(args.steps):
        t0 = time.perf_counter()
        ids = torch.randint(20, 1100, (args.sequences, args.seq_len), generator=g)
        mask, comp = torch.ones_like(ids), torch.zeros_like(ids, dtype=torch.bool)
        comp[:, 8:] = True
        with adapter.capture(policy) as cap:  # 1) the log-prob recompute, 2) the policy's backward
            logits = policy(input_ids=ids, attention_mask=mask).logits
        logits.logsumexp(-1).mean().backward()
        policy.zero_grad(set_to_none=True)
        t1 = time.perf_counter()
        adapter.on_rollouts(cap.rollout_batch(input_ids=ids, attention_mask=mask, completion_mask=comp,
                                              policy_version=v))
        stats = adapter.on_step_end(v)
        t2 = time.perf_counter()
        exposed.append(t2 - t1)
        step_s.append(t2 - t0)
        trained += stats.train.steps if stats.train is not None else 0
    if worker is not None:
        worker.state_dict()  # waits for a run still in flight
        worker.shutdown()
    med = lambda xs: statistics.median(xs[1:])  # noqa: E731
    return {"arm": name, "exposed_s": med(exposed), "step_s": med(step_s), "policy_work_s": med(step_s) - med(exposed),
            "draft_steps_reported": trained}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="RL steps per arm (the first is left out)")
    ap.add_argument("--sequences", type=int, default=64, help="sequences per RL step")
    ap.add_argument("--seq-len", type=int, default=112)
    ap.add_argument("--train-steps", type=int, default=4, help="draft optimizer steps per RL step")
    ap.add_argument("--batch-tokens", type=int, default=4096, help="tokens per draft optimizer step")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # else a first ray.init writes a token under ~/.ray
    import ray
    from transformers import AutoModelForCausalLM

    from draftadapt.ray_utils import RayConfig, init_ray
    from draftadapt.toy.draft import toy_draft
    from draftadapt.toy.policy import toy_policy

    torch.set_num_threads(1)
    policy_dir = toy_policy(progress=False)
    draft_dir = toy_draft(policy_dir, progress=False)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's unix sockets live under it
    ray_cfg = RayConfig(num_cpus=2, temp_dir=tmp, actor_cpus=1)
    try:
        init_ray(ray_cfg)
        rows = [run_arm(name, policy, draft_dir, args, ray_cfg) for name in ("local", "ray_sync", "ray_async")]
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    local = rows[0]["exposed_s"]
    for r in rows:
        r["exposed_vs_local"] = r["exposed_s"] / local
    cols = ["arm", "exposed_s", "exposed_vs_local", "policy_work_s", "step_s", "draft_steps_reported"]
    print(f"\ndraft-trainer exposed cost per RL step ({args.train_steps} draft steps x {args.batch_tokens} tokens, "
          f"{args.sequences}x{args.seq_len} tokens of policy work), torch threads 1 (driver) + 1 (actor), "
          f"{os.cpu_count()} cores, load avg {os.getloadavg()[0]:.1f}; medians of {args.steps - 1} steps")
    print_table(cols, [[r[c] for c in cols] for r in rows])
    write_json("draft_actor_cost", {"args": vars(args), "load_avg_1min": os.getloadavg()[0], "rows": rows})


if __name__ == "__main__":
    main()
