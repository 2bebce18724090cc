"""`python -m draftadapt.toy`: build (or find cached) every toy artefact and print its hash and build time.

The artefacts: the toy policy, its EAGLE-3 draft, the MiMo-MTP policy and the draft LM, with their default
configs, under $DRAFTADAPT_CACHE. Same hashes on two machines = the same toy (draftadapt/toy/build.py).
`--json PATH` also writes the table as JSON (CI reports its artefact-build time from it).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def build_all(progress: bool = True) -> dict:
    from .draft_lm import toy_draft_lm
    from .build import weights_hash
    from .draft import toy_draft
    from .mtp import toy_mtp_policy
    from .policy import toy_policy

    rows, t0 = {}, time.perf_counter()
    policy = toy_policy(progress=progress)
    rows["policy"] = (policy, time.perf_counter() - t0)
    for name, build in (("eagle3_draft", lambda: toy_draft(policy, progress=progress)),
                        ("mtp_policy", lambda: toy_mtp_policy(policy, progress=progress).model_dir),
                        ("draft_lm", lambda: toy_draft_lm(policy, progress=progress))):
        t0 = time.perf_counter()
        rows[name] = (build(), time.perf_counter() - t0)
    return {name: {"path": str(path), "weights": weights_hash(path), "seconds": round(s, 1)}
            for name, (path, s) in rows.items()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="also write the table here")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    table = build_all(progress=not args.quiet)
    for name, row in table.items():
        print(f"{name:14s} {row['weights']}  {row['seconds']:7.1f} s  {row['path']}")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1))
    return table


if __name__ == "__main__":
    main()
