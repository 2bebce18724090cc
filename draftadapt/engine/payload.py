"""The push payload, checked where it enters: safetensors bytes in/out, the digest, name/shape/dtype
validation against what an engine expects, and tied-weight aliases dropped from a state dict.

Split from `swap.py` (which moves payloads into engines); it touches no engine and no vLLM internals.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Mapping

import torch

KINDS = ("draft", "policy")
MTP_PREFIX = "model.mtp_layers."  # checkpoint names of a policy's own MTP layers (MiMo)
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
    """Order-independent digest of names, shapes, dtypes and the bytes of the values (no float32
    copy: hashing bf16 weights as float32 doubled the bytes and cost a conversion pass - at hidden
    2048 the two digests of a push took longer than the probe). Compare tensors in one dtype."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # buffer protocol: no copy
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


# safetensors dtype tags a push may carry (no F64/I8/bool/fp8: nothing the engines serve)
_ST_DTYPES = {"F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
              "I64": (torch.int64, 8), "I32": (torch.int32, 4)}
MAX_HEADER_BYTES = 1 << 20  # a safetensors header listing a few thousand tensors is ~100-300 KB


def check_safetensors_dir(path: str | os.PathLike, spec: Spec, kind: str,
                          forbidden: Mapping[str, str] | None = None) -> int:
    """Refuse a checkpoint dir from outside (a push over HTTP) from its headers alone, before a
    byte of tensor data is read: unknown or forbidden names, dtypes other than F32/F16/BF16/I64/I32
    or of the wrong kind (float vs int), wrong shapes, a header over 1 MiB, or a file larger than
    its header says (oversize). Returns the payload bytes. Values (NaN, d2t) are `check_push`'s
    job once loaded. O(header) time and memory."""
    forbidden = dict(forbidden or {})
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ValueError(f"refused {kind} push: {path} holds no *.safetensors file")
    problems, total = [], 0
    for f in files:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= MAX_HEADER_BYTES or n + 8 > size:
                raise ValueError(f"refused {kind} push: {f.name} has a header of {n} bytes (limit "
                                 f"{MAX_HEADER_BYTES}, file {size}): not a safetensors file, or oversize")
            try:
                header = json.loads(fh.read(n))
            except ValueError as exc:
                raise ValueError(f"refused {kind} push: {f.name} has an unreadable header ({exc})") from exc
        if not isinstance(header, dict):
            raise ValueError(f"refused {kind} push: {f.name} has no tensor table")
        data = 0
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            data = max(data, _header_problem(name, meta, spec, forbidden, problems))
        if size != 8 + n + data:
            problems.append(f"{f.name}: {size} bytes, its header accounts for {8 + n + data} (oversize)")
        total += size
    if problems:
        raise ValueError(f"refused {kind} push before loading it (the engine keeps serving its current weights): "
                         + "; ".join(problems))
    return total


def _header_problem(name: str, meta, spec: Spec, forbidden: Mapping[str, str], problems: list) -> int:
    """Append what is wrong with one header entry; return the end offset of its data."""
    try:
        tag, shape, (start, end) = meta["dtype"], tuple(int(x) for x in meta["shape"]), meta["data_offsets"]
    except (KeyError, TypeError, ValueError):
        problems.append(f"{name}: malformed header entry")
        return 0
    if name in forbidden:
        problems.append(f"{name}: {forbidden[name]}")
    elif name not in spec:
        problems.append(f"{name}: unknown tensor (the engine has no such weight)")
    elif tag not in _ST_DTYPES:
        problems.append(f"{name}: dtype {tag} (allowed: {sorted(_ST_DTYPES)})")
    elif _ST_DTYPES[tag][0].is_floating_point != _dtype(spec[name][1]).is_floating_point:
        problems.append(f"{name}: dtype {tag}, expected {spec[name][1]}")
    elif shape != tuple(spec[name][0]):
        problems.append(f"{name}: shape {shape}, expected {tuple(spec[name][0])}")
    elif end - start != torch.Size(shape).numel() * _ST_DTYPES[tag][1]:
        problems.append(f"{name}: {end - start} data bytes for shape {shape} {tag}")
    return int(end)


TIED = (("lm_head.weight", "model.embed_tokens.weight"),)  # (output head, input embedding) a tied model shares


def drop_aliases(state: Mapping[str, torch.Tensor], spec: Spec) -> dict[str, torch.Tensor]:
    """`state` without the second names of shared tensors the engine loads once.

    A tied policy's `state_dict()` carries `lm_head.weight` and `model.embed_tokens.weight`, one
    storage; vLLM's model ties them and lists only the embedding. A name the engine does not list
    is dropped when its tensor is another listed name's tensor (same data_ptr, shape, stride and
    dtype: any alias), or when it is a tied output head equal to the input embedding (a state read
    from a file holds two copies). A head that differs from the embedding the engine ties it to
    is refused, naming both: the engine cannot serve it.
    """
    extra = [n for n in state if n not in spec]
    if not extra:
        return dict(state)
    owners = {_storage_key(state[n]): n for n in state if n in spec and state[n].numel()}
    out = dict(state)
    for name in extra:
        t = state[name]
        if t.numel() and _storage_key(t) in owners:
            del out[name]
            continue
        for head, embed in TIED:
            if name == head and embed in spec and embed in state:
                if tuple(t.shape) == tuple(state[embed].shape) and torch.equal(t, state[embed]):
                    del out[name]
                else:
                    raise ValueError(f"refused policy refit: {head} differs from {embed}, but the engine's policy ties "
                                     "them (tie_word_embeddings=True in its config.json) and serves the embedding as "
                                     f"the head; tie them in the policy (model.tie_weights()) or serve an untied "
                                     "checkpoint")
    return out


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device, t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, str(name).removeprefix("torch."))
