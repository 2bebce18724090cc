"""Versioned, validated, verified weight pushes (draft and policy) into running vLLM engines.

Driver side, `EngineSwapper` takes a state dict in checkpoint naming, checks it against what
the engines expect, ships it as safetensors bytes (a multiprocessing engine turns tensors in RPC
arguments into lists), and records the version each engine serves. Worker side,
`swap_worker.DraftSwapExtension` (mixed into vLLM's workers by `LLM(worker_extension_cls=...)`) applies it
with vLLM's in-place layerwise reload (or its native transfer), verifies them, and restores the
previous weights if anything fails. It knows nothing of how the weights were trained.

Transports: the in-place layerwise reload (the default on every platform: the path CI runs), or
vLLM 0.32's native draft update over CUDA IPC (`engine/native.py`), opt-in with
`transport="native"` until a GPU run records it passing; `"auto"` picks it only on a vLLM version
in `native.GPU_VERIFIED` (none yet). Both carry the same versions, digest, per-rank verification,
rollback and two phases: the native one is `draftadapt_push` with IPC handles instead of bytes.

Tensor parallelism: every rank receives the full tensors, validates them, and verifies what its
own weight loaders make of them (`swap_verify`); all ranks reply, then all keep the push or all
restore the previous weights (two phases).

Checksum: sha256 over names, shapes, dtypes and value bytes in checkpoint form, of the tensors each
rank received (the transport), checked before any weight moves. Then each rank verifies its
shard (`swap_verify`): by default a functional probe of every layer's kernel on a fixed input
(O(8 P) flops), or (`verify="full"`) the exact read-back of every weight through its kernel
(O(H P) flops: ~5 TFLOP for an 8B policy's EAGLE-3 head on CPU).

Native MTP drafters (`method="mtp"`): the MTP layers are part of the policy checkpoint
(`model.mtp_layers.*`) but NOT of vLLM's target model - reloading the target leaves the drafter's
copy untouched. So `refit_policy` splits them off and pushes them to the drafter as a draft push of
the same version (verified like any draft push), and warns when an MTP engine's policy is
refitted without them (the MTP weights then stay what they were: push adapted ones with
`push_draft`).

Rollback source: the worker keeps the last weights it loaded per kind (the start-up ones: read
back on first push at TP = 1, read from the start-up checkpoint at TP > 1): one copy of the draft,
and one of the policy once it is refitted; at TP > 1 a rank keeps only the elements its own loaders
take (`swap_verify.ShardCopy`: 56% of the full draft per rank at TP = 2 for the toy head, where fc and
the norms are replicated). The same copy repairs weights lost silently (level-2
sleep, faults: `ensure_latest`); the swapper keeps the last push to re-send it after a restart.
"""
from __future__ import annotations

import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..metrics import SpecCounters
from . import native
from .methods import METHODS

from .payload import (KINDS, MTP_PREFIX, TIED, Spec, check_push, checksum, drop_aliases,  # noqa: F401 (re-exported)
                      read_safetensors_dir, tensors_from_bytes, tensors_to_bytes)


@dataclass(frozen=True)
class PushResult:
    kind: str  # "draft" or "policy"
    version: int
    pushed: bool  # False: every engine already served this version
    skipped_reason: str | None
    seconds: float  # wall time of the whole push, driver side
    bytes: int  # safetensors payload shipped to each engine (0 when skipped or sent as a path)
    checksum: str | None  # trainer-side digest of the pushed state (None when not verifying)
    verified: bool  # every engine's read-back digest equalled `checksum`
    engine_seconds: tuple[float, ...] = ()  # per engine pushed: RPC round trip incl. load + verify
    phases: dict[str, float] = field(default_factory=dict)  # driver phases + first engine's worker phases
    mtp: "PushResult | None" = None  # policy refit of an MTP engine: the push of its MTP layers


