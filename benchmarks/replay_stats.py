"""Statistics and plots of benchmarks/adaptation_replay.py: paired differences to the frozen draft with 95% t
intervals over recorded trajectories (seeds), the fraction of the frozen-to-oracle gap closed, compute per arm."""
from __future__ import annotations

import math
from pathlib import Path


def t_interval(xs: list[float]) -> list[float]:
    """[mean, lo, hi] of a 95% Student-t interval; lo = hi = nan with fewer than two values."""
    from scipy.stats import t

    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return [math.nan] * 3
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return [m, math.nan, math.nan]
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    half = t.ppf(0.975, len(xs) - 1) * sd / math.sqrt(len(xs))
    return [m, m - half, m + half]


def _fraction(row: dict, arm: str) -> float | None:
    al = row["al"]
    gap = al["oracle"] - al["frozen"]
    return (al[arm] - al["frozen"]) / gap if gap > 0 else None


def summarize(runs: dict[str, list[dict]], arms: list[str]) -> dict:
    """{reward: {n_seeds, arms: {arm: gain, gap_closed, tokens_ratio, train_seconds}, per_step, oracle_steps}}."""
    out = {}
    for reward in sorted({k.split("/")[0] for k in runs}):
        seeds = {k: rows for k, rows in runs.items() if k.split("/")[0] == reward}
        n = min(len(rows) for rows in seeds.values())  # partial runs: the steps every trajectory reached
        seeds = {k: rows[:n] for k, rows in seeds.items()}
        versions = [r["version"] for r in next(iter(seeds.values()))]
        oracle_versions = [r["version"] for r in next(iter(seeds.values())) if "oracle" in r["al"]]
        # the goal is stated where the frozen->oracle gap exceeds its own CI: only those steps enter "gap_closed"
        open_gaps = [v for i, v in enumerate(versions) if v in oracle_versions and
                     t_interval([rows[i]["al"]["oracle"] - rows[i]["al"]["frozen"] for rows in seeds.values()])[1] > 0]
        arm_rows = {}
        for a in arms:
            gains = [sum(r["al"][a] - r["al"]["frozen"] for r in rows) / len(rows) for rows in seeds.values()]
            fracs = []
            for rows in seeds.values():
                f = [_fraction(r, a) for r in rows if r["version"] in open_gaps]
                f = [x for x in f if x is not None]
                fracs.append(sum(f) / len(f) if f else None)
            all_rows = [r for rows in seeds.values() for r in rows]
            base = arms[0]  # the paired difference to the first arm (the default) decides a default change
            vs_base = [sum(r["al"][a] - r["al"][base] for r in rows) / len(rows) for rows in seeds.values()]
            arm_rows[a] = {"gain": t_interval(gains), "gap_closed": t_interval(fracs), "vs_first_arm": t_interval(vs_base),
                           "tokens_ratio": sum(r["train"][a]["tokens"] / r["rollout_completion_tokens"]
                                               for r in all_rows) / len(all_rows),
                           "train_seconds": sum(r["train"][a]["seconds"] for r in all_rows) / len(all_rows),
                           # draft-train seconds over the recorded step's (generation + policy update) seconds
                           "step_fraction": t_interval([r["train"][a]["seconds"] / r["step_seconds"]
                                                        for r in all_rows if r.get("step_seconds")])[0],
                           "per_step_gain": {v: t_interval([rows[i]["al"][a] - rows[i]["al"]["frozen"]
                                                            for rows in seeds.values()])
                                             for i, v in enumerate(versions)}}
        per_step, oracle_steps = [], {}
        for i, v in enumerate(versions):
            rs = [rows[i] for rows in seeds.values()]
            frozen = t_interval([r["al"]["frozen"] for r in rs])[0]
            oracle, gap = math.nan, [math.nan] * 3
            if v in oracle_versions:
                oracle = t_interval([r["al"]["oracle"] for r in rs])[0]
                gap = t_interval([r["al"]["oracle"] - r["al"]["frozen"] for r in rs])
                oracle_steps[v] = {a: t_interval([_fraction(r, a) for r in rs]) for a in arms}
                # ratio of the means (steadier than the mean of per-seed ratios when a seed's gap is small)
                oracle_steps[v]["ratio_of_means"] = {a: t_interval([r["al"][a] - r["al"]["frozen"] for r in rs])[0]
                                                     / gap[0] for a in arms} if gap[0] > 0 else None
            per_step.append([v, frozen, oracle, *gap, t_interval([r["accuracy"] for r in rs])[0],
                             t_interval([r["drift_share"] if "drift_share" in r else r["styles"]["formal"] for r in rs])[0]])
        out[reward] = {"n_seeds": len(seeds), "steps": n, "drift": next(iter(seeds.values()))[0].get("drift", "formal"), "arms": arm_rows, "per_step": per_step,
                       "oracle_steps": oracle_steps, "open_gap_steps": open_gaps}
    return out


