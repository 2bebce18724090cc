"""Where a pushed tensor lands in a running vLLM model: each checkpoint name's module, parameter,
shard and shape (`layout`), the drafters' name maps (EAGLE-3, MTP), and the name -> [shape, dtype]
spec a push is checked against before any weight moves. Reads the model; changes nothing.
"""
from __future__ import annotations

import re
from typing import Any, NamedTuple, Sequence


class Slot(NamedTuple):
    module: Any  # vLLM module that holds the tensor
    param: str  # its parameter name there
    rows: tuple[int, int] | None  # [start, stop) of dim 0 at TP = 1 (fused qkv / gate_up, padded vocab); None = all
    shape: tuple[int, ...]  # checkpoint shape (the full tensor, at any tensor-parallel size)
    probe: bool  # read through the layer's matmul (CPU keeps only a repacked copy)
    shard: Any = None  # the loader's shard id in a fused module: "q"/"k"/"v" or 0, 1, ...; None = not fused


def build_layout(model, rename, skip: Sequence[str] = (), packed: dict | None = None) -> dict[str, Slot]:
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
                out[rename(f"{mod_name}.{pname}")] = Slot(mod, pname, (0, mod.org_vocab_size),
                                                           (mod.org_vocab_size, mod.embedding_dim),
                                                           cpu and isinstance(mod, ParallelLMHead))
            elif isinstance(mod, LinearBase):
                subs = packed.get(leaf, [leaf])
                sizes, shards = full_sizes(mod, len(subs))
                assert len(subs) == len(sizes), (mod_name, subs, sizes)
                start = 0
                for sub, size, shard in zip(subs, sizes, shards):
                    shape = (size, mod.input_size) if pname == "weight" else (size,)
                    name = f"{prefix}.{sub}.{pname}" if prefix else f"{sub}.{pname}"
                    out[rename(name)] = Slot(mod, pname, (start, start + size), shape, cpu and pname == "weight",
                                              shard)
                    start += size
            else:
                name = f"{mod_name}.{pname}" if mod_name else pname
                out[rename(name)] = Slot(mod, pname, None, tuple(p.shape), False)
    return out


def full_sizes(mod, parts: int) -> tuple[list[int], list]:
    """Checkpoint output sizes of a linear layer's parts and the shard ids its loader takes."""
    from vllm.model_executor.layers.linear import QKVParallelLinear

    if parts == 1:
        return [mod.output_size], [None]
    if isinstance(mod, QKVParallelLinear):  # output_sizes count replicated kv heads once per rank
        kv = mod.total_num_kv_heads
        return [mod.total_num_heads * mod.head_size, kv * mod.head_size, kv * mod.v_head_size], ["q", "k", "v"]
    return list(mod.output_sizes), list(range(parts))


def draft_name(name: str) -> str:
    """vLLM's Eagle3LlamaForCausalLM names -> the checkpoint names its load_weights reads."""
    name = name.removeprefix("model.").replace("draft_id_to_target_id", "d2t")
    return "midlayer." + name.removeprefix("layers.0.") if name.startswith("layers.0.") else name


_MTP_LAYER = re.compile(r"^model\.mtp_layers\.(\d+)\.(?:mtp_block\.)?")


def mtp_namer(start: int):
    """vLLM's MiMoMTP names -> checkpoint names (`MiMoMTP.hf_to_vllm_mapper` inverted): layer
    index `start + i` -> i, the `mtp_block.` wrapper dropped."""
    def rename(name: str) -> str:
        m = _MTP_LAYER.match(name)
        return name if m is None else f"model.mtp_layers.{int(m.group(1)) - start}." + name[m.end():]
    return rename


def spec_of(layout: dict[str, Slot]) -> dict[str, list]:
    return {n: [list(s.shape), str(getattr(s.module, s.param).dtype)] for n, s in layout.items()}
