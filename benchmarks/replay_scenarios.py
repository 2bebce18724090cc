"""The drift scenarios of benchmarks/adaptation_replay.py: what is recorded, which draft starts, what is measured.

A scenario is one object the replay lab asks for: `record` (one GRPO trajectory per seed), `tokenizer_dir` and
`draft_dirs` (the initial drafts by init name), `eval_set` (seeded held-out prompts and a judge of the frozen draft's
samples: accuracy and the share of the drift's style), `oracle` (a draft trained to convergence on the measured
policy's own samples) and `max_tokens`. Two kinds:
- ToyScenario(reward): the toy task (word-level toy tokenizer); formal-only = a style drift whose tokens the draft
  vocab already holds, the frozen draft's AL falls; formal = a sharpening toward the draft's best-predicted style,
  the frozen draft's AL rises.
- LettersScenario: draftadapt.toy.letters, a second task and tokenizer built from code; only correct UPPER-case
  answers pay, and no upper-case letter is in the first draft's vocab (new tokens).
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# formal: correct answers in the formal style (3% of the SFT data) earn 3x - accuracy rises while the style moves;
# formal-only: ONLY correct formal answers pay (other_styles=0) - formal_bonus alone let chain of thought (the
#   draft's own style) win, the frozen draft's AL rose; this reward forces the move toward the under-represented style
# correct: correctness only (sharpening); style: +1 for any verbose completion, right or wrong (a reward hack)
REWARDS = {"verbose": ["reward.verbose_bonus=2"],
           "formal": ["reward.verbose_bonus=0", "reward.formal_bonus=2"],
           "formal-only": ["reward.verbose_bonus=0", "reward.other_styles=0"],
           "correct": ["reward.verbose_bonus=0"],
           "style": ["reward.verbose_bonus=0", "reward.verbose_reward=1"]}
# the policy lr each drift was recorded with in the results (formal-only: the frozen AL falls; formal: it rises)
TOY_POLICY_LR = {"formal-only": 2e-4, "formal": 1e-4}


def _record_loop(root: Path, meta: dict, policy, opt, engine_cfg, steps: int, step_rollouts, update, info_of):
    """The shared GRPO recording loop: rollouts of policy v (plain decoding), record, update, refit."""
    from draftadapt.engine.swap import EngineSwapper
    from draftadapt.engine.vllm import Engine
    from draftadapt.grpo.loop import collate
    from draftadapt.grpo.objective import group_advantages
    from draftadapt.replay import StepRollouts, TrajectoryRecorder

    rec = TrajectoryRecorder(root, meta={**meta, "update_seconds": []})
    with Engine(engine_cfg) as eng:
        swapper = EngineSwapper(eng)
        for step in range(steps):
            r, pad_id, scale = step_rollouts(eng, step)
            b = collate(r, pad_id)
            adv = group_advantages(r.rewards, r.group_size, scale=scale)
            info = {"reward": float(r.rewards.mean()), "generation_seconds": r.seconds,
                    "completion_tokens": r.num_tokens, **info_of(step, r)}
            rec.record(step, policy, StepRollouts(b.input_ids, b.attention_mask, b.completion_mask,
                                                  r.rewards.float(), adv.float()), info)
            t0 = time.perf_counter()
            update(r)
            rec.meta["update_seconds"].append(time.perf_counter() - t0)  # + generation = the step
            swapper.refit_policy(policy.state_dict(), step + 1)
            print(f"  record {meta['reward']} s{meta['seed']} step {step}: "
                  f"{json.dumps({k: round(v, 3) for k, v in info.items()})}", flush=True)
    rec.finish(steps, policy)


class ToyScenario:
    """The toy task under one of REWARDS."""

    max_tokens = 96

    def __init__(self, reward: str):
        self.name, self.drift = reward, "formal"
        self.policy_lr = TOY_POLICY_LR.get(reward, 5e-5)

    def tokenizer_dir(self) -> Path:
        from draftadapt.toy.policy import toy_policy

        return toy_policy()  # the trajectory's checkpoints hold weights only

    def draft_dirs(self, inits: set[str], generic_steps: int) -> dict[str, Path]:
        from draftadapt.toy.draft import ToyDraftConfig, toy_draft

        dirs = {"task": toy_draft(self.tokenizer_dir())}
        if "chat" in inits:  # the generic (toy chat corpus) init, built once, cached beside the policy
            dirs["chat"] = toy_draft(self.tokenizer_dir(), ToyDraftConfig(domain="chat", steps=generic_steps))
        return dirs

    def record(self, seed: int, steps: int, lr: float, root: Path, overrides: tuple[str, ...] = ()) -> None:
        sys_path = str(ROOT / "recipes")
        import sys

        if sys_path not in sys.path:
            sys.path.insert(0, sys_path)
        import grpo_toy as recipe
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from draftadapt.engine.vllm import EngineConfig
        from draftadapt.grpo.loop import policy_update
        from draftadapt.toy.task import STYLES, style_of

        cfg = recipe.load_config(str(ROOT / "recipes" / "grpo_toy.yaml"), [*REWARDS[self.name], f"run.seed={seed}",
                                 f"run.steps={steps}", f"optim.lr={lr}", *overrides])
        torch.manual_seed(seed)
        policy_dir = self.tokenizer_dir()
        tok = AutoTokenizer.from_pretrained(policy_dir)
        policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
        opt = torch.optim.AdamW(policy.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas)
        problems = {}

        def step_rollouts(eng, step):
            problems[step] = recipe.step_problems(cfg, step)
            r = recipe.rollouts(eng, tok, problems[step], cfg, version=step, seed=seed * 7919 + step)
            return r, tok.pad_token_id, cfg.update.scale_advantages

        def info_of(step, r):
            return {"accuracy": recipe.accuracy(problems[step], r),
                    **{f"style/{s}": sum(style_of(t) == s for t in r.texts) / len(r.texts) for s in STYLES}}

        _record_loop(root, {"reward": self.name, "seed": seed, "config": asdict(cfg)}, policy, opt,
                     EngineConfig(model=str(policy_dir), max_num_seqs=cfg.rollout.max_num_seqs, seed=seed), steps,
                     step_rollouts, lambda r: policy_update(policy, opt, r, tok.pad_token_id, cfg.update), info_of)

    def eval_set(self, traj, tok, n: int):
        """(prompts, judge): the trajectory's own problem distribution; judge(outs) -> (accuracy, styles)."""
        from draftadapt.toy.eval import encode_prompt, eval_problems
        from draftadapt.toy.task import STYLES, TaskConfig, parse_answer, style_of

        task = TaskConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in traj.meta["config"]["task"].items()})
        problems = eval_problems(n, seed=4321, cfg=task)

        def judge(outs):
            texts = [(p, tok.decode(c.token_ids, skip_special_tokens=True)) for p, g in zip(problems, outs) for c in g]
            return (sum(parse_answer(t) == p.answer for p, t in texts) / len(texts),
                    {s: sum(style_of(t) == s for _, t in texts) / len(texts) for s in STYLES})
        self._task = task
        return [encode_prompt(tok, p.prompt) for p in problems], judge

    def oracle(self, engine, tok, policy, args, version: int):
        """The initial draft trained to convergence on this policy's own temperature-1 samples."""
        from draftadapt.checkpoint import load_eagle3
        from draftadapt.offline import train_offline
        from draftadapt.toy.draft import domain_prompts, rollout_sequences
        from draftadapt.trainer import TrainerConfig

        prompts = domain_prompts(tok, "task", args.oracle_prompts, seed=100 + version, task=self._task)
        roll = rollout_sequences(engine, tok, prompts, 2, self.max_tokens)
        return train_offline(policy, roll.sequences, args.oracle_steps, draft=load_eagle3(self.draft_dirs(set(), 0)["task"]),
                             config=TrainerConfig(lr=1e-3, ttt_steps=3, warmup_steps=20), loss_masks=roll.loss_masks,
                             batch_size=32, progress=False)


