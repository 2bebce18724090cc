"""Which draft-adaptation strategy keeps up with a drifting policy? A replay lab that isolates the draft.

0) scenario (benchmarks/replay_scenarios.py): what drifts - a toy reward (formal-only: a style drift; formal: a
   sharpening drift, the frozen AL rises) or letters-upper (a second task and tokenizer whose drift writes tokens
   outside the draft vocab); it records, names the tokenizer and initial drafts, the held-out prompts and the oracle.
1) record: a GRPO run of the scenario, ONCE per (scenario, seed): per-step policy checkpoints and
   rollouts (`draftadapt.replay`), sampled with plain decoding (a draft never changes what is
   sampled), kept under runs/adaptation_replay/ and reused by later replays (--rerecord redoes it).
2) replay: every strategy (arm) adapts its own copy of the same initial draft over the SAME
   trajectory: at boundary v each arm caches the features of step v's rollouts (recomputed from
   the saved policy v, identical for all arms) and trains; then ONE engine is refitted to policy v+1
   and every arm's draft is pushed in turn and measured on the same seeded held-out samples.
   The frozen initial draft is measured alike, and every `--oracle-every` steps an oracle: the
   initial draft trained to convergence on policy v+1's own samples.
3) report: per step and arm, AL and the paired difference to the frozen draft, with a 95% t
   interval over the recorded trajectories (seeds); at oracle steps the fraction of the
   frozen-to-oracle gap closed; draft compute per arm. JSON (every arm's config) + PNG curves.

    python benchmarks/adaptation_replay.py [--scenarios formal-only letters-upper] [--seeds 0 1 2] [--steps 10]
        [--arms default tv ...] [--eval-prompts 64] [--reuse] [--rerecord]

The `generic` arm starts the default strategy from a draft trained on the toy chat corpus (built once, cached) and
is measured beside `frozen-chat` (that init, never adapted); `generic-refresh` also re-targets that draft's vocab to
the task's completion tokens (AdapterConfig.vocab_refresh_every=1; `-lr2x`/`-lr4x`: and a 2x/4x draft lr, same compute).
Measures on every run; --reuse only re-prints the last JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "recipes"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
from _common import RESULTS, print_table, stamp, write_json  # noqa: E402
from replay_scenarios import SCENARIOS, scenario  # noqa: E402
from replay_stats import markdown_table, plot_curves, summarize  # noqa: E402

from draftadapt.adapter import AdapterConfig, DraftAdapter  # noqa: E402
from draftadapt.cache import CacheConfig  # noqa: E402
from draftadapt.config import load_section  # noqa: E402
from draftadapt.strategy import StrategyConfig  # noqa: E402
from draftadapt.trainer import TrainerConfig  # noqa: E402

TRAJ_ROOT = ROOT / "runs" / "adaptation_replay"
OUT = RESULTS / "adaptation_replay"
# BASE pins the adapter as it was before session 4 (a fixed budget, no refresh): the arm "default" stays the one the
# earlier results measured; the library's defaults since then are the arm "defaults"
BASE = {"adapter": {"train_steps": 4, "batch_tokens": 4096, "min_tokens": 2048, "staleness_window": 2,
                    "acceptance_drop": None, "vocab_refresh_uncovered": None, "vocab_refresh_boost": 1.0,
                    "vocab_refresh_trend": False, "teacher": "draft_vocab", "vocab_refresh_lr": 1.0},
        "trainer": {"lr": 5e-4, "ttt_steps": 3}, "cache": {"max_tokens": 400_000},
        "strategy": {"boost_factor": 1.0, "hold_factor": 1.0},
        "init": "task"}  # the initial draft: "task" (in-domain toy draft) or "chat" (generic: toy chat corpus)
# every arm trains train_steps x batch_tokens per boundary (equal draft compute) except "boost" and "until-boundary"
ARMS = {"default": {},
        "replay20": {"adapter": {"staleness_window": 20}},
        "rejected": {"strategy": {"rejected_weight": 4.0}},
        "tv": {"strategy": {"loss": "tv"}},
        "kl+tv": {"strategy": {"loss": "kl+tv"}},
        "top1": {"strategy": {"loss": "top1"}},  # matched to the engine's greedy drafting
        "advantage": {"strategy": {"min_advantage": 0.0}},
        "boost": {"strategy": {"boost_factor": 3.0, "boost_drop": 0.05}},
        "lr2x": {"trainer": {"lr": 1e-3}},
        "generic": {"init": "chat"},  # the default strategy from a generic-domain init (UltraChat analogue)
        # ... whose draft vocab is re-targeted to the task's completion tokens (AdapterConfig.vocab_refresh_every)
        "generic-refresh": {"init": "chat", "adapter": {"vocab_refresh_every": 1}},
        "generic-refresh-lr2x": {"init": "chat", "adapter": {"vocab_refresh_every": 1}, "trainer": {"lr": 1e-3}},
        "generic-refresh-lr4x": {"init": "chat", "adapter": {"vocab_refresh_every": 1}, "trainer": {"lr": 2e-3}},
        # UntilBoundaryDraftWorker: serves one step behind and trains as many steps as the recorded step lasted
        # (its capture budget stays the default's: the sampler is sized once, from the initial train_steps)
        "until-boundary": {"clock": True},
        # [U] candidates for the defaults, chosen on three drifts (formal-only, formal, letters-upper):
        "lr2e-3": {"trainer": {"lr": 2e-3}},  # 4x the draft lr, same compute
        # the vocab refresh whenever > 5% of a step's completion tokens are outside the draft vocab (the lab hands
        # the adapter the policy's lm_head), at the default lr and at 4x
        "refresh": {"adapter": {"vocab_refresh_uncovered": 0.05}},
        "refresh-lr2e-3": {"adapter": {"vocab_refresh_uncovered": 0.05}, "trainer": {"lr": 2e-3}},
        # ... and 4x the optimizer steps at a boundary whose acceptance fell 0.05 below the adapter's EMA
        "refresh-boost4": {"adapter": {"vocab_refresh_uncovered": 0.05},
                           "strategy": {"boost_factor": 4.0, "boost_drop": 0.05}},
        "refresh-lr2e-3-boost4": {"adapter": {"vocab_refresh_uncovered": 0.05}, "trainer": {"lr": 2e-3},
                                  "strategy": {"boost_factor": 4.0, "boost_drop": 0.05}},
        # session 4: a budget that also SHRINKS (StrategyConfig.hold_factor: 1 step of 4 while the acceptance length
        # holds or rises), and a burst after a refresh (AdapterConfig.vocab_refresh_boost: the first training on
        # features of the new vocab runs 16 x train_steps; its admitted rows start untrained)
        "hold": {"strategy": {"hold_factor": 0.25, "hold_max_gain": 1.0}},
        "boost4-hold": {"strategy": {"boost_factor": 4.0, "boost_drop": 0.05, "hold_factor": 0.25, "hold_max_gain": 1.0}},
        "refresh-rb16": {"adapter": {"vocab_refresh_uncovered": 0.05, "vocab_refresh_boost": 16.0}},
        "refresh-rb16-boost4-hold": {"adapter": {"vocab_refresh_uncovered": 0.05, "vocab_refresh_boost": 16.0},
                                     "strategy": {"boost_factor": 4.0, "boost_drop": 0.05, "hold_factor": 0.25, "hold_max_gain": 1.0}},
        # ... and the refresh ranks the tokens the next step is expected to write (AdapterConfig.vocab_refresh_trend)
        "trend-rb16": {"adapter": {"vocab_refresh_uncovered": 0.05, "vocab_refresh_boost": 16.0,
                                   "vocab_refresh_trend": True}},
        "trend-rb16-boost4-hold": {"adapter": {"vocab_refresh_uncovered": 0.05, "vocab_refresh_boost": 16.0,
                                               "vocab_refresh_trend": True},
                                   "strategy": {"boost_factor": 4.0, "boost_drop": 0.05, "hold_factor": 0.25, "hold_max_gain": 1.0}},
        # the library's defaults (session 4): the arm above with the hold guarded - the budget shrinks only while the
        # draft's training accuracy gained < 0.02 since the training before (hold_max_gain 1.0 above = unguarded, as
        # those arms were measured: every training gain is < 1)
        "defaults": {"adapter": {"vocab_refresh_uncovered": 0.05, "vocab_refresh_boost": 16.0, "vocab_refresh_trend": True},
                     "strategy": {"boost_factor": 4.0, "boost_drop": 0.05, "hold_factor": 0.25, "hold_max_gain": 0.02}},
        # session 5: the features outlive a refresh (a top-k teacher over target ids, mapped to the draft vocab when
        # sampled: the post-refresh burst trains on the window's steps, not one; top-64 as first measured - the letters
        # vocab has 59 ids, so it is every id there), and the burst at 4x the lr, falling (cosine) to 0.4x
        # (AdapterConfig.vocab_refresh_lr)
        "defaults-keep": {"adapter": {"vocab_refresh_uncovered": 0.05, "vocab_refresh_boost": 16.0,
                                      "vocab_refresh_trend": True, "teacher": "topk", "top_k": 64},
                          "strategy": {"boost_factor": 4.0, "boost_drop": 0.05, "hold_factor": 0.25, "hold_max_gain": 0.02}},
        "defaults-blr4": {"adapter": {"vocab_refresh_uncovered": 0.05, "vocab_refresh_boost": 16.0,
                                      "vocab_refresh_trend": True, "vocab_refresh_lr": 4.0},
                          "strategy": {"boost_factor": 4.0, "boost_drop": 0.05, "hold_factor": 0.25, "hold_max_gain": 0.02}},
        "defaults-keep-blr4": {"adapter": {"vocab_refresh_uncovered": 0.05, "vocab_refresh_boost": 16.0,
                                           "vocab_refresh_trend": True, "teacher": "topk", "top_k": 64,
                                           "vocab_refresh_lr": 4.0},
                               "strategy": {"boost_factor": 4.0, "boost_drop": 0.05, "hold_factor": 0.25,
                                            "hold_max_gain": 0.02}},
        # the library's defaults since session 5: as above with teacher "auto" = top-k of as many ids as the draft vocab
        # holds (toy: 512, where top-64 held 96-98% of the policy's mass; letters: all 59, as above)
        "defaults5": {"adapter": {"vocab_refresh_uncovered": 0.05, "vocab_refresh_boost": 16.0, "vocab_refresh_trend": True,
                                  "teacher": "auto", "vocab_refresh_lr": 4.0},
                      "strategy": {"boost_factor": 4.0, "boost_drop": 0.05, "hold_factor": 0.25, "hold_max_gain": 0.02}},
        # session 6: the hold's guard is what a training bought WITHIN itself (TrainResult.acc_gain: its later half's
        # step-1 accuracy minus its earlier half's), no longer the gain between two trainings, which also rose when the
        # policy sharpened (c). Every arm above with hold_max_gain 0.02 was measured with the gain between trainings.
        # "first_counters": the first boundary gets the acceptance length the initial draft served on step 0's
        # rollouts, as in a real loop (the adapter reads them from the sink); without it (every arm above) the first
        # boundary has none and the EMA reference starts one boundary later.
        "defaults6": {"first_counters": True,
                      "adapter": {"vocab_refresh_uncovered": 0.05, "vocab_refresh_boost": 16.0, "vocab_refresh_trend": True,
                                  "teacher": "auto", "vocab_refresh_lr": 4.0},
                      "strategy": {"boost_factor": 4.0, "boost_drop": 0.05, "hold_factor": 0.25, "hold_max_gain": 0.02}},
        # ... and nothing while the acceptance length holds (StrategyConfig.hold_factor=0; a lever, not the default)
        "defaults6-h0": {"first_counters": True,
                         "adapter": {"vocab_refresh_uncovered": 0.05, "vocab_refresh_boost": 16.0,
                                     "vocab_refresh_trend": True, "teacher": "auto", "vocab_refresh_lr": 4.0},
                         "strategy": {"boost_factor": 4.0, "boost_drop": 0.05, "hold_factor": 0.0, "hold_max_gain": 0.02}},
        "defaults6-nofirst": {"adapter": {"vocab_refresh_uncovered": 0.05, "vocab_refresh_boost": 16.0,
                                          "vocab_refresh_trend": True, "teacher": "auto", "vocab_refresh_lr": 4.0},
                              "strategy": {"boost_factor": 4.0, "boost_drop": 0.05, "hold_factor": 0.25,
                                           "hold_max_gain": 0.02}}}


def arm_config(name: str) -> dict:
    cfg = {k: dict(v) if isinstance(v, dict) else v for k, v in BASE.items()}
    for section, over in ARMS[name].items():
        if isinstance(over, dict):
            cfg[section].update(over)
        else:
            cfg[section] = over
    return cfg


def recorded_step_seconds(traj, v: int) -> float:
    """Seconds the recorded RL step v took: generation + policy update (nan when not recorded)."""
    update_s = traj.meta.get("update_seconds") or []
    return traj.step_info(v)["generation_seconds"] + (update_s[v] if v < len(update_s) else math.nan)


def clock_steps(train: dict, step_seconds: float, min_steps: int) -> int:
    """Draft steps an until-boundary worker fits in a step of `step_seconds`, at the seconds per draft step
    the fixed-budget arms just took on this machine (the library's UntilBoundaryDraftWorker runs on a real
    clock; a replay needs the count up front). At least `min_steps`, as the worker trains."""
    timed = [t["seconds"] / t["steps"] for t in train.values() if t["steps"]]
    if not timed or math.isnan(step_seconds):
        return min_steps
    return max(min_steps, int(step_seconds / sorted(timed)[len(timed) // 2]))


# 2) replay ------------------------------------------------------------------------------------
def make_adapter(name: str, draft_dirs: dict[str, Path], embed, head=None) -> DraftAdapter:
    from draftadapt.checkpoint import load_eagle3

    c = arm_config(name)
    return DraftAdapter(load_eagle3(draft_dirs[c["init"]]), embed, load_section(AdapterConfig, c["adapter"]),
                        load_section(TrainerConfig, c["trainer"]), load_section(CacheConfig, c["cache"]),
                        strategy=load_section(StrategyConfig, c["strategy"]), target_head=head)


def load_policy(policy, state: dict) -> None:
    """Load a saved policy state; a tied head is not saved (safetensors keeps the shared tensor once)."""
    missing = policy.load_state_dict(state, strict=False).missing_keys
    tied = policy.get_output_embeddings().weight is policy.get_input_embeddings().weight
    if missing and not (tied and missing == ["lm_head.weight"]):
        raise ValueError(f"the trajectory's policy state lacks {missing}; record it again")


def measure(swapper, engine, state: dict, version: int, prompts: list[list[int]], tok, args, max_tokens: int):
    """Push `state` as draft `version` and sample the held-out prompts (seeded, T=1): (spec counters, outputs)."""
    swapper.push_draft(state, version)
    c0 = swapper.spec_counters()
    outs = engine.generate(prompts, n=args.samples, temperature=1.0, max_tokens=max_tokens, logprobs=False,
                           seed=args.eval_seed, stop_token_ids=[tok.eos_token_id])
    return swapper.spec_counters() - c0, outs


def replay(scn, traj_dir: Path, arms: list[str], args) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from draftadapt.checkpoint import draft_state_for_push, load_eagle3
    from draftadapt.engine.swap import EngineSwapper
    from draftadapt.engine.vllm import Engine, EngineConfig, SpecConfig
    from draftadapt.replay import Trajectory, features

    traj = Trajectory(traj_dir)
    tok_dir = scn.tokenizer_dir()  # the trajectory's checkpoints hold weights only
    draft_dirs = scn.draft_dirs({arm_config(a)["init"] for a in arms}, args.generic_steps)
    draft_dir = draft_dirs["task"]
    tok = AutoTokenizer.from_pretrained(tok_dir)
    policy = AutoModelForCausalLM.from_pretrained(traj.policy_dir(0), dtype=torch.float32).eval()
    adapters = {a: make_adapter(a, draft_dirs, policy.get_input_embeddings(), policy.get_output_embeddings())
                for a in arms}
    frozen = {k: v.clone() for k, v in draft_state_for_push(load_eagle3(draft_dir)).items()}
    frozen_chat = draft_state_for_push(load_eagle3(draft_dirs["chat"])) if "chat" in draft_dirs else None
    prompts, judge = scn.eval_set(traj, tok, args.eval_prompts)  # the trajectory's own problem distribution
    engine = Engine(EngineConfig(model=str(traj.policy_dir(0)), tokenizer=str(tok_dir), max_num_seqs=64, seed=0,
                                 spec=SpecConfig("eagle3", 3, model=str(draft_dir))))
    swapper, push_version, counters, rows = EngineSwapper(engine), 0, {a: None for a in arms}, []
    try:
        initial = {arm_config(a)["init"] for a in arms if arm_config(a).get("first_counters")}
        for init in sorted(initial):  # what the initial draft served on policy 0 (step 0's rollouts in a real loop)
            push_version += 1
            spec, _ = measure(swapper, engine, frozen if init == "task" else frozen_chat, push_version, prompts, tok,
                              args, scn.max_tokens)
            print(f"  replay {traj_dir.name} v0: {init} initial draft {spec.acceptance_length:.3f}", flush=True)
            for a in arms:
                if arm_config(a).get("first_counters") and arm_config(a)["init"] == init:
                    counters[a] = spec
        for v in traj.versions:
            t0 = time.perf_counter()
            # 1) every arm sees the same features of step v's rollouts (policy v), then trains
            load_policy(policy, traj.policy_state(v))
            ro = traj.rollouts(v)
            # (the teacher is over each draft's own vocab: one feature pass per initial draft, vocab and teacher)
            def key(a):
                ids, ad = adapters[a].features.draft_vocab_ids, adapters[a]
                return arm_config(a)["init"], None if ids is None else tuple(ids.tolist()), ad.teacher, ad.top_k
            first = {key(a): a for a in reversed(arms)}
            batches = {k: list(features(policy, adapters[a], ro, v)) for k, a in first.items()}
            advs = ro.advantages.split(64)
            train, step_s = {}, recorded_step_seconds(traj, v)
            # a background worker serves at v+1 what it trained through step v-1 (one step behind)
            behind = {a: {k: t.clone() for k, t in adapters[a].worker.state_for_push().items()}
                      for a in arms if arm_config(a).get("clock")}
            for a in sorted(arms, key=lambda a: bool(arm_config(a).get("clock"))):  # fixed budgets first
                ad = adapters[a]
                for b, adv in zip(batches[key(a)], advs):
                    ad.on_rollouts(b, advantages=adv)
                if a in behind:  # until the boundary: as many steps as the recorded step lasted
                    ad.config = replace(ad.config, train_steps=clock_steps(train, step_s, BASE["adapter"]["train_steps"]))
                st = ad.on_step_end(v + 1, counters=counters[a])
                train[a] = {"steps": st.train.steps, "tokens": st.train.tokens, "seconds": st.train.seconds} \
                    if st.train else {"steps": 0, "tokens": 0, "seconds": 0.0}
                # what the budget was decided on: the served draft's acceptance, its reference, the training accuracy
                train[a].update(acceptance=st.spec.acceptance_length if st.spec is not None else None,
                                reference=st.acceptance_reference,
                                step_acc=list(st.train.step_acc) if st.train else None,
                                acc_gain=st.train.acc_gain if st.train else None)
                if st.vocab is not None:  # a vocab refresh (vocab_refresh_every): coverage before/after
                    train[a]["vocab"] = st.vocab._asdict()
            # 2) the engine serves policy v+1; each draft is pushed and measured on the same seeded samples
            load_policy(policy, traj.policy_state(v + 1))
            swapper.refit_policy(policy.state_dict(), v + 1)
            drafts = {"frozen": frozen, **({"frozen-chat": frozen_chat} if frozen_chat else {}),
                      **{a: behind.get(a) or adapters[a].worker.state_for_push() for a in arms}}
            oracle_s = None
            if args.oracle_every and (v + 1) % args.oracle_every == 0:
                t1 = time.perf_counter()
                drafts["oracle"] = draft_state_for_push(scn.oracle(engine, tok, policy, args, v + 1))
                oracle_s = time.perf_counter() - t1
            names = list(drafts)
            names = names[v % len(names):] + names[:v % len(names)]  # rotate the measuring order
            al, acc, styles = {}, None, None
            for name in names:
                push_version += 1
                spec, outs = measure(swapper, engine, drafts[name], push_version, prompts, tok, args, scn.max_tokens)
                al[name] = spec.acceptance_length
                if name in arms:
                    counters[name] = spec
                if name == "frozen":
                    acc, styles = judge(outs)
            rows.append({"version": v + 1, "al": al, "accuracy": acc, "styles": styles, "drift": scn.drift,
                         "drift_share": styles[scn.drift], "train": train,
                         "rollout_completion_tokens": ro.completion_tokens, "oracle_seconds": oracle_s,
                         "step_seconds": step_s, "load_average": os.getloadavg(),
                         "recorded": traj.step_info(v), "replay_seconds": time.perf_counter() - t0})
            partial = {"stamp": stamp(), "args": vars(args), "arms": {a: arm_config(a) for a in arms},
                       "runs": {f"{traj.meta['reward']}/{traj.meta['seed']}": rows}}
            (RESULTS / f"{args.name}.partial.json").write_text(json.dumps(partial, default=str))  # --combine reads it
            print(f"  replay {traj_dir.name} v{v + 1}: acc {acc:.3f} {scn.drift} {styles[scn.drift]:.2f} "
                  + " ".join(f"{k} {x:.3f}" for k, x in al.items()), flush=True)
    finally:
        engine.shutdown()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", "--rewards", dest="scenarios", nargs="+", default=["formal"], choices=SCENARIOS,
                    help="drift scenarios (benchmarks/replay_scenarios.py): a toy reward, or letters-upper")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=10, help="GRPO steps per recorded trajectory")
    ap.add_argument("--policy-lr", type=float, default=None, help="policy lr of the recording (default: the "
                    "scenario's: formal-only 2e-4, formal 1e-4, letters-upper 3e-4, other toy rewards 5e-5)")
    ap.add_argument("--record-override", nargs="*", default=[], help="recipe overrides for recording, e.g. "
                    "rollout.prompts_per_step=8 (they name the trajectory directory)")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS),
                    help="arms to replay; with --combine, the arms to report (default: every arm all parts share)")
    ap.add_argument("--eval-prompts", type=int, default=64, help="held-out prompts per measurement")
    ap.add_argument("--samples", type=int, default=2, help="seeded samples per held-out prompt")
    ap.add_argument("--eval-seed", type=int, default=777)
    ap.add_argument("--oracle-every", type=int, default=5)
    ap.add_argument("--oracle-prompts", type=int, default=256)
    ap.add_argument("--oracle-steps", type=int, default=300)
    ap.add_argument("--generic-steps", type=int, default=600, help="TTT steps of the generic (chat) init draft")
    ap.add_argument("--name", default="adaptation_replay", help="result name under benchmarks/results/")
    ap.add_argument("--reuse", action="store_true", help="re-print the last result JSON instead of measuring")
    ap.add_argument("--rerecord", action="store_true", help="record the trajectories again even if present")
    ap.add_argument("--record-only", action="store_true", help="record the missing trajectories, replay nothing")
    ap.add_argument("--combine", nargs="+", metavar="NAME", help="reuse: summarize the per-step results of earlier "
                    "runs (e.g. one process per seed) under --name, measuring nothing")
    args = ap.parse_args()
    path = RESULTS / f"{args.name}.json"
    if args.reuse:
        res = json.loads(path.read_text())
        print_report(res["summary"])
        return
    if args.combine:
        # a part is a finished run's JSON, or the per-step partial of a run that stopped after its trajectory
        parts = [json.loads((RESULTS / f"{n}.json").read_text()) for n in args.combine]
        runs = merge_runs(parts)
        order = list(dict.fromkeys(a for p in parts for a in p["args"]["arms"]))
        arms = [a for a in order if a in args.arms and all(a in r["al"] for rows in runs.values() for r in rows)]
        report(runs, arms, args, {"combined": args.combine, "parts_args": [p["args"] for p in parts],
                                  "parts_stamps": [p["stamp"] for p in parts],
                                  "arms": {a: c for p in parts for a, c in p["arms"].items() if a in arms}})
        return
    torch.set_num_threads(1)
    runs = {}
    for name in args.scenarios:
        scn = scenario(name)
        lr = scn.policy_lr if args.policy_lr is None else args.policy_lr
        for seed in args.seeds:
            tag = "".join(f"-{o.replace('=', '')}" for o in args.record_override)
            root = TRAJ_ROOT / f"{name}-s{seed}-n{args.steps}-lr{lr:g}{tag}"
            if args.rerecord or not (root / "trajectory.json").exists() or \
                    json.loads((root / "trajectory.json").read_text()).get("steps") is None:
                print(f"recording {root.name}", flush=True)
                scn.record(seed, args.steps, lr, root, tuple(args.record_override))
            if args.record_only:
                continue
            runs[f"{name}/{seed}"] = replay(scn, root, args.arms, args)
            report(runs, args.arms, args, {"arms": {a: arm_config(a) for a in args.arms}})  # after every trajectory


def merge_runs(parts: list[dict]) -> dict[str, list[dict]]:
    """The runs of several results, arms of the same trajectory merged step by step: a later part (e.g. new arms
    replayed with --oracle-every 0) adds its arms' AL and train records to the rows of an earlier one. Recording is
    deterministic (same seed, same rollouts), and the frozen draft's AL, measured in every part, must agree: a
    mismatch means the trajectories differ and raises."""
    runs: dict[str, list[dict]] = {}
    for p in parts:
        for key, rows in p["runs"].items():
            if key not in runs:
                runs[key] = [dict(r, al=dict(r["al"]), train=dict(r["train"])) for r in rows]
                continue
            have = {r["version"]: r for r in runs[key]}
            for r in rows:
                old = have.get(r["version"])
                if old is None:
                    continue
                if abs(old["al"]["frozen"] - r["al"]["frozen"]) > 1e-6:
                    raise ValueError(f"{key} v{r['version']}: the frozen draft's AL is {old['al']['frozen']} in one part "
                                     f"and {r['al']['frozen']} in another: not the same trajectory; record it again")
                old["al"].update({a: x for a, x in r["al"].items() if a not in old["al"]})
                old["train"].update({a: t for a, t in r["train"].items() if a not in old["train"]})
    return runs


def report(runs: dict, arms: list[str], args, extra: dict) -> None:
    summary = summarize(runs, arms)
    print_report(summary)
    png = plot_curves(runs, OUT / f"{args.name}.png", arms)
    write_json(args.name, {"args": vars(args), **extra, "load_average": os.getloadavg(), "shared_machine": True,
                           "summary": summary, "runs": runs, "plot": str(png)})


def print_report(summary: dict) -> None:
    for reward, s in summary.items():
        print(f"\n== reward {reward}: AL - frozen AL, mean over steps, 95% CI over {s['n_seeds']} seeds ==")
        print_table(["arm", "gain", "ci lo", "ci hi", "- first arm", "ci lo", "ci hi", "gap closed (open gaps)",
                     "ci lo", "ci hi", "train tok / rollout tok", "train s", "train s / step s"],
                    [[a, *r["gain"], *r.get("vs_first_arm", [math.nan] * 3), *r["gap_closed"], r["tokens_ratio"],
                      r["train_seconds"], r.get("step_fraction")]
                     for a, r in s["arms"].items()])
        print(f"  gap closed = mean over the oracle steps whose gap CI excludes 0: {s.get('open_gap_steps')}")
        for v, fr in s["oracle_steps"].items():
            ratio = fr.get("ratio_of_means") or {}
            print(f"  oracle step {v}: fraction of the frozen->oracle gap closed [CI] (ratio of means) " + ", ".join(
                f"{a} {m:+.2f} [{lo:+.2f}, {hi:+.2f}] ({ratio.get(a, math.nan):+.2f})"
                for a, (m, lo, hi) in ((k, x) for k, x in fr.items() if k != "ratio_of_means")))
        print_table(["version", "frozen AL", "oracle AL", "oracle gap", "gap ci lo", "gap ci hi", "accuracy",
                     f"{s.get('drift', 'formal')} share"], s["per_step"])
        if s["oracle_steps"]:
            print(markdown_table(s))


if __name__ == "__main__":
    main()
