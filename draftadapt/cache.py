"""HiddenStateCache: a bounded, version-tagged store of captured target features.

Holds one entry per sequence or window (a one-row `RolloutBatch`, hidden states in bf16/fp16) tagged
with the `policy_version` that produced it; with `version_tokens` keeps per version only the
highest-priority windows that fit (the step reservoir of budget.py, same rule as capture's); evicts
oldest-first past `max_tokens` or `max_bytes`, drops (with a warning and a count, never a crash) an
entry that alone breaks a bound, drops entries that fall out of the staleness window, samples
padded `DraftBatch`es, and saves to / loads from safetensors shards with a JSON manifest (resume,
offline pre-init).
It does not capture features or train; it knows nothing of models or engines.
"""
from __future__ import annotations

import json
import os
import uuid
import warnings
from collections import deque
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .batch import DraftBatch
from .budget import reservoir_keep
from .capture import RolloutBatch

MANIFEST = "manifest.json"
FORMAT = "draftadapt.hidden_state_cache/1"
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_HIDDEN = ("aux_hidden", "final_hidden")  # stored in CacheConfig.dtype
_TEACHER = ("teacher_logprobs", "teacher_topk_logprobs")  # stored in CacheConfig.teacher_dtype


@dataclass(frozen=True)
class CacheConfig:
    max_tokens: int = 1 << 20  # cached tokens at most; oldest sequences are evicted first
    max_bytes: int = 4 << 30  # cached tensor bytes at most (hidden states + teacher + ids + mask)
    dtype: str = "bfloat16"  # storage of hidden states: "bfloat16" or "float16"
    teacher_dtype: str = "float32"  # storage of teacher log-probs; "float16" halves it at ~1e-3 error
    staleness_window: int | None = None  # keep features from the newest `window` versions back; None keeps all
    version_tokens: int | None = None  # per policy version keep at most this many positions: the highest-
    #   priority windows (RolloutBatch.priority, a step reservoir); None = no per-version bound

    def __post_init__(self) -> None:
        for name in ("max_tokens", "max_bytes") + (("version_tokens",) if self.version_tokens is not None else ()):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"CacheConfig.{name}={getattr(self, name)!r}; set it to a positive int")
        if self.dtype not in ("bfloat16", "float16"):
            raise ValueError(f"CacheConfig.dtype={self.dtype!r}; use 'bfloat16' or 'float16'")
        if self.teacher_dtype not in _DTYPES:
            raise ValueError(f"CacheConfig.teacher_dtype={self.teacher_dtype!r}; use one of {sorted(_DTYPES)}")
        window = self.staleness_window
        if window is not None and (not isinstance(window, int) or window < 0):
            raise ValueError(f"CacheConfig.staleness_window={self.staleness_window!r}; use an int >= 0 or None")


def _nbytes(entry: RolloutBatch) -> int:
    return sum(t.numel() * t.element_size() for t in vars(entry).values() if isinstance(t, torch.Tensor))


