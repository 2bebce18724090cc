"""Where speculation pays: a speed-up model for speculative decoding in RL rollouts (`model`: acceptance,
costs, rollout and step speed-up), its calibration from measured timings (`fit`), a k chooser (`choose`),
the published figures it reproduces (`published`) and a CLI (`python -m draftadapt.speed`). See model.py's
docstring for the model itself."""
from .choose import acceptance_from_counts, choose_schedule, merge_acceptance, schedule_k
from .fit import Measured, calibrate, calibrate_table, fit_linear
from .model import (Acceptance, Cost, Costs, LinearCost, Schedule, StepSpeedup, TableCost, costs_from_dict, costs_to_dict,
                    rollout_speedup, rollout_time, step_bound, step_speedup, trajectory_from_lengths)
from .published import PUBLISHED, Check, published_checks

__all__ = ["Acceptance", "Check", "Cost", "Costs", "LinearCost", "Measured", "PUBLISHED", "Schedule", "StepSpeedup",
           "TableCost", "acceptance_from_counts", "calibrate", "calibrate_table", "choose_schedule", "costs_from_dict",
           "costs_to_dict", "fit_linear", "merge_acceptance", "published_checks", "rollout_speedup", "rollout_time",
           "schedule_k", "step_bound", "step_speedup", "trajectory_from_lengths"]