def plot_curves(runs: dict[str, list[dict]], png: Path, arms: list[str] | None = None) -> Path | None:
    """Per-step AL (mean over seeds) of every arm (or of `arms`), the frozen draft and the oracle points; one panel
    per reward."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rewards = sorted({k.split("/")[0] for k in runs})
    fig, axes = plt.subplots(1, len(rewards), figsize=(7 * len(rewards), 4.5), squeeze=False)
    for ax, reward in zip(axes[0], rewards):
        seeds = [rows for k, rows in runs.items() if k.split("/")[0] == reward]
        seeds = [rows[:min(len(r) for r in seeds)] for rows in seeds]
        names = [n for n in seeds[0][0]["al"] if n != "oracle" and all(n in rows[0]["al"] for rows in seeds)
                 and (arms is None or n in arms or n.startswith("frozen"))]
        for name in names:
            xs = [r["version"] for r in seeds[0]]
            ys = [sum(rows[i]["al"][name] for rows in seeds) / len(seeds) for i in range(len(xs))]
            ax.plot(xs, ys, label=name, lw=2.5 if name in ("frozen", "default") else 1.2,
                    ls="--" if name == "frozen" else "-")
        pts = [(r["version"], sum(rows[i]["al"]["oracle"] for rows in seeds) / len(seeds))
               for i, r in enumerate(seeds[0]) if "oracle" in r["al"]]
        if pts:
            ax.scatter(*zip(*pts), marker="*", s=150, c="k", label="oracle", zorder=5)
        ax.set_title(f"reward {reward}: draft AL on the next policy (mean of {len(seeds)} trajectories)")
        ax.set_xlabel("policy version")
        ax.set_ylabel("acceptance length (k=3, T=1)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def ratio_per_step(runs: dict[str, list[dict]], num: str, den: str) -> list[list]:
    """Per version: [version, mean AL of `num`, of `den`, ratio num/den mean, lo, hi] with a 95% t interval of the
    per-trajectory ratios (the generic-domain goal: num = a generic init, den = the in-domain default)."""
    seeds = list(runs.values())
    n = min(len(rows) for rows in seeds)
    out = []
    for i in range(n):
        rs = [rows[i] for rows in seeds]
        mean = [t_interval([r["al"][a] for r in rs])[0] for a in (num, den)]
        out.append([rs[0]["version"], *mean, *t_interval([r["al"][num] / r["al"][den] for r in rs])])
    return out


def markdown_table(s: dict) -> str:
    """One scenario's summary as a markdown table: the fraction of the frozen->oracle gap closed at each oracle
    step per arm (per-seed mean [95% CI]; ratio of the means), the frozen and oracle AL, and the draft compute
    (train tokens / rollout completion tokens, per RL step)."""
    steps = sorted(s["oracle_steps"], key=int)
    per = {row[0]: row for row in s["per_step"]}
    head = ["arm", *[f"gap closed v{v}" for v in steps], "AL gain vs frozen (mean v1-6)", "vs default",
            "train tok / rollout tok"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for a, r in s["arms"].items():
        cells = [a]
        for v in steps:
            m, lo, hi = s["oracle_steps"][v][a]
            ratio = (s["oracle_steps"][v].get("ratio_of_means") or {}).get(a, math.nan)
            cells.append(f"{m:+.2f} [{lo:+.2f}, {hi:+.2f}]; {ratio:+.2f}")
        g, b = r["gain"], r.get("vs_first_arm", [math.nan] * 3)
        cells += [f"{g[0]:+.3f} [{g[1]:+.3f}, {g[2]:+.3f}]", f"{b[0]:+.3f} [{b[1]:+.3f}, {b[2]:+.3f}]",
                  f"{r['tokens_ratio']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("| frozen -> oracle AL (gap [CI]) | " + " | ".join(
        f"{per[int(v)][1]:.3f} -> {per[int(v)][2]:.3f} ({per[int(v)][3]:+.3f} [{per[int(v)][4]:+.3f}, "
        f"{per[int(v)][5]:+.3f}])" for v in steps) + " | | | |")
    return "\n".join(lines)
