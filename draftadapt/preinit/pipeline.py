"""The offline draft pre-init pipeline: data -> (regeneration) -> vocab -> features -> TTT -> export -> AL.

`run_preinit(cfg)` runs the stages in order inside `run.out_dir`; each stage records its stats in
`stages/<name>.json` when it finishes and is skipped on a rerun. Regeneration resumes per chunk
of prompts, capture per shard, training per trainer checkpoint, so an interrupted run continues
where it stopped and ends with the same draft. The engine is started only for regeneration and
for the acceptance-length evaluation.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .data import DataConfig, RenderConfig, Sample, load_rows, parse_rows, render
from .features import (CaptureConfig, TrainConfig, TrainSequence, capture_to_shards, train_from_shards,
                       write_text_atomic)

log = logging.getLogger("draftadapt.preinit")
STAGES = ("prepare", "regenerate", "vocab", "capture", "train", "export", "evaluate")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# run.target names -> resolve(progress) -> checkpoint dir: a workload's own target, registered by its package
# (the toy's cached policy: `import draftadapt.toy.preinit_sources`), so this module imports no workload
TARGETS: dict[str, Callable[[bool], str | Path]] = {}


def register_target(name: str, resolve: Callable[[bool], str | Path]) -> None:
    """Make `run.target=name` mean the checkpoint dir `resolve(progress)` returns (built on first use)."""
    TARGETS[name] = resolve


@dataclass(frozen=True)
class RunConfig:
    out_dir: str = "runs/preinit"  # every stage's output; a rerun resumes from it
    target: str | None = None  # HF checkpoint dir of the target, or a registered name ("toy": the toy policy)
    tokenizer: str | None = None  # tokenizer dir (default: the target's)
    dtype: str = "float32"  # target weights in vLLM and in the HF capture forward
    device: str = "auto"  # HF capture / training device: "auto" (cuda when present), "cpu", "cuda"
    threads: int = 1  # torch threads for capture and training (vLLM pins its process to 1)
    max_model_len: int = 4096  # engine context: render.max_prompt_tokens + max completion tokens must fit
    seed: int = 0  # engine sampling seed

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"run.dtype={self.dtype!r}; choose one of {sorted(_DTYPES)}")


@dataclass(frozen=True)
class RegenConfig:
    enabled: bool = True  # regenerate responses with the target (False: train on the dataset's responses)
    max_prompts: int | None = 4096  # prompts regenerated at most (the rest are not used)
    samples_per_prompt: int = 1  # completions per prompt
    max_tokens: int = 2048  # completion cap
    temperature: float = 1.0  # the rollout temperature the draft will serve at
    chunk_prompts: int = 256  # prompts per resumable chunk
    max_num_seqs: int = 64  # engine batch


@dataclass(frozen=True)
class DraftConfig:
    draft_vocab_size: int | None = 32000  # most frequent completion tokens kept; None = full target vocab
    aux_layer_ids: tuple[int, ...] | None = None  # HF hidden_states indices; None = vLLM's (2, L//2, L-3)


@dataclass(frozen=True)
class EvalConfig:
    prompts: int = 64  # held-out prompts for the acceptance length (0 = skip the evaluation)
    data: DataConfig | None = None  # where they come from; None = held out from `data`
    num_speculative_tokens: int = 3  # k
    samples_per_prompt: int = 1  # completions per prompt
    max_tokens: int = 512  # completion cap
    temperature: float = 1.0
    max_num_seqs: int = 64  # engine batch
    layout: str = "vllm"  # which export the engine loads: "vllm" or "speculators" (needs export.speculators)

    def __post_init__(self) -> None:
        if self.layout not in ("vllm", "speculators"):
            raise ValueError(f"eval.layout={self.layout!r}; choose 'vllm' or 'speculators'")


@dataclass(frozen=True)
class ExportConfig:
    speculators: bool = False  # also write the `speculators` layout to <out_dir>/draft-speculators


@dataclass(frozen=True)
class PreinitConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    regen: RegenConfig = field(default_factory=RegenConfig)
    draft: DraftConfig = field(default_factory=DraftConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def __post_init__(self) -> None:
        if self.run.target is None:
            raise ValueError("run.target is not set: pass run.target=<HF checkpoint dir> (or a registered name: "
                             "'toy' after `import draftadapt.toy.preinit_sources`)")
        if self.eval.layout == "speculators" and not self.export.speculators:
            raise ValueError("eval.layout=speculators needs export.speculators=true")
        for name, cap in (("regen.max_tokens", self.regen.max_tokens), ("eval.max_tokens", self.eval.max_tokens)):
            if self.render.max_prompt_tokens + cap > self.run.max_model_len:
                raise ValueError(f"render.max_prompt_tokens + {name} = {self.render.max_prompt_tokens + cap} exceeds "
                                 f"run.max_model_len={self.run.max_model_len}; lower one or raise run.max_model_len")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> PreinitConfig:
    import yaml

    from ..config import apply_overrides, load_section

    data = (yaml.safe_load(Path(path).read_text()) or {}) if path else {}
    return load_section(PreinitConfig, apply_overrides(data, list(overrides)), "config")


class StageLog:
    """stages/<name>.json holds a finished stage's stats; its presence means 'skip on rerun'."""

    def __init__(self, out: Path):
        self.dir = out / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)

    def done(self, name: str) -> dict | None:
        path = self.dir / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def finish(self, name: str, stats: dict) -> dict:
        write_text_atomic(self.dir / f"{name}.json", json.dumps(stats, indent=1))
        return stats