class EngineSwapper:
    """Push drafts and refit policies into one or more running engines, by version.

    An engine is anything with `collective_rpc(method, args, kwargs) -> list`,
    `reset_prefix_cache() -> bool` and `spec_counters()`: `engine.vllm.Engine`, or a Ray actor
    handle exposing the same (`engine.ray_pool.EngineActor`). Engines are pushed one after
    another, except engines that also have `collective_rpc_async(...) -> .result()`, which all
    receive a push at once; each push is atomic per engine. If engine i fails, engines before it
    already serve the new version: the error says so, and pushing the same version again
    completes the lagging ones only.
    """

    def __init__(self, engines: Any | Sequence[Any], transport: str = "auto"):
        """transport: "inplace" (every build; what "auto" picks today), "native" (opt-in: vLLM's
        CUDA IPC draft transfer, engines started with weight_transfer_config={"backend": "ipc"},
        see `engine/native.py`), or "auto": native only where every engine supports it AND runs a
        vLLM version a GPU check recorded native pushes passing on (`native.GPU_VERIFIED`)."""
        self.engines = [_as_engine(e) for e in ([engines] if hasattr(engines, "collective_rpc") else list(engines))]
        if not self.engines:
            raise ValueError("EngineSwapper needs at least one engine")
        replies = [_agreed(_info(e, i), i) for i, e in enumerate(self.engines)]
        infos = [r[0] for r in replies]
        self.ranks = tuple(len(r) for r in replies)  # tensor-parallel ranks per engine
        for i, info in enumerate(infos[1:], 1):
            for key in ("draft", "policy", "draft_forbidden", "vocab_size"):
                if info[key] != infos[0][key]:
                    raise ValueError(f"engine {i} expects a different {key} than engine 0: one swapper pushes "
                                     "one model")
        self._spec: dict[str, Spec | None] = {k: _as_spec(infos[0][k]) for k in KINDS}
        self._forbidden = {"draft": dict(infos[0]["draft_forbidden"]), "policy": {}}
        self._vocab_size = infos[0]["vocab_size"]
        self.draft_method = infos[0].get("draft_method")  # vLLM's method name (`methods.METHODS`) or None
        record = METHODS.get(self.draft_method)  # None: no drafter, or a vLLM method without a record
        # the drafter's weights are in the policy checkpoint (MTP): refit_policy pushes them to it
        self._draft_in_policy = record is not None and record.weights_in_target
        self._versions = {k: [info["versions"][k] for info in infos] for k in KINDS}
        self.native_draft_update = tuple(bool(info["native_draft_update"]) for info in infos)
        self.gpu_uuids = tuple(tuple(r.get("gpu_uuid") for r in rs) for rs in replies)
        self.transport = _transport(transport, infos, self.gpu_uuids)
        if self.transport == "native":
            for e in self.engines:
                e.collective_rpc("init_weight_transfer_engine", kwargs={"init_info": {"packed": False}})
        self._latest: dict[str, dict] = {}  # kind -> the last push's RPC kwargs (re-sent after a restart)
        self._deferred: dict[str, tuple] = {}  # kind -> (state, version, path, verify) pushed while asleep
        self.asleep = False

    @property
    def draft_version(self) -> int | None:
        """The draft version every engine serves (None while one still serves its start-up draft)."""
        return _served(self._versions["draft"])

    @property
    def policy_version(self) -> int | None:
        return _served(self._versions["policy"])

    def expected(self, kind: str = "draft") -> Spec:
        """name -> (shape, dtype) the engines expect in a push, checkpoint naming."""
        spec = self._spec[kind]
        if spec is None:
            raise RuntimeError("the engines run no drafter: start them with "
                               "EngineConfig(spec=SpecConfig('eagle3', ...))")
        return dict(spec)

    def push_draft(self, state: Mapping[str, torch.Tensor], version: int, *, verify: bool | str = True) -> PushResult:
        """Push draft weights (`checkpoint.draft_state_for_push(draft)`: no embed_tokens).
        `verify`: True / "probe" (default: digest of the received tensors + a functional probe of
        every layer on every rank), "full" (+ exact read-back of every weight), False (none)."""
        return self._push("draft", version, state, None, verify)

    def refit_policy(self, state_or_dir: Mapping[str, torch.Tensor] | str | os.PathLike, version: int, *,
                     verify: bool | str = True) -> PushResult:
        """Reload the policy (target) weights from a state dict (HF naming) or a checkpoint dir.
        The drafter keeps sharing the target's embedding, so it sees the new one at once. With an
        MTP drafter, `model.mtp_layers.*` tensors are pushed to it as draft `version` (`.mtp`)."""
        path = None
        if isinstance(state_or_dir, (str, os.PathLike)):
            path = str(Path(state_or_dir).resolve())
            state_or_dir = read_safetensors_dir(path)
        if self._spec["policy"] is not None:  # a tied policy's state_dict() names its embedding twice
            state_or_dir = drop_aliases(state_or_dir, self._spec["policy"])
        mtp = {k: v for k, v in state_or_dir.items() if k.startswith(MTP_PREFIX)}
        if not mtp:
            if self._draft_in_policy:
                warnings.warn("refit_policy: the engines serve an MTP drafter but the new policy weights carry no "
                              f"{MTP_PREFIX}* tensors, so the MTP layers keep the weights of draft version "
                              f"{self.draft_version}; push adapted ones with push_draft", stacklevel=2)
            result = self._push("policy", version, state_or_dir, path, verify)
            if result.pushed and "draft" in self._latest:  # a refit must not cost the drafter its weights
                self.ensure_latest("draft")
            return result
        # vLLM's target drops MTP tensors on load: send the trunk alone, then the MTP layers to the drafter
        trunk = {k: v for k, v in state_or_dir.items() if not k.startswith(MTP_PREFIX)}
        result = self._push("policy", version, trunk, None, verify)
        if not self._draft_in_policy:  # nothing serves them
            return result
        return replace(result, mtp=self._push("draft", version, mtp, None, verify))

    # lifecycle: sleep, wake-up, restarts and faults discard weights silently ------------------------
    def sleep(self, level: int = 2) -> None:
        """Put every engine to sleep (`vllm.LLM.sleep`); pushes until `wake_up()` are deferred."""
        for e in self.engines:
            e.sleep(level)
        self.asleep = True

    def wake_up(self) -> dict[str, list[str]]:
        """Wake every engine, apply the pushes deferred meanwhile (policy first: the drafter shares
        its embedding), then check both kinds and restore the latest weights where they were lost."""
        for e in self.engines:
            e.wake_up()
        self.asleep = False
        return self.restore()

    def restore(self) -> dict[str, list[str]]:
        """Apply the pushes deferred while the engines slept, then `ensure_latest` the draft (and
        the policy, when this swapper refitted it; else its owner does). Call it after any wake-up
        made elsewhere (TRL's colocated engine sleeps and wakes on its own)."""
        for kind in ("policy", "draft"):
            if kind in self._deferred:
                state, version, path, verify = self._deferred.pop(kind)
                self._push(kind, version, state, path, verify)
        kinds = [k for k in ("policy", "draft") if self._spec[k] is not None and (k == "draft" or k in self._latest)]
        return {kind: self.ensure_latest(kind) for kind in kinds}

    def ensure_latest(self, kind: str = "draft", verify: str = "probe") -> list[str]:
        """Check that every rank of every engine computes with the latest `kind` weights it was
        pushed (a probe: cheap); restore them where not. Per engine: "ok", "repaired" (the worker
        reloaded its own copy: after a level-2 sleep or a fault) or "re-pushed" (a fresh worker
        after a restart got the last push again, which the swapper keeps for this)."""
        report = []
        for i, e in enumerate(self.engines):
            checks = e.collective_rpc("draftadapt_check", kwargs=dict(kind=kind, verify=verify, repair=True))
            latest = self._latest.get(kind)
            if latest is not None and any(c["version"] is None or c["version"] < latest["version"] for c in checks):
                outs = e.collective_rpc("draftadapt_push", kwargs=self._kw(i, {**latest, "force": True}))
                self._settle(i, kind, latest["version"], latest.get("verify"), outs)
                report.append("re-pushed")
            else:
                report.append("repaired" if any(c["repaired"] for c in checks) else "ok")
            if report[-1] != "ok" and not e.reset_prefix_cache():
                raise RuntimeError(f"engine {i}: the prefix cache could not be reset after restoring {kind} weights")
        return report

    @contextmanager
    def serving_draft(self, state: Mapping[str, torch.Tensor], verify: str = "probe"):
        """Serve `state` inside the block (a baseline to measure against, e.g. the first draft kept
        frozen), then the draft served before it again: the last push (any TP), else the start-up
        draft read back (TP = 1). Versions and the push kept for restarts are untouched, so the next
        `push_draft` goes through as usual; push nothing inside the block. Cost: two verified loads."""
        if self._sleeping():
            raise RuntimeError("serving_draft while the engines sleep: call wake_up() first")
        state = check_push(state, self.expected("draft"), "draft", self._forbidden["draft"], self._vocab_size)
        latest = self._latest.get("draft")
        back = [latest["payload"] if latest is not None and latest.get("payload") is not None else
                e.collective_rpc("draftadapt_state", kwargs={"kind": "draft"})[0] for e in self.engines]
        try:
            for i in range(len(self.engines)):
                self._reload_draft(i, tensors_to_bytes(state), verify)
            yield
        finally:
            for i, payload in enumerate(back):
                self._reload_draft(i, payload, verify)

    def _reload_draft(self, i: int, payload: bytes, verify: str) -> None:
        """Load draft weights into engine i under the version it serves (`force`), verified."""
        version = self._versions["draft"][i]
        kw = dict(kind="draft", version=version, expected_checksum=checksum(tensors_from_bytes(payload)),
                  payload=payload, path=None, verify=verify, force=True)
        self._settle(i, "draft", version, verify, self.engines[i].collective_rpc("draftadapt_push",
                                                                                  kwargs=self._kw(i, kw)))
        if not self.engines[i].reset_prefix_cache():
            raise RuntimeError(f"engine {i}: the prefix cache could not be reset after a draft reload")

    def _sleeping(self) -> bool:
        return self.asleep or any(bool(getattr(e, "is_sleeping", lambda: False)()) for e in self.engines)

    def spec_counters(self) -> SpecCounters:
        """Cumulative spec-decode counters summed over the engines."""
        return sum((e.spec_counters() for e in self.engines), SpecCounters())

    def _push(self, kind: str, version: int, state, path: str | None, verify: bool | str,
              fault: dict | None = None) -> PushResult:
        t0 = time.perf_counter()
        if not isinstance(version, int) or isinstance(version, bool):
            raise ValueError(f"version={version!r}: pass an int (e.g. the policy's global_step)")
        mode = "probe" if verify is True else verify
        if mode not in (False, None, "probe", "full"):
            raise ValueError(f"verify={verify!r}; choose True/'probe', 'full' or False")
        served = self._versions[kind]
        newer = [v for v in served if v is not None and v > version]
        if newer:
            raise ValueError(f"{kind} version {version} is older than the served version {max(newer)}: refused")
        todo = [i for i, v in enumerate(served) if v is None or v < version]
        if not todo:
            return PushResult(kind, version, False, f"every engine already serves {kind} version {version}",
                              time.perf_counter() - t0, 0, None, False)
        # 1) validate and cast, before any byte leaves the driver
        state = check_push(state, self.expected(kind), kind, self._forbidden[kind], self._vocab_size)
        if self._sleeping():  # a push into a sleeping engine is lost (level 2) or lands under a wake-up
            self._deferred[kind] = (state, version, path, verify)
            return PushResult(kind, version, False, "deferred: the engines sleep; wake_up() applies it",
                              time.perf_counter() - t0, 0, None, False)
        digest = checksum(state) if mode else None
        t1 = time.perf_counter()
        # 2) serialize once (a checkpoint dir travels as its path)
        payload = None if path is not None else tensors_to_bytes(state)
        t2 = time.perf_counter()
        # 3) apply + verify engine by engine (every rank of an engine at once; a TP engine's ranks in
        #    two phases: all verify, then all keep or all restore); engines that run RPCs in the
        #    background (Ray actors) all receive it at once and are then checked in order
        base = dict(kind=kind, version=version, expected_checksum=digest, payload=payload, path=path,
                    **({"verify": mode} if mode else {}))
        kw = {**base, **(fault or {})}
        concurrent = self.transport != "native" and all(hasattr(self.engines[i], "collective_rpc_async")
                                                        for i in todo)
        pending = {i: self.engines[i].collective_rpc_async("draftadapt_push", kwargs=self._kw(i, kw))
                   for i in todo} if concurrent else {}
        engine_seconds, worker_phases = [], {}
        for i in todo:
            te = t2 if concurrent else time.perf_counter()
            try:
                if kind == "draft" and self.transport == "native":
                    outs = native.push(self, i, kw, state)
                else:
                    outs = pending[i].result() if concurrent else self.engines[i].collective_rpc(
                        "draftadapt_push", kwargs=self._kw(i, kw))
                self._settle(i, kind, version, mode, outs)
            except Exception as exc:
                done = [j for j in todo if j < i]
                later = " (later engines may too)" if concurrent and i != todo[-1] else ""
                raise RuntimeError(f"{kind} push of version {version} failed on engine {i} (engines {done} already "
                                   f"serve it{later}; push the same version again to finish): {exc}") from exc
            for out in outs:
                if out["pushed"] and mode and out["checksum"] != digest:
                    raise RuntimeError(f"engine {i} rank {out.get('rank', 0)} reports checksum {out['checksum']} for "
                                       f"{kind} version {version}, the trainer's is {digest}")
            self._versions[kind][i] = version
            if not self.engines[i].reset_prefix_cache():  # cached KV was computed with the old weights
                raise RuntimeError(f"engine {i}: the prefix cache could not be reset (requests running?); push "
                                   "between generate calls")
            engine_seconds.append(time.perf_counter() - te)
            worker_phases = worker_phases or dict(outs[0]["phases"])
        self._latest[kind] = base
        phases = {"validate": t1 - t0, "serialize": t2 - t1, **worker_phases}
        return PushResult(kind, version, True, None, time.perf_counter() - t0, len(payload or b""), digest,
                          bool(mode), tuple(engine_seconds), phases)

    def _kw(self, i: int, kw: dict) -> dict:
        return {**kw, "two_phase": True} if self.ranks[i] > 1 else kw

    def _settle(self, i: int, kind: str, version: int, mode, outs: list) -> None:
        """Every rank answered: all verified -> all keep the push; any failed -> all restore."""
        if len(outs) != self.ranks[i]:
            raise RuntimeError(f"{len(outs)} of engine {i}'s {self.ranks[i]} ranks answered")
        if self.ranks[i] == 1:
            return
        failed = [o["error"] for o in outs if not o["ok"]]
        call = "draftadapt_abort" if failed else "draftadapt_commit"
        kw = {"kind": kind, "version": version, **({"verify": mode} if failed and mode else {})}
        self.engines[i].collective_rpc(call, kwargs=kw)
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(outs)} ranks failed, every rank serves the previous "
                               f"weights: " + " | ".join(failed))

