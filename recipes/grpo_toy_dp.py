"""Data-parallel GRPO on the toy task: W policy ranks, ONE draft owner, one vLLM engine.

    python recipes/grpo_toy_dp.py [--ranks 2] [--mode owner|data_parallel] [section.field=value ...]
    torchrun --nproc_per_node 2 recipes/grpo_toy_dp.py [...]      # the same, launched by torchrun

The layout of a real run at toy size: every rank holds a DDP replica of the policy (gloo on CPU,
NCCL on GPUs), samples nothing itself, trains on its share of the step's prompt groups and
captures its own log-prob recompute for the draft; rank 0 also drives the engine (rollouts,
policy refit) and owns the draft (`DistributedDraftAdapter`): it is the only pusher, and every
rank's on_step_end returns its stats. Same config sections as `recipes/grpo_toy.py`.

Reads top to bottom: 1) process group, 2) policy replica, engine and adapter, 3) the loop
(rollouts on rank 0 -> broadcast -> each rank's share -> update with capture -> refit ->
adapter step), 4) the push log and the per-rank token counts.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "recipes"))

from grpo_toy import load_config, rollouts, step_problems  # noqa: E402

from draftadapt.checkpoint import load_eagle3  # noqa: E402
from draftadapt.distributed import MODES, DistributedDraftAdapter  # noqa: E402
from draftadapt.grpo.loop import Rollouts, policy_update  # noqa: E402


def share(r: Rollouts, rank: int, world: int) -> Rollouts:
    """Rank `rank`'s prompt groups (whole groups: advantages are normalised within a group)."""
    g = r.group_size
    rows = [i for grp in range(rank, len(r.prompts) // g, world) for i in range(grp * g, (grp + 1) * g)]
    pick = lambda xs: [xs[i] for i in rows]  # noqa: E731
    return Rollouts(pick(r.prompts), pick(r.completions), pick(r.logprobs), r.rewards[rows], pick(r.texts), g,
                    r.policy_version, r.seconds)


def run(rank: int, world: int, argv: list[str]) -> dict | None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "recipes" / "grpo_toy.yaml"))
    ap.add_argument("--mode", default="owner", choices=MODES)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    torch.set_num_threads(cfg.run.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from draftadapt.toy.draft import toy_draft
    from draftadapt.toy.policy import toy_policy

    # 2) the same policy replica on every rank; the engine and the draft's sink on rank 0 only
    policy_dir = toy_policy(progress=False)  # cached by prepare() before the process group formed
    draft_dir = toy_draft(policy_dir, cfg.draft, progress=False)
    tok = AutoTokenizer.from_pretrained(policy_dir)
    torch.manual_seed(cfg.run.seed)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    ddp = torch.nn.parallel.DistributedDataParallel(policy)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas)
    engine = swapper = None
    if rank == 0:
        from draftadapt.engine.vllm import Engine, EngineConfig, SpecConfig
        from draftadapt.engine.swap import EngineSwapper

        spec = SpecConfig("eagle3", cfg.rollout.num_speculative_tokens, model=str(draft_dir))
        # its own process: an in-process vLLM would build its groups on this process group and hang
        engine = Engine(EngineConfig(model=str(policy_dir), spec=spec, max_num_seqs=cfg.rollout.max_num_seqs,
                                     max_model_len=512, seed=cfg.run.seed, multiprocessing=True))
        swapper = EngineSwapper([engine])
    adapter = DistributedDraftAdapter(load_eagle3(draft_dir), policy.get_input_embeddings(), cfg.adapter, cfg.trainer,
                                      cfg.cache, sink=swapper, mode=args.mode)
    # 3) the loop
    log = []
    for step in range(cfg.run.steps):
        t0 = time.perf_counter()
        box = [None, None]
        if rank == 0:
            c0 = swapper.spec_counters()
            r = rollouts(engine, tok, step_problems(cfg, step), cfg, version=step, seed=cfg.run.seed * 7919 + step)
            box = [r, swapper.spec_counters() - c0]
        dist.broadcast_object_list(box, src=0)
        r, spec = share(box[0], rank, world), box[1]
        upd = policy_update(ddp, optimizer, r, tok.pad_token_id, cfg.update, adapter, policy_version=step)
        version = step + 1
        if rank == 0:
            swapper.refit_policy(policy.state_dict(), version)
        t_draft = time.perf_counter()
        stats = adapter.on_step_end(step, counters=spec)
        t_draft = time.perf_counter() - t_draft
        row = {"rank": rank, "step": step, "sequences": len(r.completions), "rollout_tokens": r.num_tokens,
               "reward": float(r.rewards.mean()), "owner_cache_sequences": stats.cache.sequences,
               "loss": upd.loss, "pushed": stats.pushed, "push_reason": stats.push_reason,
               "pushed_version": stats.last_pushed_version, "owner_cache_tokens": stats.cache.tokens,
               "owner_train_tokens": stats.train.tokens if stats.train else 0, "time/draft_exposed": t_draft,
               "time/step": time.perf_counter() - t0, "spec_acceptance_length": spec.acceptance_length}
        rows = [None] * world
        dist.all_gather_object(rows, row)
        log.append(rows)
        if rank == 0:
            print(" | ".join(f"rank {x['rank']}: {x['rollout_tokens']} tok, pushed={x['pushed']}" for x in rows)
                  + f" | owner cache {row['owner_cache_tokens']} tok, trained {row['owner_train_tokens']} tok,"
                  f" AL {row['spec_acceptance_length']:.2f}", flush=True)
    if engine is not None:
        engine.shutdown()
    return {"mode": args.mode, "world": world, "log": log, "pushes": None if swapper is None else swapper_pushes(log)}


def swapper_pushes(log: list[list[dict]]) -> list[int]:
    """Versions the owner pushed, one entry per push."""
    return [rows[0]["step"] for rows in log if rows[0]["pushed"]]


def prepare(argv: list[str]) -> None:
    """Build (or find cached) the toy policy and first draft, BEFORE the process group forms: their
    builders start an in-process vLLM engine, which would take the recipe's process group for its own."""
    from draftadapt.toy.draft import toy_draft
    from draftadapt.toy.policy import toy_policy

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "recipes" / "grpo_toy.yaml"))
    ap.add_argument("--mode", default="owner")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args(argv)
    toy_draft(toy_policy(), load_config(args.config, args.overrides).draft)


def _spawned(rank: int, world: int, store: str, argv: list[str], out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        result = run(rank, world, argv)
        if rank == 0:
            Path(out).write_text(json.dumps(result, indent=1))
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2, help="policy ranks to spawn (ignored under torchrun)")
    ap.add_argument("--out", default="runs/grpo_toy_dp/result.json")
    known, rest = ap.parse_known_args(argv)
    Path(known.out).parent.mkdir(parents=True, exist_ok=True)
    if "RANK" in os.environ:  # torchrun: the other ranks wait in init_process_group while rank 0 prepares
        if os.environ["RANK"] == "0":
            prepare(rest)
        dist.init_process_group("gloo")
        result = run(dist.get_rank(), dist.get_world_size(), rest)
        if dist.get_rank() == 0:
            Path(known.out).write_text(json.dumps(result, indent=1))
        dist.destroy_process_group()
        return result
    import torch.multiprocessing as mp

    prepare(rest)
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_spawned, args=(known.ranks, os.path.join(tmp, "store"), rest, known.out),
                           nprocs=known.ranks, start_method="spawn")
    return json.loads(Path(known.out).read_text())


if __name__ == "__main__":
    main()
