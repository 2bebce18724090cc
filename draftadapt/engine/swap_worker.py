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

import re
import time
from contextlib import contextmanager
from typing import Any, Iterator, NamedTuple, Sequence

import torch

from .swap import KINDS, check_push, checksum, read_safetensors_dir, tensors_from_bytes, tensors_to_bytes

class _Slot(NamedTuple):
    module: Any  # vLLM module that holds the tensor
    param: str  # its parameter name there
    rows: tuple[int, int] | None  # [start, stop) of dim 0 (fused qkv / gate_up, padded vocab); None = all
    shape: tuple[int, ...]  # checkpoint shape
    probe: bool  # read through the layer's matmul (CPU keeps only a repacked copy)


def _layout(model, rename, skip: Sequence[str] = (), packed: dict | None = None) -> dict[str, _Slot]:
    """Checkpoint name -> where the engine keeps it, for every parameter outside `skip`.
    `packed`: fused module -> its checkpoint parts, when `type(model)` declares none."""
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
    from vllm.platforms import current_platform

    cpu = current_platform.is_cpu()
    packed = getattr(type(model), "packed_modules_mapping", None) or packed or {}
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
                name = f"{mod_name}.{pname}" if mod_name else pname
                out[rename(name)] = _Slot(mod, pname, None, tuple(p.shape), False)
    return out


def _draft_name(name: str) -> str:
    """vLLM's Eagle3LlamaForCausalLM names -> the checkpoint names its load_weights reads."""
    name = name.removeprefix("model.").replace("draft_id_to_target_id", "d2t")
    return "midlayer." + name.removeprefix("layers.0.") if name.startswith("layers.0.") else name


_MTP_LAYER = re.compile(r"^model\.mtp_layers\.(\d+)\.(?:mtp_block\.)?")


def _mtp_namer(start: int):
    """vLLM's MiMoMTP names -> checkpoint names (`MiMoMTP.hf_to_vllm_mapper` inverted): layer
    index `start + i` -> i, the `mtp_block.` wrapper dropped."""
    def rename(name: str) -> str:
        m = _MTP_LAYER.match(name)
        return name if m is None else f"model.mtp_layers.{int(m.group(1)) - start}." + name[m.end():]
    return rename


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
    after a failure are the last ones it loaded (read back from the engine on first use).
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
                "draft_method": self._draftadapt_method(),
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

    def _draftadapt_method(self) -> str | None:
        """The spec-decode method of the drafter ("eagle3", "mtp", ...); None without one."""
        spec = self.vllm_config.speculative_config
        return None if spec is None or self.model_runner.get_draft_model() is None else spec.method

    def _draftadapt_draft_names(self):
        """(rename vLLM -> checkpoint names, packed-module mapping) of the drafter."""
        if self._draftadapt_method() == "draft_model":  # an external draft LM: its own HF names, nothing renamed
            return (lambda name: name), None
        if self._draftadapt_method() != "mtp":
            return _draft_name, None
        draft = self.model_runner.get_draft_model()
        if type(draft).__name__ != "MiMoMTP":
            raise RuntimeError(f"draft pushes into a {type(draft).__name__} MTP drafter are not supported; "
                               "supported: MiMoMTP (MiMoForCausalLM targets)")
        packed = getattr(type(self.model_runner.get_model()), "packed_modules_mapping", None)
        return _mtp_namer(self.model_config.hf_config.num_hidden_layers), packed

    def _draftadapt_forbidden(self) -> dict[str, str]:
        out = {"embed_tokens.weight": "a draft push must never carry embed_tokens: the drafter uses the target's"}
        if self._draftadapt_method() == "mtp":
            out["model.embed_tokens.weight"] = out["embed_tokens.weight"]
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
            return model, _layout(model, lambda n: n)
        if kind != "draft":
            raise ValueError(f"kind={kind!r}; choose one of {KINDS}")
        model = self.model_runner.get_draft_model()
        if model is None:
            raise RuntimeError("the engine has no drafter: start it with EngineConfig(spec=SpecConfig('eagle3', ...))")
        skip = set(self._draftadapt_shared())
        if self._draftadapt_method() != "draft_model":  # a draft LM owns its embedding: vLLM shares none with it
            skip.add("model.embed_tokens")
        skip = sorted(skip)
        rename, packed = self._draftadapt_draft_names()
        return model, _layout(model, rename, skip, packed)

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
