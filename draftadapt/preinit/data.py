"""Pre-init data: rows of DAPO-Math-17k / UltraChat-200k (hub, local file or a registered source), checked
and rendered.

`load_rows` reads raw rows from the hub (`datasets.load_dataset`, imported lazily), a local
jsonl/parquet file in the dataset's real schema, or a source registered with `register_rows` (the toy
workload registers its rows, written in those schemas, from `draftadapt/toy/preinit_sources.py`).
`parse_rows` checks each row against its schema and `render` turns conversations into token
ids with the target's chat template (or a plain template); both count bad rows by reason and
skip them, or reject the whole input when `on_bad_rows="error"`. Knows nothing of models,
engines or training.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

log = logging.getLogger("draftadapt.preinit")
SOURCES = ("hub", "local")  # built in; more by register_rows (the toy's: `import draftadapt.toy.preinit_sources`)
SCHEMAS = ("dapo", "ultrachat")
# name -> (rows(cfg) -> raw rows in a real schema, {path: the schema its rows are written in} or None = any)
ROW_SOURCES: dict[str, tuple[Callable[["DataConfig"], Iterable[dict]], dict[str, str] | None]] = {}


def register_rows(name: str, rows: Callable[["DataConfig"], Iterable[dict]],
                  schemas: dict[str, str] | None = None) -> None:
    """Make `data.source=name` read `rows(cfg)`: raw rows in one of SCHEMAS, generated or read by the caller's
    package (the toy registers its task and chat rows this way, so this module imports no workload)."""
    if name in SOURCES:
        raise ValueError(f"data source {name!r} is built in; register another name")
    ROW_SOURCES[name] = (rows, schemas)


@dataclass(frozen=True)
class DataConfig:
    source: str = "hub"  # "hub" (datasets.load_dataset), "local" (jsonl/parquet file) or a registered source
    path: str = "BytedTsinghua-SIA/DAPO-Math-17k"  # hub id, local file, or what the source reads (toy: "task" | "chat")
    split: str = "train"  # hub split ("train" for DAPO, "train_sft" for UltraChat)
    schema: str = "dapo"  # row layout: "dapo" (prompt messages + reward_model) or "ultrachat" (messages)
    max_rows: int | None = None  # read at most this many rows (toy: rows generated)
    seed: int = 0  # shuffle of the rows (toy: the prompt stream's seed, as toy/draft.py domain_prompts)
    shuffle: bool = True  # shuffle rows before the train/eval split
    dedupe: bool = True  # drop rows whose prompt repeats an earlier row's (the hub DAPO-Math-17k repeats them)
    on_bad_rows: str = "skip"  # "skip": count and drop bad rows; "error": refuse the input, listing them

    def __post_init__(self) -> None:
        if self.source not in SOURCES and self.source not in ROW_SOURCES:
            raise ValueError(f"data.source={self.source!r}; choose one of {SOURCES + tuple(ROW_SOURCES)}, or register "
                             "it first (draftadapt.preinit.data.register_rows; the toy's rows: "
                             "`import draftadapt.toy.preinit_sources`)")
        if self.schema not in SCHEMAS:
            raise ValueError(f"data.schema={self.schema!r}; choose one of {SCHEMAS}")
        if self.on_bad_rows not in ("skip", "error"):
            raise ValueError(f"data.on_bad_rows={self.on_bad_rows!r}; choose 'skip' or 'error'")
        schemas = ROW_SOURCES[self.source][1] if self.source in ROW_SOURCES else None
        if schemas is not None and schemas.get(self.path) != self.schema:
            raise ValueError(f"{self.source} data path={self.path!r} schema={self.schema!r}; use "
                             + " or ".join(f"path {p!r} with schema {sc!r}" for p, sc in schemas.items()))
        if self.max_rows is not None and self.max_rows <= 0:
            raise ValueError(f"data.max_rows={self.max_rows}; use a positive int or null")


@dataclass(frozen=True)
class RenderConfig:
    template: str = "auto"  # "auto": the tokenizer's chat template when it has one, else plain; "plain"
    plain_turn: str = "{role}: {content}\n"  # one turn in the plain template ({role}, {content})
    plain_generation_prompt: str = "assistant:"  # appended after the prompt turns in the plain template
    add_bos: bool = True  # plain template: start with the tokenizer's bos token (if it has one)
    max_prompt_tokens: int = 1024  # longer prompts are bad rows ("prompt_too_long")
    max_response_tokens: int = 2048  # longer reference responses are bad rows ("response_too_long")

    def __post_init__(self) -> None:
        if self.template not in ("auto", "plain"):
            raise ValueError(f"render.template={self.template!r}; choose 'auto' or 'plain'")
        if "{content}" not in self.plain_turn:
            raise ValueError(f"render.plain_turn={self.plain_turn!r} must contain '{{content}}'")


@dataclass(frozen=True)
class Conversation:
    index: int  # row number in the source
    prompt: list[dict]  # chat messages [{"role", "content"}] up to the first assistant turn
    response: str | None  # the dataset's first assistant turn (None: prompts-only data such as DAPO)
    ground_truth: str | None = None  # DAPO reward_model.ground_truth


@dataclass(frozen=True)
class Sample:
    index: int  # row number in the source
    prompt_ids: list[int]  # rendered prompt, generation prompt included
    response_ids: list[int] | None  # rendered reference response (eos included), None when absent


@dataclass
class BadRows:
    """Bad rows by reason, with the first few row numbers of each reason."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[int]] = field(default_factory=dict)
    duplicates: int = 0  # rows dropped as repeats of an earlier prompt (not bad, not counted in total)

    def add(self, reason: str, index: int) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(index)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict:
        return {"total": self.total, "counts": dict(self.counts), "examples": dict(self.examples),
                "duplicates": self.duplicates}

    def check(self, on_bad_rows: str, kept: int, where: str) -> None:
        """Log the counts, or raise when on_bad_rows == 'error' (or nothing is left)."""
        if not self.total:
            return
        detail = ", ".join(f"{r}: {n} (rows {self.examples[r]})" for r, n in sorted(self.counts.items()))
        if on_bad_rows == "error" or kept == 0:
            raise ValueError(f"{where}: {self.total} bad rows ({detail}), {kept} good; fix the rows or set "
                             "data.on_bad_rows=skip (and loosen render.max_* for over-long ones)")
        log.warning("%s: skipped %d bad rows (%s); %d kept", where, self.total, detail, kept)


