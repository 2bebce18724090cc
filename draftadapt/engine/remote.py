"""`RemoteEngine`: a vLLM server in another process, as an engine `EngineSwapper` can push into.

The server is `python -m draftadapt.server` (vLLM's OpenAI server with draftadapt's worker
extension and its dev routes). This client speaks the same worker protocol as an in-process
engine (`draftadapt_info`, `draftadapt_push`, `draftadapt_check`, ...) through vLLM's
`POST /collective_rpc`, so every guarantee of a push (version, validation before any weight is
touched, digest, verification, rollback, re-push after a restart) is the worker's, unchanged.

Transport: vLLM's /collective_rpc takes JSON only (its args are "serialized strings",
vllm/entrypoints/serve/dev/rpc/api_router.py:43-46), so a push's safetensors bytes go to a file
in a directory both sides see (`push_dir`, /dev/shm by default) and the RPC carries its path; the
worker checks the path is inside its push root and the file's header before reading data, and the
digest after. Nothing is unpickled on either side. Cost: one write + one read of the payload
(~0.8 GB for an 8B model's EAGLE-3 head in bf16) on top of the in-process push.

Counters come from the server's Prometheus `/metrics`. It knows nothing of how drafts are trained
and does not generate: rollouts go through the server's OpenAI API (/v1/completions).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Sequence

from ..metrics import SpecCounters

_METRIC = re.compile(r'^vllm:spec_decode_(num_drafts|num_draft_tokens|num_accepted_tokens|'
                     r'num_accepted_tokens_per_pos)(?:_total)?(?:\{([^}]*)\})?\s+([0-9.eE+-]+)\s*$')
_POSITION = re.compile(r'position="(\d+)"')


def default_push_dir() -> Path:
    """Where pushes are staged: /dev/shm (memory) where it exists, else the temp dir."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return base / "draftadapt-push"


def spec_counters_from_prometheus(text: str) -> SpecCounters:
    """Sum vLLM's spec-decode counters over every label set of a Prometheus exposition."""
    vals = {"num_drafts": 0.0, "num_draft_tokens": 0.0, "num_accepted_tokens": 0.0}
    per_pos: dict[int, float] = {}
    for line in text.splitlines():
        m = _METRIC.match(line)
        if m is None:
            continue
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        if name == "num_accepted_tokens_per_pos":
            pos = _POSITION.search(labels)
            if pos is not None:
                per_pos[int(pos.group(1))] = per_pos.get(int(pos.group(1)), 0.0) + value
        else:
            vals[name] += value
    k = max(per_pos) + 1 if per_pos else 0
    return SpecCounters(int(vals["num_drafts"]), int(vals["num_draft_tokens"]), int(vals["num_accepted_tokens"]),
                        tuple(int(per_pos.get(i, 0)) for i in range(k)))


class RemoteEngine:
    """A vLLM server started with `python -m draftadapt.server`, seen as an engine.

    Usable wherever `EngineSwapper` takes one: `EngineSwapper(RemoteEngine(url, token=...))`.
    `token`: the server's bearer token (`DRAFTADAPT_TOKEN` when it started). `push_dir`: a
    directory this process writes and the server reads, the server's `--push-dir` (same default).
    """

    def __init__(self, url: str, token: str | None = None, push_dir: str | os.PathLike | None = None,
                 timeout: float = 600.0):
        self.url = url.rstrip("/")
        self.token = token
        self.push_dir = Path(push_dir) if push_dir is not None else default_push_dir()
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"RemoteEngine({self.url!r})"

    # the engine protocol EngineSwapper speaks -----------------------------------------------------
    def collective_rpc(self, method: str, args: Sequence[Any] = (), kwargs: dict | None = None) -> list:
        """Run a worker-extension method on every rank. A `payload` (safetensors bytes) is staged
        as a file under `push_dir` and sent as its `path`; the file is removed after the call."""
        kwargs = dict(kwargs or {})
        staged = None
        if kwargs.get("payload") is not None:
            staged = self._stage(kwargs.pop("payload"))
            kwargs["path"] = str(staged)
        try:
            body = self._request("POST", "/collective_rpc", {"method": method, "args": list(args), "kwargs": kwargs,
                                                             "timeout": self.timeout})
        finally:
            if staged is not None:
                shutil.rmtree(staged, ignore_errors=True)
        return list(json.loads(body)["results"]) if body else []

    def reset_prefix_cache(self) -> bool:
        return bool(json.loads(self._request("POST", "/reset_prefix_cache"))["success"])

    def spec_counters(self) -> SpecCounters:
        """Cumulative spec-decode counters of the server (Prometheus /metrics); diff two reads."""
        return spec_counters_from_prometheus(self._request("GET", "/metrics").decode())

    # lifecycle ---------------------------------------------------------------------------------------
    def wait_ready(self, timeout: float = 300.0, poll: float = 0.5) -> float:
        """Block until the server answers /health; returns the seconds waited."""
        t0 = time.monotonic()
        while True:
            try:
                self._request("GET", "/health", timeout=5.0)
                return time.monotonic() - t0
            except (OSError, RuntimeError) as exc:
                if time.monotonic() - t0 > timeout:
                    raise TimeoutError(f"{self.url} did not answer /health within {timeout:.0f} s: {exc}") from exc
                time.sleep(poll)

    # transport ---------------------------------------------------------------------------------------
    def _stage(self, payload: bytes) -> Path:
        self.push_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        out = self.push_dir / f"push-{uuid.uuid4().hex}"
        out.mkdir(mode=0o700)
        tmp = out / "model.safetensors.part"
        tmp.write_bytes(payload)
        tmp.rename(out / "model.safetensors")  # the worker lists *.safetensors: never a half-written one
        return out

    def _request(self, verb: str, route: str, body: dict | None = None, timeout: float | None = None) -> bytes:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + route, data=data, method=verb)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout + 30) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:2000]
            raise RuntimeError(f"{verb} {self.url}{route}: HTTP {exc.code}: {detail}") from exc
