"""Peak memory and time of ONE TTT training step (K=3: forward, backward, AdamW) vs sequence length.

Arms: `old` = the former dense unroll (`ttt.unroll_dense`, masks [B, T, k*T]) with the former
unchunked loss (K x [T, Vd] fp32 logits alive); `new` = `ttt.ttt_loss` (SDPA causal step 1,
chunked causal+diagonal steps 2..K, loss in chunks recomputed in backward). Each in fp32 and under
bf16 autocast (fp32 master weights). Shapes: a Qwen3-0.6B-shaped draft (hidden 1024, 16/8 heads,
head_dim 128, MLP 3072), a Qwen3-1.7B-shaped one (hidden 2048, 16/8 heads, MLP 6144; --points
only) and a Qwen3-8B-shaped one (hidden 4096, 32/8 heads, MLP 12288); draft
vocab 32k (an fp16 draft-vocab teacher); the target embedding 151,936 x H (bf16, frozen); one
sequence of T tokens. The new arm runs with TrainerConfig's defaults (layer recompute on).

--teacher-memory: one training step (K=1) that starts from a cache sample with a top-64 teacher (what
teacher="auto" stores at Vd > 8192), sequences of 1024 tokens packed to T: `topk_dense` pads it with the
teacher densified to [B, T, Vd] fp32 (the former training path, sparse_teacher=False), `topk_sparse`
keeps it top-k and the loss densifies one chunk of positions at a time (sparse_teacher=True).

    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python benchmarks/ttt_scaling.py --teacher-memory --tokens 8192 \
        --name teacher_memory

Each point runs in a FRESH subprocess with no allocator environment variable (the process a user
runs: the library fixes glibc's mmap threshold itself, draftadapt/allocator.py; each result records
the threshold set and any MALLOC_* variable inherited from the caller): build, one warm-up step at
64 tokens (allocates AdamW state), then reset the peak-RSS counter (/proc/self/clear_refs 5), run
the measured step and report VmHWM - VmRSS before it (CPU) or max_memory_allocated - allocated
(CUDA): the memory one step ADDS on top of weights, optimizer state and the batch. Points of the old arm whose memory,
extrapolated from its smaller points, exceeds --old-max-gb are skipped (and listed). Arms are
interleaved per T. Memory slope = least-squares GB per 1k tokens over the new arm's points. Arm
`new_plain` = `new` with the library's allocator fix opted out (DRAFTADAPT_MMAP_THRESHOLD=off in the
child): the same code in a plain glibc process, for the side-by-side memory and speed cost of the fix.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/ttt_scaling.py            # CPU sweep
    .venv/bin/python benchmarks/ttt_scaling.py --device cuda --hidden 4096 \\
        --tokens 2048,8192,16384,32768 --dtypes bf16 --old-max-gb 100 --name ttt_scaling_cuda   # GPU
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, print_table, write_json  # noqa: E402

SHAPES = {1024: dict(intermediate_size=3072, num_attention_heads=16),  # Qwen3-0.6B
          2048: dict(intermediate_size=6144, num_attention_heads=16),  # Qwen3-1.7B
          4096: dict(intermediate_size=12288, num_attention_heads=32)}  # Qwen3-8B
VOCAB, DRAFT_VOCAB, STEPS = 151936, 32000, 3
# --teacher-memory: one training step from a top-64 cache sample, the teacher densified to [B, T, Vd] in the
# sample (the former path, sparse_teacher=False) vs kept top-k and read per loss chunk (sparse_teacher=True)
TEACHER_ARMS, TEACHER_STEPS, TEACHER_SEQ, TOPK = ("topk_dense", "topk_sparse"), 1, 1024, 64


def _status(key: str) -> float:
    """GB of a /proc/self/status field (VmRSS, VmHWM)."""
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1e6
    raise KeyError(key)


def old_loss(draft, batch, embed):
    """The former ttt_loss: dense unroll, all K logit tensors and their fp32 softmax copies alive."""
    import torch

    from draftadapt.allocator import limit_heap_growth
    from draftadapt.ttt import shift, unroll_dense

    limit_heap_growth()  # what ttt_loss does: the arms differ in the loss, not the allocator
    scored, losses = batch.loss_mask & batch.valid, []
    for k, logit in enumerate(unroll_dense(draft, batch, embed, STEPS), start=1):
        sel = shift(scored, k) & batch.valid
        rows, cols = sel.nonzero(as_tuple=True)
        teacher = batch.teacher_logprobs[rows, cols + k].float().log_softmax(-1)
        logq = logit[sel].float().log_softmax(-1)
        p = teacher.exp()
        kl = -(p * logq).sum(-1) - torch.special.entr(p).sum(-1)
        losses.append(kl.sum() / max(int(sel.sum()), 1))
    return sum(0.8 ** (k - 1) * step for k, step in enumerate(losses, start=1))


def run_point(impl: str, hidden: int, t: int, dtype: str, device: str) -> dict:
    """One measured step in this process (the child side)."""
    import torch

    from draftadapt import allocator
    from draftadapt.batch import DraftBatch, RolloutBatch
    from draftadapt.drafts.eagle3 import Eagle3Config, Eagle3Draft
    from draftadapt.ttt import ttt_loss

    torch.manual_seed(0)
    dev = torch.device(device)
    cfg = Eagle3Config(hidden_size=hidden, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, vocab_size=VOCAB,
                       draft_vocab_size=DRAFT_VOCAB, target_hidden_size=hidden, aux_layer_ids=(2, 14, 25),
                       max_position_embeddings=65536, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                       **SHAPES[hidden])
    draft = Eagle3Draft(cfg).to(dev)
    embed = torch.randn(VOCAB, hidden, dtype=torch.bfloat16, device=dev) * 0.02  # the target's, frozen
    opt = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=1e-5, foreach=False)

    def batch_of(n: int) -> DraftBatch:
        teacher = torch.empty(1, n, DRAFT_VOCAB, device=dev, dtype=torch.float16)  # a 64 KB/token fp16 teacher
        for a in range(0, n, 512):  # in place, no [T, Vd] temporaries
            teacher[0, a:a + 512] = torch.randn(min(512, n - a), DRAFT_VOCAB, device=dev).mul_(3).log_softmax(-1)
        ones = torch.ones(1, n, dtype=torch.bool, device=dev)
        return DraftBatch(torch.randint(0, VOCAB, (1, n), device=dev), torch.randn(1, n, 3 * hidden, device=dev),
                          teacher, ones, ones.clone())

    steps = TEACHER_STEPS if impl in TEACHER_ARMS else STEPS

    def topk_rollout(n: int) -> RolloutBatch:
        """What the cache holds at Vd > 8192 (teacher="auto"): top-64 target ids + log-probs per token,
        sequences of TEACHER_SEQ tokens packed; ids distinct per row, ~5/6 of them in the draft vocab."""
        lens = [min(TEACHER_SEQ, n - a) for a in range(0, n, TEACHER_SEQ)]
        span = DRAFT_VOCAB * 6 // 5 // TOPK  # id j of a row is drawn from [j * span, (j + 1) * span)
        ids = torch.randint(0, span, (n, TOPK)) + torch.arange(TOPK) * span
        lp = torch.randn(n, TOPK).sort(-1, descending=True).values.log_softmax(-1) - 0.01
        return RolloutBatch(torch.randint(0, VOCAB, (n,)), torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()]),
                            torch.randn(n, 3 * hidden, dtype=torch.bfloat16), torch.ones(n, dtype=torch.bool),
                            teacher_topk_ids=ids, teacher_topk_logprobs=lp)

    def step(batch: DraftBatch) -> None:
        if impl in TEACHER_ARMS:  # a cache sample: the top-k rollout padded into a DraftBatch, in the step
            batch = batch.to_draft_batch(draft.target_ids(), sparse_teacher=impl == "topk_sparse").to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = old_loss(draft, batch, embed) if impl == "old" else ttt_loss(draft, batch, embed, steps=steps).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt.step()

    make = topk_rollout if impl in TEACHER_ARMS else batch_of
    step(make(64))  # AdamW state and allocator warm-up
    batch = make(t)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 1e9
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        before = _status("VmRSS")
    start = time.perf_counter()
    step(batch)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 1e9 if dev.type == "cuda" else _status("VmHWM")
    return {"impl": impl, "hidden": hidden, "tokens": t, "dtype": dtype, "device": device, "added_gb": peak - before,
            "base_gb": before, "step_s": seconds, "tokens_per_s": t / seconds,
            "params_m": sum(p.numel() for p in draft.parameters()) / 1e6,
            "mmap_threshold_set": allocator._applied,  # by the library (ttt_loss); 0 = not set (env, opt-out, no glibc)
            "malloc_env": {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "DRAFTADAPT_MMAP"))}}


def mem_available_gb() -> float:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1e6
    return float("inf")


def wait_for_memory(need_gb: float, patience_s: float) -> float:
    """On a shared machine: wait (up to patience_s) until need_gb is available; returns what is."""
    deadline = time.time() + patience_s
    while mem_available_gb() < need_gb and time.time() < deadline:
        time.sleep(5)
    return mem_available_gb()


def spawn(impl: str, hidden: int, t: int, dtype: str, device: str, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, str(hidden), str(t), dtype, device]
    if device == "cpu":
        cmd = ["nice", "-n", "5"] + cmd
    # No allocator variable: the child is the process a user runs; the library fixes glibc's mmap
    # threshold itself (draftadapt/allocator.py) and each result records what it set. The `new_plain`
    # arm opts out of that (glibc's dynamic threshold): what the library did before it.
    env = {**os.environ, **({"DRAFTADAPT_MMAP_THRESHOLD": "off"} if impl == "new_plain" else {})}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"impl": impl, "hidden": hidden, "tokens": t, "dtype": dtype, "device": device, "error": "timeout"}
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        err = (out.stderr.strip().splitlines() or [f"exit code {out.returncode} (-9: killed, e.g. out of memory)"])[-1]
        return {"impl": impl, "hidden": hidden, "tokens": t, "dtype": dtype, "device": device, "error": err[-200:]}
    return json.loads(lines[-1])


def predict(points: list[dict], t: int) -> float:
    """Added GB at t from measured points of one arm: a quadratic through the last three (the old
    arm's scores are T^2), a power law through the last two, else T^1.5 from one."""
    import math

    pts = sorted((p["tokens"], p["added_gb"]) for p in points if "added_gb" in p)
    if not pts:
        return 0.0
    if len(pts) == 1:
        return pts[0][1] * (t / pts[0][0]) ** 1.5
    if len(pts) == 2:
        (x0, y0), (x1, y1) = pts
        return y1 * (t / x1) ** (math.log(max(y1, 1e-3) / max(y0, 1e-3)) / math.log(x1 / x0))
    import numpy as np

    (x, y) = zip(*pts[-3:])
    return float(np.polyval(np.polyfit(x, y, 2), t))


def slope(points: list[dict]) -> float | None:
    """Least-squares GB per 1k tokens."""
    pts = [(p["tokens"], p["added_gb"]) for p in points if "added_gb" in p]
    if len({x for x, _ in pts}) < 2:  # one T (e.g. an A/B at one point): no slope
        return None
    mx, my = statistics.mean(x for x, _ in pts), statistics.mean(y for _, y in pts)
    return 1000 * sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    arms = sorted({(r["hidden"], r["impl"], r["dtype"]) for r in results if "added_gb" in r})
    for hidden, impl, dtype in arms:
        pts = sorted((r["tokens"], r["added_gb"]) for r in results if "added_gb" in r
                     and (r["hidden"], r["impl"], r["dtype"]) == (hidden, impl, dtype))
        ax.plot(*zip(*pts), marker="o", linestyle="--" if impl == "old" else "-", label=f"H={hidden} {impl} {dtype}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens T (one sequence)")
    ax.set_ylabel("GB added by one TTT-3 step")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hidden", default="1024,4096")
    ap.add_argument("--tokens", default="512,1024,2048,4096,8192,16384")
    ap.add_argument("--tokens-4096", default="512,2048", help="tokens at hidden 4096 (CPU time: ~4 tok/s)")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--impls", default="old,new")
    ap.add_argument("--old-max-gb", type=float, default=8.0, help="skip old points predicted above this")
    ap.add_argument("--max-tokens-bf16", type=int, default=1 << 30, help="skip bf16 points above this T")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per point")
    ap.add_argument("--memory-patience", type=float, default=300.0, help="seconds to wait for free memory per point")
    ap.add_argument("--ab", type=int, default=2, help="extra interleaved fp32/bf16 pairs at H=1024, T=2048")
    ap.add_argument("--points", default="", help="explicit H:T:impl:dtype,... in this order (overrides the grid)")
    ap.add_argument("--teacher-memory", action="store_true", help="the top-k teacher point instead of the grid: "
                    f"H=1024, T=--tokens, {TEACHER_ARMS} interleaved, --rounds times")
    ap.add_argument("--rounds", type=int, default=1, help="rounds of the --teacher-memory arms")
    ap.add_argument("--name", default="ttt_scaling")
    ap.add_argument("--report-only", action="store_true", help="summarise results/<name>.partial.json (a cut run)")
    ap.add_argument("--resume", action="store_true", help="keep results/<name>.partial.json, run the points it lacks")
    args = ap.parse_args()
    if args.child:
        impl, hidden, t, dtype, device = args.child
        print(json.dumps(run_point(impl, int(hidden), int(t), dtype, device)), flush=True)
        return
    if args.teacher_memory:
        points = [(1024, int(t), impl, "fp32") for _ in range(args.rounds) for t in args.tokens.split(",")
                  for impl in TEACHER_ARMS]
        args.ab, args.impls, args.dtypes = 0, ",".join(TEACHER_ARMS), "fp32"
    elif args.points:
        points = [(int(h), int(t), impl, dtype) for h, t, impl, dtype in (p.split(":") for p in args.points.split(","))]
    else:  # per T, the arms back to back (interleaved)
        points = [(hidden, t, impl, dtype) for hidden in (int(h) for h in args.hidden.split(","))
                  for t in (int(x) for x in (args.tokens if hidden == 1024 or args.device != "cpu"
                                             else args.tokens_4096).split(","))
                  for dtype in args.dtypes.split(",") for impl in args.impls.split(",")
                  if not (dtype == "bf16" and t > args.max_tokens_bf16)]
    results, skipped = [], []
    partial = RESULTS / f"{args.name}.partial.json"
    if args.report_only or args.resume:
        saved = json.loads(partial.read_text())
        results, skipped = saved["results"], saved["skipped"]
        done = {(r["hidden"], r["tokens"], r["impl"], r["dtype"]) for r in results}
        if not args.report_only:  # failed points are retried
            results = [r for r in results if "error" not in r]
            done = {(r["hidden"], r["tokens"], r["impl"], r["dtype"]) for r in results}
        points = [] if args.report_only else [p for p in points if p not in done]
        args.ab = 0 if args.report_only else args.ab
    for hidden, t, impl, dtype in points:
        arm = [r for r in results if (r["hidden"], r["impl"], r["dtype"]) == (hidden, impl, dtype)]
        why = None
        if impl == "old" and predict(arm, t) > args.old_max_gb:
            why = f"predicted {predict(arm, t):.1f} GB > {args.old_max_gb} GB"
        if why:
            skipped.append(dict(impl=impl, hidden=hidden, tokens=t, dtype=dtype, why=why))
            print(f"skip {impl} H={hidden} T={t} {dtype}: {why}", flush=True)
            continue
        # weights, Adam, batch
        base = {1024: 2.5, 2048: 4.0}.get(hidden, 9.0) + t * (DRAFT_VOCAB * 2 + 12 * hidden) / 1e9
        need = base + (predict(arm, t) if impl == "old" else 1.0 + t * 0.2e-3) + 1.0  # + what the step adds + margin
        avail = wait_for_memory(need, args.memory_patience) if args.device == "cpu" else None
        if avail is not None and avail < need:
            skipped.append(dict(impl=impl, hidden=hidden, tokens=t, dtype=dtype,
                                why=f"needs ~{need:.1f} GB, {avail:.1f} GB free on the shared machine"))
            print(f"skip {impl} H={hidden} T={t} {dtype}: {skipped[-1]['why']}", flush=True)
            continue
        r = spawn(impl, hidden, t, dtype, args.device, args.timeout)
        r["load_avg"], r["mem_available_gb_before"] = os.getloadavg()[0], avail
        results.append(r)
        print(json.dumps(r), flush=True)
        partial.write_text(json.dumps({"results": results, "skipped": skipped}))
    ab = []
    for _ in range(args.ab if args.device == "cpu" else 0):
        for dtype in ("fp32", "bf16"):
            ab.append(spawn("new", 1024, 2048, dtype, args.device, args.timeout))
            print(json.dumps(ab[-1]), flush=True)
    rows, summary = [], {}
    for r in results:
        rows.append([r["hidden"], r["tokens"], r["impl"], r["dtype"], r.get("added_gb", r.get("error")),
                     r.get("step_s", "-"), r.get("tokens_per_s", "-"), f"{r['load_avg']:.1f}"])
    print()
    print_table(["H", "T", "impl", "dtype", "added GB", "step s", "tok/s", "load"], rows)
    for hidden in sorted({r["hidden"] for r in results}):
        for dtype in args.dtypes.split(","):
            for impl in args.impls.split(","):
                arm = [r for r in results if (r["hidden"], r["impl"], r["dtype"]) == (hidden, impl, dtype)]
                summary[f"H{hidden}_{impl}_{dtype}"] = {
                    "gb_per_1k_tokens": slope(arm),
                    "max_tokens_run": max((r["tokens"] for r in arm if "added_gb" in r), default=None)}
    print("\nslopes (GB per 1k tokens) and largest T run:", json.dumps(summary, indent=1))
    for s in skipped:
        print(f"skipped: {s}")
    check = [r for r in results if (r["hidden"], r["impl"], r["dtype"], r["tokens"]) == (1024, "new", "fp32", 4096)]
    if check and "added_gb" in check[0]:
        print(f"\ncheck H=1024 T=4096 new fp32 adds {check[0]['added_gb']:.2f} GB (<= 1.5 GB: "
              f"{check[0]['added_gb'] <= 1.5})")
    for t in sorted({r["tokens"] for r in results if r["impl"] in TEACHER_ARMS}):
        gb = {a: [r["added_gb"] for r in results if (r["impl"], r["tokens"]) == (a, t) and "added_gb" in r]
              for a in TEACHER_ARMS}
        if all(gb.values()):
            diff = statistics.median(gb["topk_dense"]) - statistics.median(gb["topk_sparse"])
            print(f"\ntop-k teacher, T={t}: densified in the sample adds {gb['topk_dense']} GB, sparse "
                  f"{gb['topk_sparse']} GB (dense - sparse: {diff:.2f} GB; a [T, Vd] fp32 teacher is "
                  f"{t * DRAFT_VOCAB * 4 / 1e9:.2f} GB)")
    if ab:
        secs = {d: [r["step_s"] for r in ab if r["dtype"] == d and "step_s" in r] for d in ("fp32", "bf16")}
        if secs["fp32"] and secs["bf16"]:
            ratios = [b / f for f, b in zip(secs["fp32"], secs["bf16"])]
            print(f"bf16/fp32 step time at H=1024 T=2048 (interleaved pairs): {[round(x, 3) for x in ratios]}")
    write_json(args.name, {"args": vars(args), "results": results, "skipped": skipped, "summary": summary,
                           "ab_fp32_vs_bf16": ab, "note": "CPU runs on a shared 2-core machine: times contended"})
    if any("added_gb" in r for r in results) and not args.teacher_memory:
        plot(results, RESULTS / f"{args.name}.png")
    partial.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