# 1) raw rows ------------------------------------------------------------------------------------
def load_rows(cfg: DataConfig) -> Iterator[dict | None]:
    """Raw rows of the source in its real schema; None for a row that could not be read at all."""
    if cfg.source in ROW_SOURCES:
        yield from ROW_SOURCES[cfg.source][0](cfg)
        return
    rows = _hub_rows(cfg) if cfg.source == "hub" else _local_rows(Path(cfg.path))
    for n, row in enumerate(rows):
        if cfg.max_rows is not None and n >= cfg.max_rows:
            return
        yield row


def _hub_rows(cfg: DataConfig) -> Iterator[dict]:
    try:
        from datasets import load_dataset
    except ImportError as e:
        raise ImportError("hub data needs the `datasets` package: pip install datasets") from e
    split = cfg.split if cfg.max_rows is None else f"{cfg.split}[:{cfg.max_rows}]"
    yield from load_dataset(cfg.path, split=split)


def _local_rows(path: Path) -> Iterator[dict | None]:
    if not path.is_file():
        raise ValueError(f"data.path={str(path)!r} is not a file; give a .jsonl or .parquet file in the schema")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from pq.read_table(path).to_pylist()
    elif path.suffix in (".jsonl", ".json"):
        with path.open() as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                yield row if isinstance(row, dict) else None
    else:
        raise ValueError(f"data.path={str(path)!r}: unknown file type; use .jsonl or .parquet")


