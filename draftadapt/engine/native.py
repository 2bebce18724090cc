"""Draft pushes over vLLM's native weight transfer (CUDA IPC): an OPT-IN transport of the swapper.

Where the engine was started with `weight_transfer_config={"backend": "ipc"}`,
`Worker.supports_draft_weight_updates()` is true and vLLM 0.32 loads a draft through the worker's
`start_draft_weight_update` -> `update_weights(update_info)` -> `finish_weight_update`. Here that
session is one more way for `DraftSwapExtension.draftadapt_push` to load a draft: the push keeps
its whole contract (version, digest of the received tensors checked before any weight moves,
per-rank verification, rollback, two phases at TP > 1); only the bytes travel differently - the
trainer exports CUDA tensors as IPC handles and every rank maps them without a host copy.

    driver: export_handles (plain data)  ->  collective_rpc("draftadapt_push", update_info=...)
    each rank: received (map + digest) -> load (vLLM's session, shared modules detached, always
               closed) -> verify -> keep, or restore the previous weights

What it fixes against a naive use of vLLM's API:
- the handles travel as plain data (sizes, ints, bytes, the dtype by name): `torch.multiprocessing.
  reduce_tensor` puts two classes and a torch.dtype into them, which vLLM's msgpack encoder
  (`v1/serial_utils.py:220-225`) refuses on a multiprocessing engine unless
  VLLM_ALLOW_INSECURE_SERIALIZATION=1; each rank rebuilds the typed args itself.
- the session is closed on every path: vLLM closes it when `update_weights` raises
  (`gpu_worker.py:1582-1585`) but not when `finish_weight_update` raises (`:1597-1600`).
- the modules the drafter shares with the target (embed_tokens, maybe lm_head) are out of its
  tree during the session, so `initialize_layerwise_reload` cannot put the target's on meta.

Not the default: no GPU has run it yet. `auto` picks it only on a vLLM version listed in
`GPU_VERIFIED` (a GPU run of `scripts/gpu_check.sh` that recorded native pushes passing).
Only the `ipc` backend: NCCL needs a trainer-side process group this library does not own. The
driver needs a CUDA device that sees every rank's GPU (a colocated trainer).
"""
from __future__ import annotations

from typing import Any

import torch

BACKEND = "ipc"
GPU_VERIFIED: dict[str, str] = {}  # vLLM version -> the GPU check JSON that recorded native pushes passing


def plain_args(args: tuple) -> list:
    """`reduce_tensor`'s rebuild_cuda_tensor args as plain data (what msgpack carries): the
    tensor and storage classes dropped (always torch.Tensor / TypedStorage here), the dtype by
    name, sizes as lists; handles stay bytes."""
    tensor_cls, size, stride, offset, storage_cls, dtype, *rest = args
    assert tensor_cls is torch.Tensor and storage_cls is torch.TypedStorage, (tensor_cls, storage_cls)
    return [list(size), list(stride), int(offset), str(dtype).removeprefix("torch."), *rest]


def typed_args(plain: list, device_index: int) -> tuple:
    """`plain_args` back to rebuild_cuda_tensor's args, on this rank's device (index 6, as vLLM's
    ipc engine sets it)."""
    size, stride, offset, dtype, _device, *rest = plain
    return (torch.Tensor, torch.Size(size), tuple(stride), offset, torch.TypedStorage, getattr(torch, dtype),
            device_index, *rest)


def export_handles(state: dict[str, torch.Tensor], uuids: list[str]) -> tuple[dict, list[torch.Tensor]]:
    """Plain-data update info for vLLM's ipc engine (unpacked; `IPCWeightTransferUpdateInfo`'s
    fields) with a copy of `state` on each GPU in `uuids`; returns it and the tensors that must
    stay alive until every rank replied."""
    from torch.multiprocessing.reductions import reduce_tensor

    devices = {str(torch.cuda.get_device_properties(i).uuid): i for i in range(torch.cuda.device_count())}
    unseen = sorted(set(uuids) - set(devices))
    if unseen:
        raise RuntimeError(f"the engine's GPUs {unseen} are not visible to this process: native draft pushes need "
                           "a colocated trainer; use EngineSwapper(..., transport='inplace')")
    names = sorted(state)
    handles: list[dict[str, list]] = [{} for _ in names]
    keep = []
    for uuid in sorted(set(uuids)):
        for j, name in enumerate(names):
            t = state[name].detach().to(f"cuda:{devices[uuid]}").contiguous()
            keep.append(t)
            handles[j][uuid] = plain_args(reduce_tensor(t)[1])
    info = {"names": names, "dtype_names": [str(state[n].dtype).removeprefix("torch.") for n in names],
            "shapes": [list(state[n].shape) for n in names], "ipc_handles": handles}
    return info, keep


def typed_update_info(info: dict, device_index: int) -> dict:
    """The update info vLLM's `update_weights` reads (typed rebuild args), from `export_handles`'."""
    return {**info, "ipc_handles": [{u: typed_args(a, device_index) for u, a in h.items()}
                                    for h in info["ipc_handles"]]}


def received(info: dict, device: torch.device) -> dict[str, torch.Tensor]:
    """The pushed tensors as this rank maps them, copied to the CPU (for the digest and the
    verification; vLLM maps the same handles again when it loads them)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    if getattr(device, "type", None) != "cuda":
        raise RuntimeError(f"this rank runs on {device}: CUDA IPC handles map only onto a CUDA device; push with "
                           "EngineSwapper(..., transport='inplace')")
    uuid = str(torch.cuda.get_device_properties(device.index).uuid)
    out = {}
    for name, handle in zip(info["names"], info["ipc_handles"]):
        if uuid not in handle:
            raise ValueError(f"no IPC handle for this rank's GPU {uuid}: the driver exported for {sorted(handle)}")
        out[name] = rebuild_cuda_tensor(*typed_args(handle[uuid], device.index)).to("cpu")
    return out


def load(worker: Any, info: dict) -> None:
    """Load a draft through vLLM's own draft-update session on this rank; the session is closed
    whatever fails. The caller detaches the modules the drafter shares with the target and
    restores the previous weights on failure (a failed session can leave layers on meta)."""
    worker.start_draft_weight_update()
    try:
        worker.update_weights(typed_update_info(info, worker.device.index))
        worker.finish_weight_update()
    finally:
        close_session(worker)


def close_session(worker: Any) -> None:
    """End vLLM 0.32's update session if it is still open: `finish_weight_update` raising (in
    finalize) leaves `_weight_update_active` set (gpu_worker.py:1597-1600), and every later
    `start_draft_weight_update` would then refuse (:1534-1538)."""
    if getattr(worker, "_weight_update_active", False):
        worker._weight_update_active = False
        worker.weight_transfer_engine.reset_weight_update_target()


def push(swapper, i: int, kw: dict, state: dict[str, torch.Tensor]) -> list[dict]:
    """One native draft push into engine `i`: every rank's `draftadapt_push` reply."""
    info, keep = export_handles(state, list(swapper.gpu_uuids[i]))
    try:
        return swapper.engines[i].collective_rpc("draftadapt_push", kwargs=swapper._kw(i, {**kw, "payload": None,
                                                                                           "update_info": info}))
    finally:
        del keep
        torch.cuda.ipc_collect()


def gpu_uuid(worker: Any) -> str | None:
    """This rank's physical GPU (None off CUDA)."""
    device = getattr(worker, "device", None)
    if not torch.cuda.is_available() or device is None or getattr(device, "type", None) != "cuda":
        return None
    return str(torch.cuda.get_device_properties(device.index).uuid)
