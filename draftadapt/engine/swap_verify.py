"""Worker-side checks of pushed weights, per tensor-parallel rank: probe, full read-back, rollback copy.

A push carries FULL tensors in checkpoint form to every rank. Each rank derives what it should
now hold by running its own modules' weight loaders (`weight_loader` of the vLLM layer: column /
row / qkv / merged / vocab sharding, vocab padding) on the full tensors into scratch parameters
of its local shape, then compares that with what its kernels compute with:

- `probe` (default): each linear layer's kernel (`quant_method.apply`, the repacked oneDNN/SGL
  copy on CPU) applied to a fixed seeded input x [8, K_local], compared with x @ W_expected^T in
  float32: max |y_live - y_exp| <= rtol(dtype) * max |y_exp|, rtol = 2 eps(dtype) + 1e-4
  (fp32 1.0e-4, bf16 0.016, fp16 2.1e-3). Other parameters (norms, d2t, biases, embeddings) are
  compared exactly. Cost O(8 P) flops for P parameters: ~7 GFLOP for an 8B policy's 0.4B-param
  EAGLE-3 head, against ~5 TFLOP for the read-back below.
- `full`: every linear weight read back through its kernel on chunks of the identity (exact:
  one product by 1.0 and exact zeros per output) and compared exactly. O(K P) flops.

Together with the digest of the received tensors (checked by the worker against the trainer's)
the probe proves: the bytes arrived intact, and the kernels compute with what this rank's loaders
make of them. It does not prove bit-equality of every weight (a change far below the tolerance in
one element would pass the probe); `full` does, at O(K) times the cost.

Also here: `read_back` (the weights in checkpoint form, TP = 1 only: fused qkv / gate_up split,
padded vocab rows dropped), the identity-matmul read-through, the start-up weights from disk, and
`ShardCopy`: a TP > 1 rank's rollback copy, which keeps only the elements its own loaders take
(1/TP of every sharded tensor) instead of the full tensors (TP copies of the draft per engine).
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping, NamedTuple

import torch

PROBE_ROWS = 8
PROBE_SEED = 1234
VERIFY_MODES = ("probe", "full")


class Report(NamedTuple):
    ok: bool
    worst: float  # largest relative probe error (0.0 in full mode)
    problem: str | None  # the first tensor that failed, and how


def rtol(dtype: torch.dtype) -> float:
    return 2 * torch.finfo(dtype).eps + 1e-4


def local_shape(mod, pname: str, p: torch.Tensor) -> tuple[int, ...]:
    """Shape of this rank's copy (CPU kernels keep a repacked copy and leave `weight` empty)."""
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    if pname == "weight" and isinstance(mod, LinearBase):
        out = sum(getattr(mod, "output_partition_sizes", None) or [mod.output_size])
        return (out, getattr(mod, "input_size_per_partition", mod.input_size))
    if pname == "weight" and isinstance(mod, VocabParallelEmbedding):
        return (mod.num_embeddings_per_partition, mod.embedding_dim)
    return tuple(p.shape)


@torch.no_grad()
def expected_shard(mod, pname: str, parts: Iterable[tuple[Any, torch.Tensor]], dtype: torch.dtype) -> torch.Tensor:
    """What this rank's weight loader makes of the full tensors `parts` = [(shard id, tensor)]
    (shard id: "q"/"k"/"v" or an int for fused modules, None otherwise), on the CPU."""
    from vllm.model_executor.layers.linear import LinearBase, RowParallelLinear
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    p = getattr(mod, pname)
    scratch = torch.nn.Parameter(torch.zeros(local_shape(mod, pname, p), dtype=dtype), requires_grad=False)
    loader = None
    if isinstance(mod, LinearBase):
        loader = type(mod).weight_loader
        if pname == "weight":
            scratch.output_dim, scratch.input_dim = 0, 1
        elif not isinstance(mod, RowParallelLinear):  # a row-parallel bias is replicated
            scratch.output_dim = 0
    elif isinstance(mod, VocabParallelEmbedding) and pname == "weight":
        loader, scratch.output_dim = type(mod).weight_loader, 0
    for shard, t in parts:
        t = t.to(dtype)
        if loader is None:
            scratch.data.copy_(t)
        elif shard is None:
            loader(mod, scratch, t)
        else:
            loader(mod, scratch, t, shard)
    return scratch.data


def groups(layout: dict) -> dict[tuple[int, str], tuple[Any, str, bool, list]]:
    """(module, param) -> (module, param name, probe?, [(shard id, checkpoint name)])."""
    out: dict = {}
    for name, s in layout.items():
        key = (id(s.module), s.param)
        out.setdefault(key, (s.module, s.param, s.probe, []))[3].append((s.shard, name))
    return out


