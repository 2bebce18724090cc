"""allocator: the trainer fixes glibc's mmap threshold, so a freed multi-MB CPU buffer leaves RSS."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from draftadapt.allocator import _glibc

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or _glibc() is None, reason="glibc only")

# In a fresh process: optionally build a DraftTrainer (which must fix the threshold) or call the fix, then free a 16 MB
# malloc block (glibc's dynamic threshold rises to 16 MB), malloc 8 MB + a small block, free the 8 MB:
# with the dynamic threshold it came from the heap and stays in RSS, with a fixed one it is unmapped.
PROBE = """
import ctypes, json, sys
if sys.argv[1] == "trainer":
    import torch
    from draftadapt.trainer import DraftTrainer, TrainerConfig
    DraftTrainer(torch.nn.Linear(4, 4), None, TrainerConfig(device="cpu"))
from draftadapt import allocator
if sys.argv[1] == "lib":
    allocator.limit_heap_growth()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes, libc.memset.argtypes = [ctypes.c_void_p], [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
rss = lambda: next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:")) / 1024  # MB
def block(mb):
    p = libc.malloc(mb << 20)
    libc.memset(p, 1, mb << 20)
    return p
libc.free(block(16))
b, pin = block(8), block(0)
before = rss()
libc.free(b)
print(json.dumps({"released_mb": before - rss(), "applied": allocator._applied}))
"""


def _probe(arm: str, **env: str) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "DRAFTADAPT_MMAP_THRESHOLD")}
    root = str(Path(__file__).resolve().parents[1])
    base["PYTHONPATH"] = os.pathsep.join([root, base.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", PROBE, arm], capture_output=True, text=True, timeout=120,
                         env={**base, **env})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_trainer_fixes_the_mmap_threshold_so_freed_buffers_leave_rss():
    plain = _probe("plain")
    assert plain["released_mb"] < 2, f"the probe cannot tell: glibc released {plain} without the fix"
    fixed = _probe("trainer")
    assert fixed["applied"] == 65536 and fixed["released_mb"] > 7, \
        f"after DraftTrainer() a freed 8 MB block should leave RSS: {fixed} (plain process: {plain})"


def test_opt_out_and_a_user_threshold_are_respected():
    assert _probe("lib", DRAFTADAPT_MMAP_THRESHOLD="off") == {"released_mb": pytest.approx(0, abs=2), "applied": 0}
    assert _probe("lib", MALLOC_MMAP_THRESHOLD_="65536")["applied"] == 0  # glibc applied the user's own
    assert _probe("lib", DRAFTADAPT_MMAP_THRESHOLD="131072")["applied"] == 131072
