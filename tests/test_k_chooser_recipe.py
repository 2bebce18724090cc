"""[L] the GRPO recipe with rollout.k_costs: k chosen per batch size between steps, logged per step."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "grpo_toy.py"


def test_recipe_chooses_k_per_batch_size_each_step_and_logs_it(toy_policy_dir, toy_draft_dir, tmp_path):
    # costs where a drafted token is cheap at batch 1 and prohibitive at batch 64
    costs = {"verify": {"fixed": 1.0, "per_token": 0.08}, "draft": {"fixed": 0.0, "per_token": 0.05},
             "overhead": {"fixed": 0.0, "per_token": 0.0}}
    (tmp_path / "costs.json").write_text(json.dumps(costs))
    args = ["run.steps=2", "run.checkpoint_every=0", "run.adapt=false", "rollout.prompts_per_step=8",
            "rollout.group_size=4", "run.eval_prompts=8", "rollout.num_speculative_tokens=5",
            f"rollout.k_costs={tmp_path / 'costs.json'}", f"run.out_dir={tmp_path / 'run'}"]
    p = subprocess.run([sys.executable, str(RECIPE), *args], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for r in rows:
        sched = json.loads(r["spec/k_schedule"])
        assert sched[0][0] == 1 and sched[-1][1] == 64, sched
        assert sched[0][2] >= 1, f"speculation must stay on at batch 1: {sched}"
        assert sched[-1][2] == 0, f"speculation must be off at batch 64: {sched}"
    # step 2 ran under the chosen schedule: large batches drafted nothing, so fewer drafts per token
    assert rows[1]["spec_num_drafts"] < rows[0]["spec_num_drafts"]
