"""Is the replay lab's oracle converged? Oracles for ONE recorded policy version, trained on more samples and for
more steps than the lab's, measured like the lab measures (held-out prompts, seeded samples, k=3, T=1).

The lab (`adaptation_replay.py`) calls "oracle" the initial draft fine-tuned on the next policy's own samples
(`--oracle-prompts` x 2 samples, `--oracle-steps` TTT steps). If a bigger budget still raises its acceptance
length (AL), the lab's frozen-to-oracle gap is understated and so is "the fraction of the gap closed" overstated.

    python benchmarks/oracle_convergence.py --trajectory runs/adaptation_replay/formal-only-s0-n10-lr0.0002 \\
        --version 10 --grid 768:300 768:600 1536:600 768:300:lag --repeats 2

A ":lag" oracle is trained on the previous version's samples and features: the ceiling of any online adapter,
which is always measured on a policy one update newer than its newest data.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import adaptation_replay as lab  # noqa: E402
from _common import print_table, stamp, write_json  # noqa: E402


def parse(point: str) -> tuple[int, int, bool]:
    """"768:300" -> (768, 300, False); "768:300:lag" -> (768, 300, True)."""
    parts = point.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "lag"):
        raise ValueError(f"--grid {point!r}: write prompts:steps or prompts:steps:lag, e.g. 768:300:lag")
    return int(parts[0]), int(parts[1]), len(parts) == 3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trajectory", type=Path, help="a recorded trajectory directory of the lab (required unless --against)")
    ap.add_argument("--version", type=int, default=10, help="policy version to train the oracles on")
    ap.add_argument("--grid", nargs="+", default=["768:300", "768:600", "1536:600"],
                    help="prompts:steps per oracle; a trailing :lag trains it on the samples and features of policy "
                         "version - 1 (what an online adapter has when it is measured on this version)")
    ap.add_argument("--repeats", type=int, default=2, help="oracles per grid point (fresh samples, seeds)")
    ap.add_argument("--eval-prompts", type=int, default=96)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--eval-seed", type=int, default=777)
    ap.add_argument("--name", default="oracle_convergence")
    ap.add_argument("--against", metavar="LAB_JSON", help="measure nothing: read the oracle JSONs named by --runs "
                    "(one per seed) and the lab's combined result, and report each lab arm's fraction of the "
                    "frozen -> (these oracles) gap at --version, with 95%% t intervals over seeds")
    ap.add_argument("--runs", nargs="+", default=[], help="with --against: oracle result names, seed order")
    args = ap.parse_args()
    if args.against:
        return against(args)
    if args.trajectory is None:
        ap.error("--trajectory is required (or --against LAB_JSON --runs ... to summarize)")
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from draftadapt.checkpoint import draft_state_for_push, load_eagle3
    from draftadapt.engine.swap import EngineSwapper
    from draftadapt.engine.vllm import Engine, EngineConfig, SpecConfig
    from draftadapt.replay import Trajectory
    from draftadapt.toy.draft import toy_draft
    from draftadapt.toy.eval import encode_prompt, eval_problems
    from draftadapt.toy.policy import toy_policy
    from draftadapt.toy.task import TaskConfig

    traj = Trajectory(args.trajectory)
    tok_dir = toy_policy()
    draft_dir = toy_draft(tok_dir)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    policy = AutoModelForCausalLM.from_pretrained(traj.policy_dir(args.version), dtype=torch.float32).eval()
    previous = AutoModelForCausalLM.from_pretrained(traj.policy_dir(args.version - 1), dtype=torch.float32).eval()
    task = TaskConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in traj.meta["config"]["task"].items()})
    prompts = [encode_prompt(tok, p.prompt) for p in eval_problems(args.eval_prompts, seed=4321, cfg=task)]
    rows, version = [], 0
    with Engine(EngineConfig(model=str(traj.policy_dir(args.version)), tokenizer=str(tok_dir), max_num_seqs=64,
                             seed=0, spec=SpecConfig("eagle3", 3, model=str(draft_dir)))) as engine:
        swapper = EngineSwapper(engine)
        version += 1
        frozen = lab.measure(swapper, engine, draft_state_for_push(load_eagle3(draft_dir)), version, prompts, tok,
                             args)[0].acceptance_length
        print(f"frozen initial draft: AL {frozen:.3f}", flush=True)
        for r in range(args.repeats):
            for point in args.grid:  # grid points interleaved within a repeat
                n_prompts, steps, lag = parse(point)
                torch.manual_seed(1000 * r + steps)
                cfg = argparse.Namespace(oracle_prompts=n_prompts, oracle_steps=steps)
                source = previous if lag else policy
                if lag:  # the engine samples the previous policy for this oracle's data
                    version += 1
                    swapper.refit_policy(previous.state_dict(), version)
                draft, seconds = lab.oracle_draft(engine, tok, source, draft_dir, cfg, args.version + 1000 * r, task)
                version += 1
                if lag:
                    swapper.refit_policy(policy.state_dict(), version)
                al = lab.measure(swapper, engine, draft_state_for_push(draft), version, prompts, tok,
                                 args)[0].acceptance_length
                rows.append({"point": point, "prompts": n_prompts, "steps": steps, "lag": lag, "repeat": r, "al": al,
                             "train_seconds": seconds,
                             "load_average": os.getloadavg()})
                print(f"  repeat {r} oracle {point}: AL {al:.3f} ({seconds:.0f} s)", flush=True)
    table = []
    for point in args.grid:
        n_prompts, steps, lag = parse(point)
        als = [x["al"] for x in rows if x["point"] == point]
        table.append([n_prompts, steps, lag, sum(als) / len(als), min(als), max(als), sum(als) / len(als) - frozen])
    print_table(["prompts", "steps", "previous policy", "mean AL", "min", "max", "- frozen"], table)
    write_json(args.name, {"stamp": stamp(), "args": {k: str(v) for k, v in vars(args).items()},
                           "trajectory": traj.meta.get("reward"), "frozen_al": frozen, "rows": rows,
                           "table": table})
    print(json.dumps({"frozen": frozen}))


def against(args) -> None:
    """Fractions of the gap to these oracles closed by the lab's arms (paired by seed, same measurement)."""
    from _common import RESULTS
    from replay_stats import t_interval

    lab_runs = json.loads((RESULTS / f"{args.against}.json").read_text())["runs"]
    seeds = sorted(lab_runs, key=lambda k: int(k.split("/")[1]))
    oracles = [json.loads((RESULTS / f"{n}.json").read_text()) for n in args.runs]
    if len(oracles) != len(seeds):
        raise ValueError(f"--runs names {len(oracles)} oracle results for {len(seeds)} lab seeds {seeds}")
    rows = [next(r for r in lab_runs[k] if r["version"] == args.version) for k in seeds]
    for point in sorted({x["point"] for o in oracles for x in o["rows"]}):
        al = [sum(x["al"] for x in o["rows"] if x["point"] == point) / max(1, sum(x["point"] == point for x in o["rows"]))
              for o in oracles]
        gaps = [a - r["al"]["frozen"] for a, r in zip(al, rows)]
        table = [[arm, *t_interval([(r["al"][arm] - r["al"]["frozen"]) / g for r, g in zip(rows, gaps)])]
                 for arm in rows[0]["al"] if arm not in ("frozen",)]
        print(f"oracle {point} at v{args.version}: gap over frozen [mean, lo, hi] "
              f"{[round(float(x), 3) for x in t_interval(gaps)]}")
        print_table(["arm", "fraction of that gap", "ci lo", "ci hi"], table)
        write_json(f"{args.name}_{point.replace(':', '-')}", {"stamp": stamp(), "lab": args.against, "runs": args.runs,
                                                              "version": args.version, "oracle_al": al, "gaps": gaps,
                                                              "gap": t_interval(gaps), "fractions": table})


if __name__ == "__main__":
    main()