def run_preinit(cfg: PreinitConfig, progress: bool = True, stop_after: str | None = None) -> dict:
    """Run (or resume) every stage; returns {stage: stats} and writes <out_dir>/result.json.

    stop_after: a stage name to stop after (e.g. "capture" to build feature shards only)."""
    out = Path(cfg.run.out_dir)
    _check_same_config(out, cfg)
    stages, ctx, result = StageLog(out), _Context(cfg, out, progress), {}
    for name in STAGES:
        stats = stages.done(name)
        if stats is None:
            print(f"[preinit] {name} ...", flush=True)
            stats = stages.finish(name, getattr(ctx, name)())
        else:
            print(f"[preinit] {name}: done earlier, skipped", flush=True)
        result[name] = stats
        if name == stop_after:
            break
    write_text_atomic(out / "result.json", json.dumps(result, indent=1))
    return result


def format_summary(res: dict) -> str:
    """The closing table of a run: rows kept, throughput per stage, disk cost, acceptance length."""
    def rate(stage: str) -> str:
        v = res.get(stage, {}).get("tokens_per_s")
        return "-" if v is None else f"{v:,.0f}"

    prep, cap, ev = res["prepare"], res.get("capture", {}), res.get("evaluate", {})
    al = ev.get("spec_acceptance_length")
    rows = [("train samples / eval prompts", f"{prep['train_samples']} / {prep['eval_prompts']}"),
            ("bad rows skipped", str(prep["bad_rows"]["total"] + prep["bad_render"]["total"])),
            ("regeneration tokens/s", rate("regenerate")), ("capture tokens/s", rate("capture")),
            ("disk bytes / captured token", f"{cap.get('bytes_per_token', 0):,.0f}"),
            ("training tokens/s", rate("train")), ("acceptance length", "-" if al is None else f"{al:.2f}"),
            ("draft (vLLM layout)", str(res.get("export", {}).get("vllm")))]
    width = max(len(k) for k, _ in rows)
    return "\n" + "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _check_same_config(out: Path, cfg: PreinitConfig) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path, now = out / "config.json", json.loads(json.dumps(asdict(cfg), default=str))
    if path.is_file():
        before = json.loads(path.read_text())
        if before != now:
            diff = sorted(f"{s}.{k}" for s in now for k in now[s] if before.get(s, {}).get(k) != now[s][k])
            raise ValueError(f"{out} holds a run with another config (differs in {diff}); rerun with the same "
                             "config to resume, or pass --fresh / another run.out_dir")
    path.write_text(json.dumps(now, indent=1))


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


