"""One trainer step for every draft kind and strategy loss (trainer.DraftTrainer, the loss handed in): a NaN
batch skips the update - weights unchanged to the bit, the stats say skipped - for EAGLE-3, MTP, the draft LM,
each strategy loss and the data-parallel trainer (its multi-rank case: test_distributed.py)."""
from __future__ import annotations

import dataclasses
import math
import tempfile

import pytest
import torch
import torch.distributed as dist
from conftest import tiny_model

from draftadapt.capture import FeatureCapture
from draftadapt.distill import TeacherCapture
from draftadapt.drafts.draft_lm import DraftLM
from draftadapt.drafts.eagle3 import Eagle3Draft
from draftadapt.drafts.mtp import MTPDraft
from draftadapt.strategy import StrategyConfig, StrategyLoss
from draftadapt.trainer import DraftTrainer, TrainerConfig

CFG = TrainerConfig(lr=1e-2, device="cpu")


@pytest.fixture(scope="module")
def policy():
    return tiny_model("llama", layers=8, hidden=64, vocab=300)


def _batch(policy, draft, cap):
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(3))
    cm = torch.zeros(2, 20, dtype=torch.bool)
    cm[:, 6:] = True
    with cap as c, torch.no_grad():
        policy(input_ids=ids)
    return c.rollout_batch(ids, completion_mask=cm, policy_version=0).to_draft_batch(draft.target_ids().cpu())


def _poisoned(batch):
    """Every float feature and teacher tensor NaN."""
    nan = {f: torch.full_like(getattr(batch, f), math.nan) for f in ("aux_hidden", "final_hidden", "teacher_logprobs")
           if getattr(batch, f) is not None}
    return dataclasses.replace(batch, **nan)


def _weights(draft):
    return {k: v.detach().clone() for k, v in draft.state_dict().items()}


def _check_skips(trainer, batch):
    """A clean step moves the weights (the check can fail); the NaN step leaves them as they were."""
    first = trainer.step(batch)
    assert not first.skipped and math.isfinite(first.grad_norm) and trainer.steps_done == 1
    before = _weights(trainer.draft)
    with pytest.warns(UserWarning, match="non-finite loss"):
        stats = trainer.step(_poisoned(batch))
    assert stats.skipped and math.isnan(stats.grad_norm) and math.isnan(stats.loss)
    assert trainer.steps_done == 1 and trainer.skipped_nonfinite == 1
    after = _weights(trainer.draft)
    assert all(torch.equal(before[k], after[k]) for k in before), "a skipped update must not move any weight"
    assert not trainer.step(batch).skipped and trainer.steps_done == 2, "training resumes after a skipped batch"
    moved = _weights(trainer.draft)
    assert any(not torch.equal(after[k], moved[k]) for k in after), "the clean step after it updates"


def _kind(policy, name):
    torch.manual_seed(1)
    if name == "eagle3":
        draft = Eagle3Draft.from_target(policy.config)
        return draft, FeatureCapture(policy, aux_layer_ids=draft.config.aux_layer_ids)
    if name == "mtp":
        draft = MTPDraft.from_target(policy.config, policy.lm_head)
        return draft, FeatureCapture(policy, aux_layer_ids=(), capture_final_hidden=True, final_prenorm=True)
    return DraftLM.from_policy(policy, num_layers=1), TeacherCapture(policy)


@pytest.mark.parametrize("kind", ["eagle3", "mtp", "draft_lm"])
def test_a_nan_batch_is_skipped_for_every_draft_kind(policy, kind):
    draft, cap = _kind(policy, kind)
    _check_skips(DraftTrainer(draft, policy.get_input_embeddings(), CFG), _batch(policy, draft, cap))


@pytest.mark.parametrize("loss,rejected_weight", [("kl", 1.0), ("tv", 1.0), ("kl+tv", 1.0), ("top1", 1.0),
                                                   ("kl", 3.0)])
def test_a_nan_batch_is_skipped_for_every_strategy_loss(policy, loss, rejected_weight):
    draft, cap = _kind(policy, "eagle3")
    strategy = StrategyLoss.of(CFG, StrategyConfig(loss=loss, rejected_weight=rejected_weight))
    _check_skips(DraftTrainer(draft, policy.get_input_embeddings(), CFG, strategy), _batch(policy, draft, cap))


def test_a_nan_batch_is_skipped_by_the_data_parallel_trainer(policy):
    from draftadapt.distributed import data_parallel_trainer

    draft, cap = _kind(policy, "eagle3")
    batch = _batch(policy, draft, cap)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            _check_skips(data_parallel_trainer(draft, policy.get_input_embeddings(), CFG), batch)
        finally:
            dist.destroy_process_group()


def test_a_step_without_a_batch_needs_a_collective(policy):
    draft, _ = _kind(policy, "eagle3")
    with pytest.raises(ValueError, match="only a data-parallel trainer"):
        DraftTrainer(draft, policy.get_input_embeddings(), CFG).step(None)