# 2) schema checks -------------------------------------------------------------------------------
def parse_rows(rows, cfg: DataConfig) -> tuple[list[Conversation], BadRows]:
    """Conversations from raw rows; bad rows counted by reason (and refused when on_bad_rows='error')."""
    out, bad, seen = [], BadRows(), set()
    for index, row in enumerate(rows):
        conv = _parse(row, cfg.schema, index)
        if isinstance(conv, str):
            bad.add(conv, index)
            continue
        key = json.dumps(conv.prompt, sort_keys=True)
        if cfg.dedupe and key in seen:
            bad.duplicates += 1
            continue
        seen.add(key)
        out.append(conv)
    bad.check(cfg.on_bad_rows, len(out), f"data {cfg.source}:{cfg.path}")
    return out, bad


def _parse(row: Any, schema: str, index: int) -> Conversation | str:
    """A Conversation, or the reason the row is bad."""
    if not isinstance(row, dict):
        return "unreadable_row"
    if schema == "dapo":
        if row.get("prompt") is None:  # absent, or null in a parquet file whose other rows have it
            return "missing_column:prompt"
        gt = (row.get("reward_model") or {}).get("ground_truth") if isinstance(row.get("reward_model"), dict) else None
        if gt is None:
            return "missing_column:reward_model.ground_truth"
        messages, response = row["prompt"], row.get("response")
    else:
        if row.get("messages") is None:
            return "missing_column:messages"
        messages, response, gt = row["messages"], None, None
    if not isinstance(messages, list) or not messages:
        return "empty_messages"
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return "malformed_message"
        if not m["content"].strip():
            return "empty_message_content"
    first_assistant = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
    prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:first_assistant]]
    if not any(m["role"] == "user" for m in prompt):
        return "no_user_turn"
    if first_assistant < len(messages):
        response = messages[first_assistant]["content"]
    return Conversation(index, prompt, response if isinstance(response, str) else None,
                        None if gt is None else str(gt))


# 3) rendering -----------------------------------------------------------------------------------
def uses_chat_template(tok, cfg: RenderConfig) -> bool:
    return cfg.template == "auto" and bool(getattr(tok, "chat_template", None))


def render(conversations: list[Conversation], tok, cfg: RenderConfig, on_bad_rows: str = "skip",
           need_response: bool = False, where: str = "render") -> tuple[list[Sample], BadRows]:
    """Token ids of every conversation; over-long (or, with need_response, response-less) rows are bad."""
    chat = uses_chat_template(tok, cfg)
    out, bad = [], BadRows()
    for conv in conversations:
        prompt_text = _prompt_text(tok, conv.prompt, cfg, chat)
        prompt_ids = _encode(tok, prompt_text, cfg, chat)
        response_ids = None
        if conv.response is not None:
            response_ids = _response_ids(tok, conv, prompt_text, cfg, chat)
        reason = None
        if not prompt_ids:
            reason = "empty_prompt_after_render"
        elif len(prompt_ids) > cfg.max_prompt_tokens:
            reason = "prompt_too_long"
        elif need_response and not response_ids:
            reason = "no_response"
        elif need_response and len(response_ids) > cfg.max_response_tokens:
            reason = "response_too_long"
        if reason:
            bad.add(reason, conv.index)
            continue
        out.append(Sample(conv.index, prompt_ids, response_ids))
    bad.check(on_bad_rows, len(out), where)
    return out, bad


def _prompt_text(tok, messages: list[dict], cfg: RenderConfig, chat: bool) -> str:
    if chat:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(cfg.plain_turn.format(role=m["role"], content=m["content"]) for m in messages) \
        + cfg.plain_generation_prompt


def _encode(tok, text: str, cfg: RenderConfig, chat: bool) -> list[int]:
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    if not chat and cfg.add_bos and tok.bos_token_id is not None:
        ids = [tok.bos_token_id] + ids
    return ids


def _response_ids(tok, conv: Conversation, prompt_text: str, cfg: RenderConfig, chat: bool) -> list[int]:
    """The response as the template renders it after the prompt (end-of-turn tokens included)."""
    if chat:
        full = tok.apply_chat_template(conv.prompt + [{"role": "assistant", "content": conv.response}],
                                       tokenize=False)
        if full.startswith(prompt_text):
            return list(tok(full[len(prompt_text):], add_special_tokens=False)["input_ids"])
    ids = list(tok(conv.response, add_special_tokens=False)["input_ids"])
    return ids + ([tok.eos_token_id] if tok.eos_token_id is not None and ids else [])
