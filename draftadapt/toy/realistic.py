"""The Qwen3-0.6B-shaped workload: a random target at the real vocabulary and width, rollouts of
thousands of tokens from the real engine, capture with the step budget, TTT at a 32k draft vocab,
export, push into the running engine; every stage timed, with the process's RSS.

Shape (Qwen3-0.6B): vocab 151,936, hidden 1024, 16 query / 8 KV heads, head_dim 128, intermediate
3072, tied embeddings; `layers` of them (28 in the real model). Prompts are token ids (no
tokenizer: the engine runs with skip_tokenizer_init). It proves the feature path runs at real
sizes on a CPU; a random target teaches the draft nothing that generalises, so acceptance here is
not a quality figure. It does not own the engine or the loop: `run_realistic` drives the public
API (Engine, DraftAdapter, EngineSwapper, save_eagle3) the way an RL loop would.
"""
from __future__ import annotations

import copy
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

QWEN3_0_6B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, tie_word_embeddings=True, rope_theta=1_000_000.0,
                  rms_norm_eps=1e-6, max_position_embeddings=40960)


@dataclass(frozen=True)
class RealisticConfig:
    layers: int = 4  # decoder layers of the target (Qwen3-0.6B has 28)
    rollouts: int = 2  # sequences per step
    prompt_tokens: int = 64  # random token-id prompt length
    completion_tokens: int = 2048  # every rollout runs this long (ignore_eos)
    max_model_len: int = 4096
    k: int = 2  # draft tokens per verification
    draft_vocab_size: int = 32000
    capture_tokens: int = 2048  # the step budget (positions)
    window_tokens: int = 512  # longest trained window (the dense TTT costs ~0.46 GB per 512 positions)
    batch_tokens: int = 1024  # positions per TTT batch
    train_steps: int = 2
    backward: bool = True  # run the policy's backward under capture, as the RL loss does
    policy_dtype: str = "float32"  # dtype of the HF policy that runs the captured forward
    engine_dtype: str = "float32"  # dtype the engine serves in (bfloat16: half the weights' RSS; pushes are cast)
    after_tokens: int = 256  # rollout length served by the pushed draft
    kv_cache_gib: int = 1
    temperature: float = 1.0
    seed: int = 0
    # Long windows (benchmarks/realistic_shape.py --layers 28 --windows 8192 16384); the defaults keep the above.
    document_rollouts: int = 1  # rollouts concatenated into one captured document, prompt 1 + rollout 1 + prompt 2
    #   + rollout 2 ... (the length of an agentic multi-turn trajectory; the turns were sampled independently, so
    #   only the length is multi-turn); the completion mask covers the rollouts. 1: each rollout is a sequence
    document_tokens: int = 0  # > 0: each document cycles its (prompt, rollout) pairs up to this many tokens (a
    #   long document from short rollouts when rollouts of the full length cost too much engine time)
    train_windows: tuple[int, ...] = ()  # one adapter per window size (window = budget = batch), each trained
    #   `train_steps` steps on the same documents from the initial draft, the last one pushed and served;
    #   (): the one adapter of window_tokens / capture_tokens / batch_tokens
    logprob_chunk: int = 0  # > 0: the log-prob forward as RL frameworks run it at long lengths - the policy body,
    #   then log-probs per chunk of this many positions through the head (no [T, V] logits), and the teacher
    #   from the captured final hidden state through the frozen head, per chunk ("final_hidden"). 0: one
    #   forward with full logits, the teacher from them


class Stages:
    """Wall time and RSS per stage: rss_gb now, peak_gb = the process's peak so far; stage_peak_gb (this
    process) and engine_peak_gb (its child processes: the vLLM EngineCore) sampled every 0.2 s during the stage.
    `on_row(rows)` runs after each stage (a benchmark writes partial results with it)."""

    def __init__(self, on_row=None):
        self.rows: dict[str, dict] = {}
        self.on_row = on_row

    def run(self, name: str, fn, **extra):
        import threading

        import psutil

        me, peaks, done = psutil.Process(), [0, 0], threading.Event()

        def poll():
            while True:
                try:
                    kids = sum(c.memory_info().rss for c in me.children(recursive=True))
                except psutil.Error:
                    kids = 0
                peaks[0], peaks[1] = max(peaks[0], me.memory_info().rss), max(peaks[1], kids)
                if done.wait(0.2):
                    return

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        t0 = time.perf_counter()
        try:
            out = fn()
        finally:
            done.set()
            th.join()
        self.rows[name] = {"seconds": time.perf_counter() - t0, "rss_gb": rss_gb(), "peak_gb": peak_rss_gb(),
                           "stage_peak_gb": peaks[0] / 2**30, "engine_peak_gb": peaks[1] / 2**30, **extra}
        if self.on_row is not None:
            self.on_row(self.rows)
        return out


def rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def target_config(layers: int):
    from transformers import Qwen3Config

    return Qwen3Config(num_hidden_layers=layers, **QWEN3_0_6B)


def save_target(out: Path, layers: int, seed: int = 0) -> Path:
    """A random Qwen3-0.6B-shaped target, fp32, saved as a checkpoint dir."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(target_config(layers), dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    return out


def aux_ids(layers: int) -> tuple[int, int, int]:
    """vLLM's default (2, L//2, L-3) when increasing, else the last three layers (L >= 3)."""
    ids = (2, layers // 2, layers - 3)
    return ids if ids[0] < ids[1] < ids[2] else (layers - 3, layers - 2, layers - 1)


def run_realistic(cfg: RealisticConfig, workdir: str | Path, on_stage=None) -> dict:
    """Run every stage once; returns {"config", "stages", "figures"}. on_stage(rows): after each stage."""
    from transformers import AutoModelForCausalLM

    from ..adapter import AdapterConfig, DraftAdapter
    from ..checkpoint import save_eagle3
    from ..drafts.eagle3 import Eagle3Draft
    from ..engine.swap import EngineSwapper
    from ..engine.vllm import Engine, EngineConfig, SpecConfig
    from ..trainer import TrainerConfig

    work, st, fig = Path(workdir), Stages(on_stage), {}
    tc = target_config(cfg.layers)
    # 1) a random target and a random draft over the 32k lowest ids (d2t all zeros, as vLLM loads it)
    target_dir = st.run("build_target", lambda: save_target(work / "target", cfg.layers, cfg.seed))
    torch.manual_seed(cfg.seed)
    draft = Eagle3Draft.from_target(tc, draft_vocab=torch.zeros(cfg.draft_vocab_size, dtype=torch.long),
                                    aux_layer_ids=aux_ids(cfg.layers), max_position_embeddings=cfg.max_model_len)
    draft_dir = st.run("export_initial_draft", lambda: save_eagle3(draft, work / "draft0", tc))
    fig["draft_params_m"] = sum(p.numel() for p in draft.parameters()) / 1e6
    # 2) the engine, with the draft speculating
    ecfg = EngineConfig(model=str(target_dir), spec=SpecConfig("eagle3", cfg.k, model=str(draft_dir)),
                        max_model_len=cfg.max_model_len, max_num_seqs=cfg.rollouts, kv_cache_gib=cfg.kv_cache_gib,
                        dtype=cfg.engine_dtype,
                        seed=cfg.seed, extra={"skip_tokenizer_init": True})
    engine = st.run("engine_start", lambda: Engine(ecfg))
    try:
        g = torch.Generator().manual_seed(cfg.seed)
        prompts = torch.randint(0, cfg.draft_vocab_size, (cfg.rollouts, cfg.prompt_tokens), generator=g).tolist()
        c0 = engine.spec_counters()
        outs = st.run("rollouts", lambda: engine.generate(prompts, temperature=cfg.temperature, logprobs=False,
                                                          max_tokens=cfg.completion_tokens, ignore_eos=True,
                                                          seed=cfg.seed))
        c1 = engine.spec_counters()
        lens = [len(o[0].token_ids) for o in outs]
        st.rows["rollouts"].update(tokens=sum(lens), tokens_per_s=sum(lens) / st.rows["rollouts"]["seconds"])
        fig.update(completion_lengths=lens, acceptance_length_before=(c1 - c0).acceptance_length,
                   drafts_before=(c1 - c0).drafts)
        # 3) the policy's log-prob forward (+ backward) under capture, one document per micro-batch
        docs = _documents(prompts, [o[0].token_ids for o in outs], cfg.document_rollouts, cfg.document_tokens)
        fig["document_tokens"] = [len(d) for d, _ in docs]
        policy = st.run("load_policy", lambda: AutoModelForCausalLM.from_pretrained(
            target_dir, dtype=getattr(torch, cfg.policy_dtype)))
        sink, chunked = EngineSwapper(engine), cfg.logprob_chunk > 0
        windows = cfg.train_windows or (cfg.window_tokens,)
        for version, w in enumerate(windows):
            sfx, one = (f"_w{w}", copy.deepcopy(draft)) if cfg.train_windows else ("", draft)
            sizes = (w, w, w) if cfg.train_windows else (cfg.capture_tokens, cfg.window_tokens, cfg.batch_tokens)
            adapter = DraftAdapter(one, policy.get_input_embeddings(),
                                   AdapterConfig(train_steps=cfg.train_steps, batch_tokens=sizes[2], min_tokens=1,
                                                 capture_tokens=sizes[0], window_tokens=sizes[1],
                                                 teacher="final_hidden" if chunked else "auto",
                                                 acceptance_drop=None, seed=cfg.seed),
                                   TrainerConfig(ttt_steps=cfg.k), sink=sink,
                                   target_head=policy.get_output_embeddings() if chunked else None)
            row = {"teacher": adapter.teacher, "top_k": adapter.top_k}
            st.run("capture_step" + sfx, lambda: _capture(policy, adapter, docs, cfg, version))
            # 4) the step boundary: train on the kept windows, push into the running engine
            stats = st.run("train_and_push" + sfx, lambda: adapter.on_step_end(version))
            cache = adapter.worker.cache
            row.update(budget=stats.budget._asdict(),
                       train={"steps": stats.train.steps, "tokens": stats.train.tokens,
                              "seconds": stats.train.seconds, "loss": stats.train.loss},
                       pushed=stats.pushed, push_seconds=stats.push_seconds, push_mb=stats.push_bytes / 2**20,
                       cache_bytes_per_token=cache.num_bytes / max(1, cache.num_tokens),
                       cache_windows=[(int(e.positions[0]), e.num_tokens) for e in cache._entries])
            st.run("export_draft" + sfx, lambda: save_eagle3(adapter.worker.draft, work / f"draft1{sfx}", tc))
            if cfg.train_windows:
                fig.setdefault("windows", {})[w] = row
                del stats, cache, adapter, one  # the next window's adapter starts from the initial draft
            else:
                fig.update(row)
        # 5) the engine serves the pushed draft: the counters keep moving
        c2 = engine.spec_counters()
        st.run("rollouts_after_push", lambda: engine.generate(prompts, temperature=cfg.temperature, logprobs=False,
                                                               max_tokens=cfg.after_tokens, ignore_eos=True,
                                                               seed=cfg.seed + 1))
        after = engine.spec_counters() - c2
        fig.update(acceptance_length_after=after.acceptance_length, drafts_after=after.drafts,
                   draft_version_served=sink.draft_version)
    finally:
        engine.shutdown()
    return {"config": asdict(cfg), "stages": st.rows, "figures": fig}


def _documents(prompts: list[list[int]], completions: list[list[int]], n: int,
               length: int = 0) -> list[tuple[list[int], list[bool]]]:
    """(token ids, completion mask) per document: every n consecutive (prompt, rollout) pairs back to back,
    cycled up to `length` tokens when length > 0."""
    docs = []
    for i in range(0, len(prompts), n):
        ids, comp = [], []
        while True:
            for p, c in zip(prompts[i:i + n], completions[i:i + n]):
                ids += list(p) + list(c)
                comp += [False] * len(p) + [True] * len(c)
            if len(ids) >= length:
                break
        docs.append((ids[:length or None], comp[:length or None]))
    return docs


def chunked_logprobs(head, hidden: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """log p(targets) [B, T] from hidden [B, T, H] through `head`, `chunk` positions at a time: one [chunk, V]
    block at a time, and under grad each chunk is recomputed in backward (nothing [T, V] is kept for it)."""
    from torch.utils.checkpoint import checkpoint

    def one(h, t):
        return head(h).float().log_softmax(-1).gather(-1, t[..., None]).squeeze(-1)

    grad = torch.is_grad_enabled()
    parts = [checkpoint(one, h, t, use_reentrant=False) if grad else one(h, t)
             for h, t in zip(hidden.split(chunk, 1), targets.split(chunk, 1))]
    return torch.cat(parts, 1)


def _capture(policy, adapter, docs, cfg: RealisticConfig, version: int = 0) -> None:
    """What the RL loop's log-prob recompute does, one document per micro-batch."""
    policy.train()
    for doc, mask in docs:
        ids, comp = torch.tensor([doc]), torch.tensor([mask])  # [1, T]
        if cfg.logprob_chunk > 0:  # the body under capture, then the log-probs per chunk of positions
            with adapter.capture(policy.model) as cap, torch.set_grad_enabled(cfg.backward):
                hidden = policy.model(input_ids=ids, use_cache=False).last_hidden_state  # [1, T, H]
            batch = cap.rollout_batch(input_ids=ids, completion_mask=comp, policy_version=version)
            with torch.set_grad_enabled(cfg.backward):
                lp = chunked_logprobs(policy.get_output_embeddings(), hidden[:, :-1], ids[:, 1:], cfg.logprob_chunk)
            del hidden
        else:
            with adapter.capture(policy) as cap, torch.set_grad_enabled(cfg.backward):
                logits = policy(input_ids=ids, use_cache=False).logits  # [1, T, V]
                lp = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1) \
                    if cfg.backward else None
            batch = cap.rollout_batch(input_ids=ids, completion_mask=comp, policy_version=version)
            del logits
        if cfg.backward:
            (-(lp * comp[:, 1:]).sum() / comp.sum()).backward()
        del lp
        adapter.on_rollouts(batch)
    policy.zero_grad(set_to_none=True)
