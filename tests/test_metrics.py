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


def test_sequence_rounds_give_rejected_offsets_and_their_share_of_the_counters():
    from types import SimpleNamespace

    from draftadapt.metrics import SequenceSpec

    # k=3: token 0 from the prefill; round 1 accepts 3 (tokens 1-4), round 2 accepts 1 and rejects at
    # token 6, round 3 accepts 0 and rejects at token 7, round 4 accepts 2 then the stop at token 9 ends it
    seq = SequenceSpec(accepted=(3, 1, 0, 2), drafted=(3, 3, 3, 3))
    assert seq.rejected_offsets(10) == [6, 7]
    assert seq.rejected_offsets(11) == [6, 7, 10]  # the 4th round's rejection lands on token 10 when it exists
    assert seq.rejected_offsets(12) is None  # more tokens than the rounds emit: a round went unreported
    assert seq.rejected_offsets(8) is None  # the last round would have started past the end
    c = seq.counters
    assert (c.drafts, c.draft_tokens, c.accepted, c.accepted_per_pos) == (4, 12, 6, (3, 2, 1))
    assert c.acceptance_length == 2.5
    detailed = SimpleNamespace(histogram=[1, 1, 1, 1], per_step_accepted=[3, 1, 0, 2], per_step_drafted=[3] * 4)
    assert SequenceSpec.from_vllm(detailed) == seq
    summary = SimpleNamespace(histogram=[1, 1, 1, 1], per_step_accepted=[], per_step_drafted=[])
    assert SequenceSpec.from_vllm(summary) is None and SequenceSpec.from_vllm(None) is None
