"""Adaptation strategies: the default is the plain TTT loss exactly; losses, weights, selection and budget do
what their settings say; a recorded trajectory replays the same features."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from conftest import tiny_config, tiny_model

from draftadapt.adapter import AdapterConfig, DraftAdapter
from draftadapt.batch import DraftBatch
from draftadapt.cache import CacheConfig
from draftadapt.drafts.eagle3 import Eagle3Draft
from draftadapt.drafts.vocab import build_draft_vocab
from draftadapt.metrics import SpecCounters
from draftadapt.strategy import FIXED_BUDGET, StrategyConfig, StrategyDraftWorker, rejected_positions, strategy_loss, train_budget
from draftadapt.trainer import TrainerConfig
from draftadapt.ttt import ttt_loss

V, VD, H = 200, 120, 64


@pytest.fixture
def setup():
    torch.manual_seed(0)
    cfg = tiny_config("qwen3", layers=8, hidden=H, vocab=V)
    draft = Eagle3Draft.from_target(cfg, build_draft_vocab([torch.randint(0, V, (3000,))], V, VD))
    draft._init_weights(std=0.15)
    return draft, torch.nn.Embedding(V, H)


def make_batch(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    valid = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    ids = torch.randint(0, V, (len(lengths), t), generator=g) * valid
    teacher = torch.randn(len(lengths), t, VD, generator=g).mul(3).log_softmax(-1)
    loss_mask = valid & (torch.rand(len(lengths), t, generator=g) < 0.8)
    return DraftBatch(ids, torch.randn(len(lengths), t, 3 * H, generator=g), teacher, loss_mask, valid)


def test_default_strategy_loss_equals_the_ttt_loss(setup):
    draft, embed = setup
    b = make_batch([12, 9])
    ones = torch.ones(2, 12)  # forces the weighted path: with unit weights it must be the plain TTT loss
    ref, got = ttt_loss(draft, b, embed, 3, 0.8), strategy_loss(draft, b, embed, 3, 0.8, "kl", weight=ones)
    torch.testing.assert_close(got.loss, ref.loss)
    torch.testing.assert_close(strategy_loss(draft, b, embed, 3, 0.8, "kl").loss, ref.loss)
    torch.testing.assert_close(got.step_acc, ref.step_acc)
    assert not StrategyConfig().custom_loss


def test_tv_is_a_distance_in_0_1_and_zero_at_the_teacher(setup):
    draft, embed = setup
    b = make_batch([12, 9])
    tv = strategy_loss(draft, b, embed, 3, 1.0, "tv")
    assert ((tv.step_loss > 0) & (tv.step_loss <= 1)).all()
    torch.testing.assert_close(strategy_loss(draft, b, embed, 3, 1.0, "tv", weight=torch.ones(2, 12)).loss, tv.loss)
    both = strategy_loss(draft, b, embed, 3, 1.0, "kl+tv")
    kl = strategy_loss(draft, b, embed, 3, 1.0, "kl")
    torch.testing.assert_close(both.loss, kl.loss + tv.loss)


def test_top1_loss_scores_the_drafts_mass_on_the_teachers_argmax_only(setup):
    """Greedy drafting accepts with p(argmax q): the top1 loss sees where the teacher's argmax is, not the
    rest of its shape. Reshaping the teacher below its argmax leaves top1 unchanged and moves KL."""
    draft, embed = setup
    b = make_batch([12, 9])
    top = b.teacher_logprobs.argmax(-1, keepdim=True)
    flat = torch.full_like(b.teacher_logprobs, -20.0).scatter(-1, top, 0.0)  # the same argmax, all mass on it
    other = DraftBatch(b.input_ids, b.aux_hidden, flat, b.loss_mask, b.valid)
    t1, t1_flat = strategy_loss(draft, b, embed, 3, 0.8, "top1"), strategy_loss(draft, other, embed, 3, 0.8, "top1")
    torch.testing.assert_close(t1.loss, t1_flat.loss)
    torch.testing.assert_close(t1.step_loss, t1_flat.step_loss)
    kl, kl_flat = strategy_loss(draft, b, embed, 3, 0.8, "kl"), strategy_loss(draft, other, embed, 3, 0.8, "kl")
    assert not torch.allclose(kl.loss, kl_flat.loss)
    # against a one-hot teacher top1 is the KL itself (cross-entropy minus a zero entropy)
    torch.testing.assert_close(t1_flat.step_loss, kl_flat.step_loss, atol=1e-4, rtol=1e-4)


def test_weights_move_the_loss_toward_the_weighted_positions(setup):
    draft, embed = setup
    b = make_batch([12])
    only = torch.zeros(1, 12)
    only[0, 5] = 1.0  # all weight on teacher position 5: step 1 scores it from base 4
    got = strategy_loss(draft, b, embed, 1, 1.0, "kl", weight=only)
    single = DraftBatch(b.input_ids, b.aux_hidden, b.teacher_logprobs, b.loss_mask & (torch.arange(12) == 5), b.valid)
    if bool(single.loss_mask.any()) and bool(b.valid[0, 4]):
        torch.testing.assert_close(got.loss, ttt_loss(draft, single, embed, 1, 1.0).loss)


def test_rejected_positions_mark_where_the_step1_guess_misses(setup):
    draft, embed = setup
    b = make_batch([10])
    with torch.no_grad():
        from draftadapt.ttt import unroll

        guess = draft.target_ids()[unroll(draft, b, embed, 1)[0].argmax(-1)]  # [1, T]: token i+2 from base i
    # make base 3's guess right: teacher position 4 is then not rejected, position 5 (base 4) is unless lucky
    ids = b.input_ids.clone()
    ids[0, 5] = guess[0, 3]
    b2 = DraftBatch(ids, b.aux_hidden, b.teacher_logprobs, b.loss_mask, b.valid)
    with torch.no_grad():
        guess2 = draft.target_ids()[unroll(draft, b2, embed, 1)[0].argmax(-1)]
    rej = rejected_positions(draft, b2, embed)
    assert rej.shape == (1, 10) and not bool(rej[0, 0])
    assert not bool(rej[0, 4])
    assert bool(rej[0, 6]) == bool(guess2[0, 5] != ids[0, 7])


def test_acceptance_triggered_budget():
    s = StrategyConfig(boost_factor=3.0, boost_drop=0.1, hold_factor=1.0)
    assert train_budget(4, s, 2.0, 2.5) == 12
    assert train_budget(4, s, 2.45, 2.5) == 4
    assert train_budget(4, s, 2.6, 2.5) == 4
    assert train_budget(4, s, None, 2.5) == 4
    assert train_budget(4, FIXED_BUDGET, 1.0, 3.0) == 4 and train_budget(4, FIXED_BUDGET, 3.5, 3.0) == 4
    assert train_budget(4, StrategyConfig(), 1.0, 3.0) == 16 and train_budget(4, StrategyConfig(), 3.5, 3.0) == 1
    hold = StrategyConfig(boost_factor=3.0, boost_drop=0.1, hold_factor=0.25)
    assert train_budget(4, hold, 2.5, 2.5) == 1, "acceptance held: the budget shrinks"
    assert train_budget(4, hold, 2.9, 2.5) == 1, "acceptance rose: the budget shrinks"
    assert train_budget(4, hold, 2.45, 2.5) == 4, "a fall within boost_drop: the fixed budget"
    assert train_budget(4, hold, 2.0, 2.5) == 12
    assert train_budget(4, hold, None, 2.5) == 4, "no acceptance known yet: the fixed budget"
    assert train_budget(1, hold, 2.6, 2.5) == 1 and train_budget(2, hold, 2.6, 2.5) == 1, "a shrunk budget keeps a step"
    assert train_budget(4, StrategyConfig(hold_factor=0.0), 2.6, 2.5) == 0, "hold_factor=0: no step while it holds"
    assert train_budget(4, hold, 2.9, 2.5, acc_gain=0.1) == 4, "a draft still learning keeps its budget"
    assert train_budget(4, hold, 2.9, 2.5, acc_gain=None) == 4, "no training gain known yet: no shrinking"
    assert train_budget(4, hold, 2.9, 2.5, acc_gain=-0.05) == 1


@pytest.mark.parametrize("field,value", [("loss", "l2"), ("rejected_weight", 0.0), ("boost_factor", 0.5),
                                         ("hold_factor", 1.5), ("hold_factor", -0.1), ("hold_max_gain", -0.01)])
def test_bad_strategy_names_the_field(field, value):
    with pytest.raises(ValueError, match=field if field == "loss" else "StrategyConfig"):
        StrategyConfig(**{field: value})


def _adapter(policy, strategy, **cfg):
    torch.manual_seed(1)
    draft = Eagle3Draft.from_target(policy.config, target_head=policy.lm_head.weight)
    config = AdapterConfig(**{"train_steps": 2, "batch_tokens": 64, "min_tokens": 1, "acceptance_drop": None, **cfg})
    return DraftAdapter(draft, policy.get_input_embeddings(), config, TrainerConfig(lr=3e-3),
                        CacheConfig(max_tokens=4096), strategy=strategy)


def _capture(adapter, policy, version, b=4, t=16):
    ids = torch.randint(0, 1147, (b, t), generator=torch.Generator().manual_seed(version))
    with adapter.capture(policy) as cap, torch.no_grad():
        policy(input_ids=ids)
    return cap.rollout_batch(ids, completion_mask=torch.arange(t)[None].expand(b, t) >= 4, policy_version=version)


def test_adapter_selects_by_advantage_and_boosts_on_a_drop():
    policy = tiny_model("llama", layers=8, hidden=64)
    ad = _adapter(policy, StrategyConfig(min_advantage=0.0, boost_factor=2.0, boost_drop=0.1, loss="tv"))
    assert isinstance(ad.worker, StrategyDraftWorker)
    assert ad.on_rollouts(_capture(ad, policy, 0), advantages=torch.tensor([1.0, -1.0, 0.0, -0.5])) == 2
    assert ad.on_step_end(1, counters=SpecCounters(100, 300, 150, (60, 50, 40))).train.steps == 2  # sets the EMA
    ad.on_rollouts(_capture(ad, policy, 1), advantages=torch.ones(4))
    assert ad.on_step_end(2, counters=SpecCounters(100, 300, 50, (30, 15, 5))).train.steps == 4  # AL 2.5 -> 1.5


def test_adapter_trains_nothing_while_acceptance_holds_with_hold_factor_zero():
    policy = tiny_model("llama", layers=8, hidden=64)
    ad = _adapter(policy, StrategyConfig(hold_factor=0.0, boost_factor=2.0, boost_drop=0.1))
    ad.on_rollouts(_capture(ad, policy, 0))
    first = ad.on_step_end(1, counters=SpecCounters(100, 300, 150, (60, 50, 40)))
    assert first.train.steps == 2  # no reference yet
    # the guard is what the training bought within itself: step 2's step-1 accuracy minus step 1's
    assert ad.last_acc_gain == first.train.acc_gain and math.isfinite(first.train.acc_gain)
    ad.last_acc_gain = 0.1  # the draft was still learning (its own steps raised its accuracy by 0.1)
    ad.on_rollouts(_capture(ad, policy, 1))
    learning = ad.on_step_end(2, counters=SpecCounters(100, 300, 150, (60, 50, 40)))  # held
    assert learning.train.steps == 2, "a draft still learning keeps its budget"
    ad.last_acc_gain = 0.0  # the draft stopped learning
    ad.on_rollouts(_capture(ad, policy, 2))
    held = ad.on_step_end(3, counters=SpecCounters(100, 300, 160, (62, 55, 43)))  # AL 2.5 -> 2.6: rose
    assert held.train is None and "hold_factor" in held.train_skipped_reason
    assert ad.last_acc_gain == 0.0, "no training ran: the guard keeps the last gain"
    ad.on_rollouts(_capture(ad, policy, 3))
    assert ad.on_step_end(4, counters=SpecCounters(100, 300, 50, (30, 15, 5))).train.steps == 4  # fell: boost


def test_a_one_step_hold_keeps_the_gain_of_the_last_training_that_could_measure_one():
    policy = tiny_model("llama", layers=8, hidden=64)
    ad = _adapter(policy, StrategyConfig(hold_factor=0.25, boost_factor=2.0, boost_drop=0.1))  # hold: 1 of 2 steps
    ad.on_rollouts(_capture(ad, policy, 0))
    ad.on_step_end(1, counters=SpecCounters(100, 300, 150, (60, 50, 40)))
    ad.last_acc_gain = -0.01
    ad.on_rollouts(_capture(ad, policy, 1))
    held = ad.on_step_end(2, counters=SpecCounters(100, 300, 160, (62, 55, 43)))
    assert held.train.steps == 1 and math.isnan(held.train.acc_gain)
    assert ad.last_acc_gain == -0.01  # one step tells nothing: the hold goes on until acceptance falls


def test_a_recorded_trajectory_replays_the_same_features(tmp_path):
    from draftadapt.replay import StepRollouts, Trajectory, TrajectoryRecorder, features

    policy = tiny_model("llama", layers=8, hidden=64)
    ad = _adapter(policy, StrategyConfig())
    ids = torch.randint(0, 1147, (3, 12), generator=torch.Generator().manual_seed(0))
    am = torch.ones(3, 12, dtype=torch.long)
    am[2, 9:] = 0
    ro = StepRollouts(ids, am, (torch.arange(12)[None] >= 3).expand(3, 12) & am.bool(), torch.tensor([1.0, 0, 1]),
                      torch.tensor([0.5, -1.0, 0.5]))
    rec = TrajectoryRecorder(tmp_path / "t", meta={"reward": "x"})
    rec.record(0, policy, ro, {"accuracy": 0.5})
    rec.finish(1, policy)
    traj = Trajectory(tmp_path / "t")
    assert list(traj.versions) == [0] and traj.step_info(0)["accuracy"] == 0.5
    again = tiny_model("llama", layers=8, hidden=64, seed=5)
    again.load_state_dict(traj.policy_state(0))
    live = next(features(policy, ad, ro, 0))
    replayed = next(features(again, ad, traj.rollouts(0), 0))
    torch.testing.assert_close(replayed.aux_hidden, live.aux_hidden)
    torch.testing.assert_close(replayed.teacher_logprobs, live.teacher_logprobs)
    assert next(features(again, ad, traj.rollouts(0), 0, min_advantage=0.0)).cu_seqlens.numel() - 1 == 2
    with pytest.raises(ValueError, match="TrajectoryRecorder"):
        Trajectory(tmp_path / "missing")


def test_until_boundary_worker_trains_until_the_next_boundary():
    import time

    from draftadapt.strategy import UntilBoundaryDraftWorker

    policy = tiny_model("llama", layers=8, hidden=64)
    base = _adapter(policy, StrategyConfig())
    worker = UntilBoundaryDraftWorker(base.worker, max_steps=500)
    ad = DraftAdapter.with_worker(worker, base.config)
    ad.on_rollouts(_capture(ad, policy, 0))
    assert ad.on_step_end(1).train is None  # the first run has not finished
    time.sleep(1.0)  # a "long step": the run keeps training past its 2 steps
    ad.on_rollouts(_capture(ad, policy, 1))
    first = ad.on_step_end(2).train
    assert first is not None and first.steps > 2, first
    worker.close()  # stops the second run at once instead of waiting for max_steps
    assert worker._last.steps >= 2


def test_a_train_results_gain_is_its_later_half_minus_its_earlier_half():
    from draftadapt.trainer import TrainStats
    from draftadapt.workers import TrainResult

    def stats(acc1):
        return TrainStats(step=1, loss=1.0, step_loss=(1.0, 1.0), step_acc=(acc1, 0.1), tokens=10, grad_norm=1.0, lr=1e-3)

    four = TrainResult.of([stats(a) for a in (0.50, 0.60, 0.70, 0.90)], 1.0)
    assert four.acc_gain == pytest.approx((0.70 + 0.90) / 2 - (0.50 + 0.60) / 2)
    assert four.step_acc == pytest.approx((0.675, 0.1)) and four.tokens == 40
    assert TrainResult.of([stats(a) for a in (0.5, 0.6, 0.8)], 1.0).acc_gain == pytest.approx(0.3)  # middle left out
    assert math.isnan(TrainResult.of([stats(0.5)], 1.0).acc_gain) and math.isnan(TrainResult.of([], 1.0).acc_gain)


def test_the_hold_follows_what_training_buys_not_a_policy_that_grows_easier():
    """The budget's guard, as the replay lab's sharpening drift (c) met it: the draft's training accuracy rises from
    one training to the next because the policy's samples grow easier, while its own steps buy nothing - the budget
    shrinks; a draft whose own steps raise its accuracy (a weak start) keeps its budget at the same acceptance."""
    from draftadapt.workers import TrainResult

    class Scripted:  # a worker whose trainings report a scripted accuracy: 0.80, 0.85, 0.90, ... (+0.05 per training)
        def __init__(self, inner, within):
            self.inner, self.within, self.asked = inner, within, []

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def train(self, num_steps):
            self.asked.append(num_steps)
            acc = 0.80 + 0.05 * (len(self.asked) - 1)
            return TrainResult(num_steps, 1.0, (acc, acc / 2), 64 * num_steps, 1.0, 0.01,
                               self.within if num_steps >= 2 else math.nan)

    policy = tiny_model("llama", layers=8, hidden=64)
    for within, expected in [(0.0, [4, 1, 1, 1, 1]), (0.1, [4, 4, 4, 4, 4])]:
        base = _adapter(policy, StrategyConfig())
        worker = Scripted(base.worker, within)
        ad = DraftAdapter.with_worker(worker, replace(base.config, train_steps=4), strategy=StrategyConfig())
        for v in range(5):  # acceptance rises every step (2.5 -> 2.9): it holds against the EMA
            ad.on_rollouts(_capture(ad, policy, v))
            ad.on_step_end(v + 1, counters=SpecCounters(100, 300, 150 + 10 * v, (60, 50, 40 + 10 * v)))
        assert worker.asked == expected, (within, worker.asked)
