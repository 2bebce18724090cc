"""A dispatch mode that records the vocabulary-sized tensors ops allocate (for the tests that prove no path
builds or keeps [tokens, V] or [tokens, Vd] beyond one chunk of positions)."""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

QWEN3_VOCAB = 151_936  # the realistic vocabulary these tests run at


class LargestVocabTensor(TorchDispatchMode):
    """Per watched width w (a tensor whose last dim is w, or w + 1: a scatter's spill column), in rows
    (numel // w): `rows[w]`, the largest one tensor an op allocated; `live[w]`, the most rows alive at once
    (allocated under the mode and not yet freed: what backward keeps counts until it is released). Views and
    in-place results (sharing an input's storage) allocate nothing and are skipped; tensors made before the
    mode (the policy's own logits) are not counted, nor what a module passed to `exempt` allocates."""

    def __init__(self, *widths: int):
        super().__init__()
        self.rows = {w: 0 for w in widths}
        self.live = {w: 0 for w in widths}
        self._alive = {w: 0 for w in widths}
        self.paused = False

    def exempt(self, module: torch.nn.Module) -> list:
        """Do not count what `module`'s forward allocates (the target's own logits: what the forward makes
        anyway). Returns the hook handles; remove them after."""
        return [module.register_forward_pre_hook(lambda *a: setattr(self, "paused", True)),
                module.register_forward_hook(lambda *a: setattr(self, "paused", False))]

    def _freed(self, w: int, n: int) -> None:
        self._alive[w] -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or self.paused:
            return out
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor) or not t.dim() or t.untyped_storage().data_ptr() in inputs:
                continue
            for w in self.rows:
                if t.shape[-1] in (w, w + 1):
                    n = t.numel() // t.shape[-1]
                    self.rows[w] = max(self.rows[w], n)
                    self._alive[w] += n
                    self.live[w] = max(self.live[w], self._alive[w])
                    weakref.finalize(t, self._freed, w, n)
        return out
