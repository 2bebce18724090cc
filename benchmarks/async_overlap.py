"""How much do two threads of this process overlap: generation or draft training beside a policy update?

The GRPO-level benchmark (async_vs_sync.py) measures whole steps, which on a shared machine
swing with the other jobs' load. This one isolates the mechanism in one process with one engine
and fixed work (a fixed rollout batch, a policy update with lr 0, the draft's `train_steps`
optimizer steps), interleaving `reps` rounds of: each piece alone, then the policy update on the
main thread with the other piece in a thread. Overlap = (alone_a + alone_b - together) /
min(alone_a, alone_b): 1 = the shorter one fully hidden, 0 = no better than one after the other,
< 0 = worse. Medians over the rounds; the load average is recorded.

    .venv/bin/python benchmarks/async_overlap.py [--reps 3] [recipe overrides ...]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "recipes"))
from _common import print_table, write_json  # noqa: E402


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def together(main_fn, thread_fn) -> float:
    """Wall time of main_fn on this thread while thread_fn runs in another."""
    errors: list[BaseException] = []

    def target():
        try:
            thread_fn()
        except BaseException as exc:  # noqa: B036 - re-raised on the main thread
            errors.append(exc)

    t0 = time.perf_counter()
    th = threading.Thread(target=target)
    th.start()
    main_fn()
    th.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--switch-interval", type=float, default=None,
                    help="sys.setswitchinterval (s; Python's default 0.005): how soon a thread waiting for the GIL gets it")
    ap.add_argument("--name", default="async_overlap", help="results/<name>.json")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    import torch
    from grpo_toy import ROOT as RECIPES_ROOT, load_config, rollouts, step_problems
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from draftadapt.adapter import DraftAdapter
    from draftadapt.checkpoint import load_eagle3
    from draftadapt.engine.vllm import Engine, EngineConfig, SpecConfig
    from draftadapt.grpo.loop import policy_update
    from draftadapt.toy.draft import toy_draft
    from draftadapt.toy.policy import toy_policy

    cfg = load_config(str(RECIPES_ROOT / "recipes" / "grpo_toy.yaml"), args.overrides)
    policy_dir = toy_policy()
    draft_dir = toy_draft(policy_dir, cfg.draft)
    tok = AutoTokenizer.from_pretrained(policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    opt = torch.optim.AdamW(policy.parameters(), lr=0.0)  # the same work every round
    spec = SpecConfig("eagle3", cfg.rollout.num_speculative_tokens, model=str(draft_dir))
    engine = Engine(EngineConfig(model=str(policy_dir), spec=spec, max_num_seqs=cfg.rollout.max_num_seqs,
                                 max_model_len=512))
    try:
        problems = step_problems(cfg, 0)
        r = rollouts(engine, tok, problems, cfg, version=0, seed=1)
        adapter = DraftAdapter(load_eagle3(draft_dir), policy.get_input_embeddings(), cfg.adapter, cfg.trainer,
                               cfg.cache)
        policy_update(policy, opt, r, tok.pad_token_id, cfg.update, adapter)  # fills the draft's cache
        work = {"generation": lambda: rollouts(engine, tok, problems, cfg, version=0, seed=1),
                "policy update": lambda: policy_update(policy, opt, r, tok.pad_token_id, cfg.update),
                "draft training": lambda: adapter.worker.train(cfg.adapter.train_steps)}
        t: dict[str, list[float]] = {k: [] for k in [*work, "update + generation", "update + draft"]}
        load = [os.getloadavg()[0]]
        for _ in range(args.reps):
            for name, fn in work.items():
                t[name].append(timed(fn))
            t["update + generation"].append(together(work["policy update"], work["generation"]))
            t["update + draft"].append(together(work["policy update"], work["draft training"]))
            load.append(os.getloadavg()[0])
    finally:
        engine.shutdown()
    med = {k: statistics.median(v) for k, v in t.items()}
    rows = []
    for other, pair in (("generation", "update + generation"), ("draft training", "update + draft")):
        a, b, both = med["policy update"], med[other], med[pair]
        rows.append([f"policy update + {other} (thread)", a, b, a + b, both, (a + b - both) / min(a, b)])
    print(f"\nmedians of {args.reps} interleaved rounds, seconds; torch threads {torch.get_num_threads()}, "
          f"load average {min(load):.1f}..{max(load):.1f} on {os.cpu_count()} CPUs")
    print_table(["pair", "update alone", "other alone", "serial sum", "together", "overlap"], rows)
    write_json(args.name, {"args": vars(args), "switch_interval": sys.getswitchinterval(), "torch_threads": torch.get_num_threads(),
                                 "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "load_average": load,
                                 "seconds": t, "medians": med,
                                 "overlap": {row[0]: row[-1] for row in rows}})


if __name__ == "__main__":
    main()
