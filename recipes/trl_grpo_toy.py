"""TRL's GRPOTrainer on the toy task, its rollouts drafted by an EAGLE-3 draft that draftadapt adapts online.

    python recipes/trl_grpo_toy.py [--steps 10] [--no-adapt] [--k 3] [--hf-generate] [--out-dir runs/trl_grpo_toy]

Reads top to bottom: 1) the toy policy, its first draft and the prompts, 2) the GRPOTrainer with
vLLM colocate, its engine started with the draft (`trl_engine_options`), 3) `attach`: capture around
TRL's loss forward, draft training and a verified push after every optimizer step, 4) train,
5) a per-step table: reward, acceptance length of the step's rollouts, draft loss, push time.
`--no-adapt` keeps the initial draft frozen (the baseline arm); `--hf-generate` generates with
transformers instead of vLLM (no spec decode: the draft still trains, nothing is pushed).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from draftadapt.adapter import AdapterConfig, DraftAdapter  # noqa: E402
from draftadapt.cache import CacheConfig  # noqa: E402
from draftadapt.checkpoint import load_eagle3  # noqa: E402
from draftadapt.engine.vllm import SpecConfig  # noqa: E402
from draftadapt.integrations.trl import attach, trl_engine_options  # noqa: E402
from draftadapt.toy.draft import toy_draft  # noqa: E402
from draftadapt.toy.policy import toy_policy  # noqa: E402
from draftadapt.toy.task import RewardConfig, reward, sample_problem  # noqa: E402
from draftadapt.trainer import TrainerConfig  # noqa: E402


class StepClock(TrainerCallback):
    """Wall time of each optimizer step, draft work at its end included (added after attach's callback)."""

    def __init__(self):
        self.t, self.seconds = None, []

    def on_step_begin(self, args, state, control, **kw):
        self.t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.seconds.append(time.perf_counter() - self.t)


def toy_data(n: int, seed: int, reward_cfg: RewardConfig):
    """Plain-text prompts (the toy tokenizer has no chat template) and a TRL reward function."""
    from datasets import Dataset

    rng = random.Random(seed)
    problems = [sample_problem(rng) for _ in range(n)]
    ds = Dataset.from_dict({"prompt": ["<bos> " + p.prompt for p in problems], "idx": list(range(n))})

    def toy_reward(prompts, completions, idx, **kw):
        return [reward(problems[i], c, reward_cfg) for i, c in zip(idx, completions)]

    return ds, toy_reward


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="GRPO optimizer steps")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step")
    ap.add_argument("--group-size", type=int, default=8, help="completions per prompt")
    ap.add_argument("--max-tokens", type=int, default=96, help="max completion tokens")
    ap.add_argument("--k", type=int, default=3, help="draft tokens per verification (EAGLE-3)")
    ap.add_argument("--lr", type=float, default=5e-5, help="policy learning rate")
    ap.add_argument("--verbose-bonus", type=float, default=2.0, help="reward bonus for the verbose style (drift)")
    ap.add_argument("--no-adapt", action="store_true", help="keep the initial draft frozen (baseline arm)")
    ap.add_argument("--hf-generate", action="store_true", help="generate with transformers, not vLLM")
    ap.add_argument("--out-dir", default="runs/trl_grpo_toy")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    # 1) policy (supervised toy policy, cached), its first draft, prompts and reward
    policy_dir = toy_policy()
    draft_dir = toy_draft(policy_dir)
    tok = AutoTokenizer.from_pretrained(policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    ds, toy_reward = toy_data(args.prompts * args.steps, args.seed, RewardConfig(verbose_bonus=args.verbose_bonus))
    # 2) GRPOTrainer; with vLLM its colocated engine serves the policy with the EAGLE-3 draft
    out = Path(args.out_dir)
    cfg = GRPOConfig(output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.prompts * args.group_size,
                     num_generations=args.group_size, max_completion_length=args.max_tokens, learning_rate=args.lr,
                     use_vllm=not args.hf_generate, vllm_mode="colocate", vllm_max_model_length=512, bf16=False,
                     use_cpu=not torch.cuda.is_available(), report_to=[], logging_steps=1, save_strategy="no",
                     seed=args.seed, disable_tqdm=True)
    with trl_engine_options(spec=SpecConfig("eagle3", args.k, model=str(draft_dir))):
        trainer = GRPOTrainer(model=policy, reward_funcs=toy_reward, args=cfg, train_dataset=ds, processing_class=tok)
    # 3) draftadapt: the adapter trains the draft from TRL's loss forward and pushes it every step
    adapter = DraftAdapter(load_eagle3(draft_dir), policy.get_input_embeddings(),
                           AdapterConfig(train_steps=4, batch_tokens=4096, min_tokens=1024),
                           TrainerConfig(lr=5e-4, ttt_steps=3), CacheConfig(max_tokens=200_000))
    callback = attach(trainer, adapter, capture=not args.no_adapt)  # --no-adapt: refits + metrics only
    clock = StepClock()
    trainer.add_callback(clock)
    # 4) train
    trainer.train()
    # 5) one row per step
    rewards = [r["reward"] for r in trainer.state.log_history if "reward" in r]
    rows = []
    print(f"\n{'step':>4} {'reward':>7} {'AL':>5} {'draft loss':>10} {'captured':>8} {'capture s':>9} "
          f"{'train s':>7} {'push ms':>7} {'step s':>7}")
    for i, s in enumerate(callback.history):
        d = s.as_dict()
        row = {"step": s.policy_version, "reward": rewards[i] if i < len(rewards) else None,
               "spec_acceptance_length": d.get("spec_acceptance_length"), "draft_loss": d.get("draft/loss"),
               "captured_tokens": callback.capture_tokens[i], "capture_seconds": callback.capture_seconds[i],
               "train_seconds": d.get("draft/train_seconds", 0.0), "push_seconds": s.push_seconds,
               "step_seconds": clock.seconds[i]}
        rows.append(row)
        print(f"{row['step']:>4} {row['reward'] or 0:7.3f} {row['spec_acceptance_length'] or 0:5.2f} "
              f"{row['draft_loss'] or float('nan'):10.4f} {row['captured_tokens']:8d} {row['capture_seconds']:9.3f} "
              f"{row['train_seconds']:7.2f} {1e3 * row['push_seconds']:7.1f} {row['step_seconds']:7.2f}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "steps.json").write_text(json.dumps(rows, indent=1))
    return {"rows": rows, "adapter": adapter, "trainer": trainer}


if __name__ == "__main__":
    main()
