"""Where speculation pays: a speed-up model for speculative decoding in RL rollouts, and a k chooser.

Inputs are plain numbers - per-position acceptance, the draft's and verifier's cost as functions
of batch size, a rollout's batch-size trajectory (sequences alive per decode step) and the step's
time split R_gen - and the output is rollout and step speed-up for sync and async RL, or a
`[(lo, hi, k), ...]` schedule of draft lengths by batch size. It knows nothing of vLLM: the engine
module turns a schedule into engine settings; benchmarks measure the inputs.

The model (chain drafting, expected values):
- E(k) = 1 + sum_{i<k} p_i, p_i = P(drafts 0..i all accepted) (vLLM's acceptance_rate-pos-i).
- one plain decode step at batch b costs verify(b); a spec round at k costs
  k * draft(b) + verify(b * (k + 1)) + overhead(b): a verify of b sequences x n query tokens costs
  what a forward over b*n tokens costs. Two forms of a cost: `LinearCost` (fixed + per_token *
  tokens; fixed is the weight read that makes batch 1 memory-bound, per_token the compute that
  makes large batches pay for every drafted token) and `TableCost` (measured points, piecewise
  linear between them). A forward's time is NOT linear in its tokens on real hardware (GEMM
  efficiency steps with the token count), so `calibrate_table` takes verify(T) from plain decode
  steps measured at batch T itself - up to the largest b * (k + 1) the chooser may use - and fits
  only the draft's part, linear in k per batch size.
- a rollout is a list of alive-batch sizes per plain decode step; under speculation each such
  step's worth of tokens costs round(b, k(b)) / E(k(b)).
Time and memory: O(len(trajectory) * k) arithmetic; nothing model-sized.
"""
from .choose import acceptance_from_counts, choose_schedule, merge_acceptance, schedule_k
from .fit import Measured, calibrate, calibrate_table, fit_linear
from .model import (Acceptance, Cost, Costs, LinearCost, Schedule, StepSpeedup, TableCost, costs_from_dict, costs_to_dict,
                    rollout_speedup, rollout_time, step_bound, step_speedup, trajectory_from_lengths)
from .published import PUBLISHED, Check, published_checks

__all__ = ["Acceptance", "Check", "Cost", "Costs", "LinearCost", "Measured", "PUBLISHED", "Schedule", "StepSpeedup",
           "TableCost", "acceptance_from_counts", "calibrate", "calibrate_table", "choose_schedule", "costs_from_dict",
           "costs_to_dict", "fit_linear", "merge_acceptance", "published_checks", "rollout_speedup", "rollout_time",
           "schedule_k", "step_bound", "step_speedup", "trajectory_from_lengths"]
