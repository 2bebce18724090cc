"""Shared by the benchmark scripts: machine/version stamp, table printing, JSON output."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def stamp() -> dict:
    import torch

    try:
        import vllm

        vllm_version = vllm.__version__
    except ImportError:
        vllm_version = None
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        sha = None
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "git_sha": sha, "machine": platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "vllm": vllm_version, "processor": platform.processor(),
            "load_average": os.getloadavg(), "git_dirty": _dirty(), "toy_build": toy_build()}


def toy_build() -> dict:
    """sha256 prefixes of the default toy policy and EAGLE-3 draft in the cache (the ones a benchmark on the
    toy reads); an artefact not built yet is left out. Equal hashes: the same toy (draftadapt/toy/build.py)."""
    from draftadapt.toy.build import weights_hash
    from draftadapt.toy.draft import toy_draft_path
    from draftadapt.toy.policy import toy_policy_path

    policy = toy_policy_path()
    paths = {"policy": policy, "draft": toy_draft_path(policy)}
    return {k: weights_hash(p) for k, p in paths.items() if (p / "model.safetensors").exists()}


def _dirty() -> bool | None:
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                             cwd=Path(__file__).parent)
    except OSError:
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def print_table(header: list[str], rows: list[list]) -> None:
    cells = [header] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for j, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"stamp": stamp(), **payload}, indent=1, default=str))
    print(f"\nwrote {path}")
    return path
