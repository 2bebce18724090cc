"""Does the adapter's memory stay within its budgets over many steps of large batches?

Many DraftAdapter steps (on_rollouts of a large synthetic RolloutBatch, then on_step_end: evict
stale, train, no engine) while a thread samples the process RSS every 0.1 s. The budget is
    baseline RSS (draft, optimizer state, one batch built) + CacheConfig.max_bytes
    + the trainer's peak (the RSS rise of one training step, measured on its own first)
and the run fails when the peak RSS exceeds it by more than the slack. Writes a PNG of RSS,
budget and cache bytes over time and a JSON under benchmarks/results/. No vLLM: the features
are random (the memory of a step does not depend on their values).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/soak.py [--steps 60] [--hidden 512] [--tokens 16384]
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, print_table, write_json  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssSampler(threading.Thread):
    def __init__(self, every: float = 0.1):
        super().__init__(daemon=True)
        self.every, self.samples, self.stop, self.t0 = every, [], threading.Event(), time.perf_counter()

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.perf_counter() - self.t0, rss_bytes()))
            time.sleep(self.every)


def synthetic_batch(cfg, tokens: int, seq_len: int, vd: int, version: int, gen: torch.Generator):
    from draftadapt.batch import RolloutBatch

    n_seq = tokens // seq_len
    n = n_seq * seq_len  # [N] tokens, sequences back to back
    return RolloutBatch(
        input_ids=torch.randint(0, cfg.vocab_size, (n,), generator=gen),
        cu_seqlens=torch.arange(0, n + 1, seq_len, dtype=torch.long),
        aux_hidden=torch.randn(n, 3 * cfg.hidden_size, generator=gen, dtype=torch.bfloat16),  # [N, 3H]
        loss_mask=torch.ones(n, dtype=torch.bool),
        policy_version=version,
        teacher_logprobs=torch.log_softmax(torch.randn(n, vd, generator=gen), -1))  # [N, Vd]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=8192, help="target vocab = draft vocab (teacher width)")
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per synthetic rollout batch")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--cache-mb", type=int, default=512, help="CacheConfig.max_bytes")
    ap.add_argument("--batch-tokens", type=int, default=2048, help="AdapterConfig.batch_tokens (trainer budget)")
    ap.add_argument("--slack", type=float, default=0.10, help="allowed excess over the budget (fraction)")
    ap.add_argument("--out", default="soak")
    args = ap.parse_args(argv)
    from transformers import LlamaConfig

    from draftadapt.adapter import AdapterConfig, DraftAdapter
    from draftadapt.cache import CacheConfig
    from draftadapt.drafts.eagle3 import Eagle3Draft
    from draftadapt.trainer import TrainerConfig

    h = args.hidden
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=args.seq_len + 8)
    gen = torch.Generator().manual_seed(0)
    draft = Eagle3Draft.from_target(cfg, aux_layer_ids=(1, 4, 6))
    embed = torch.nn.Embedding(args.vocab, h)
    cache = CacheConfig(max_tokens=1 << 30, max_bytes=args.cache_mb << 20)
    adapter = DraftAdapter(draft, embed, AdapterConfig(train_steps=1, batch_tokens=args.batch_tokens, min_tokens=1,
                                                       acceptance_drop=None, push_every=0),
                           TrainerConfig(lr=1e-4), cache)
    # 1) the trainer's own peak: one step on one batch, before the soak (cache then emptied by eviction)
    sampler = RssSampler()
    sampler.start()
    adapter.on_rollouts(synthetic_batch(cfg, args.batch_tokens * 2, args.seq_len, args.vocab, 0, gen))
    base = rss_bytes()
    adapter.on_step_end(0)
    time.sleep(0.3)
    train_peak = max(r for _, r in sampler.samples) - base
    baseline = rss_bytes()
    budget = baseline + cache.max_bytes + train_peak
    # 2) the soak: a large batch per step, a step boundary after each
    rows, t_steps = [], []
    for step in range(1, args.steps + 1):
        adapter.on_rollouts(synthetic_batch(cfg, args.tokens, args.seq_len, args.vocab, step, gen))
        st = adapter.on_step_end(step)
        t_steps.append((time.perf_counter() - sampler.t0, st.cache.bytes))
        if step % max(1, args.steps // 10) == 0 or step == args.steps:
            rows.append([step, rss_bytes() / 2**20, st.cache.bytes / 2**20, max(r for _, r in sampler.samples) / 2**20])
    sampler.stop.set()
    sampler.join()
    peak = max(r for _, r in sampler.samples)
    print_table(["step", "RSS MiB", "cache MiB", "peak so far MiB"], rows)
    ok = peak <= budget * (1 + args.slack)
    print(f"\nbaseline {baseline / 2**20:.0f} MiB + cache budget {args.cache_mb} MiB + trainer peak "
          f"{train_peak / 2**20:.0f} MiB = budget {budget / 2**20:.0f} MiB; peak RSS {peak / 2**20:.0f} MiB "
          f"({peak / budget:.2f}x) -> {'WITHIN' if ok else 'OVER'} budget (slack {args.slack:.0%}); "
          f"load average {os.getloadavg()[0]:.1f}; threads {torch.get_num_threads()}")
    png = _plot(sampler.samples, t_steps, budget, baseline, args.out)
    res = {"config": vars(args), "baseline_bytes": baseline, "train_peak_bytes": train_peak,
           "cache_budget_bytes": cache.max_bytes, "budget_bytes": budget, "peak_rss_bytes": peak,
           "within_budget": ok, "rss": sampler.samples[::5], "cache_bytes": t_steps, "png": str(png),
           "load_average": os.getloadavg()}
    write_json(args.out, res)
    return res


def _plot(samples, cache, budget, baseline, name) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot([t for t, _ in samples], [r / 2**20 for _, r in samples], label="RSS")
    ax.plot([t for t, _ in cache], [(baseline + b) / 2**20 for _, b in cache], label="baseline + cache bytes")
    ax.axhline(budget / 2**20, color="red", linestyle="--", label="budget")
    ax.set_xlabel("seconds")
    ax.set_ylabel("MiB")
    ax.legend()
    ax.set_title("draftadapt soak: RSS vs budget")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


if __name__ == "__main__":
    main()
