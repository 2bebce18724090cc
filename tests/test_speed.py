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


def test_table_cost_interpolates_and_extends_its_end_segments():
    from draftadapt.speed import TableCost, costs_from_dict, costs_to_dict

    t = TableCost((1.0, 4.0, 8.0), (1.0, 1.3, 3.3))
    assert t(1) == pytest.approx(1.0) and t(2.5) == pytest.approx(1.15) and t(6) == pytest.approx(2.3)
    assert t(12) == pytest.approx(5.3)  # the last segment's slope (0.5 per unit) carries on
    assert t(0) == pytest.approx(0.9)
    c = Costs(verify=t, draft=LinearCost(0.1, 0.01))
    assert costs_from_dict(costs_to_dict(c)) == c
    with pytest.raises(ValueError, match="strictly increasing"):
        TableCost((2.0, 1.0), (1.0, 1.0))
    with pytest.raises(ValueError, match="xs.*ys"):
        costs_from_dict({"verify": {"a": 1}})


def test_calibrate_table_follows_a_verify_cost_that_is_not_linear_in_tokens():
    """A forward whose cost jumps past 64 tokens (a GEMM tile boundary): the linear model cannot follow it,
    the table model - verify(T) from plain steps at batch T - predicts unseen k exactly."""
    from draftadapt.speed import calibrate_table

    verify = lambda t: 0.01 + 0.0001 * t + (0.004 if t > 64 else 0.0)  # noqa: E731
    draft = lambda b: 0.002 + 0.00005 * b  # noqa: E731
    round_s = lambda b, k: verify(b * (k + 1)) + k * draft(b) + 0.0005  # noqa: E731
    plain = {b: verify(b) for b in (1, 2, 4, 8, 16, 32, 64, 65, 128, 256)}
    fit = [Measured(b, k, verify(b), round_s(b, k)) for b in (1, 4, 16, 32) for k in (1, 3)]
    table, linear = calibrate_table(plain, fit), calibrate(fit)
    for b, k in ((16, 5), (32, 7), (4, 2)):
        assert table.round(b, k) == pytest.approx(round_s(b, k), rel=1e-6)
    assert max(abs(linear.round(b, k) / round_s(b, k) - 1) for b, k in ((16, 5), (32, 7))) > 0.05
    with pytest.raises(ValueError, match=">= 2 ks"):
        calibrate_table(plain, [Measured(1, 3, 0.01, 0.02)])


def test_chooser_never_drafts_past_the_measured_positions_and_merges_old_ones():
    from draftadapt.speed import merge_acceptance

    costs = Costs(verify=LinearCost(1.0, 0.0), draft=LinearCost(0.001, 0.0))  # drafting nearly free: more k pays
    acc = Acceptance((0.9, 0.85, 0.8))
    assert max(k for _, _, k in choose_schedule(costs, acc, 7, 8)) == 3
    assert max(k for _, _, k in choose_schedule(costs, acc, 7, 8, extrapolate=True)) == 7
    merged = merge_acceptance(Acceptance((0.5,)), acc)  # a step that measured position 0 only
    assert merged.rates == pytest.approx((0.5, 0.5 * 0.85 / 0.9, 0.5 * 0.8 / 0.9))
    assert merge_acceptance(None, acc) is acc and merge_acceptance(acc, None) is acc