class _Context:
    """The stages; each returns its stats dict. Heavy objects are loaded once, on first use."""

    def __init__(self, cfg: PreinitConfig, out: Path, progress: bool):
        self.cfg, self.out, self.progress = cfg, out, progress
        self._target_dir, self._tok, self._model = None, None, None

    # shared resources ---------------------------------------------------------------------------
    @property
    def target_dir(self) -> str:
        if self._target_dir is None:
            t = self.cfg.run.target
            if t in TARGETS:
                t = TARGETS[t](self.progress)
            self._target_dir = str(Path(t).resolve())
        return self._target_dir

    @property
    def tokenizer_dir(self) -> str:
        return str(Path(self.cfg.run.tokenizer).resolve()) if self.cfg.run.tokenizer else self.target_dir

    @property
    def tok(self):
        if self._tok is None:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        return self._tok

    @property
    def model(self):
        if self._model is None:
            from transformers import AutoModelForCausalLM

            dev = self.cfg.run.device
            dev = ("cuda" if torch.cuda.is_available() else "cpu") if dev == "auto" else dev
            self._model = AutoModelForCausalLM.from_pretrained(
                self.target_dir, dtype=_DTYPES[self.cfg.run.dtype]).to(dev).eval()
        torch.set_num_threads(self.cfg.run.threads)  # an in-process engine leaves torch at 1 thread
        return self._model

    def engine(self, spec=None, max_num_seqs: int = 64):
        from ..engine.vllm import Engine, EngineConfig

        return Engine(EngineConfig(model=self.target_dir, tokenizer=self.tokenizer_dir, spec=spec,
                                   dtype=self.cfg.run.dtype, max_model_len=self.cfg.run.max_model_len,
                                   max_num_seqs=max_num_seqs, seed=self.cfg.run.seed, worker_extension=None))

    # 1) data ------------------------------------------------------------------------------------
    def prepare(self) -> dict:
        cfg, t0 = self.cfg, time.perf_counter()
        convs, bad = parse_rows(load_rows(cfg.data), cfg.data)
        if cfg.data.shuffle:
            import random

            random.Random(cfg.data.seed).shuffle(convs)
        samples, bad_render = render(convs, self.tok, cfg.render, cfg.data.on_bad_rows,
                                     need_response=not cfg.regen.enabled, where="render")
        n_eval = cfg.eval.prompts if cfg.eval.data is None else 0
        if n_eval >= len(samples):
            raise ValueError(f"{len(samples)} good rows cannot give eval.prompts={n_eval} held-out prompts "
                             "and a training set; lower eval.prompts or add rows")
        train, held = samples[:len(samples) - n_eval], samples[len(samples) - n_eval:]
        eval_bad = {}
        if cfg.eval.data is not None and cfg.eval.prompts:
            e_convs, e_bad = parse_rows(load_rows(cfg.eval.data), cfg.eval.data)
            held, e_bad_render = render(e_convs, self.tok, cfg.render, cfg.eval.data.on_bad_rows, where="eval render")
            held = held[:cfg.eval.prompts]
            eval_bad = {"parse": e_bad.as_dict(), "render": e_bad_render.as_dict()}
        _write_jsonl(self.out / "data" / "train.jsonl", [asdict(s) for s in train])
        _write_jsonl(self.out / "data" / "eval.jsonl", [asdict(s) for s in held])
        return {"rows_good": len(convs), "bad_rows": bad.as_dict(), "bad_render": bad_render.as_dict(),
                "eval_bad_rows": eval_bad, "train_samples": len(train), "eval_prompts": len(held),
                "chat_template": bool(getattr(self.tok, "chat_template", None)) and cfg.render.template == "auto",
                "seconds": time.perf_counter() - t0}

    def _samples(self, split: str) -> list[Sample]:
        return [Sample(**r) for r in _read_jsonl(self.out / "data" / f"{split}.jsonl")]

    # 2) regeneration ----------------------------------------------------------------------------
    def regenerate(self) -> dict:
        rc = self.cfg.regen
        if not rc.enabled:
            return {"enabled": False, "seconds": 0.0}
        samples = self._samples("train")[:rc.max_prompts]
        chunks = [samples[i:i + rc.chunk_prompts] for i in range(0, len(samples), rc.chunk_prompts)]
        todo = [i for i in range(len(chunks)) if not self._chunk_path(i).is_file()]
        tokens, t0, seconds = 0, time.perf_counter(), 0.0
        if todo:
            from tqdm.auto import tqdm

            with self.engine(max_num_seqs=rc.max_num_seqs) as eng:
                t0 = time.perf_counter()  # generation only, not the engine start
                for i in tqdm(todo, disable=not self.progress, desc="regenerate"):
                    tokens += self._regen_chunk(eng, i, chunks[i])
                seconds = time.perf_counter() - t0
        return {"enabled": True, "prompts": len(samples), "chunks": len(chunks), "chunks_now": len(todo),
                "completion_tokens_now": tokens, "seconds": seconds,
                "tokens_per_s": tokens / seconds if seconds else None}

    def _chunk_path(self, i: int) -> Path:
        return self.out / "regen" / f"chunk-{i:05d}.jsonl"

    def _regen_chunk(self, eng, i: int, chunk: list[Sample]) -> int:
        rc = self.cfg.regen
        seed = self.cfg.run.seed + i * rc.chunk_prompts * rc.samples_per_prompt  # chunks never share a stream
        outs = eng.generate([s.prompt_ids for s in chunk], n=rc.samples_per_prompt, temperature=rc.temperature,
                            max_tokens=rc.max_tokens, logprobs=False, seed=seed,
                            stop_token_ids=[self.tok.eos_token_id] if self.tok.eos_token_id is not None else None)
        rows = [{"index": s.index, "prompt_ids": s.prompt_ids, "completion_ids": c.token_ids,
                 "finish_reason": c.finish_reason} for s, group in zip(chunk, outs) for c in group]
        _write_jsonl(self._chunk_path(i), rows)
        return sum(len(r["completion_ids"]) for r in rows)

    def sequences(self) -> list[TrainSequence]:
        """Training sequences: regenerated completions, or the dataset's responses."""
        if not self.cfg.regen.enabled:
            return [TrainSequence(s.prompt_ids + s.response_ids, len(s.prompt_ids)) for s in self._samples("train")]
        rows = [r for p in sorted((self.out / "regen").glob("chunk-*.jsonl")) for r in _read_jsonl(p)]
        return [TrainSequence(r["prompt_ids"] + r["completion_ids"], len(r["prompt_ids"]))
                for r in rows if r["completion_ids"]]

    # 3) vocab -----------------------------------------------------------------------------------
    def vocab(self) -> dict:
        from safetensors.torch import save_file

        from ..drafts.vocab import build_draft_vocab

        t0 = time.perf_counter()
        v = self.model.config.get_text_config().vocab_size
        size = self.cfg.draft.draft_vocab_size or v
        completions = [s.ids[s.completion_start:] for s in self.sequences()]
        vocab = build_draft_vocab(completions, v, min(size, v))
        save_file({"d2t": vocab.d2t, "counts": vocab.counts}, str(self.out / "vocab.safetensors"))
        return {"draft_vocab_size": len(vocab.d2t), "vocab_size": v, "coverage": vocab.coverage(),
                "completion_tokens": int(vocab.counts.sum()), "seconds": time.perf_counter() - t0}

    def draft_vocab(self):
        from safetensors.torch import load_file

        from ..drafts.vocab import DraftVocab

        t = load_file(str(self.out / "vocab.safetensors"))
        t2d = torch.zeros(len(t["counts"]), dtype=torch.bool)
        t2d[torch.arange(len(t["d2t"])) + t["d2t"]] = True
        return DraftVocab(t["d2t"], t2d, t["counts"])

    # 4) features --------------------------------------------------------------------------------
    def new_draft(self):
        from ..drafts.eagle3 import Eagle3Draft

        vocab = self.draft_vocab()
        full = len(vocab.d2t) == len(vocab.counts)
        torch.manual_seed(self.cfg.train.seed)
        head = self.model.get_output_embeddings()
        return Eagle3Draft.from_target(self.model.config, None if full else vocab, self.cfg.draft.aux_layer_ids,
                                       target_head=None if head is None else head.weight.detach().float().cpu(),
                                       max_position_embeddings=self.cfg.run.max_model_len)

    def capture(self) -> dict:
        draft = self.new_draft()
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        stats = capture_to_shards(self.model, self.sequences(), self.out / "features", draft.target_ids(),
                                  draft.config.aux_layer_ids, self.cfg.capture, pad_id=pad, progress=self.progress)
        stats["tokens_per_s"] = stats["tokens_now"] / stats["seconds"] if stats["seconds"] else None
        return stats

    # 5) training and export ---------------------------------------------------------------------
    def train(self) -> dict:
        model = self.model
        draft = self.new_draft().to(next(model.parameters()).device)
        embed = model.get_input_embeddings().weight.detach().float()
        stats = train_from_shards(draft, embed, self.out / "features", self.cfg.train, self.out / "train" / "state.pt",
                                  progress=self.progress)
        (self.out / "train").mkdir(parents=True, exist_ok=True)
        torch.save(draft.cpu().state_dict(), self.out / "train" / "draft.pt")  # the stage record comes after it
        stats["tokens_per_s"] = stats["tokens_now"] / stats["seconds"] if stats["seconds"] else None
        return stats

    def export(self) -> dict:
        from ..checkpoint import save_eagle3, save_speculators

        draft = self.new_draft()
        draft.load_state_dict(torch.load(self.out / "train" / "draft.pt", map_location="cpu"))
        paths = {"vllm": str(save_eagle3(draft, self.out / "draft", self.model.config))}
        if self.cfg.export.speculators:
            paths["speculators"] = str(save_speculators(
                draft, self.out / "draft-speculators", self.model.config, verifier=self.target_dir,
                num_speculative_tokens=self.cfg.eval.num_speculative_tokens))
        return paths

    # 6) acceptance length on held-out prompts ---------------------------------------------------
    def evaluate(self) -> dict:
        from ..engine.vllm import SpecConfig

        ec = self.cfg.eval
        prompts = [s.prompt_ids for s in self._samples("eval")]
        if not ec.prompts or not prompts:
            return {"prompts": 0}
        draft_dir = self.out / ("draft" if ec.layout == "vllm" else "draft-speculators")
        spec = SpecConfig("eagle3", ec.num_speculative_tokens, model=str(draft_dir))
        with self.engine(spec, ec.max_num_seqs) as eng:
            before, t0 = eng.spec_counters(), time.perf_counter()
            outs = eng.generate(prompts, n=ec.samples_per_prompt, temperature=ec.temperature, max_tokens=ec.max_tokens,
                                logprobs=False, seed=self.cfg.run.seed + 777_777,
                                stop_token_ids=[self.tok.eos_token_id] if self.tok.eos_token_id is not None else None)
            delta, seconds = eng.spec_counters() - before, time.perf_counter() - t0
        tokens = sum(len(c.token_ids) for g in outs for c in g)
        return {"prompts": len(prompts), "layout": ec.layout, "completion_tokens": tokens, "seconds": seconds,
                "spec_acceptance_length": delta.acceptance_length,
                "acceptance_rate_per_pos": list(delta.acceptance_rate_per_pos()), **delta.as_dict()}
