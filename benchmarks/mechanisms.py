"""Which speculation mechanism pays on this RL run? Every mechanism on the toy GRPO run, side by side.

For each seed, runs recipes/grpo_toy.py once per arm, arms interleaved in rounds (seed by seed):
eagle3, mtp, draft_model (each adapted online AND frozen: the paired adaptation gain), ngram, suffix
(model-free, nothing to adapt) and plain decoding (k=0, the tokens/s reference). Same seeds, same
prompts per step, same initial policy weights (the MTP arm's MiMo checkpoint is the Llama converted
exactly); the policy trajectories still differ between arms (spec decode changes the samples drawn).

Reports per arm: acceptance length (AL) and per-position acceptance rates over the steps, the
adaptation gain (adapted - frozen: on the final policy with the same seeded prompts, and per step
against the frozen run of the same seed, with a 95% t-interval over steps), draft-train seconds and
push bytes / seconds per step, rollout tokens/s and its ratio to plain decoding in the same round.

    nice -n 5 .venv/bin/python benchmarks/mechanisms.py                   # short: 5 steps, 16 prompts x 8
    nice -n 5 .venv/bin/python benchmarks/mechanisms.py --long            # 30 steps, 32 prompts, seeds 0 1
    ... --suffix-python /path/to/venv-with-arctic-inference/bin/python    # run the suffix arm there
    ... --methods eagle3 ngram --reuse                                     # reuse finished arms (explicit)

Runs go to runs/bench_mechanisms/<arm>-s<seed>/ (checkpoints, configs, logs); the JSON (every
arm's config, command, per-step rows, load average before/after) to benchmarks/results/mechanisms.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, print_table, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "grpo_toy.py"
METHODS = ("eagle3", "mtp", "draft_model", "ngram", "suffix")
TRAINABLE = ("eagle3", "mtp", "draft_model")


def arms_of(methods, plain: bool) -> dict[str, list[str]]:
    """arm name -> recipe overrides."""
    arms = {}
    for m in methods:  # in the order given: on a busy machine the first arms finish first
        if m in TRAINABLE:
            arms[f"{m}-adapted"] = [f"rollout.method={m}", "run.adapt=true"]
            arms[f"{m}-frozen"] = [f"rollout.method={m}", "run.adapt=false"]
        else:
            arms[m] = [f"rollout.method={m}", "run.adapt=false"]
    if plain:  # the tok/s reference
        arms["plain"] = ["rollout.num_speculative_tokens=0"]
    return arms


def suffix_refusal(python: str) -> str | None:
    """None when `python` can run the suffix arm, else the reason it cannot."""
    code = "from draftadapt.engine.vllm import SpecConfig; SpecConfig('suffix', 3)"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env)
    return None if r.returncode == 0 else (r.stderr.strip().splitlines() or ["?"])[-1]


def run_arm(out: Path, python: str, common: list[str], overrides: list[str], reuse: bool) -> dict:
    cmd = [python, str(RECIPE), f"run.out_dir={out}", *common, *overrides]
    reused = reuse and (out / "result.json").exists()
    if not reused:
        shutil.rmtree(out, ignore_errors=True)
        print("$", " ".join(cmd[1:]), flush=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
               "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1"}
        load_before, t0 = os.getloadavg(), time.perf_counter()
        subprocess.run(cmd, check=True, env=env, preexec_fn=lambda: os.nice(5))
        when = {"wall_seconds": time.perf_counter() - t0, "loadavg_before": load_before,
                "loadavg_after": os.getloadavg(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (out / "bench_arm.json").write_text(json.dumps(when))
    when = json.loads((out / "bench_arm.json").read_text()) if (out / "bench_arm.json").exists() else {
        "wall_seconds": None, "loadavg_before": None, "loadavg_after": None, "finished": None}
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {"command": cmd, "config": json.loads((out / "config.json").read_text()), "rows": rows,
            "result": json.loads((out / "result.json").read_text()), "reused": reused, **when}


def mean(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


def paired_ci(a: list[float], b: list[float]) -> tuple[float, float, float] | None:
    """Mean of a - b (paired by step) with a 95% t-interval; None under 2 pairs."""
    from scipy.stats import t

    d = [x - y for x, y in zip(a, b) if x is not None and y is not None]
    if len(d) < 2:
        return None
    m = sum(d) / len(d)
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1))
    h = t.ppf(0.975, len(d) - 1) * sd / math.sqrt(len(d))
    return m, m - h, m + h


def summarise(arm: str, run: dict, frozen: dict | None, plain: dict | None) -> dict:
    rows, res = run["rows"], run["result"]
    al = [r.get("spec_acceptance_length") for r in rows]
    k = run["config"]["rollout"]["num_speculative_tokens"]
    tps = mean(r.get("rollout_tokens_per_s") for r in rows)
    out = {"arm": arm, "AL mean": mean(al), "AL first": al[0] if al else None, "AL last": al[-1] if al else None,
           **{f"pos-{i}": mean(r.get(f"spec_acceptance_rate-pos-{i}") for r in rows) for i in range(k)},
           "AL final frozen": (res.get("frozen") or {}).get("spec_acceptance_length"),
           "AL final adapted": (res.get("adapted") or {}).get("spec_acceptance_length"),
           "draft train s/step": mean(r.get("draft/train_seconds") for r in rows),
           "push KB/step": (mean(r.get("draft/push_bytes") for r in rows) or 0) / 1e3 or None,
           "push ms/step": 1e3 * (mean(r.get("draft/push_seconds") for r in rows) or 0) or None,
           "rollout tok/s": tps, "step s": mean(r.get("time/step") for r in rows),
           "acc after": res["after"]["accuracy"]}
    if out["AL final frozen"] is not None and out["AL final adapted"] is not None:
        out["gain final"] = out["AL final adapted"] - out["AL final frozen"]
    if frozen is not None:
        ci = paired_ci(al, [r.get("spec_acceptance_length") for r in frozen["rows"]])
        out["gain per step (95% CI)"] = None if ci is None else f"{ci[0]:+.2f} [{ci[1]:+.2f}, {ci[2]:+.2f}]"
        out["gain per step"] = None if ci is None else list(ci)
    if plain is not None and tps:
        out["tok/s vs plain"] = tps / mean(r.get("rollout_tokens_per_s") for r in plain["rows"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--prompts-per-step", type=int, default=16)
    ap.add_argument("--eval-prompts", type=int, default=64)
    ap.add_argument("--group-size", type=int, default=8, help="samples per prompt")
    ap.add_argument("--min-tokens", type=int, default=256,
                    help="adapter.min_tokens: the recipe's 2048 is more than a short run's cache ever holds")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--long", action="store_true", help="30 steps, 32 prompts per step, 200 eval prompts, seeds 0 1")
    ap.add_argument("--no-plain", action="store_true", help="skip the plain-decoding (k=0) arm")
    ap.add_argument("--suffix-python", default=sys.executable,
                    help="interpreter for the suffix arm (a venv with arctic-inference; see engine/vllm.SUFFIX_INSTALL)")
    ap.add_argument("--reuse", action="store_true", help="reuse arms whose result.json exists (default: rerun)")
    args = ap.parse_args()
    if args.long:
        args.steps, args.prompts_per_step, args.eval_prompts, args.seeds = 30, 32, 200, [0, 1]
    common = [f"run.steps={args.steps}", "run.checkpoint_every=0", f"run.eval_prompts={args.eval_prompts}",
              f"rollout.prompts_per_step={args.prompts_per_step}", f"rollout.group_size={args.group_size}",
              f"adapter.min_tokens={args.min_tokens}"]
    refused = {}
    if "suffix" in args.methods:
        reason = suffix_refusal(args.suffix_python)
        if reason:
            refused["suffix"] = reason
            print(f"suffix arm skipped: {reason}")
    methods = [m for m in args.methods if m not in refused]
    arms = arms_of(methods, not args.no_plain)
    base = ROOT / "runs" / "bench_mechanisms"
    runs: dict[str, dict] = {}
    for seed in args.seeds:  # rounds: every arm once per seed, in the same order
        for arm, ov in arms.items():
            python = args.suffix_python if arm == "suffix" else sys.executable
            runs[f"{arm}/s{seed}"] = run_arm(base / f"{arm}-s{seed}", python, [*common, f"run.seed={seed}"], ov,
                                             args.reuse)
            report(runs, refused, args)  # after every arm: a cut-short run still leaves its results


def report(runs: dict, refused: dict, args) -> None:
    table = []
    for key, run in runs.items():
        arm, seed = key.split("/")
        frozen = runs.get(f"{arm.replace('-adapted', '-frozen')}/{seed}") if arm.endswith("-adapted") else None
        table.append({"seed": seed, **summarise(arm, run, frozen, runs.get(f"plain/{seed}"))})
    cols = ["seed", "arm", "AL mean", "AL first", "AL last", "pos-0", "pos-1", "pos-2", "AL final frozen",
            "AL final adapted", "gain final", "gain per step (95% CI)", "draft train s/step", "push KB/step",
            "push ms/step", "rollout tok/s", "tok/s vs plain", "step s", "acc after"]
    print_table(cols, [[("-" if r.get(c) is None else r[c]) for c in cols] for r in table])
    for m, reason in refused.items():
        print(f"{m}: not run - {reason}")
    png = RESULTS / "mechanisms" / "acceptance_over_steps.png"
    plot(runs, png)
    write_json("mechanisms", {"args": vars(args), "refused": refused, "table": table, "machine_note":
                              "shared machine (2 cores, other jobs running): compare arms within a round, see loadavg",
                              "runs": runs})


def plot(runs: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for key, r in runs.items():
        if key.startswith("plain"):
            continue
        steps = [x["step"] for x in r["rows"]]
        style = "--" if "-frozen" in key else "-"
        axes[0].plot(steps, [x.get("spec_acceptance_length") for x in r["rows"]], style, label=key)
        axes[1].plot(steps, [x.get("rollout_tokens_per_s") for x in r["rows"]], style, label=key)
    for ax, name in zip(axes, ("acceptance length (k=3)", "rollout tokens/s")):
        ax.set_xlabel("GRPO step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    print(f"plot: {png}")


if __name__ == "__main__":
    main()
