"""CLI: python -m draftadapt.speed published | predict | choose."""
from __future__ import annotations

import argparse
import json
from typing import Sequence

from .choose import choose_schedule, schedule_k
from .model import Acceptance, costs_from_dict, rollout_speedup, step_speedup
from .published import published_checks


def _parse_rates(text: str) -> Acceptance:
    return Acceptance(tuple(float(x) for x in text.split(",")))


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m draftadapt.speed", description="where speculation pays: speed-up model and k chooser")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("published", help="reproduce the published figures from published inputs")
    for name in ("predict", "choose"):
        p = sub.add_parser(name, help="rollout/step speed-up" if name == "predict" else "k schedule by batch size")
        p.add_argument("--costs", required=True, help="JSON of Costs (as benchmarks/spec_speed.py writes it)")
        p.add_argument("--rates", required=True, help="per-position acceptance, e.g. 0.8,0.6,0.5")
        p.add_argument("--trajectory", help="JSON list: sequences alive per decode step (default: batch 1..32 flat)")
        p.add_argument("--max-k", type=int, default=7)
        p.add_argument("--max-batch", type=int, default=32)
        p.add_argument("--r-gen", type=float, default=0.661, help="generation share of a sync step")
    args = ap.parse_args(argv)
    if args.cmd == "published":
        print(f"{'quantity':<24} {'published':>9} {'model':>7} {'error':>7}  how")
        for c in published_checks():
            print(f"{c.quantity:<24} {c.published:9.2f} {c.model:7.2f} {c.error:+7.1%}  {c.how}")
        return
    costs = costs_from_dict(json.loads(open(args.costs).read()))
    acc = _parse_rates(args.rates)
    sched = choose_schedule(costs, acc, args.max_k, args.max_batch)
    if args.cmd == "choose":
        print(json.dumps(sched))
        return
    traj = json.loads(open(args.trajectory).read()) if args.trajectory else list(range(args.max_batch, 0, -1))
    for label, k in [(f"k={k}", k) for k in range(1, args.max_k + 1)] + [("chosen", schedule_k(sched))]:
        s = rollout_speedup(costs, acc, traj, k)
        st = step_speedup(s, args.r_gen)
        print(f"{label:>7}: rollout {s:.3f}x  step sync {st.sync:.3f}x  async {st.async_vs_async:.3f}x "
              f"(vs sync baseline {st.async_vs_sync:.3f}x)")
    print("schedule:", sched)


if __name__ == "__main__":
    main()
