"""Issue 17's GPU checks (marker `gpu`; `bash scripts/gpu_check.sh` runs them): native CUDA IPC draft
transfer, the real level-2 sleep / wake-up lifecycle, TP = 2 where two GPUs exist. Skipped on CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _run(tmp_path, tp):
    out = tmp_path / f"gpu-tp{tp}.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
           "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    proc = subprocess.run([sys.executable, str(HERE / "gpu_engine_script.py"), str(out), str(tp)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


@pytest.mark.parametrize("tp", [1, 2])
def test_native_draft_transfer_and_the_real_sleep_wake_lifecycle(tmp_path, tp):
    if torch.cuda.device_count() < tp:
        pytest.skip(f"needs {tp} GPUs")
    rec = _run(tmp_path, tp)
    print(json.dumps({k: v for k, v in rec.items() if not k.startswith("greedy")}))
    assert rec["transport"] == "native" and all(rec["native"]), "a CUDA build with ipc transfer must use it"
    assert all(p["verified"] for p in rec["pushes"])
    ok = lambda checks, v: len(checks) == tp and all(c["ok"] and c["version"] == v for c in checks)  # noqa: E731
    assert ok(rec["checks_after_push"], 2), rec["checks_after_push"]
    assert rec["refit"] and rec["sleeping"] and rec["deferred"]
    assert rec["draft_version_after_wake"] == 3 and ok(rec["checks_after_wake"], 3), rec["checks_after_wake"]
    assert ok(rec["policy_checks_after_wake"], 1), "level-2 sleep discards the policy too: it must be restored"
    assert rec["greedy_after"] == rec["greedy_before"]
