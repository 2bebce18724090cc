"""The speed-up model and the k chooser (pure arithmetic: no engine, no model)."""
import pytest

from draftadapt.speed import (Acceptance, Costs, LinearCost, Measured, calibrate, choose_schedule, published_checks,
                              rollout_speedup, schedule_k, step_bound, step_speedup, trajectory_from_lengths)


def test_acceptance_length_is_one_plus_sum_of_chain_rates():
    acc = Acceptance((0.8, 0.6, 0.45))
    assert acc.length(3) == pytest.approx(1 + 0.8 + 0.6 + 0.45)
    assert acc.conditional() == pytest.approx([0.8, 0.75, 0.75])
    # past the measured positions the last conditional rate repeats
    assert acc.extended(5)[3:] == pytest.approx([0.45 * 0.75, 0.45 * 0.75 ** 2])
    assert acc.length(0) == 1.0


def test_acceptance_from_length_inverts_the_geometric_chain():
    acc = Acceptance.from_length(3.32, 3)
    assert acc.length(3) == pytest.approx(3.32, abs=1e-6)
    with pytest.raises(ValueError, match="non-increasing"):
        Acceptance((0.5, 0.7))


def test_memory_bound_pays_compute_bound_does_not():
    # fixed weight read dominates at b=1; per-token compute dominates at b=32
    costs = Costs(verify=LinearCost(1.0, 0.08), draft=LinearCost(0.02, 0.002))
    acc = Acceptance((0.7, 0.5, 0.35))
    assert costs.speedup(acc, 1, 3) > 1.5
    assert costs.speedup(acc, 32, 3) < 1.0
    sched = choose_schedule(costs, acc, max_k=7, max_batch=32)
    assert sched[0][0] == 1 and sched[-1][1] == 32 and sched[-1][2] == 0  # off at large batch
    assert sched[0][2] >= 2  # speculation on in the tail
    assert all(a[1] + 1 == b[0] for a, b in zip(sched, sched[1:]))  # contiguous ranges
    k_of = schedule_k(sched)
    assert k_of(1) == sched[0][2] and k_of(32) == 0 and k_of(99) == 0


def test_chosen_schedule_beats_every_fixed_k_on_a_tapering_rollout():
    costs = Costs(verify=LinearCost(1.0, 0.08), draft=LinearCost(0.02, 0.002))
    acc = Acceptance((0.7, 0.5, 0.35))
    traj = trajectory_from_lengths([10 * i for i in range(1, 33)])
    chosen = rollout_speedup(costs, acc, traj, schedule_k(choose_schedule(costs, acc, 7, 32, min_gain=0.0)))
    for k in range(0, 8):
        assert chosen >= rollout_speedup(costs, acc, traj, k) - 1e-9


def test_trajectory_counts_alive_sequences_with_a_slot_cap():
    assert trajectory_from_lengths([3, 1, 2]) == [3, 2, 1]
    # 2 slots: the third request starts when the 1-token one frees its slot
    assert trajectory_from_lengths([3, 1, 2], max_num_seqs=2) == [2, 2, 2]
    assert sum(trajectory_from_lengths([5, 7, 2], 2)) == 14  # every token costs one slot-step


def test_step_speedup_sync_and_async():
    assert step_bound(3.32, 0.661) == pytest.approx(1.86, abs=0.01)
    s = step_speedup(2.0, 0.5)
    assert s.sync == pytest.approx(1 / (0.25 + 0.5))
    assert s.async_vs_sync == pytest.approx(2.0)  # training (0.5) becomes the bottleneck
    assert s.async_vs_async == pytest.approx(1.0)  # async without spec was already bound by 0.5


def test_calibrate_recovers_costs_and_predicts_unseen_k():
    truth = Costs(verify=LinearCost(0.01, 0.001), draft=LinearCost(0.002, 0.0001), overhead=LinearCost(0.001, 0.0002))
    meas = lambda b, k: Measured(b, k, truth.plain(b), truth.round(b, k))
    fit = calibrate([meas(b, k) for b in (1, 4, 16, 32) for k in (1, 3)])
    assert fit.round(8, 7) == pytest.approx(truth.round(8, 7), rel=1e-6)


def test_published_figures_within_stated_errors():
    checks = {c.quantity: c for c in published_checks()}
    for name in ("rl_zero", "rl_think"):
        assert abs(checks[f"{name} gen k=3"].error) < 1e-6  # fitted
        assert abs(checks[f"{name} step bound"].error) < 0.01
        assert abs(checks[f"{name} step k=3"].error) < 0.015
    assert abs(checks["rl_zero gen k=5 flat AL"].error) < 0.10
    assert abs(checks["235B sync step"].error) < 0.02


def test_acceptance_from_counts_uses_only_positions_every_draft_had():
    from draftadapt.speed import acceptance_from_counts

    acc = acceptance_from_counts([80, 60, 10], drafts=100, k_min=2)  # position 2 ran in few drafts only
    assert acc.rates == pytest.approx((0.8, 0.6))
    assert acc.extended(3)[2] == pytest.approx(0.6 * 0.75)
    assert acceptance_from_counts([], drafts=0, k_min=3) is None
