"""The toy artefacts are the same bytes on every machine: builds run with pinned kernels (draftadapt/toy/build.py).

Two optimizer steps of the toy policy's SFT are enough to see a kernel difference (each step's weights carry it on);
the control shows that without the pins the same two steps DO depend on the thread count, so the test can fail."""
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # five build processes (~40 s)

STEPS, ROWS = 2, 4  # small: each build is a process start and a few seconds


def _unpinned_hash(out, threads: int) -> str:
    code = ("import sys; from dataclasses import replace; from draftadapt.toy.policy import SFTConfig, train_policy; "
            "from draftadapt.toy.build import weights_hash; "
            f"train_policy(sys.argv[1], SFTConfig(steps={STEPS}, rows={ROWS}, threads={threads}), progress=False); "
            "print(weights_hash(sys.argv[1]))")
    env = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}
    return subprocess.run([sys.executable, "-c", code, str(out)], env=env, capture_output=True, text=True,
                          check=True).stdout.split()[-1]


def test_the_toy_policy_build_is_the_same_at_any_thread_count_and_instruction_set(tmp_path, monkeypatch):
    from draftadapt.toy.build import weights_hash
    from draftadapt.toy.policy import SFTConfig, toy_policy

    hashes = {}
    for name, threads, mkl_isa in (("2 threads", 2, None), ("1 thread", 1, None), ("2 threads, AVX2 MKL", 2, "AVX2")):
        if mkl_isa:  # what an AVX2-only CPU's MKL would run
            monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", mkl_isa)
        out = toy_policy(SFTConfig(steps=STEPS, rows=ROWS, threads=threads), root=tmp_path / name.replace(" ", "_"), progress=False)
        hashes[name] = weights_hash(out)
    assert len(set(hashes.values())) == 1, hashes
    monkeypatch.delenv("MKL_ENABLE_INSTRUCTIONS")
    control = {t: _unpinned_hash(tmp_path / f"unpinned{t}", t) for t in (1, 2)}
    assert control[1] != control[2], f"unpinned builds agree across thread counts {control}: the control cannot fail"
