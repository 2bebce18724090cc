"""Worker side of the weight pushes: `DraftSwapExtension`, mixed into vLLM's workers.

`LLM(worker_extension_cls="draftadapt.engine.swap_worker.DraftSwapExtension")` puts these
methods on every worker; `engine/swap.py` (the driver side) calls them with `collective_rpc`.
See `engine/swap.py` for the design: in-place layerwise reload, read-back checksum, rollback.

Drafters: EAGLE-3 (`Eagle3LlamaForCausalLM`) and the native MTP drafter of a MiMo target
(`method="mtp"`, `MiMoMTP`). The MTP drafter's names are mapped back to the checkpoint's
(`model.mtp_layers.{L+i}.mtp_block.X` -> `model.mtp_layers.{i}.X`); its fused qkv / gate_up are
split with the target's `packed_modules_mapping` (its block is the target's decoder layer, and
`MiMoMTP` declares none); it shares the target's `embed_tokens` and `lm_head`, never pushed.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from .. import faults
from .payload import (KINDS, check_push, check_safetensors_dir, checksum, read_safetensors_dir, tensors_from_bytes,
                      tensors_to_bytes)
from . import native
from .methods import EAGLE3, EAGLE3_HEAD, METHODS, MTP_LAYERS, OWN_HF_NAMES, SpecMethod
from .swap_verify import ShardCopy, held_bytes, read_back, startup_weights
from .swap_verify import verify as verify_rank
from .worker_layout import build_layout, draft_name, mtp_namer, spec_of


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

    A mixin: a framework that installs its own worker extension (verl, NeMo-RL, OpenRLHF) puts
    this class among its bases - `class MyExt(MyFrameworkExt, DraftSwapExtension): ...` - and
    passes `worker_extension_cls="my_pkg.MyExt"`. It keeps its state in `self._draftadapt` and
    defines no `__init__`, so it composes with any other extension.

    Every tensor-parallel rank runs each call: it receives the FULL tensors, and validates and
    verifies what its own weight loaders make of them (`swap_verify`). With `two_phase=True` a
    rank that fails restores its previous weights and REPLIES `ok: False` instead of raising, so
    the driver hears every rank and then tells all of them to keep (`draftadapt_commit`) or to
    restore (`draftadapt_abort`) the push.

    It assumes it is the only writer of the weights it pushes: the previous weights it restores
    after a failure are the last ones it loaded (at start: read back at TP = 1, read from the
    start-up checkpoint at TP > 1, where a rank holds only a shard).
    """

    def draftadapt_info(self) -> dict:
        """What a push must look like: per kind name -> [shape, dtype] (full tensors), versions, capabilities."""
        from vllm.distributed import get_tensor_model_parallel_rank

        pc = self.vllm_config.parallel_config
        if pc.pipeline_parallel_size != 1:
            raise RuntimeError("draftadapt pushes support pipeline_parallel_size = 1 engines (any tensor_parallel_size)")
        has_draft = self.model_runner.get_draft_model() is not None
        supports = getattr(self, "supports_draft_weight_updates", None)
        return {"versions": dict(self._draftadapt_state()["versions"]),
                "draft": spec_of(self._draftadapt_layout("draft")[1]) if has_draft else None,
                "policy": spec_of(self._draftadapt_layout("policy")[1]),
                "draft_forbidden": self._draftadapt_forbidden() if has_draft else {},
                "draft_method": self._draftadapt_method(),
                "vocab_size": self.model_config.get_vocab_size(),
                "tp_size": pc.tensor_parallel_size, "tp_rank": get_tensor_model_parallel_rank(),
                "native_draft_update": bool(supports()) if callable(supports) else False,
                "weight_transfer_backend": getattr(getattr(self.vllm_config, "weight_transfer_config", None),
                                                   "backend", None), "gpu_uuid": native.gpu_uuid(self),
                "vllm_version": _vllm_version()}

    def draftadapt_state(self, kind: str) -> bytes:
        """The weights the engine computes with now, checkpoint form, as safetensors bytes (TP = 1)."""
        if self.vllm_config.parallel_config.tensor_parallel_size != 1:
            raise RuntimeError("draftadapt_state reads whole weights back at tensor_parallel_size = 1 only (a TP rank "
                               "holds a shard); check a TP engine with draftadapt_check")
        return tensors_to_bytes(read_back(self._draftadapt_layout(kind)[1]))

    def draftadapt_push(self, kind: str, version: int, expected_checksum: str | None = None,
                        payload: bytes | None = None, path: str | None = None, verify: str = "probe",
                        two_phase: bool = False, force: bool = False, update_info: dict | None = None,
                        inject_failure_after: int | None = None, inject_rank: int | None = None) -> dict:
        """Apply a push: validate, check the received tensors' digest equals `expected_checksum`
        (when given; else no verification), reload in place, verify this rank's shard (`verify`:
        "probe" or "full"). On failure restore and re-verify the previous weights, then raise (or,
        `two_phase`, reply ok=False). `two_phase` success leaves the push pending until
        `draftadapt_commit` / `draftadapt_abort`. `force` re-applies a served version (repair).
        `inject_failure_after` (tests) fails the reload after n tensors, on rank `inject_rank` only
        when given."""
        from vllm.distributed import get_tensor_model_parallel_rank

        try:
            return self._draftadapt_apply(kind, version, expected_checksum, payload, path, verify, two_phase, force,
                                          inject_failure_after if inject_rank in (None, get_tensor_model_parallel_rank())
                                          else None, update_info)
        except Exception as exc:
            if not two_phase:
                raise
            return {"ok": False, "pushed": False, "rank": get_tensor_model_parallel_rank(),
                    "error": f"rank {get_tensor_model_parallel_rank()}: {type(exc).__name__}: {exc}"}

    def _draftadapt_apply(self, kind, version, expected_checksum, payload, path, verify, two_phase, force,
                          fail_after, update_info=None) -> dict:
        from vllm.distributed import get_tensor_model_parallel_rank

        rank, lap, st = get_tensor_model_parallel_rank(), _Laps(), self._draftadapt_state()
        current = st["versions"][kind]
        if current is not None and version <= current and not (force and version == current):
            if version < current:
                raise ValueError(f"{kind} version {version} is older than the served version {current}: refused")
            return {"ok": True, "pushed": False, "checksum": None, "phases": {}, "rank": rank}
        model, layout = self._draftadapt_layout(kind)
        if update_info is not None and kind != "draft":
            raise ValueError("update_info (vLLM's native transfer) carries draft pushes only")
        forbidden = self._draftadapt_forbidden() if kind == "draft" else {}
        if payload is None and update_info is None:  # a dir: maybe written by a remote client (engine/remote.py)
            _check_push_path(path, spec_of(layout), kind, forbidden)
        state = (tensors_from_bytes(payload) if payload is not None else read_safetensors_dir(path) if update_info
                 is None else native.received(update_info, self.device))
        lap("receive")
        state = check_push(state, spec_of(layout), kind, forbidden, self.model_config.get_vocab_size())
        got = checksum(state) if expected_checksum is not None else None
        if got != expected_checksum:  # before any weight is touched
            raise ValueError(f"refused {kind} push of version {version} on rank {rank}: the received tensors' digest "
                             f"{got} != the trainer's {expected_checksum} (corrupted in transit?)")
        lap("validate")
        previous = self._draftadapt_reference(kind, layout)
        lap("rollback_copy")
        try:
            self._draftadapt_reload(kind, model, state, fail_after, update_info)
            lap("load")
            self._draftadapt_check_sharing()
            if expected_checksum is not None:
                report = verify_rank(layout, state, verify)
                if not report.ok:
                    raise RuntimeError(f"rank {rank} verification ({verify}) failed: {report.problem}")
            lap("verify")
        except Exception as exc:
            self._draftadapt_restore(kind, model, layout, previous, verify)
            raise RuntimeError(f"{kind} push of version {version} failed on rank {rank}; the previous weights "
                               f"(version {current}) were restored and verified: {exc}") from exc
        kept = self._draftadapt_keep(layout, state)
        if two_phase:
            st["pending"][kind] = (version, kept, previous)
        else:
            st["last"][kind], st["versions"][kind] = kept, version
        return {"ok": True, "pushed": True, "checksum": got, "phases": lap.phases, "rank": rank}

    def draftadapt_commit(self, kind: str, version: int) -> bool:
        """Keep the pending two-phase push of `version` (every rank verified it)."""
        st = self._draftadapt_state()
        pending = st["pending"].pop(kind, None)
        if pending is None or pending[0] != version:
            return False
        st["versions"][kind], st["last"][kind] = version, pending[1]
        return True

    def draftadapt_abort(self, kind: str, version: int, verify: str = "probe") -> bool:
        """Restore the weights from before the pending push of `version` (another rank failed)."""
        st = self._draftadapt_state()
        pending = st["pending"].pop(kind, None)
        if pending is None or pending[0] != version:
            return False
        model, layout = self._draftadapt_layout(kind)
        self._draftadapt_restore(kind, model, layout, pending[2], verify)
        return True

    def draftadapt_check(self, kind: str = "draft", verify: str = "probe", repair: bool = False) -> dict:
        """Does this rank still compute with the last weights it loaded for `kind`? A level-2
        sleep, a wake-up or a fault can discard them silently. `repair` reloads them (versions
        unchanged) and re-verifies. Cost: one `verify` pass (and a reload when repairing)."""
        from vllm.distributed import get_tensor_model_parallel_rank

        st = self._draftadapt_state()
        model, layout = self._draftadapt_layout(kind)
        reference = self._draftadapt_reference(kind, layout, trust_live=False)
        report = verify_rank(layout, reference, verify)
        repaired = False
        if not report.ok and repair:
            self._draftadapt_restore(kind, model, layout, reference, verify)
            repaired = True
        full = sum(torch.Size(s.shape).numel() * getattr(s.module, s.param).element_size() for s in layout.values())
        return {"rank": get_tensor_model_parallel_rank(), "version": st["versions"][kind], "ok": report.ok,
                "problem": report.problem, "repaired": repaired, "rollback_bytes": held_bytes(reference),
                "full_bytes": full}

    def draftadapt_fault_discard_draft(self) -> None:
        """FAULT INJECTION (tests, the draft-health watchdog): zero every drafter weight a push
        carries, as vLLM's level-2 sleep discards them on GPUs (on CPU sleep is a no-op), leaving
        the recorded versions untouched - what a silent weight loss looks like to the swapper."""
        self.draftadapt_inject_fault("draft", "zero")

    def draftadapt_inject_fault(self, kind: str = "draft", fault: str = "zero") -> dict:
        """Fault injection for the watchdog's tests: change the served weights underneath the
        version bookkeeping, as a sleep/wake or a broken refit does in the field. "zero": reload
        zeros into every pushable tensor. The recorded version stays; no rollback copy is kept."""
        if fault != "zero":
            raise ValueError(f"fault={fault!r}; choose 'zero'")
        model, layout = self._draftadapt_layout(kind)
        zeros = {n: torch.zeros(s.shape, dtype=getattr(s.module, s.param).dtype) for n, s in layout.items()}
        self._draftadapt_reload(kind, model, zeros, None)
        return {"faulted": kind, "tensors": len(zeros), "version": self._draftadapt_state()["versions"][kind]}

    def draftadapt_forget_version(self, kind: str = "draft") -> int | None:
        """Forget the served version so that the next push of any version reloads (the watchdog's
        repair of weights that changed underneath it); returns the forgotten version."""
        st = self._draftadapt_state()
        old, st["versions"][kind] = st["versions"][kind], None
        return old

    def _draftadapt_state(self) -> dict:
        if not hasattr(self, "_draftadapt"):
            self._draftadapt = {"versions": {k: None for k in KINDS}, "last": {}, "pending": {}}
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

    def _draftadapt_method(self) -> str | None:
        """The spec-decode method of the drafter (vLLM's name: `methods.METHODS`); None without one."""
        spec = self.vllm_config.speculative_config
        return None if spec is None or self.model_runner.get_draft_model() is None else spec.method

    def _draftadapt_record(self) -> SpecMethod:
        """The drafter's method record (`engine/methods.py`). Another vLLM drafter (eagle, dflash, ...: a
        framework's own engine) is treated as EAGLE-3, as before the records existed: untested."""
        return METHODS.get(self._draftadapt_method(), EAGLE3)

    def _draftadapt_draft_names(self):
        """(rename vLLM -> checkpoint names, packed-module mapping) of the drafter."""
        method, draft = self._draftadapt_record(), self.model_runner.get_draft_model()
        if method.push_classes and type(draft).__name__ not in method.push_classes:
            raise RuntimeError(f"draft pushes into a {type(draft).__name__} {method.name} drafter are not supported; "
                               f"supported: {', '.join(method.push_classes)}")
        if method.push_names == OWN_HF_NAMES:  # an external draft LM: its own HF names, nothing renamed
            return (lambda name: name), None
        if method.push_names == EAGLE3_HEAD:
            return draft_name, None
        assert method.push_names == MTP_LAYERS, method
        packed = getattr(type(self.model_runner.get_model()), "packed_modules_mapping", None)
        return mtp_namer(self.model_config.hf_config.num_hidden_layers), packed

    def _draftadapt_forbidden(self) -> dict[str, str]:
        out = {"embed_tokens.weight": "a draft push must never carry embed_tokens: the drafter uses the target's"}
        method = self._draftadapt_record()
        if method.shares_embedding:  # the target's embedding under the drafter's push naming too
            out[method.embed_name] = out["embed_tokens.weight"]
        draft = self.model_runner.get_draft_model()
        rename = self._draftadapt_draft_names()[0]
        for path in self._draftadapt_shared():
            for pname, _ in draft.get_submodule(path).named_parameters():
                out[rename(f"{path}.{pname}")] = (
                    f"shared with the target: vLLM gave the drafter the target's {path} (the draft checkpoint had "
                    "none, or an identical copy); a draft push must never carry it, it would overwrite the policy's")
        return out

    def _draftadapt_layout(self, kind: str):
        if kind == "policy":
            model = self.model_runner.get_model()
            return model, build_layout(model, lambda n: n)
        if kind != "draft":
            raise ValueError(f"kind={kind!r}; choose one of {KINDS}")
        model = self.model_runner.get_draft_model()
        if model is None:
            raise RuntimeError("the engine has no drafter: start it with EngineConfig(spec=SpecConfig('eagle3', ...))")
        skip = set(self._draftadapt_shared())
        if self._draftadapt_record().shares_embedding:  # a draft LM owns its embedding: vLLM shares none with it
            skip.add("model.embed_tokens")
        skip = sorted(skip)
        rename, packed = self._draftadapt_draft_names()
        return model, build_layout(model, rename, skip, packed)

    def _draftadapt_reload(self, kind: str, model, state: dict, fail_after: int | None,
                           update_info: dict | None = None) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.inplace import reload_weights

        items = iter(state.items()) if fail_after is None else _failing(state.items(), fail_after)
        if kind == "policy":  # the worker's own path: also drops LoRA / encoder caches
            self.reload_weights(weights_iterator=items, is_checkpoint_format=True)
            _reprocess_tied(model)
            return
        items = faults.killing_after_first(items, "push")
        with set_current_vllm_config(self.vllm_config), torch.no_grad(), _detached(model, self._draftadapt_shared()):
            if update_info is not None:  # vLLM's own session loads what the IPC handles point at
                native.load(self, update_info)
                return
            reload_weights(self.vllm_config, model, weights_iterator=items, weights_path=None,
                           is_checkpoint_format=True)

    def _draftadapt_restore(self, kind: str, model, layout, previous: dict, verify: str = "probe") -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

        with set_current_vllm_config(self.vllm_config), torch.no_grad():
            finalize_layerwise_reload(model, self.model_config)  # put back layers a failed load left on meta
        self._draftadapt_reload(kind, model, previous, None)
        report = verify_rank(layout, previous, verify)
        if not report.ok:
            raise RuntimeError(f"ROLLBACK FAILED: the {kind} weights are undefined ({report.problem}); restart the "
                               "engine")

    def _draftadapt_reference(self, kind: str, layout, trust_live: bool = True) -> dict:
        """The last weights loaded for `kind` (the rollback copy): the last push, else the start-up
        ones - read back at TP = 1 (`trust_live`), else read from the start-up checkpoint."""
        st = self._draftadapt_state()
        if kind in st["last"]:
            return st["last"][kind]
        if trust_live and self.vllm_config.parallel_config.tensor_parallel_size == 1:
            st["last"][kind] = read_back(layout)
        else:
            spec = self.vllm_config.speculative_config
            path = spec.model if kind == "draft" and spec is not None and spec.model else self.model_config.model
            st["last"][kind] = self._draftadapt_keep(layout, startup_weights(path, spec_of(layout), kind))
        return st["last"][kind]

    def _draftadapt_keep(self, layout, state: dict):
        """What this rank keeps of full tensors it may restore later: all of them at TP = 1, only
        its own shard's elements at TP > 1 (`swap_verify.ShardCopy`: 1/TP of the sharded bytes)."""
        return state if self.vllm_config.parallel_config.tensor_parallel_size == 1 else ShardCopy(layout, state)

    def _draftadapt_check_sharing(self) -> None:
        """The drafter still uses the target's own embedding (and lm_head, where shared) modules,
        so a policy refit reached it too, and no draft push re-parented them."""
        if self.model_runner.get_draft_model() is None:
            return
        now, then = self._draftadapt_shared(live=True), self._draftadapt_shared()
        if now != then:
            raise RuntimeError(f"the drafter shared {then} with the target before this push and {now} after it")


