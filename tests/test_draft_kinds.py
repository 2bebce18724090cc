"""The draft-kind registry (drafts/kinds.py): every kind is looked up once by class or vLLM method, an
unregistered class fails naming the fix, and a fourth kind trains and pushes through the generic path."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from torch import nn

from draftadapt.adapter import AdapterConfig, DraftAdapter
from draftadapt.batch import teacher_dense
from draftadapt.drafts import kinds
from draftadapt.drafts.draft_lm import DraftLM
from draftadapt.drafts.eagle3 import Eagle3Draft
from draftadapt.drafts.mtp import MTPDraft
from draftadapt.trainer import DraftTrainer, TrainerConfig
from draftadapt.ttt import TTTResult


class Eagle3Subclass(Eagle3Draft):
    pass


def test_each_kind_is_found_by_class_and_by_vllm_method():
    for cls, method in ((Eagle3Draft, "eagle3"), (MTPDraft, "mtp"), (DraftLM, "draft_model")):
        kind = kinds.kind_of(cls)
        assert kind.draft_class is cls and kind.vllm_method == method
        assert kinds.kind_for_method(method) is kind
    assert kinds.kind_of(Eagle3Subclass) is kinds.EAGLE3, "a subclass is its base's kind (MRO lookup)"
    assert [k.features for k in (kinds.EAGLE3, kinds.MTP, kinds.DRAFT_LM)] == ["aux_hidden", "final_hidden", None]
    assert [k.vocab_refresh for k in (kinds.EAGLE3, kinds.MTP, kinds.DRAFT_LM)] == [True, False, False]


def test_an_unregistered_draft_fails_naming_how_to_register_one():
    with pytest.raises(ValueError, match=r"Linear is not a registered draft kind.*kinds\.register.*new_draft_kind"):
        kinds.kind_of(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no draft kind is served by vLLM method 'medusa'"):
        kinds.kind_for_method("medusa")
    with pytest.raises(ValueError, match="is not a registered draft kind"):
        _ = DraftTrainer(nn.Linear(2, 2), None, TrainerConfig(device="cpu")).loss  # the default loss is the kind's


def test_a_method_or_class_cannot_be_registered_twice():
    with pytest.raises(ValueError, match="vLLM method 'eagle3' is already registered as the EAGLE-3 kind"):
        kinds.register(kinds.DraftKind("other", FakeDraft, "eagle3", None, loss=FakeLoss.from_config,
                                       push_state=fake_push_state))


# a minimal fourth kind: a bigram draft reading token ids only, distilled from the teacher ----------
class FakeConfig:
    def __init__(self, vocab_size: int, hidden_size: int):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.aux_layer_ids, self.full_vocab, self.final_hidden = (), True, None
        self.draft_vocab_size, self.target_hidden_size = vocab_size, hidden_size


class FakeDraft(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.config = FakeConfig(vocab_size, hidden_size)
        self.bigram = nn.Embedding(vocab_size, vocab_size)

    def target_ids(self) -> torch.Tensor:
        return torch.arange(self.config.vocab_size)


class FakeLoss:
    @classmethod
    def from_config(cls, config):
        return cls()

    def __call__(self, draft, batch, embed, normalizer=None):
        rows, cols = (batch.loss_mask & batch.valid).nonzero(as_tuple=True)
        t = teacher_dense(batch, rows, cols)  # [n, V] log-probs
        q = draft.bigram(batch.input_ids[rows, cols]).log_softmax(-1)
        loss = (t.exp() * (t - q)).sum(-1).mean()
        acc = (q.argmax(-1) == t.argmax(-1)).float().mean()
        return TTTResult(loss, loss.detach().reshape(1), acc.reshape(1), torch.tensor([rows.numel()]))


def fake_push_state(draft):
    return {"bigram.weight": draft.bigram.weight.detach()}


class Sink:
    def __init__(self):
        self.states = []

    def push_draft(self, state, version):
        self.states.append({k: v.clone() for k, v in state.items()})
        return type("Result", (), {"pushed": True, "skipped_reason": None})()

    def spec_counters(self):
        from draftadapt.metrics import SpecCounters

        return SpecCounters(0, 0, 0, (0, 0, 0))


def test_a_fourth_kind_trains_and_pushes_through_the_generic_path():
    policy = tiny_model("llama", layers=8, hidden=64, vocab=300)
    kind = kinds.register(kinds.DraftKind("bigram", FakeDraft, "fake_bigram", None, loss=FakeLoss.from_config,
                                          push_state=fake_push_state))
    try:
        torch.manual_seed(0)
        draft = FakeDraft(300, 64)
        before = draft.bigram.weight.detach().clone()
        sink = Sink()
        adapter = DraftAdapter(draft, policy.get_input_embeddings(), AdapterConfig(train_steps=2, min_tokens=0,
                               batch_tokens=64), TrainerConfig(lr=1e-2), sink=sink)
        assert kinds.kind_for_method("fake_bigram") is kind and adapter.worker.kind is kind
        ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
        cm = torch.zeros(2, 24, dtype=torch.bool)
        cm[:, 8:] = True
        with adapter.capture(policy) as cap, torch.no_grad():  # a token-ids kind: the teacher-only capture
            policy(input_ids=ids)
        assert adapter.on_rollouts(cap.rollout_batch(ids, completion_mask=cm, policy_version=0)) > 0
        stats = adapter.on_step_end(0)
        assert stats.train is not None and stats.train.steps == 2 and stats.pushed
        assert list(sink.states[0]) == ["bigram.weight"], "the push carries the kind's push state"
        assert not torch.equal(sink.states[0]["bigram.weight"], before), "training moved the fake draft's weights"
        with pytest.raises(ValueError, match="bigram draft has no checkpoint format"):
            adapter.export("unused")
    finally:
        kinds.unregister(kind)
    with pytest.raises(ValueError, match="not a registered draft kind"):
        kinds.kind_of(FakeDraft)
