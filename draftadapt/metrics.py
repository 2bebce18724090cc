"""Spec-decode counters -> per-step deltas -> the derived metrics RL users chart.

Reads vLLM's cumulative counters (`vllm:spec_decode_num_drafts`, `..._num_draft_tokens`,
`..._num_accepted_tokens`, `..._num_accepted_tokens_per_pos`) from any list of objects shaped
like `vllm.v1.metrics.reader` metrics, and one sequence's verification rounds (`SequenceSpec`, from
vLLM's per_request_spec_decode_metrics="detailed"); does not import vLLM itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

_PREFIX = "vllm:spec_decode_"


@dataclass(frozen=True)
class SpecCounters:
    """Cumulative (or delta) spec-decode counters of one or more engines."""

    drafts: int = 0  # verification rounds that carried a draft (one per request per step)
    draft_tokens: int = 0  # tokens proposed
    accepted: int = 0  # proposed tokens the target accepted (bonus tokens not included)
    accepted_per_pos: tuple[int, ...] = ()  # accepted count at draft position 0..k-1

    @classmethod
    def from_vllm_metrics(cls, metrics: Iterable) -> "SpecCounters":
        """Sum the spec-decode counters over every engine label in a `get_metrics()` list."""
        vals = {"num_drafts": 0, "num_draft_tokens": 0, "num_accepted_tokens": 0}
        per_pos: list[int] = []
        for m in metrics:
            name = m.name.removeprefix(_PREFIX)
            if not m.name.startswith(_PREFIX):
                continue
            if name == "num_accepted_tokens_per_pos":
                per_pos = _add_lists(per_pos, list(m.values))
            elif name in vals:
                vals[name] += int(m.value)
        return cls(vals["num_drafts"], vals["num_draft_tokens"], vals["num_accepted_tokens"], tuple(per_pos))

    def __add__(self, other: "SpecCounters") -> "SpecCounters":
        return SpecCounters(
            self.drafts + other.drafts,
            self.draft_tokens + other.draft_tokens,
            self.accepted + other.accepted,
            tuple(_add_lists(list(self.accepted_per_pos), list(other.accepted_per_pos))),
        )

    def __sub__(self, other: "SpecCounters") -> "SpecCounters":
        neg = SpecCounters(-other.drafts, -other.draft_tokens, -other.accepted,
                           tuple(-x for x in other.accepted_per_pos))
        return self + neg

    @property
    def acceptance_length(self) -> float:
        """Tokens per target forward, bonus token included: 1 + accepted / drafts."""
        return 1.0 + self.accepted / self.drafts if self.drafts else float("nan")

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.draft_tokens if self.draft_tokens else float("nan")

    def acceptance_rate_per_pos(self) -> list[float]:
        """Share of drafts whose position i was accepted (conditional chain: non-increasing)."""
        return [a / self.drafts if self.drafts else float("nan") for a in self.accepted_per_pos]

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """The derived metrics under the names RL dashboards already use."""
        out = {
            f"{prefix}spec_acceptance_length": self.acceptance_length,
            f"{prefix}spec_acceptance_rate": self.acceptance_rate,
            f"{prefix}spec_num_drafts": float(self.drafts),
            f"{prefix}spec_num_draft_tokens": float(self.draft_tokens),
            f"{prefix}spec_num_accepted_tokens": float(self.accepted),
        }
        for i, r in enumerate(self.acceptance_rate_per_pos()):
            out[f"{prefix}spec_acceptance_rate-pos-{i}"] = r
        return out


def _add_lists(a: list[int], b: list[int]) -> list[int]:
    n = max(len(a), len(b))
    return [(a[i] if i < len(a) else 0) + (b[i] if i < len(b) else 0) for i in range(n)]


@dataclass(frozen=True)
class SequenceSpec:
    """One sampled sequence's verification rounds, as vLLM reports them per request with
    per_request_spec_decode_metrics="detailed" (`CompletionOutput.spec_decode_metrics`): which
    rollouts the draft served well, and where in each one the target rejected it."""

    accepted: tuple[int, ...]  # [R] draft tokens accepted in verification round r
    drafted: tuple[int, ...]  # [R] draft tokens proposed in round r

    @classmethod
    def from_vllm(cls, metrics) -> "SequenceSpec | None":
        """From a `RequestSpecDecodeMetrics`; None when absent or recorded without "detailed"."""
        if metrics is None or (not metrics.per_step_drafted and sum(metrics.histogram)):
            return None
        return cls(tuple(metrics.per_step_accepted), tuple(metrics.per_step_drafted))

    @property
    def counters(self) -> SpecCounters:
        """The engine counters this sequence contributed (summed over sequences they equal the engine's delta)."""
        k = max(self.drafted, default=0)
        per_pos = tuple(sum(a > i for a in self.accepted) for i in range(k))
        return SpecCounters(sum(d > 0 for d in self.drafted), sum(self.drafted), sum(self.accepted), per_pos)

    def rejected_offsets(self, num_tokens: int) -> list[int] | None:
        """Completion offsets of the tokens the target emitted where it rejected a draft token (Draft-OPD's
        training positions). The first token comes from the prefill; round r then emits accepted[r] + 1 tokens.
        None when the rounds do not account for the `num_tokens` completion tokens (a decode step without a
        draft is not reported by vLLM), so positions are never guessed."""
        offsets, pos = [], 1
        for a, d in zip(self.accepted, self.drafted):
            if a < d and pos + a < num_tokens:
                offsets.append(pos + a)
            pos += a + 1
        # the last round may emit past a stop token or max_tokens (those tokens are dropped)
        return offsets if pos >= num_tokens and pos - (self.accepted[-1] if self.accepted else 0) - 1 < num_tokens \
            else None
