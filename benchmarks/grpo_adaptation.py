"""Does online adaptation keep the draft matched to a drifting policy? (GRPO on the toy task)

For each reward (style: correct + 1 for any verbose completion, the drift case; correct: correctness only,
the sharpening case) and each seed, runs the GRPO recipe twice: draft adapted online, and the
same initial draft kept frozen. Reports the acceptance length over the steps of both arms, and
the paired adaptation gain on the FINAL policy of the adapted run (same prompts, same seeded
samples): AL(adapted) - AL(frozen initial draft). Optional arms: a generic-domain initial draft
(the UltraChat analogue) adapted online, and plain decoding (k=0) for rollout tokens/s and the
rollout-vs-recompute log-prob mismatch without spec decode.

    .venv/bin/python benchmarks/grpo_adaptation.py [--steps 30] [--seeds 0 1] [--rewards style correct]
                                                   [--generic] [--no-spec]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, print_table, write_json  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "grpo_toy.py"
# style: +1 for any verbose completion, right or wrong (the toy's verbose answers are rarely right, so a bonus on
# correct verbose answers alone does not move its style); correct: correctness only (the policy sharpens)
REWARDS = {"style": ["reward.verbose_bonus=0", "reward.verbose_reward=1"],
           "correct": ["reward.verbose_bonus=0", "reward.verbose_reward=0"]}


def run_arm(out: Path, steps: int, seed: int, overrides: list[str], reuse: bool = False) -> dict:
    """Runs the arm from scratch unless `reuse` (then a finished run in `out` is read back)."""
    cmd = [sys.executable, str(RECIPE), f"run.out_dir={out}", f"run.steps={steps}", f"run.seed={seed}",
           "run.checkpoint_every=5", "--resume", *overrides]
    reused = reuse and (out / "result.json").exists()
    if not reused:
        shutil.rmtree(out, ignore_errors=True)  # a benchmark measures when it runs
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {"rows": rows, "result": json.loads((out / "result.json").read_text()), "command": cmd[1:],
            "reused": reused}


def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--rewards", nargs="+", default=["style", "correct"], choices=sorted(REWARDS))
    ap.add_argument("--generic", action="store_true", help="also: generic (chat) initial draft, adapted")
    ap.add_argument("--no-spec", action="store_true", help="also: plain decoding arm (k=0)")
    ap.add_argument("--reuse", action="store_true", help="read finished arms back instead of re-running them")
    args = ap.parse_args()
    base = RESULTS / "grpo_adaptation"
    arms = {"adapted": ["run.adapt=true"], "frozen": ["run.adapt=false"]}
    extra = {}  # run once, on the first reward and seed
    if args.generic:
        extra["generic-adapted"] = ["run.adapt=true", "draft.domain=chat"]
    if args.no_spec:
        extra["no-spec"] = ["rollout.num_speculative_tokens=0"]
    runs, table = {}, []
    for reward in args.rewards:
        for seed in args.seeds:
            first = reward == args.rewards[0] and seed == args.seeds[0]
            for arm, ov in {**arms, **(extra if first else {})}.items():
                r = run_arm(base / f"{reward}-{arm}-s{seed}", args.steps, seed, [*REWARDS[reward], *ov], args.reuse)
                runs[f"{reward}/{arm}/{seed}"] = r
                rows, res = r["rows"], r["result"]
                final = res.get("adapted") or res.get("frozen") or {}
                gain = None
                if res.get("adapted") and res.get("frozen"):
                    gain = res["adapted"]["spec_acceptance_length"] - res["frozen"]["spec_acceptance_length"]
                table.append([reward, seed, arm, res["before"]["accuracy"], res["after"]["accuracy"],
                              rows[0].get("spec_acceptance_length"), mean(x.get("spec_acceptance_length") for x in rows[-5:]),
                              final.get("spec_acceptance_length"), gain,
                              mean(x.get("rollout_tokens_per_s") for x in rows), mean(x.get("logprob_mismatch") for x in rows),
                              rows[0].get("style/verbose"), mean(x.get("style/verbose") for x in rows[-5:])])
    print_table(["reward", "seed", "arm", "acc before", "acc after", "AL step 1", "AL last 5",
                 "AL final policy", "gain vs frozen", "rollout tok/s", "|dlogp|",
                 "verbose step 1", "verbose last 5"],
                [[("-" if c is None else c) for c in row] for row in table])
    plot(runs, base / "acceptance_over_steps.png")
    write_json("grpo_adaptation", {"args": vars(args), "table": table,
                                   "curves": {k: [(x["step"], x.get("spec_acceptance_length")) for x in v["rows"]]
                                              for k, v in runs.items()},
                                   "results": {k: v["result"] for k, v in runs.items()},
                                   "arms": {k: {"command": v["command"], "reused": v["reused"]} for k, v in runs.items()}})


def plot(runs: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rewards = sorted({k.split("/")[0] for k in runs})
    fig, axes = plt.subplots(1, len(rewards), figsize=(6 * len(rewards), 4), squeeze=False)
    for ax, reward in zip(axes[0], rewards):
        for key, r in runs.items():
            rw, arm, seed = key.split("/")
            if rw != reward or arm == "no-spec":
                continue
            pts = [(x["step"], x.get("spec_acceptance_length")) for x in r["rows"]]
            ax.plot(*zip(*pts), label=f"{arm} s{seed}", ls="-" if arm.endswith("adapted") else "--")
        ax.set_title(f"reward: {reward}")
        ax.set_xlabel("GRPO step")
        ax.set_ylabel("acceptance length (k=3)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"plot: {png}")


if __name__ == "__main__":
    main()