PUSH_ROOT_ENV = "DRAFTADAPT_PUSH_ROOT"  # set by `python -m draftadapt.server`: pushes by path come from here only


def _check_push_path(path: str | None, spec: dict, kind: str, forbidden: dict) -> None:
    """A push by path (a policy checkpoint dir, or a remote client's file): inside the server's
    push root when one is set, and its safetensors headers valid before any data is read."""
    import os
    from pathlib import Path

    if path is None:
        raise ValueError(f"a {kind} push needs payload, path or update_info")
    root = os.environ.get(PUSH_ROOT_ENV)
    if root:  # resolved: a symlinked dir or file cannot lead out of the root
        inside = [Path(path).resolve(), *(f.resolve() for f in Path(path).glob("*.safetensors"))]
        if not all(p.is_relative_to(Path(root).resolve()) for p in inside):
            raise ValueError(f"refused {kind} push: {path} is (or links) outside this server's push root {root} "
                             f"({PUSH_ROOT_ENV})")
    check_safetensors_dir(path, spec, kind, forbidden)


def _reprocess_tied(model) -> None:
    """Redo the post-load processing of modules whose weight IS an earlier module's (a tied
    lm_head). vLLM's layerwise reload loads the embedding, skips the tied head ("ParallelLMHead:
    Failed to load weights"), and on CPU the head's matmul keeps its packed copy of the OLD
    weights: without this a tied policy's refit decodes with a stale output head."""
    owners: set[int] = set()
    for mod in model.modules():
        params = list(mod.parameters(recurse=False))
        method = getattr(mod, "quant_method", None)
        if method is not None and any(id(p) in owners for p in params):
            method.process_weights_after_loading(mod)
        owners.update(id(p) for p in params)


def _vllm_version() -> str:
    import vllm

    return vllm.__version__