def _transport(asked: str, infos: list[dict], uuids: tuple) -> str:
    import torch.cuda

    if asked not in ("auto", "native", "inplace"):
        raise ValueError(f"transport={asked!r}; choose 'auto', 'native' or 'inplace'")
    if asked == "inplace":
        return "inplace"
    versions = sorted({str(i.get("vllm_version")) for i in infos})
    reasons = [why for why, bad in (
        (f"no GPU check recorded native pushes passing on vLLM {versions} (native.GPU_VERIFIED: "
         f"{sorted(native.GPU_VERIFIED)})", asked == "auto" and not set(versions) <= set(native.GPU_VERIFIED)),
        ("an engine's worker has no native draft update (started without weight_transfer_config={'backend': 'ipc'})",
         not all(i["native_draft_update"] for i in infos)),
        ("only the 'ipc' weight_transfer_config backend is supported",
         any(i.get("weight_transfer_backend") != native.BACKEND for i in infos)),
        ("this process sees no CUDA device", not torch.cuda.is_available()),
        ("a rank reports no GPU", any(u is None for us in uuids for u in us))) if bad]
    if asked == "native" and reasons:
        raise ValueError(f"transport='native' is unavailable: {'; '.join(reasons)}; use transport='inplace'")
    return "inplace" if reasons else "native"


