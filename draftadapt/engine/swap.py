"""Weight pushes into a running vLLM engine: the worker extension that runs inside its workers.

vLLM imports `DraftSwapExtension` into every worker (`LLM(worker_extension_cls=...)`); the
driver calls its methods with `collective_rpc`. Tensors travel as safetensors bytes because a
multiprocessing engine turns tensors inside RPC arguments into lists.

On CPU builds plain `load_weights` after start fails (weights were repacked for oneDNN), so
both the policy and the draft are reloaded with vLLM's in-place layerwise reload.
"""
from __future__ import annotations

import hashlib

import torch


def tensors_to_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})


def tensors_from_bytes(payload: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(payload)


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """Order-independent digest of names, shapes, dtypes and float32 values."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to(torch.float32).contiguous().cpu()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


class DraftSwapExtension:
    """Methods vLLM mixes into its worker class (names prefixed to avoid clashes)."""

    def draftadapt_reload_policy(self, payload: bytes | None = None, path: str | None = None) -> bool:
        """Reload the target (policy) weights in place from safetensors bytes or a checkpoint dir."""
        if payload is not None:
            weights = tensors_from_bytes(payload)
            self.reload_weights(weights_iterator=iter(weights.items()), is_checkpoint_format=True)
        else:
            self.reload_weights(weights_path=path, is_checkpoint_format=True)
        return True

    def draftadapt_has_drafter(self) -> bool:
        return self.model_runner.get_draft_model() is not None
