"""How close does an arm of an adaptation replay come to another? Per version, the ratio of their acceptance
lengths with a 95% t interval over the recorded trajectories (seeds) - e.g. a generic-domain init (`generic-refresh`)
over the in-domain `default`, whose goal is >= 0.80 within 10 steps (issue 19, item 4).

Re-analyses an existing result of benchmarks/adaptation_replay.py (it measures nothing: run the replay first):

    python benchmarks/replay_ratio.py adaptation_replay_generic_refresh --num generic generic-refresh --den default
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, print_table, stamp, write_json  # noqa: E402
from replay_stats import ratio_per_step  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("result", help="name of an adaptation_replay result under benchmarks/results/")
    ap.add_argument("--num", nargs="+", required=True, help="arms whose AL is the numerator")
    ap.add_argument("--den", default="default", help="the arm whose AL is the denominator")
    ap.add_argument("--goal", type=float, default=0.8)
    args = ap.parse_args()
    res = json.loads((RESULTS / f"{args.result}.json").read_text())
    out = {}
    for arm in args.num:
        rows = ratio_per_step(res["runs"], arm, args.den)
        print(f"\n== {arm} / {args.den}: AL ratio per version, 95% t interval over {len(res['runs'])} trajectories ==")
        print_table(["version", f"{arm} AL", f"{args.den} AL", "ratio", "ci lo", "ci hi"], rows)
        reached = [r[0] for r in rows if r[3] >= args.goal]
        print(f"  mean ratio >= {args.goal} first at version {reached[0] if reached else None}")
        out[arm] = {"per_step": rows, "first_version_at_goal": reached[0] if reached else None}
    write_json(f"{args.result}_ratio", {"args": vars(args), "source": args.result, "source_stamp": res.get("stamp"),
                                        "stamp": stamp(), "ratios": out})


if __name__ == "__main__":
    main()