def _as_engine(engine: Any) -> Any:
    """A raw `vllm.LLM` (started by the user or a framework) is wrapped in `ExternalLLM`, which
    adds `spec_counters()`; anything else is used as it is."""
    if type(engine).__name__ == "AsyncLLM":  # its calls are coroutines: they need the loop that serves it
        raise ValueError("an AsyncLLM is pushed through its event loop: EngineSwapper(ExternalAsyncLLM(async_llm, "
                         "loop)) (draftadapt.engine.async_llm), called from a thread other than the loop's")
    if not hasattr(engine, "spec_counters") and hasattr(engine, "get_metrics") and hasattr(engine, "collective_rpc"):
        from .vllm import ExternalLLM

        return ExternalLLM(engine)
    return engine


def _info(engine: Any, i: int) -> list:
    """draftadapt_info of every rank of engine i."""
    try:
        return engine.collective_rpc("draftadapt_info")
    except (AttributeError, NotImplementedError, RuntimeError, ValueError) as exc:
        raise RuntimeError(f"engine {i} ({type(engine).__name__}) does not answer draftadapt_info ({exc}): an engine "
                           "you start yourself needs LLM(worker_extension_cls='draftadapt.engine.swap_worker."
                           "DraftSwapExtension', disable_log_stats=False)") from exc


def _agreed(infos: list, engine: int) -> list:
    """Every rank of an engine must expect the same push (full tensors) and serve the same versions."""
    if not infos:
        raise RuntimeError(f"no worker of engine {engine} answered")
    for r, info in enumerate(infos[1:], 1):
        for key in ("draft", "policy", "versions", "vocab_size"):
            if info[key] != infos[0][key]:
                raise RuntimeError(f"engine {engine}: rank {r} reports a different {key} than rank 0")
    return infos


def _as_spec(raw) -> Spec | None:
    return None if raw is None else {k: (tuple(v[0]), str(v[1])) for k, v in raw.items()}


def _served(versions: list[int | None]) -> int | None:
    return None if any(v is None for v in versions) else min(versions)