class LettersScenario:
    """draftadapt.toy.letters: GRPO pays only correct upper-case answers, tokens outside the first draft's vocab."""

    prompts_per_step, group_size = 64, 8

    def __init__(self):
        from draftadapt.toy.letters import LettersConfig

        self.name, self.drift, self.policy_lr, self.cfg = "letters-upper", "upper", 3e-4, LettersConfig()
        self.max_tokens = self.cfg.max_letters + 1

    def _art(self):
        from draftadapt.toy.letters import letters_artefacts

        return letters_artefacts(self.cfg)

    def tokenizer_dir(self) -> Path:
        return self._art().tokenizer

    def draft_dirs(self, inits: set[str], generic_steps: int) -> dict[str, Path]:
        if inits - {"task"}:
            raise ValueError(f"scenario {self.name} has only the 'task' init; drop the arms with init {inits - {'task'}}")
        return {"task": self._art().draft}

    def _tok(self):
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(self.tokenizer_dir()))

    def record(self, seed: int, steps: int, lr: float, root: Path, overrides: tuple[str, ...] = ()) -> None:
        from transformers import AutoModelForCausalLM

        from draftadapt.engine.vllm import EngineConfig
        from draftadapt.grpo.loop import UpdateConfig, collect_rollouts, policy_update
        from draftadapt.toy.letters import correct, encode_prompt, is_upper, reward, sample_problem

        if overrides:
            raise ValueError(f"scenario {self.name} takes no --record-override (got {overrides})")
        art, tok, problems = self._art(), self._tok(), {}
        torch.manual_seed(seed)
        policy = AutoModelForCausalLM.from_pretrained(str(art.policy), dtype=torch.float32).eval()
        opt = torch.optim.AdamW(policy.parameters(), lr=lr, betas=(0.9, 0.99))
        update = UpdateConfig()

        def step_rollouts(eng, step):
            rng = random.Random(seed * 1_000_003 + step)
            ps = problems[step] = [sample_problem(rng, self.cfg) for _ in range(self.prompts_per_step)]
            r = collect_rollouts(eng, [encode_prompt(tok, p.prompt) for p in ps],
                                 lambda i, text: reward(ps[i], text, upper_only=True),
                                 lambda ids: tok.decode(ids, skip_special_tokens=True), self.group_size, 1.0,
                                 self.max_tokens, [tok.eos_token_id], step, seed * 7919 + step)
            return r, tok.pad_token_id, update.scale_advantages

        def info_of(step, r):
            ps = problems[step]
            return {"accuracy": sum(correct(ps[j // r.group_size], t) for j, t in enumerate(r.texts)) / len(r.texts),
                    "style/upper": sum(map(is_upper, r.texts)) / len(r.texts)}

        meta = {"reward": self.name, "seed": seed, "config": {"letters": asdict(self.cfg), "policy_lr": lr,
                "prompts_per_step": self.prompts_per_step, "group_size": self.group_size, "update": asdict(update)}}
        _record_loop(root, meta, policy, opt, EngineConfig(model=str(art.policy), tokenizer=str(art.tokenizer),
                                                           max_num_seqs=64, seed=seed), steps, step_rollouts,
                     lambda r: policy_update(policy, opt, r, tok.pad_token_id, update), info_of)

    def eval_set(self, traj, tok, n: int):
        from draftadapt.toy.letters import correct, encode_prompt, is_upper, sample_problem

        rng = random.Random(4321)
        problems = [sample_problem(rng, self.cfg) for _ in range(n)]

        def judge(outs):
            texts = [(p, tok.decode(c.token_ids, skip_special_tokens=True)) for p, g in zip(problems, outs) for c in g]
            up = sum(is_upper(t) for _, t in texts) / len(texts)
            return sum(correct(p, t) for p, t in texts) / len(texts), {"upper": up, "lower": 1 - up}
        return [encode_prompt(tok, p.prompt) for p in problems], judge

    def oracle(self, engine, tok, policy, args, version: int):
        """From scratch, the docs' one call on this policy's own samples: `train_from_own_samples` picks a draft
        vocab of the same size from them (upper-case letters included once the policy writes them)."""
        from draftadapt.offline import train_from_own_samples
        from draftadapt.toy.letters import AUX_LAYER_IDS, encode_prompt, sample_problem
        from draftadapt.trainer import TrainerConfig

        rng, steps = random.Random(100 + version), args.oracle_steps
        prompts = [encode_prompt(tok, sample_problem(rng, self.cfg).prompt) for _ in range(args.oracle_prompts)]
        return train_from_own_samples(engine, policy, prompts, steps, n=2, max_tokens=self.max_tokens,
                                      stop_token_ids=[tok.eos_token_id], seed=version,
                                      draft_vocab_size=self.cfg.draft_vocab_size, aux_layer_ids=AUX_LAYER_IDS,
                                      config=TrainerConfig(lr=3e-3, warmup_steps=10, lr_schedule="cosine",
                                                           lr_decay_steps=max(1, steps - 10)),
                                      batch_size=32, progress=False).draft


SCENARIOS = [*REWARDS, "letters-upper"]


def scenario(name: str):
    if name == "letters-upper":
        return LettersScenario()
    if name in REWARDS:
        return ToyScenario(name)
    raise ValueError(f"scenario {name!r}; choose one of {SCENARIOS}")
