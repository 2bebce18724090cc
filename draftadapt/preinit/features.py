"""Pre-init features on disk: capture target features to safetensors shards, train a draft from them.

`capture_to_shards` runs the target's forward (HF) under `FeatureCapture` over token sequences
and writes the packed `RolloutBatch`es as shards of bounded size (cache.py `write_shard`) with a
manifest that `HiddenStateCache.load` / `iter_shards` read; an interrupted capture resumes after
the last shard the manifest names. `train_from_shards` runs TTT updates over a seeded,
shard-by-shard batch plan and checkpoints the trainer, so a resumed run ends on the same weights.
Knows nothing of datasets, templates or engines.
"""
from __future__ import annotations

import itertools
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple

import torch

from ..cache import FORMAT, MANIFEST, CacheConfig, write_shard
from ..capture import TEACHERS, FeatureCapture, RolloutBatch
from ..drafts.eagle3 import Eagle3Draft
from ..trainer import DraftTrainer, TrainerConfig

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class CaptureConfig:
    batch_size: int = 8  # sequences per target forward
    shard_max_bytes: int = 256 << 20  # a shard holds at most this many bytes (one sequence at least)
    dtype: str = "bfloat16"  # storage of aux hidden states: "bfloat16" or "float16"
    teacher: str = "draft_vocab"  # "draft_vocab" (log-probs at every draft id) or "topk" (top_k ids + log-probs)
    top_k: int = 0  # kept tokens for the "topk" teacher (0 otherwise)
    teacher_dtype: str = "float16"  # storage of teacher log-probs; float32 doubles the bytes for ~1e-3 precision

    def __post_init__(self) -> None:
        if self.batch_size <= 0 or self.shard_max_bytes <= 0:
            raise ValueError(f"capture.batch_size and capture.shard_max_bytes must be positive; got {self}")
        if self.dtype not in ("bfloat16", "float16") or self.teacher_dtype not in _DTYPES:
            raise ValueError(f"capture.dtype must be bfloat16|float16 and teacher_dtype one of {sorted(_DTYPES)}")
        if self.teacher not in TEACHERS[:2] or (self.teacher == "topk") != (self.top_k > 0):
            raise ValueError(f"capture.teacher={self.teacher!r} top_k={self.top_k}; use 'draft_vocab' with top_k=0 "
                             "or 'topk' with top_k > 0")


class TrainSequence(NamedTuple):
    ids: list[int]  # prompt + completion token ids
    completion_start: int  # index of the first completion token (positions before it do not train)