@torch.no_grad()
def verify(layout: dict, state: dict[str, torch.Tensor], mode: str = "probe") -> Report:
    """Does this rank compute with what its loaders make of `state` (full, checkpoint form)?"""
    if mode not in VERIFY_MODES:
        raise ValueError(f"verify={mode!r}; choose one of {VERIFY_MODES} (or False for no verification)")
    worst = 0.0
    for mod, pname, probe, parts in groups(layout).values():
        p = getattr(mod, pname)
        want = expected_shard(mod, pname, [(sid, state[n]) for sid, n in parts], p.dtype).to(p.device)
        label = "+".join(n for _, n in parts)
        if not probe:
            if not torch.equal(p.data, want):
                return Report(False, worst, f"{label}: differs from what the loader makes of the pushed tensor")
        elif mode == "full":
            if not torch.equal(through_matmul(mod, p.dtype, p.device), want):
                return Report(False, worst, f"{label}: the kernel's weights differ from the pushed tensor")
        else:
            g = torch.Generator().manual_seed(PROBE_SEED)
            x = torch.randn(PROBE_ROWS, want.shape[1], generator=g).to(p.dtype).to(p.device)
            y_exp = x.float() @ want.float().t()  # [8, N_local]
            err = float((mod.quant_method.apply(mod, x).float() - y_exp).abs().max())
            rel = err / max(float(y_exp.abs().max()), 1e-30)
            worst = max(worst, rel)
            if rel > rtol(p.dtype):
                return Report(False, worst, f"{label}: probe error {rel:.3g} of max|y| > tolerance {rtol(p.dtype):.3g}")
    return Report(True, worst, None)


@torch.no_grad()
def read_back(layout: dict) -> dict[str, torch.Tensor]:
    """The weights the engine computes with, in checkpoint form (tensor_parallel_size = 1)."""
    probed: dict[int, torch.Tensor] = {}
    out = {}
    for name, s in layout.items():
        p = getattr(s.module, s.param)
        if s.probe:
            if id(s.module) not in probed:
                probed[id(s.module)] = through_matmul(s.module, p.dtype, p.device)
            full = probed[id(s.module)]
        else:
            full = p
        t = full if s.rows is None else full[s.rows[0]:s.rows[1]]
        out[name] = t.detach().cpu().clone()
    return out


def through_matmul(mod, dtype: torch.dtype, device, chunk: int = 1024) -> torch.Tensor:
    """This rank's W [N_local, K_local] of a linear / lm_head, applied to I_K in chunks (on CPU
    the kernel holds only a repacked copy; elsewhere the parameter is read directly)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return getattr(mod, "weight").data
    k = getattr(mod, "embedding_dim", None) or getattr(mod, "input_size_per_partition", mod.input_size)
    parts = []
    for i in range(0, k, chunk):
        n = min(chunk, k - i)
        eye = torch.zeros(n, k, dtype=dtype, device=device)
        eye[torch.arange(n), torch.arange(i, i + n)] = 1
        parts.append(mod.quant_method.apply(mod, eye))  # [n, N] = rows i..i+n of W^T
    return torch.cat(parts).t()


def startup_weights(path: str, spec: dict, kind: str) -> dict[str, torch.Tensor]:
    """The tensors of checkpoint dir `path` a push of `kind` would carry (the weights the engine
    loaded at start), cast to the engine's dtypes."""
    from .payload import _dtype, read_safetensors_dir

    found = read_safetensors_dir(path)
    missing = sorted(set(spec) - set(found))
    if missing:
        raise RuntimeError(f"the start-up {kind} checkpoint {path} lacks {missing}: no rollback copy for this "
                           "tensor-parallel rank; push a complete {kind} first on a tensor_parallel_size=1 engine")
    return {k: found[k].to(_dtype(spec[k][1])).contiguous() for k in spec}


class ShardCopy(Mapping):
    """A tensor-parallel rank's copy of checkpoint tensors that keeps only this rank's elements.

    Which elements of a full tensor a rank's weight loader takes is found by running the loader on
    an index tensor (1..numel, int64) into a scratch parameter of the rank's local shape. Kept:
    those elements' values (1/TP of a sharded tensor, all of a replicated one). Reading a name
    gives the full-shape tensor with them in place and zeros elsewhere - all this rank's loaders
    and `verify` read - built one tensor at a time (transient: the full tensor and its index,
    8 bytes per element, only while it is read: at a restore or a check).
    """

    def __init__(self, layout: dict, state: Mapping[str, torch.Tensor]):
        self._layout, self._shapes, self._values = layout, {}, {}
        for name, t in state.items():
            self._shapes[name] = (tuple(t.shape), t.dtype)
            self._values[name] = t.reshape(-1)[self._positions(name)].clone()

    def _positions(self, name: str) -> torch.Tensor:
        """[n_local] int64: flat positions in the full tensor of the elements this rank holds."""
        slot, (shape, _) = self._layout[name], self._shapes[name]
        numel = int(torch.Size(shape).numel())
        index = torch.arange(1, numel + 1, dtype=torch.int64).view(shape)
        local = expected_shard(slot.module, slot.param, [(slot.shard, index)], torch.int64).reshape(-1)
        return local[local > 0] - 1

    def __getitem__(self, name: str) -> torch.Tensor:
        shape, dtype = self._shapes[name]
        full = torch.zeros(shape, dtype=dtype)
        full.view(-1)[self._positions(name)] = self._values[name]
        return full

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self._values.values())


def held_bytes(copy: Mapping[str, torch.Tensor]) -> int:
    """Bytes a rollback copy keeps (a ShardCopy's shards, or a plain dict's full tensors)."""
    if isinstance(copy, ShardCopy):
        return copy.nbytes
    return sum(t.numel() * t.element_size() for t in copy.values())
