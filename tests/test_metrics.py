"""Spec-decode counters: parsing vLLM's metric list, per-step deltas, derived metrics."""
import math
from dataclasses import dataclass

from draftadapt.metrics import SpecCounters


@dataclass
class C:  # shaped like vllm.v1.metrics.reader.Counter
    name: str
    value: int
    labels: dict


@dataclass
class V:  # shaped like vllm.v1.metrics.reader.Vector
    name: str
    values: list
    labels: dict


def snapshot(drafts, tokens, acc, per_pos, engine="0"):
    lab = {"engine": engine}
    return [C("vllm:spec_decode_num_drafts", drafts, lab), C("vllm:spec_decode_num_draft_tokens", tokens, lab),
            C("vllm:spec_decode_num_accepted_tokens", acc, lab),
            V("vllm:spec_decode_num_accepted_tokens_per_pos", per_pos, lab),
            C("vllm:num_requests_running", 99, lab)]


def test_counters_sum_over_engines_and_ignore_other_metrics():
    c = SpecCounters.from_vllm_metrics(snapshot(10, 30, 12, [7, 4, 1]) + snapshot(5, 15, 3, [2, 1, 0], "1"))
    assert c == SpecCounters(15, 45, 15, (9, 5, 1))


def test_step_delta_and_derived_metrics():
    before = SpecCounters.from_vllm_metrics(snapshot(10, 30, 12, [7, 4, 1]))
    after = SpecCounters.from_vllm_metrics(snapshot(30, 90, 52, [17, 14, 9]))
    d = after - before
    assert d == SpecCounters(20, 60, 40, (10, 10, 8))
    m = d.as_dict()
    assert m["spec_acceptance_length"] == 1 + 40 / 20
    assert m["spec_acceptance_rate"] == 40 / 60
    assert [m[f"spec_acceptance_rate-pos-{i}"] for i in range(3)] == [0.5, 0.5, 0.4]


def test_no_drafts_gives_nan_not_a_crash():
    assert math.isnan(SpecCounters().acceptance_length)
    assert SpecCounters.from_vllm_metrics([]) == SpecCounters()