# 1) capture --------------------------------------------------------------------------------------
@torch.no_grad()
def capture_to_shards(target, sequences: list[TrainSequence], out_dir: str | os.PathLike,
                      draft_vocab_ids: torch.Tensor, aux_layer_ids, cfg: CaptureConfig, pad_id: int = 0,
                      progress: bool = True) -> dict:
    """Capture every sequence into out_dir/shard-*.safetensors + manifest.json; resumes a partial run.

    Forward batches cover fixed index ranges, so a resumed capture recomputes exactly the
    features an uninterrupted one would. Returns {sequences, tokens, bytes, seconds, resumed_from}.
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = _load_progress(out, len(sequences))
    done = sum(s["num_sequences"] for s in manifest["shards"])
    device = next(target.parameters()).device
    cap = FeatureCapture(target, aux_layer_ids, draft_vocab_ids=draft_vocab_ids, teacher=cfg.teacher,
                         top_k=cfg.top_k, store_dtype=_DTYPES[cfg.dtype], offload_to_cpu=True)
    pending, pending_bytes, tokens, t0 = [], 0, 0, time.perf_counter()
    first = done - done % cfg.batch_size
    bar = tqdm(total=len(sequences), initial=done, disable=not progress, desc="capture")
    with cap:
        for start in range(first, len(sequences), cfg.batch_size):
            batch = sequences[start:start + cfg.batch_size]
            ids, am, cm = _pad(batch, pad_id)
            target(input_ids=ids.to(device), attention_mask=am.to(device), use_cache=False)
            packed = _storage(cap.rollout_batch(input_ids=ids, attention_mask=am, completion_mask=cm), cfg)
            for i, seq in enumerate(packed.sequences()):
                if start + i < done:
                    continue
                nbytes = _nbytes(seq)
                if pending and pending_bytes + nbytes > cfg.shard_max_bytes:
                    _flush(out, manifest, pending)
                    pending, pending_bytes = [], 0
                pending.append(seq)
                pending_bytes += nbytes
                tokens += seq.num_tokens
                bar.update(1)
    if pending:
        _flush(out, manifest, pending)
    bar.close()
    _finish_manifest(out, manifest, cfg)
    return {"sequences": len(sequences), "captured_now": len(sequences) - done, "tokens_now": tokens,
            "seconds": time.perf_counter() - t0, "tokens": manifest["num_tokens"], "bytes": manifest["num_bytes"],
            "bytes_per_token": manifest["num_bytes"] / max(1, manifest["num_tokens"]), "shards": len(manifest["shards"])}


def _pad(batch: list[TrainSequence], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, T] ids (right-padded), attention mask, completion mask."""
    t = max(len(s.ids) for s in batch)
    ids = torch.full((len(batch), t), pad_id, dtype=torch.long)
    am = torch.zeros(len(batch), t, dtype=torch.long)
    cm = torch.zeros(len(batch), t, dtype=torch.bool)
    for row, s in enumerate(batch):
        if len(s.ids) < 2:
            raise ValueError(f"a training sequence has {len(s.ids)} tokens; it needs a prompt and a completion")
        ids[row, :len(s.ids)] = torch.as_tensor(s.ids)
        am[row, :len(s.ids)] = 1
        cm[row, s.completion_start:len(s.ids)] = True
    return ids, am, cm


def _storage(batch: RolloutBatch, cfg: CaptureConfig) -> RolloutBatch:
    """Teacher log-probs in their storage dtype (capture already stored the hidden states); the completion mask
    (read by an online vocab refresh only) is not stored."""
    fields = dict(vars(batch), completion=None)
    for k in ("teacher_logprobs", "teacher_topk_logprobs"):
        if fields.get(k) is not None:
            fields[k] = fields[k].to(_DTYPES[cfg.teacher_dtype])
    return RolloutBatch(**fields)


def _nbytes(seq: RolloutBatch) -> int:
    return sum(t.numel() * t.element_size() for k, t in vars(seq).items()
               if isinstance(t, torch.Tensor) and k != "cu_seqlens")


def _load_progress(out: Path, total: int) -> dict:
    path = out / MANIFEST
    if path.is_file():
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT or manifest.get("sequences_total") != total:
            raise ValueError(f"{path} belongs to another capture ({manifest.get('sequences_total')} sequences, "
                             f"this one has {total}); delete {out} or use another run.out_dir")
        return manifest
    return {"format": FORMAT, "sequences_total": total, "complete": False, "shards": [], "entries": [],
            "num_tokens": 0, "num_bytes": 0, "schema": None}


def _flush(out: Path, manifest: dict, entries: list[RolloutBatch]) -> None:
    """Write one shard, then the manifest that names it (both atomic: a crash loses at most this shard)."""
    record = write_shard(out / f"shard-{len(manifest['shards']):05d}.safetensors", entries)
    record["bytes"] = sum(_nbytes(e) for e in entries)
    manifest["shards"].append(record)
    manifest["entries"] += [[e.policy_version, e.num_tokens] for e in entries]
    manifest["num_tokens"] += record["num_tokens"]
    manifest["num_bytes"] += record["bytes"]
    manifest["schema"] = {k: v.shape[1] if v.dim() > 1 else 1 for k, v in vars(entries[0]).items()
                          if isinstance(v, torch.Tensor) and k != "cu_seqlens"}
    write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=1))


