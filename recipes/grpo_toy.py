"""GRPO on the toy task with speculative-decoding rollouts and online draft adaptation.

One switch picks the speculation mechanism, `rollout.method`: eagle3 (EAGLE-3 head), mtp (the
policy's own MTP layer), draft_model (a small external draft LM distilled from the policy), ngram
or suffix (model-free: nothing to adapt, run.adapt is ignored). Same metrics, same closing table.

    python recipes/grpo_toy.py [--config recipes/grpo_toy.yaml] [section.field=value ...] [--resume]

Reads top to bottom: 1) policy and first draft, 2) the engine, 3) resume, 4) the loop
(rollouts -> rewards -> log-prob recompute with capture -> GRPO step -> policy refit -> draft
adaptation), 5) the closing comparison: the adapted draft vs the same initial draft kept frozen,
both on the final policy with the same prompts. Every `run.probe_every` steps the loop also measures
both on the current policy (`probe`): what adaptation bought so far, beside the rollouts' own curve.

Two switches, same recipe: `run.async_lag=1` samples step t+1's rollouts (with the weights of
version t) in a thread while step t trains, one-step off-policy; `run.draft_worker=thread` trains
the draft in a background thread, one step behind, instead of at the step boundary.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import os

import torch

# vLLM's INFO lines (throughput every few seconds, per-layer reload notes) drown the progress
# bar; set VLLM_LOGGING_LEVEL=INFO to see them again.
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # else Ray writes an auth token under the home directory
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from draftadapt.adapter import AdapterConfig, DraftAdapter, budget_cache_config  # noqa: E402
from draftadapt.cache import CacheConfig  # noqa: E402
from draftadapt.config import apply_overrides, load_section  # noqa: E402
from draftadapt.engine.ray_pool import make_engines  # noqa: E402
from draftadapt.engine.vllm import Engine, EngineConfig  # noqa: E402
from draftadapt.grpo.async_loop import LAGS, Generated, RolloutSource  # noqa: E402
from draftadapt.grpo.loop import UpdateConfig, collect_rollouts, policy_update  # noqa: E402
from draftadapt.grpo.runlog import RunLogger, plot_run  # noqa: E402
from draftadapt.grpo.state import has_checkpoint, load_run, save_run  # noqa: E402
from draftadapt.toy.draft import ToyDraftConfig  # noqa: E402
from draftadapt.toy.eval import encode_prompt, eval_problems  # noqa: E402
from draftadapt.toy.mechanisms import METHODS, toy_mechanism  # noqa: E402
from draftadapt.toy.task import (STYLES, RewardConfig, TaskConfig, parse_answer, reward, sample_problem,  # noqa: E402
                                 style_of)
from draftadapt.trainer import TrainerConfig  # noqa: E402
from draftadapt.ray_utils import RayConfig  # noqa: E402
from draftadapt.ray_worker import RayDraftWorker  # noqa: E402
from draftadapt.workers import BackgroundDraftWorker  # noqa: E402


@dataclass(frozen=True)
class RunConfig:
    steps: int = 30  # GRPO policy steps
    out_dir: str = "runs/grpo_toy"  # metrics.jsonl, tb/, plot.png, checkpoints, final table
    seed: int = 0
    checkpoint_every: int = 5  # steps between run checkpoints (0 = only at the end)
    adapt: bool = True  # False = keep the initial draft frozen (the baseline arm)
    eval_prompts: int = 200  # held-out prompts for the before/after accuracy and the final AL table
    threads: int = 1  # torch threads of the policy/draft updates (vLLM pins this process to 1 anyway)
    async_lag: int = 0  # 0 = sync; 1 = step t+1's rollouts are sampled (by version t) while step t trains
    draft_worker: str = "inline"  # "inline": the draft trains at the step boundary; "thread": in a
    #   background thread, one step behind (the engines get at boundary v what inline pushes at v-1);
    #   "ray": in a Ray actor (synchronous: the same pushes as inline)
    engines: int = 1  # vLLM engines; more than one needs ray: true (one engine per process)
    ray: bool = False  # engines as Ray actors (section `ray` sets their resources); else in-process
    final_compare: bool = True  # False: skip 5)'s frozen-vs-adapted engines (two engine starts; crash tests)
    probe_every: int = 5  # every this many steps, the acceptance length of the adapted draft AND of the first
    #   draft kept frozen on the same seeded held-out prompts and the same policy (two extra passes of the
    #   engine, which serves the frozen draft for the second); 0 = never
    probe_prompts: int = 64  # held-out prompts of that measurement (2 samples each)

    def __post_init__(self) -> None:
        if self.async_lag not in LAGS:
            raise ValueError(f"run.async_lag={self.async_lag!r}; use one of {LAGS}")
        if self.engines < 1 or (self.engines > 1 and not self.ray):
            raise ValueError(f"run.engines={self.engines}: use 1, or more with run.ray=true (one vLLM engine per "
                             "process, so several engines run as Ray actors)")
        if self.probe_every < 0 or self.probe_prompts < 1:
            raise ValueError(f"run.probe_every={self.probe_every}, run.probe_prompts={self.probe_prompts}; use "
                             "probe_every >= 0 (0 = never) and probe_prompts >= 1")
        if self.draft_worker not in ("inline", "thread", "ray"):
            raise ValueError(f"run.draft_worker={self.draft_worker!r}; use 'inline', 'thread' or 'ray'")


@dataclass(frozen=True)
class RolloutConfig:
    prompts_per_step: int = 32  # P
    group_size: int = 8  # G samples per prompt
    temperature: float = 1.0
    max_tokens: int = 96
    num_speculative_tokens: int = 3  # k of the drafter; 0 = no spec decode (baseline)
    max_num_seqs: int = 64  # engine batch
    k_costs: str = ""  # "" = fixed k; a draftadapt.speed Costs JSON (benchmarks/spec_speed.py writes one) = choose
    #   k per batch size (0..num_speculative_tokens) from each step's acceptance, applied to the running engine
    method: str = "eagle3"  # speculation mechanism: one of draftadapt.toy.mechanisms.METHODS

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"rollout.method={self.method!r}; choose one of {METHODS}")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 5e-5  # policy AdamW lr (1e-4 .. 3e-4 collapsed or reward-hacked in the prototype)
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0


@dataclass(frozen=True)
class RecipeConfig:
    run: RunConfig = field(default_factory=RunConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    reward: RewardConfig = field(default_factory=lambda: RewardConfig(verbose_bonus=2.0))
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    draft: ToyDraftConfig = field(default_factory=ToyDraftConfig)  # the initial EAGLE-3 draft
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(lr=5e-4, ttt_steps=3))
    cache: CacheConfig = field(default_factory=lambda: CacheConfig(max_tokens=200_000))
    ray: RayConfig = field(default_factory=lambda: RayConfig(actor_cpus=0.5))  # used when run.ray or draft_worker=ray


class KChooser:
    """k per batch size between steps (rollout.k_costs): acceptance of the last step x calibrated costs."""

    def __init__(self, rc: RolloutConfig, run: RunConfig):
        from draftadapt.speed import costs_from_dict

        if rc.num_speculative_tokens < 1 or run.ray:
            raise ValueError("rollout.k_costs needs rollout.num_speculative_tokens >= 1 (the largest k) and "
                             "run.ray=false (the schedule changes on an in-process engine)")
        self.costs = costs_from_dict(json.loads(Path(rc.k_costs).read_text()))
        self.max_k, self.max_b = rc.num_speculative_tokens, rc.max_num_seqs
        self.schedule, self.acc = [(1, rc.max_num_seqs, rc.num_speculative_tokens)], None

    def update(self, engine, delta) -> str:
        from draftadapt.speed import acceptance_from_counts, choose_schedule, merge_acceptance

        k_min = min((k for _, _, k in self.schedule if k > 0), default=0)
        # nothing drafted (every range off): keep the last acceptance; positions past k_min: the older estimate
        self.acc = merge_acceptance(acceptance_from_counts(delta.accepted_per_pos, delta.drafts, k_min), self.acc)
        if self.acc is not None:
            self.schedule = choose_schedule(self.costs, self.acc, self.max_k, self.max_b)
            engine.set_spec_schedule(self.schedule)
        return json.dumps(self.schedule)


def load_config(path: str | None, overrides: list[str]) -> RecipeConfig:
    import yaml

    data = yaml.safe_load(Path(path).read_text()) if path else {}
    return load_section(RecipeConfig, apply_overrides(data or {}, overrides), "config")


def step_problems(cfg: RecipeConfig, step: int):
    rng = random.Random(cfg.run.seed * 1_000_003 + step)  # a resumed run redraws the same prompts
    return [sample_problem(rng, cfg.task) for _ in range(cfg.rollout.prompts_per_step)]


def measure(engine, tok, problems, cfg: RecipeConfig, group: int = 2) -> dict[str, float]:
    """Accuracy and acceptance on fixed prompts at the rollout temperature."""
    before = engine.spec_counters()
    r = rollouts(engine, tok, problems, cfg, version=-1, group=group, seed=12345)
    spec = engine.spec_counters() - before
    return {"accuracy": accuracy(problems, r), "reward": float(r.rewards.mean()),
            "spec_acceptance_length": spec.acceptance_length}


def probe(engine, swapper, tok, problems, frozen: dict, cfg: RecipeConfig) -> dict[str, float]:
    """What adaptation bought so far: the acceptance length of the served (adapted) draft and of the first
    draft kept frozen, on the same seeded prompts and the current policy. The engine serves the frozen
    weights for one pass, then the adapted ones again (`serving_draft`); requests carry their own seeds
    and torch's generator is forked, so the run's trajectory is the same with or without it."""
    t0 = time.perf_counter()
    with torch.random.fork_rng():
        adapted = measure(engine, tok, problems, cfg)["spec_acceptance_length"]
        with swapper.serving_draft(frozen):
            kept = measure(engine, tok, problems, cfg)["spec_acceptance_length"]
    return {"probe/acceptance_length_adapted": adapted, "probe/acceptance_length_frozen": kept,
            "time/probe": time.perf_counter() - t0}


def accuracy(problems, r) -> float:
    """Share of completions with the right answer (not reward > 0: a style reward pays wrong answers too)."""
    return sum(parse_answer(t) == problems[j // r.group_size].answer for j, t in enumerate(r.texts)) / len(r.texts)


def rollouts(engine, tok, problems, cfg: RecipeConfig, version: int, group: int | None = None, seed: int | None = None):
    prompts = [encode_prompt(tok, p.prompt) for p in problems]
    return collect_rollouts(engine, prompts, lambda i, text: reward(problems[i], text, cfg.reward),
                            lambda ids: tok.decode(ids, skip_special_tokens=True), group or cfg.rollout.group_size,
                            cfg.rollout.temperature, cfg.rollout.max_tokens, [tok.eos_token_id], version, seed)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "recipes" / "grpo_toy.yaml"))
    ap.add_argument("--resume", action="store_true", help="continue from <out_dir>/checkpoint if present")
    ap.add_argument("overrides", nargs="*", help="section.field=value")
    args = ap.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out, ckpt = Path(cfg.run.out_dir), Path(cfg.run.out_dir) / "checkpoint"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1, default=str))
    torch.manual_seed(cfg.run.seed)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # 1) the toy policy (supervised, cached) and a first draft of the chosen mechanism, trained on its own samples
    mech = toy_mechanism(cfg.rollout.method, cfg.draft)
    tok = AutoTokenizer.from_pretrained(mech.tokenizer_dir)
    policy = AutoModelForCausalLM.from_pretrained(mech.policy_dir, dtype=torch.float32).eval()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas,
                                  weight_decay=cfg.optim.weight_decay)
    # 2) one engine serving the policy with the first draft; the swapper pushes into it
    k = cfg.rollout.num_speculative_tokens  # 0 = plain decoding (the no-spec baseline arm)
    chooser = KChooser(cfg.rollout, cfg.run) if cfg.rollout.k_costs else None
    spec = mech.spec(k)
    if chooser is not None and spec is not None:  # a per-batch-size schedule the chooser rewrites between steps
        spec = dataclasses.replace(spec, num_speculative_tokens_per_batch_size=((1, cfg.rollout.max_num_seqs, k),))
    engine, swapper = make_engines(EngineConfig(model=str(mech.policy_dir), tokenizer=str(mech.tokenizer_dir),
                                                spec=spec, max_num_seqs=cfg.rollout.max_num_seqs,
                                                max_model_len=512, seed=cfg.run.seed), cfg.run.engines, cfg.run.ray, cfg.ray)
    torch.set_num_threads(cfg.run.threads)
    adapter = None
    if cfg.run.adapt and k > 0 and mech.trainable:
        adapter = DraftAdapter(mech.load_draft(policy), policy.get_input_embeddings(), cfg.adapter, cfg.trainer,
                               cfg.cache, sink=swapper)
        if cfg.run.draft_worker == "thread":  # the same worker, its training moved off the step
            adapter = DraftAdapter.with_worker(BackgroundDraftWorker(adapter.worker), cfg.adapter, sink=swapper)
        elif cfg.run.draft_worker == "ray":  # the draft and its cache live in a Ray actor
            worker = RayDraftWorker(mech.load_draft(policy), policy.get_input_embeddings(), cfg.trainer,
                                    budget_cache_config(cfg.adapter, cfg.cache), cfg.adapter.batch_tokens,
                                    cfg.adapter.seed, ray_cfg=cfg.ray)
            adapter = DraftAdapter.with_worker(worker, cfg.adapter, sink=swapper)
    held_out = eval_problems(cfg.run.eval_prompts, seed=4321, cfg=cfg.task)
    frozen = None  # the first draft's pushable weights, for the frozen-vs-adapted probe (before any resume)
    if adapter is not None and cfg.run.probe_every:
        frozen = {name: t.detach().clone() for name, t in adapter.worker.state_for_push().items()}
        probe_set = eval_problems(cfg.run.probe_prompts, seed=2468, cfg=cfg.task)
    # 3) resume: restore policy/optimizer/draft, then refit and push them into the fresh engine
    start, logger, ready = 0, RunLogger(out), None
    if args.resume and has_checkpoint(ckpt):
        st = load_run(ckpt, policy, optimizer, adapter)
        start, before, ready = st.step, st.extra["before"], st.extra.get("ready")
        swapper.refit_policy(policy.state_dict(), start)
        if adapter is not None:
            adapter.sink.push_draft(adapter.worker.state_for_push(), start)  # through the watchdog, when on
        logger.truncate_after(start)
        print(f"resumed at step {start}")
    else:
        logger.truncate_after(-1)
        before = measure(engine, tok, held_out, cfg)
    # 4) the loop
    from tqdm import tqdm

    def generate(batch_step: int, version: int) -> Generated:  # async: runs in a thread, the engine is its own
        c0 = swapper.spec_counters()
        per_step = cfg.rollout.prompts_per_step * cfg.rollout.group_size  # seeds one step's samples use
        r = rollouts(engine, tok, step_problems(cfg, batch_step), cfg, version=version,
                     seed=(cfg.run.seed * 7919 + batch_step) * per_step)
        return Generated(r, swapper.spec_counters() - c0)

    last_probe = None  # "adapted/frozen" acceptance lengths of the latest probe, for the progress bar
    source = RolloutSource(generate, cfg.run.async_lag, cfg.run.steps, ready)
    bar = tqdm(range(start, cfg.run.steps), initial=start, total=cfg.run.steps, desc="GRPO")
    try:
        for step in bar:
            t0 = time.perf_counter()
            r = source.take(step).rollouts  # sampled by version step (sync) or step - 1 (async)
            upd = policy_update(policy, optimizer, r, tok.pad_token_id, cfg.update, adapter, policy_version=step)
            source.boundary()  # the engine is idle from here: refit, push, checkpoint
            version, spec_delta = step + 1, source.spec  # counters of the generation that finished in this step
            refit = swapper.refit_policy(policy.state_dict(), version)
            t_draft = time.perf_counter()
            astats = adapter.on_step_end(version, counters=spec_delta) if adapter is not None else None
            t_draft = time.perf_counter() - t_draft
            row = {"reward": float(r.rewards.mean()), "accuracy": accuracy(step_problems(cfg, step), r),
                   "loss": upd.loss, "kl": upd.kl, "clip_frac": upd.clip_frac, "grad_norm": upd.grad_norm,
                   "logprob_mismatch": upd.logprob_mismatch, "rollout_tokens_per_s": r.num_tokens / r.seconds,
                   "time/generation": source.generation_seconds, "time/generation_exposed": source.exposed_seconds,
                   "time/policy_train": upd.seconds, "time/refit": refit.seconds, "time/draft": t_draft,
                   "time/step": time.perf_counter() - t0, "version/rollouts": r.policy_version,
                   "version/rollout_lag": step - r.policy_version, **spec_delta.as_dict(),
                   **{f"style/{s}": sum(style_of(t) == s for t in r.texts) / len(r.texts) for s in STYLES},
                   **({k: v for k, v in astats.as_dict().items() if not k.startswith("spec_")} if astats else {})}
            if adapter is not None:
                row["version/features"] = adapter.newest_rollout_version
            if frozen is not None and version % cfg.run.probe_every == 0:  # the engine is idle until the next take
                row.update(probe(engine, swapper, tok, probe_set, frozen, cfg))
                last_probe = (f"{row['probe/acceptance_length_adapted']:.2f}/"
                              f"{row['probe/acceptance_length_frozen']:.2f}")
                bar.write(f"step {version}: acceptance length on {len(probe_set)} held-out prompts x2, adapted/frozen "
                          f"first draft {last_probe} ({row['time/probe']:.1f} s)")
            if chooser is not None:  # the next rollouts run with k chosen from this step's acceptance
                row["spec/k_schedule"] = chooser.update(engine, spec_delta)
            logger.log(version, row)
            bar.set_postfix(reward=f"{row['reward']:.2f}", AL=f"{spec_delta.acceptance_length:.2f}",
                            **({"AL_adapted/frozen": last_probe} if last_probe else {}))
            if cfg.run.checkpoint_every and version % cfg.run.checkpoint_every == 0 or version == cfg.run.steps:
                save_run(ckpt, version, policy, optimizer, adapter, extra={"before": before, "ready": source.ready})
    finally:
        source.close()
    # 5) closing comparison on the final policy: accuracy, and frozen vs adapted draft
    after = measure(engine, tok, held_out, cfg)
    engine.shutdown()
    final_policy = out / "policy-final"
    policy.save_pretrained(final_policy, safe_serialization=True)
    tok.save_pretrained(str(final_policy))  # (MTP: a tokenizer beside a qwen2 config encodes to nothing; the
    #   comparison engines get mech.tokenizer_dir)
    rows = logger.rows()
    probes = [{"step": r["step"], "adapted": r["probe/acceptance_length_adapted"], "frozen":
               r["probe/acceptance_length_frozen"], "seconds": r["time/probe"]}
              for r in rows if r.get("probe/acceptance_length_frozen") is not None]
    result = {"method": mech.method, "before": before, "after": after, "frozen": None, "adapted": None,
              "toy_build": toy_build(mech), "probes": probes, "probe_seconds": sum(p["seconds"] for p in probes)}
    arms = {"frozen": None} if k > 0 else {}  # None: the first draft (model-free: the method itself)
    if adapter is not None:
        arms["adapted"] = adapter.worker.draft
        if isinstance(adapter.worker, BackgroundDraftWorker):
            adapter.worker.close()
    if not cfg.run.final_compare:
        arms = {}
    for name, d in arms.items():
        ecfg = mech.final_engine(final_policy, d, out / f"draft-final-{name}", k, max_num_seqs=cfg.rollout.max_num_seqs,
                                 seed=cfg.run.seed)
        with Engine(ecfg) as eng:
            result[name] = measure(eng, tok, held_out, cfg)
    logger.close()
    plot_run(rows, out / "plot.png", title=f"GRPO toy (reward verbose_bonus={cfg.reward.verbose_bonus})",
             keys=("reward", "accuracy", ("spec_acceptance_length", "probe/acceptance_length_adapted",
                                          "probe/acceptance_length_frozen")))
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print_summary(result, out)
    return result


def toy_build(mech) -> dict:
    """sha256 prefixes of the toy artefacts this run started from: two runs with equal hashes ran the same toy."""
    from draftadapt.toy.build import weights_hash

    build = {"policy": weights_hash(mech.policy_dir)}
    if mech.initial_draft is not None:
        build["draft"] = weights_hash(mech.initial_draft)
    return build


def print_summary(res: dict, out: Path) -> None:
    def f(x, key, fmt):
        return "-" if x is None or x.get(key) is None else format(x[key], fmt)

    build = res.get("toy_build") or {}
    print(f"\ntoy build: {', '.join(f'{k} {v}' for k, v in build.items())}  (same hashes = same toy)")
    print("\n                      before RL   after RL")
    print(f"accuracy (T=1)        {f(res['before'], 'accuracy', '8.1%')}   {f(res['after'], 'accuracy', '8.1%')}")
    print(f"\nacceptance length on the final policy (same prompts, k drafts, {res.get('method', 'eagle3')}):")
    print(f"  initial draft, frozen   {f(res['frozen'], 'spec_acceptance_length', '.2f')}")
    print(f"  adapted online          {f(res['adapted'], 'spec_acceptance_length', '.2f')}")
    if res.get("probes"):
        p = res["probes"]
        print(f"\nacceptance length during the run (held-out probe, same prompts, {res['probe_seconds']:.0f} s in all):")
        print("  step  " + "".join(f"{x['step']:>6}" for x in p))
        print("  adapt " + "".join(f"{x['adapted']:6.2f}" for x in p))
        print("  frozen" + "".join(f"{x['frozen']:6.2f}" for x in p))
    print(f"\nlogs: {out}/metrics.jsonl, {out}/tb, plot: {out}/plot.png")


if __name__ == "__main__":
    main()
