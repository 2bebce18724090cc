"""Toy artefacts built in a child process whose floating-point kernels are pinned: the same bytes on every machine.

What made two machines build different toys (measured: 10 SFT steps, sha256 of the weights):
- the thread count: MKL's sgemm splits its sums by thread, so 1 and 2 threads round differently;
- the instruction set: MKL picks AVX2 or AVX-512 sgemm kernels, and ATen's vectorised CPU kernels
  (elementwise, softmax, reductions) have an AVX2 and an AVX-512 build; each pair rounds differently.
Four hundred optimizer steps turn the last-bit differences into a different policy.
The pins, read once when a process starts (so they cannot be set from inside the caller):
MKL_CBWR=AVX2,STRICT (MKL's conditional numerical reproducibility: the AVX2 code path, results
independent of the thread count), ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2. Measured here: with
them, 1 thread, 2 threads and MKL restricted to AVX2 (an AVX2-only CPU's kernels) give one hash,
at no measurable cost in speed. x86-64 CPUs without AVX2 (pre-2013) fall back to their own kernels.

The toy's sampling runs in torch too (`TorchSampler`), not in vLLM, whose CPU kernels pick their
instruction set themselves. This module knows nothing of what it builds: it runs a function.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch

PINNED_ENV = {"MKL_CBWR": "AVX2,STRICT", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
              "PYTHONHASHSEED": "0"}
# Bump when a build's code changes what it produces: the cache keys carry it, so no stale artefact is reused.
BUILD_VERSION = 2
# One artefact's own revision, for a change that alters it alone (the others stay cached): the draft LM's
# distillation runs through head_loss in vocabulary chunks since [S] (the same loss, rounded differently).
DRAFT_LM_REVISION = 1


def pinned() -> bool:
    """True inside a process started with the pinned kernels."""
    return all(os.environ.get(k) == v for k, v in PINNED_ENV.items())


def run_pinned(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs) in a child process with PINNED_ENV (in this process when it already has
    it); returns fn's result. The child inherits stdout/stderr, so progress bars show."""
    if pinned():
        return fn(*args, **kwargs)
    with tempfile.TemporaryDirectory(prefix="draftadapt-build-") as tmp:
        job, result = Path(tmp) / "job.pkl", Path(tmp) / "result.pkl"
        # our own process's function and configs, read back by our own child: nothing from outside
        job.write_bytes(pickle.dumps((fn, args, kwargs)))
        env = {**os.environ, **PINNED_ENV}
        rc = subprocess.run([sys.executable, "-m", "draftadapt.toy.build", str(job), str(result)], env=env).returncode
        if rc != 0:
            raise RuntimeError(f"building a toy artefact ({fn.__module__}.{fn.__qualname__}) failed in its "
                               f"pinned child process (exit {rc}); its output is above")
        return pickle.loads(result.read_bytes())


def build_once(out: Path, fn: Callable, *args: Any, **kwargs: Any) -> bool:
    """run_pinned(fn, *args, **kwargs) unless `out` holds a checkpoint already; True when this call built it.
    One builder at a time per cache directory (a file lock): a second process asking for the same artefact
    (a test beside a background build, two ranks) waits for the first instead of training it again."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".draftadapt-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "model.safetensors").exists():
            return False
        run_pinned(fn, *args, **kwargs)
        return True


class TorchThreads:
    """`with TorchThreads(n):` torch's intra-op threads set to n, restored after."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        self.prev = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.prev)


def weights_hash(model_dir: str | Path) -> str:
    """sha256 (12 hex digits) over a checkpoint's safetensors files, in name order: two people with
    the same hash ran the same toy."""
    h = hashlib.sha256()
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors under {model_dir}: not a built checkpoint")
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:12]


class Completion(NamedTuple):
    token_ids: list[int]  # sampled completion (the stop token included when it ended there)


class TorchSampler:
    """Temperature sampling from an HF causal LM in plain torch, with the `generate` signature of
    `engine.vllm.Engine` that the toy builds use: reproducible wherever the kernels are pinned.
    Memory O(batch x (prompt + max_tokens) x layers x H) for the KV cache."""

    def __init__(self, model, batch_size: int = 256):
        """model: an HF causal LM, or the directory of one (loaded in fp32)."""
        if isinstance(model, (str, Path)):
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
        self.model = model.eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def generate(self, prompts, *, n: int = 1, temperature: float = 1.0, max_tokens: int = 64,
                 seed: int = 0, stop_token_ids=(), **_ignored) -> list[list[Completion]]:
        flat = [list(p) for p in prompts for _ in range(n)]
        gen = torch.Generator().manual_seed(seed)
        out: list[Completion] = []
        for i in range(0, len(flat), self.batch_size):
            out += self._sample(flat[i:i + self.batch_size], temperature, max_tokens, set(stop_token_ids), gen)
        return [out[i * n:(i + 1) * n] for i in range(len(prompts))]

    def _sample(self, prompts, temperature, max_tokens, stops, gen) -> list[Completion]:
        # 1) left-pad the prompts: every row's next token sits in the last column
        B, P = len(prompts), max(len(p) for p in prompts)
        ids = torch.zeros(B, P, dtype=torch.long)  # [B, P]
        mask = torch.zeros(B, P, dtype=torch.long)  # [B, P]
        for b, p in enumerate(prompts):
            ids[b, P - len(p):] = torch.tensor(p)
            mask[b, P - len(p):] = 1
        done = torch.zeros(B, dtype=torch.bool)
        completions: list[list[int]] = [[] for _ in range(B)]
        past, step_ids = None, ids
        # 2) decode: one forward per token over the KV cache, finished rows ride along masked
        for _ in range(max_tokens):
            pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1]:]
            o = self.model(input_ids=step_ids, attention_mask=mask, position_ids=pos, past_key_values=past,
                           use_cache=True)
            past = o.past_key_values
            probs = torch.softmax(o.logits[:, -1].float() / temperature, dim=-1)  # [B, V]
            nxt = torch.multinomial(probs, 1, generator=gen).squeeze(-1)  # [B]
            for b in (~done).nonzero().flatten().tolist():
                completions[b].append(int(nxt[b]))
                if int(nxt[b]) in stops:
                    done[b] = True
            if bool(done.all()):
                break
            step_ids = nxt[:, None]
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], dim=1)
        return [Completion(c) for c in completions]


def _child(job: str, result: str) -> None:
    fn, args, kwargs = pickle.loads(Path(job).read_bytes())
    torch.manual_seed(0)  # a draw a build forgot to seed is still the same on every run
    Path(result).write_bytes(pickle.dumps(fn(*args, **kwargs)))


if __name__ == "__main__":
    _child(*sys.argv[1:3])