def _finish_manifest(out: Path, manifest: dict, cfg: CaptureConfig) -> None:
    """Mark the capture complete and fill the fields `HiddenStateCache.load` reads."""
    manifest["complete"] = True
    # bounds that keep every entry when HiddenStateCache.load reads it back (it also counts cu_seqlens)
    manifest["config"] = asdict(CacheConfig(max_tokens=max(1, manifest["num_tokens"]),
                                            max_bytes=2 * manifest["num_bytes"] + (1 << 20), dtype=cfg.dtype,
                                            teacher_dtype=cfg.teacher_dtype))
    manifest.update(latest_version=0, stats={"added": len(manifest["entries"]), "evicted": 0, "dropped_stale": 0})
    write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=1))


def write_text_atomic(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# 2) training -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000  # TTT optimizer steps
    batch_size: int = 16  # sequences per step (a batch never spans two shards)
    checkpoint_every: int = 200  # steps between trainer checkpoints (resume points); 0 = none
    seed: int = 0  # draft init and the batch plan
    trainer: TrainerConfig = field(  # optimizer and TTT loss
        default_factory=lambda: TrainerConfig(lr=2e-3, ttt_steps=3, warmup_steps=30))

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.batch_size <= 0 or self.checkpoint_every < 0:
            raise ValueError(f"train.steps and train.batch_size must be positive, checkpoint_every >= 0; got {self}")


def batch_plan(shard_sizes: list[int], batch_size: int, seed: int) -> Iterator[tuple[int, list[int]]]:
    """Endless (shard, sequence indices) batches: each epoch visits shards and their sequences in
    a seeded order; it depends only on the manifest, so step s is found without reading data."""
    for epoch in itertools.count():
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        for shard in torch.randperm(len(shard_sizes), generator=g).tolist():
            order = torch.randperm(shard_sizes[shard], generator=g).tolist()
            for i in range(0, len(order), batch_size):
                yield shard, order[i:i + batch_size]


def train_from_shards(draft: Eagle3Draft, target_embed, features_dir: str | os.PathLike, cfg: TrainConfig,
                      state_path: str | os.PathLike, progress: bool = True) -> dict:
    """`cfg.steps` TTT updates over the captured shards; resumes from `state_path` when it exists."""
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    features_dir, state_path = Path(features_dir), Path(state_path)
    manifest = json.loads((features_dir / MANIFEST).read_text())
    if not manifest.get("complete"):
        raise RuntimeError(f"{features_dir} holds an unfinished capture: run the capture stage first")
    trainer = DraftTrainer(draft, target_embed, cfg.trainer)
    if state_path.is_file():
        trainer.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=False))
    start = trainer.steps_done
    plan = itertools.islice(batch_plan([s["num_sequences"] for s in manifest["shards"]], cfg.batch_size, cfg.seed),
                            start, cfg.steps)
    vocab_ids = draft.target_ids().cpu()
    loaded: tuple[int, list[RolloutBatch]] | None = None
    tokens, last, t0 = 0, None, time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress, desc="train")
    for shard, idx in plan:
        if loaded is None or loaded[0] != shard:  # one shard in memory at a time
            tensors = load_file(str(features_dir / manifest["shards"][shard]["file"]))
            tensors.pop("policy_versions")
            loaded = (shard, RolloutBatch(**tensors).sequences())
        batch = RolloutBatch.concat([loaded[1][i] for i in idx]).to_draft_batch(vocab_ids, sparse_teacher=True)
        last = trainer.step(batch)
        tokens += batch.num_tokens
        bar.update(1)
        bar.set_postfix(loss=f"{last.loss:.3f}", acc=" ".join(f"{a:.2f}" for a in last.step_acc))
        if cfg.checkpoint_every and trainer.steps_done % cfg.checkpoint_every == 0 and trainer.steps_done < cfg.steps:
            _save_state(trainer, state_path)
    bar.close()
    draft.eval()
    return {"steps": cfg.steps, "steps_now": cfg.steps - start, "tokens_now": tokens,
            "seconds": time.perf_counter() - t0, "final": None if last is None else last.as_dict()}


def _save_state(trainer: DraftTrainer, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    torch.save(trainer.state_dict(), tmp)
    os.replace(tmp, path)