def _atomic_write(path: Path, write) -> None:
    """write(tmp_path) then rename over `path`: readers see the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class HiddenStateCache:
    """Bounded FIFO of per-sequence feature entries; see the module docstring."""

    def __init__(self, config: CacheConfig | None = None, **overrides):
        if config is not None and overrides:
            raise ValueError("pass a CacheConfig or keyword overrides, not both")
        unknown = set(overrides) - set(CacheConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown cache settings {sorted(unknown)}; "
                             f"valid: {sorted(CacheConfig.__dataclass_fields__)}")
        self.config = config or CacheConfig(**overrides)
        self._entries: deque[RolloutBatch] = deque()
        self._bytes: deque[int] = deque()  # bytes of each entry, same order
        self.num_tokens = 0
        self.num_bytes = 0
        self.latest_version: int | None = None  # newest policy_version ever added
        self.schema: dict | None = None  # {field: width} fixed by the first add
        self.floors: dict[int, float] = {}  # policy_version -> reservoir floor (budget.reservoir_keep)
        self.stats = {"added": 0, "evicted": 0, "dropped_stale": 0, "dropped_oversize": 0,
                      "pushed_out": 0}  # sequences; pushed_out = by a higher-priority window of the same version

    def __len__(self) -> int:
        return len(self._entries)

    # 1) add / evict / drop ----------------------------------------------------------------------
    def add(self, batch: RolloutBatch) -> int:
        """Store every sequence (window) of `batch` that has a training target and survives the
        version's reservoir; returns how many were stored."""
        if batch.completion is not None:  # read by the vocab refresh before the cache; not stored
            batch = replace(batch, completion=None)
        self._check_schema(batch)
        # 1) storage dtypes on the host (a no-op for capture's output), then one owned copy per row worth training on
        entries = [self._storage(seq) for seq in self._cast(batch).sequences() if bool(seq.loss_mask.any())]
        sizes = [_nbytes(e) for e in entries]
        # 2) drop (warn, count) a row that alone breaks a bound: cut long sequences into windows before add
        fits = [e.num_tokens <= self.config.max_tokens and b <= self.config.max_bytes for e, b in zip(entries, sizes)]
        if not all(fits):
            big = [e.num_tokens for e, ok in zip(entries, fits) if not ok]
            self.stats["dropped_oversize"] += len(big)
            warnings.warn(f"HiddenStateCache.add dropped {len(big)} sequences of {big[:4]} tokens: each alone exceeds "
                          f"max_tokens={self.config.max_tokens} or max_bytes={self.config.max_bytes}; window them "
                          "(AdapterConfig.window_tokens) or raise the bounds", stacklevel=2)
            entries, sizes = [e for e, ok in zip(entries, fits) if ok], [b for b, ok in zip(sizes, fits) if ok]
        # 3) the version's reservoir, then append, drop what fell out of the staleness window, evict oldest
        if self.config.version_tokens is not None:
            entries, sizes = self._reservoir(batch, entries, sizes)
        for e, nbytes in zip(entries, sizes):
            self._push(e, nbytes)
        self.stats["added"] += len(entries)
        v = batch.policy_version
        self.latest_version = v if self.latest_version is None else max(v, self.latest_version)
        if self.config.staleness_window is not None:
            self.drop_stale(self.latest_version, self.config.staleness_window)
        self._evict()
        return len(entries)

    def _cast(self, seq: RolloutBatch, copy: bool = False) -> RolloutBatch:
        """On the CPU, hidden states and teacher in their storage dtypes; copy=True: memory of its own."""
        dtypes = {**{k: _DTYPES[self.config.dtype] for k in _HIDDEN},
                  **{k: _DTYPES[self.config.teacher_dtype] for k in _TEACHER}}

        def cast(k, v):
            return v.to(device="cpu", dtype=dtypes.get(k, v.dtype), copy=copy)
        return RolloutBatch(**{k: cast(k, v) if isinstance(v, torch.Tensor) else v for k, v in vars(seq).items()})

    def _storage(self, seq: RolloutBatch) -> RolloutBatch:
        return self._cast(seq, copy=True)

    def _reservoir(self, batch: RolloutBatch, entries: list, sizes: list) -> tuple[list, list]:
        """Keep the version's highest-priority rows within version_tokens (budget.reservoir_keep);
        push out earlier rows of the same version that no longer make it."""
        if batch.priority is None:
            raise ValueError("CacheConfig.version_tokens needs RolloutBatch.priority: capture through "
                             "DraftAdapter.capture (a StepSampler draws it) or set version_tokens=None")
        v = batch.policy_version
        old = [i for i, e in enumerate(self._entries) if e.policy_version == v]
        if not old and not entries:
            return entries, sizes
        prio = torch.cat([self._entries[i].priority for i in old] + [e.priority for e in entries])
        n = torch.tensor([self._entries[i].num_tokens for i in old] + [e.num_tokens for e in entries])
        keep, self.floors[v] = reservoir_keep(prio, n, self.config.version_tokens, self.floors.get(v, -float("inf")))
        keep = keep.tolist()
        out = {i for i, k in zip(old, keep) if not k}
        if out:
            self._entries = deque(e for i, e in enumerate(self._entries) if i not in out)
            self._bytes = deque(b for i, b in enumerate(self._bytes) if i not in out)
            self.num_tokens = sum(e.num_tokens for e in self._entries)
            self.num_bytes = sum(self._bytes)
            self.stats["pushed_out"] += len(out)
        new = keep[len(old):]
        self.stats["pushed_out"] += new.count(False)
        return [e for e, k in zip(entries, new) if k], [b for b, k in zip(sizes, new) if k]

    def _push(self, entry: RolloutBatch, nbytes: int) -> None:
        self._entries.append(entry)
        self._bytes.append(nbytes)
        self.num_tokens += entry.num_tokens
        self.num_bytes += nbytes

    def _evict(self) -> None:
        while self.num_tokens > self.config.max_tokens or self.num_bytes > self.config.max_bytes:
            self.num_tokens -= self._entries.popleft().num_tokens
            self.num_bytes -= self._bytes.popleft()
            self.stats["evicted"] += 1

    def drop_stale(self, current_version: int, window: int) -> int:
        """Drop entries with policy_version < current_version - window; returns how many."""
        keep = [(e, b) for e, b in zip(self._entries, self._bytes)
                if e.policy_version >= current_version - window]
        dropped = len(self._entries) - len(keep)
        self.floors = {v: f for v, f in self.floors.items() if v >= current_version - window}
        self._entries, self._bytes = deque(e for e, _ in keep), deque(b for _, b in keep)
        self.num_tokens = sum(e.num_tokens for e in self._entries)
        self.num_bytes = sum(self._bytes)
        self.stats["dropped_stale"] += dropped
        return dropped

    def _check_schema(self, batch: RolloutBatch) -> None:
        schema = {k: v.shape[1] if v.dim() > 1 else 1 for k, v in vars(batch).items()
                  if isinstance(v, torch.Tensor) and k not in ("cu_seqlens", "positions", "priority")}
        if self.schema is None:
            self.schema = schema
        elif schema != self.schema:
            bad = sorted(k for k in schema.keys() | self.schema.keys() if schema.get(k) != self.schema.get(k))
            raise ValueError(f"RolloutBatch fields {bad} differ from the cached ones ({self.schema}); "
                             "capture every batch with the same aux layers, teacher and vocab, or use a new cache")

    def bytes_per_token(self) -> int:
        """Stored bytes per token: 3*H_t hidden + teacher + final hidden + int64 id + bool mask."""
        if self.schema is None:
            raise RuntimeError("the cache has no schema yet: call add() first")
        hidden, teacher = _DTYPES[self.config.dtype].itemsize, _DTYPES[self.config.teacher_dtype].itemsize
        size = {"input_ids": 8, "loss_mask": 1, "teacher_topk_ids": 8}
        size.update({k: hidden for k in _HIDDEN}, **{k: teacher for k in _TEACHER})
        return sum(width * size[k] for k, width in self.schema.items())

    # 2) sample -------------------------------------------------------------------------------
    def sample(self, num_sequences: int | None = None, num_tokens: int | None = None,
               generator: torch.Generator | None = None, draft_vocab_ids: torch.Tensor | None = None,
               target_head: nn.Module | None = None, sparse_teacher: bool = False) -> DraftBatch:
        """A padded fp32 DraftBatch of random cached sequences, uniformly without replacement.

        Give num_sequences, or num_tokens (sequences are added while they fit; at least one).
        draft_vocab_ids / target_head convert top-k / final_hidden teachers (RolloutBatch.to_draft_batch);
        sparse_teacher=True keeps a top-k teacher top-k (the loss reads it per chunk of positions through
        batch.teacher_dense); every training path passes it. False densifies it to [B, T, Vd] fp32 (2 GB at
        Vd=32k and 16k tokens): for inspection and tests.
        Its policy_version is the oldest among the sampled sequences.
        """
        if (num_sequences is None) == (num_tokens is None):
            raise ValueError("pass exactly one of num_sequences or num_tokens")
        if (num_sequences or num_tokens) <= 0:
            raise ValueError(f"sample size must be positive, got {num_sequences or num_tokens}")
        if self.config.staleness_window is not None and self.latest_version is not None:
            self.drop_stale(self.latest_version, self.config.staleness_window)
        if not self._entries:
            raise RuntimeError("the cache is empty: call add() first")
        entries = list(self._entries)
        order = torch.randperm(len(entries), generator=generator).tolist()
        if num_sequences is not None:
            picked = [entries[i] for i in order[:num_sequences]]
        else:
            picked, total = [], 0
            for i in order:
                if picked and total + entries[i].num_tokens > num_tokens:
                    break
                picked.append(entries[i])
                total += entries[i].num_tokens
        return RolloutBatch.concat(picked).to_draft_batch(draft_vocab_ids, target_head, dtype=torch.float32,
                                                          sparse_teacher=sparse_teacher)

    # 3) checkpoint / spill ------------------------------------------------------------------
    def state_dict(self) -> dict:
        """JSON-able index of the cache: config, counters, and (policy_version, tokens) per entry."""
        return {"format": FORMAT, "config": asdict(self.config), "latest_version": self.latest_version,
                "num_tokens": self.num_tokens, "num_bytes": self.num_bytes, "schema": self.schema,
                "stats": dict(self.stats), "entries": [[e.policy_version, e.num_tokens] for e in self._entries],
                "floors": {str(v): f for v, f in self.floors.items()}}

    def save(self, directory: str | os.PathLike, shard_max_bytes: int = 1 << 30) -> Path:
        """Write the entries to safetensors shards of at most `shard_max_bytes` (one sequence at
        least) and a manifest holding `state_dict()`. Shards get fresh names and the manifest is
        replaced last, so a crash leaves the previous save loadable; old shards go afterwards."""
        if shard_max_bytes <= 0:
            raise ValueError(f"shard_max_bytes={shard_max_bytes}; set it to a positive byte count")
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tag = uuid.uuid4().hex[:8]
        groups, size = [[]], 0
        for e, b in zip(self._entries, self._bytes):
            if groups[-1] and size + b > shard_max_bytes:
                groups.append([])
                size = 0
            groups[-1].append(e)
            size += b
        shards = [write_shard(out / f"shard-{tag}-{i:05d}.safetensors", g) for i, g in enumerate(groups) if g]
        manifest = {**self.state_dict(), "shards": shards}
        _atomic_write(out / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=1)))
        for old in out.glob("shard-*.safetensors"):
            if old.name not in {s["file"] for s in shards}:
                old.unlink()
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike, **overrides) -> "HiddenStateCache":
        """Rebuild a saved cache (same entries, order, versions, counters); `overrides` change its config."""
        manifest = read_manifest(directory)
        cache = cls(**{**manifest["config"], **overrides})
        for seq in iter_shards(directory):
            stored = cache._storage(seq)
            cache._push(stored, _nbytes(stored))
        if [[e.policy_version, e.num_tokens] for e in cache._entries] != manifest["entries"]:
            raise ValueError(f"the shards in {directory} do not match its manifest's entries; the save is corrupt")
        cache.latest_version, cache.schema = manifest["latest_version"], manifest["schema"]
        cache.stats.update(manifest["stats"])
        cache.floors = {int(v): f for v, f in manifest.get("floors", {}).items()}
        cache._evict()  # overrides may have tightened the bounds
        return cache


def write_shard(path: Path, entries: list[RolloutBatch]) -> dict:
    """Atomically write entries as one packed safetensors file; returns its manifest record."""
    from safetensors.torch import save_file

    packed = RolloutBatch.concat(entries)
    tensors = {k: v.contiguous() for k, v in vars(packed).items() if isinstance(v, torch.Tensor)}
    tensors["policy_versions"] = torch.tensor([e.policy_version for e in entries], dtype=torch.int64)  # [B]
    _atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"format": FORMAT}))
    return {"file": path.name, "num_sequences": len(entries), "num_tokens": packed.num_tokens}


def read_manifest(directory: str | os.PathLike) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ValueError(f"{path} does not exist; point at a directory written by HiddenStateCache.save")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def iter_shards(directory: str | os.PathLike) -> Iterator[RolloutBatch]:
    """Stream a saved cache shard by shard, one RolloutBatch per sequence (bounded memory)."""
    from safetensors.torch import load_file

    for shard in read_manifest(directory)["shards"]:
        tensors = load_file(str(Path(directory) / shard["file"]))
        versions = tensors.pop("policy_versions").tolist()
        packed = RolloutBatch(**tensors)
        for seq, version in zip(packed.sequences(), versions):
            seq.policy_version = version
            yield seq
