"""Where does speculative decoding pay on this CPU, and does the speed-up model predict it?

Verifier-heavy config (benchmarks/_verifier_heavy.py: random Llama target, 103M parameters, EAGLE-3
draft trained on its greedy outputs; measured on the training prompts, greedy - see that file for why).
One engine per drafter, built with k = max(ks) and a k-by-batch-size schedule; every arm (k=0 = off,
k in ks) runs in the SAME engine by changing the schedule between generate() calls, interleaved in
shuffled order within each round. Requests ignore eos, so all b sequences live for --max-tokens tokens.
Per (drafter, b, k): tokens/s, speed-up over k=0 in the same round (median and range over rounds),
per-position acceptance, seconds per plain step and per spec round (prefill subtracted).

Then the model (draftadapt/speed.py): costs calibrated on --fit-ks only, acceptance from the k=3 arm
(geometric tail past k=3); predicted vs measured speed-up on the other ks. Two cost models side by
side: `table` (calibrate_table: verify(T) = the plain decode step measured at batch T - the k=0 arms,
plus plain-only --calib-batches up to max(b) * (max(k) + 1), interleaved in the same rounds - and the
draft's part linear in k per batch size) and `linear` (calibrate: six numbers, linear in tokens). Then a tapering rollout
(one request per --lengths entry, continuous batching) under no spec, each fixed k, and the chosen
schedule, measured and predicted. Optionally the toy policy's real rollout trajectory.

    nice -n 5 python benchmarks/spec_speed.py        # reduced default grid: b 1..16, k 1,2,3,5, 16 tokens (~25 min shared)
    nice -n 5 python benchmarks/spec_speed.py --batches 1,2,4,8,16,32 --ks 1,2,3,5,7 --max-tokens 32 --rounds 3  # full grid

Timing: --clock cpu (default) is this process's CPU time. vLLM runs in-process on one thread, so on a machine
shared with other jobs CPU time measures the work and wall time mostly measures the other jobs; wall-clock
speed-ups are reported beside it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402
from _verifier_heavy import HeavyConfig, build  # noqa: E402

from draftadapt.speed import (Acceptance, Measured, calibrate, calibrate_table, choose_schedule,  # noqa: E402
                              costs_to_dict, rollout_time, schedule_k, trajectory_from_lengths)


CLOCK = "cpu"  # set by --clock


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _gen(eng, prompts, max_tokens):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    if isinstance(max_tokens, int):
        max_tokens = [max_tokens] * len(prompts)
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    t0, c0 = time.perf_counter(), time.process_time()
    eng.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return cpu if CLOCK == "cpu" else wall, wall


def sweep(eng, prompts, args, max_b):
    """Rows {b, k, round, seconds, decode_s, counters} for every (round, b, k), arms shuffled per (round, b)."""
    rows = []
    for r in range(args.rounds):
        for b in sorted(args.batches + args.calib_batches):
            ps = [prompts[(r * 13 + i) % len(prompts)] for i in range(b)]
            eng.set_spec_schedule(((1, max_b, 0),))
            prefill, _ = _gen(eng, ps, 1)  # prefill + one sampled token, subtracted from every arm
            arms = [0] + (args.ks if b in args.batches else [])  # calibration batches: plain steps only
            random.Random(1000 * r + b).shuffle(arms)
            for k in arms:
                eng.set_spec_schedule(((1, max_b, k),))
                c0 = eng.spec_counters()
                dt, wall = _gen(eng, ps, args.max_tokens)
                d = eng.spec_counters() - c0
                rows.append({"b": b, "k": k, "round": r, "seconds": dt, "wall_s": wall, "decode_s": max(dt - prefill, 1e-9),
                             "prefill_s": prefill, "drafts": d.drafts, "draft_tokens": d.draft_tokens,
                             "accepted": d.accepted, "accepted_per_pos": list(d.accepted_per_pos),
                             "load1": os.getloadavg()[0]})
                print(f"  r{r} b={b:<2} k={k}: {b * args.max_tokens / dt:7.1f} tok/{CLOCK}-s ({b * args.max_tokens / wall:.1f}/wall-s)  AL "
                      f"{1 + d.accepted / d.drafts if d.drafts else 1:.2f}  load {os.getloadavg()[0]:.1f}", flush=True)
    return rows


def summarise(rows, args):
    """Per (b, k): tok/s, speed-up over k=0 of the same round (median, min, max), rates, costs."""
    by = {(x["b"], x["k"], x["round"]): x for x in rows}
    out = {}
    for b in args.batches:
        plain = [by[(b, 0, r)] for r in range(args.rounds)]
        plain_step = statistics.median(p["decode_s"] / (args.max_tokens - 1) for p in plain)
        for k in [0] + args.ks:
            arms = [by[(b, k, r)] for r in range(args.rounds)]
            ratios = [p["decode_s"] / a["decode_s"] for p, a in zip(plain, arms)]
            drafts, accepted = sum(a["drafts"] for a in arms), sum(a["accepted"] for a in arms)
            per_pos = [sum(a["accepted_per_pos"][i] for a in arms if len(a["accepted_per_pos"]) > i)
                       for i in range(k)]
            # every round yields 1 + accepted tokens, drafted or not (n-gram skips rounds without a match)
            # a model drafter drafts every round (rounds = drafts); accepted tokens past max_tokens are dropped
            rounds = max(drafts, b * args.rounds * (args.max_tokens - 1) - accepted)
            rounds_per_req = rounds / (b * args.rounds)
            out[(b, k)] = {
                "b": b, "k": k, "tok_s": statistics.median(b * args.max_tokens / a["seconds"] for a in arms),
                "wall_speedup": statistics.median(p["wall_s"] / a["wall_s"] for p, a in zip(plain, arms)),
                "speedup": statistics.median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios),
                "al": 1 + accepted / drafts if drafts else 1.0, "tokens_per_round": 1 + accepted / rounds,
                "drafted_share": drafts / rounds, "proposed_per_round": sum(a["draft_tokens"] for a in arms) / rounds, "proposed_per_draft": sum(a["draft_tokens"] for a in arms) / max(drafts, 1),
                "rates": [p / rounds for p in per_pos],  # per ROUND: rounds without a draft count as rejections
                "plain_step_s": plain_step,
                "round_s": statistics.median(a["decode_s"] for a in arms) / rounds_per_req}
    return out


def _acceptance(summary, k, batches) -> Acceptance:
    """Per-position rates (per round) of arm k, pooled over `batches` (each b runs its own prompts)."""
    rates = [statistics.mean(summary[(b, k)]["rates"][i] for b in batches) for i in range(k)]
    rates = [min([1.0] + rates[: i + 1]) for i in range(len(rates))]  # rounding can break monotonicity
    return Acceptance(tuple(max(r, 1e-6) for r in rates))


def plain_steps(rows, args) -> dict[int, float]:
    """Seconds per plain decode step by batch size (median over rounds), sweep and calibration batches."""
    out = {}
    for b in sorted(set(args.batches + args.calib_batches)):
        ts = [x["decode_s"] / (args.max_tokens - 1) for x in rows if x["b"] == b and x["k"] == 0]
        if ts:
            out[b] = statistics.median(ts)
    return out


def model_check(summary, args, plain=None, model="table"):
    prop = lambda s: s["proposed_per_round"] if s["k"] else None  # noqa: E731
    fit = [Measured(b, k, s["plain_step_s"], s["round_s"], proposed=prop(s)) for (b, k), s in summary.items()
           if k in args.fit_ks]
    costs = calibrate_table(plain, fit) if model == "table" else calibrate(fit)
    k_acc = max(args.fit_ks)  # acceptance from a fitted arm at the same b (same prompts), geometric tail
    acc = _acceptance(summary, k_acc, args.batches)
    rows = []
    for (b, k), s in sorted(summary.items()):
        if k == 0:
            continue
        # proposed tokens past the fitted k are unknown before measuring: a drafter that filled its k at the
        # fitted arm fills any k (EAGLE); one that proposed fewer (n-gram: short matches) keeps that many
        p_fit = prop(summary[(b, k_acc)])
        pred = costs.speedup(_acceptance(summary, k_acc, [b]), b, k, k if p_fit >= 0.95 * k_acc else min(k, p_fit))
        pred_al = costs.plain(b) * s["tokens_per_round"] / costs.round(b, k, prop(s))  # this arm's measured AL: the cost model alone
        rows.append({"b": b, "k": k, "model": model, "fitted": k in args.fit_ks, "measured": s["speedup"], "predicted": pred,
                     "error": pred / s["speedup"] - 1, "predicted_with_arm_al": pred_al,
                     "error_with_arm_al": pred_al / s["speedup"] - 1})
    return costs, acc, rows


def _rollout_acceptance(delta, k) -> Acceptance | None:
    """Per-position acceptance of one rollout run at fixed k (vLLM's counters, per draft)."""
    if not delta.drafts:
        return None
    rates = [min(1.0, a / delta.drafts) for a in list(delta.accepted_per_pos)[:k]]
    return Acceptance(tuple(max(min(rates[: i + 1]), 1e-6) for i in range(len(rates))))


def rollout_pilot(eng, prompts, lengths, max_b, max_k):
    """One rollout at the largest k before the timed rounds: the acceptance a k chooser would have from the
    previous RL step (its per-position rates on THESE prompts; they differ from the sweep's prompts)."""
    ps = [prompts[i % len(prompts)] for i in range(len(lengths))]
    eng.set_spec_schedule(((1, max_b, max_k),))
    c0 = eng.spec_counters()
    _gen(eng, ps, lengths)
    return _rollout_acceptance(eng.spec_counters() - c0, max_k)


def rollout_compare(eng, prompts, lengths, schedule, args, max_b):
    """Time of one tapering rollout per arm (k=0, fixed ks, chosen schedule), interleaved in rounds; and
    each arm's spec counters (AL per arm)."""
    arms = {f"k={k}": ((1, max_b, k),) for k in [0] + args.ks}
    arms["chosen"] = tuple(schedule)
    ps = [prompts[i % len(prompts)] for i in range(len(lengths))]
    times, al = {a: [] for a in arms}, {a: [0, 0] for a in arms}
    for r in range(args.rounds):
        order = list(arms)
        random.Random(r).shuffle(order)
        for a in order:
            eng.set_spec_schedule(arms[a])
            c0 = eng.spec_counters()
            times[a].append(_gen(eng, ps, lengths)[0])
            d = eng.spec_counters() - c0
            al[a][0] += d.accepted
            al[a][1] += d.drafts
            print(f"  rollout r{r} {a}: {times[a][-1]:.2f}s", flush=True)
    return times, {a: 1 + x / n if n else 1.0 for a, (x, n) in al.items()}


def no_spec_rollout(base, prompts, lengths, args) -> list[float]:
    """The same rollout on an engine built WITHOUT speculation (k=0 in a spec engine is not free: vLLM
    still runs the EAGLE drafter's first forward every step to keep its KV cache in sync). Measured after
    the spec engine closed: not interleaved with its arms."""
    from draftadapt.engine.vllm import Engine, EngineConfig

    ps = [prompts[i % len(prompts)] for i in range(len(lengths))]
    cfg = EngineConfig(model=str(base / "target"), max_num_seqs=len(lengths), max_model_len=256,
                       worker_extension=None, extra={"enable_prefix_caching": False})
    with Engine(cfg) as eng:
        _gen(eng, prompts[:4], 8)
        return [_gen(eng, ps, lengths)[0] for _ in range(args.rounds)]


def toy_trajectory(max_num_seqs: int, prompts_n: int = 32, group: int = 8) -> dict:
    """Output lengths of one toy GRPO-sized rollout (T=1) and the alive-sequence trajectory they give."""
    from transformers import AutoTokenizer

    from draftadapt.engine.vllm import Engine, EngineConfig
    from draftadapt.toy.draft import domain_prompts
    from draftadapt.toy.policy import toy_policy

    policy = toy_policy()
    tok = AutoTokenizer.from_pretrained(policy)
    with Engine(EngineConfig(model=str(policy), max_num_seqs=max_num_seqs, worker_extension=None)) as eng:
        outs = eng.generate(domain_prompts(tok, "task", prompts_n, seed=4242), n=group, temperature=1.0,
                            max_tokens=96, logprobs=False, seed=0, stop_token_ids=[tok.eos_token_id])
    lengths = [len(c.token_ids) for g in outs for c in g]
    return {"lengths": lengths, "max_num_seqs": max_num_seqs, "trajectory": trajectory_from_lengths(lengths, max_num_seqs)}


def _toy_base():
    """(dir with target/ and draft/ links, build info, prompts) for the toy policy and its draft."""
    import tempfile

    from transformers import AutoTokenizer

    from draftadapt.toy.draft import ToyDraftConfig, domain_prompts, toy_draft
    from draftadapt.toy.policy import toy_policy

    policy = toy_policy()
    draft = toy_draft(policy, ToyDraftConfig())
    base = Path(tempfile.mkdtemp(prefix="spec_speed_toy_"))
    (base / "target").symlink_to(Path(policy).resolve())
    (base / "draft").symlink_to(Path(draft).resolve())
    prompts = domain_prompts(AutoTokenizer.from_pretrained(policy), "task", 64, seed=100)  # the draft's training prompts
    return base, {"target": str(policy), "draft": str(draft)}, prompts


def reanalyse(method, old, args):
    """The analysis of `run_method` on rows an earlier run measured (--from-json); nothing is re-measured."""
    summary = summarise(old["rows"], args)
    plain = plain_steps(old["rows"], args)
    costs, acc, check = model_check(summary, args, plain)
    check += model_check(summary, args, model="linear")[2]
    rich = _acceptance(summary, max(args.ks), args.batches)
    schedule = choose_schedule(costs, rich, max(args.ks), max(args.batches + [len(old["rollout_lengths"])]))
    times, lengths = old["rollout_seconds"], old["rollout_lengths"]
    traj = trajectory_from_lengths(lengths, max(args.batches + [len(lengths)])) if lengths else []
    predicted = {a: rollout_time(costs, rich, traj, schedule_k(old["schedule"]) if a == "chosen" else int(a[2:]))
                 for a in times}
    return {**old, "summary": list(summary.values()), "costs": costs_to_dict(costs), "fit_ks": args.fit_ks,
            "acceptance_k3": list(acc.rates), "acceptance_kmax": list(rich.rates), "model_check": check,
            "schedule_reanalysed": schedule, "rollout_predicted_s": predicted}


def run_method(method, base, prompts, args, lengths):
    from draftadapt.engine.vllm import Engine, EngineConfig, SpecConfig

    max_b, max_k = max(args.batches + [len(lengths) if lengths else 1]), max(args.ks)
    cap = max([max_b] + args.calib_batches)
    spec = SpecConfig(method, max_k, model=str(base / "draft") if method == "eagle3" else None,
                      num_speculative_tokens_per_batch_size=((1, max_b, max_k),))
    # KV cache for `cap` sequences of <= 128 tokens (26 layers x 4 KV heads x 64 x K,V in fp32 = 53 KB per token):
    # with the default 1 GiB vLLM admits ~150 sequences and the largest calibration batches would queue
    kv_gib = max(1, math.ceil(cap * 128 * 53e3 * 1.5 / 2**30))
    cfg = EngineConfig(model=str(base / "target"), spec=spec, max_num_seqs=cap, max_model_len=256, kv_cache_gib=kv_gib,
                       worker_extension=None, extra={"enable_prefix_caching": False})
    with Engine(cfg) as eng:
        _gen(eng, prompts[:4], 8)  # warm-up
        rows = sweep(eng, prompts, args, cap)
        summary = summarise(rows, args)
        plain = plain_steps(rows, args)
        costs, acc, check = model_check(summary, args, plain)
        check += model_check(summary, args, model="linear")[2]
        rich = _acceptance(summary, max_k, args.batches)
        pilot = rollout_pilot(eng, prompts, lengths, cap, max_k) if lengths else None
        schedule = choose_schedule(costs, pilot or rich, max_k, max_b)
        print(f"{method}: chosen schedule {schedule} (rollout pilot acceptance {pilot and [round(r, 3) for r in pilot.rates]})")
        times, arm_al = rollout_compare(eng, prompts, lengths, schedule, args, cap) if lengths else ({}, {})
    no_spec = no_spec_rollout(base, prompts, lengths, args) if lengths else []
    traj = trajectory_from_lengths(lengths, max_b) if lengths else []
    predicted = {a: rollout_time(costs, pilot or rich, traj, schedule_k(schedule) if a == "chosen" else int(a[2:]))
                 for a in times}
    return {"rows": rows, "summary": list(summary.values()), "plain_steps": plain, "costs": costs_to_dict(costs),
            "fit_ks": args.fit_ks,
            "acceptance_k3": list(acc.rates), "acceptance_kmax": list(rich.rates), "model_check": check,
            "schedule": schedule, "rollout_lengths": lengths, "rollout_seconds": times, "rollout_al": arm_al,
            "rollout_pilot_acceptance": list(pilot.rates) if pilot else None, "rollout_no_spec_engine_s": no_spec,
            "rollout_predicted_s": predicted}


def report(method, res):
    print(f"\n== {method}: tokens per {CLOCK}-second and speed-up over k=0 (median [min, max] over rounds)")
    print_table(["b", "k", "tok/s", "speed-up", "range", "wall speed-up", "AL", "drafted", "per-pos acceptance/round", "s/plain step",
                 "s/spec round"],
                [[s["b"], s["k"], s["tok_s"], s["speedup"], f"[{s['speedup_min']:.2f}, {s['speedup_max']:.2f}]",
                  s["wall_speedup"], s["al"], f"{s['drafted_share']:.2f}", " ".join(f"{r:.2f}" for r in s["rates"]), s["plain_step_s"],
                  s["round_s"]]
                 for s in res["summary"]])
    if res.get("plain_steps"):
        print("plain decode step (s) by batch = verify(T) of the table model: " +
              ", ".join(f"{b}: {t:.4f}" for b, t in sorted(res["plain_steps"].items(), key=lambda x: int(x[0]))))
    print(f"calibrated on k in {res['fit_ks']}; costs of the table model in spec_speed_*_costs_*.json")
    print("predicted: costs fitted on the fit ks + acceptance of the largest fit k at the same b (geometric tail);\n"
          "pred. w/ arm AL: the same costs with this arm's measured tokens per round and proposed tokens (cost model alone)")
    print_table(["model", "b", "k", "fit?", "measured", "predicted", "error", "pred. w/ arm AL", "error"],
                [[m.get("model", "linear"), m["b"], m["k"], "fit" if m["fitted"] else "-", m["measured"], m["predicted"],
                  f"{m['error']:+.1%}", m["predicted_with_arm_al"], f"{m['error_with_arm_al']:+.1%}"]
                 for m in res["model_check"]])
    for model in ("table", "linear"):
        for key, what in (("error", "full prediction"), ("error_with_arm_al", "cost model with the arm's AL")):
            held = [abs(m[key]) for m in res["model_check"] if not m["fitted"] and m.get("model", "linear") == model]
            if held:
                by = {(x["b"], x["k"]): x for x in res["summary"]}
                pk = "predicted" if key == "error" else "predicted_with_arm_al"
                rows = [m for m in res["model_check"] if not m["fitted"] and m.get("model", "linear") == model]
                spread = sum(by[(m["b"], m["k"])]["speedup_min"] * 0.999 <= m[pk] <= by[(m["b"], m["k"])]["speedup_max"] * 1.001
                             for m in rows)
                print(f"{model} model, held-out configs, {what}: median |error| {statistics.median(held):.1%}, "
                      f"max {max(held):.1%}, within 10%: {sum(e <= 0.10 for e in held)}/{len(held)}, "
                      f"inside the measured [min, max] over rounds: {spread}/{len(rows)}")
    if res["rollout_seconds"]:
        base = statistics.median(res["rollout_seconds"]["k=0"])
        print(f"tapering rollout ({len(res['rollout_lengths'])} requests), chosen schedule {res['schedule']}")
        al = res.get("rollout_al", {})
        print_table(["arm", "seconds (median)", "range", "speed-up", "predicted speed-up", "error", "AL"],
                    [[a, statistics.median(t), f"[{min(t):.2f}, {max(t):.2f}]", base / statistics.median(t),
                      res["rollout_predicted_s"]["k=0"] / res["rollout_predicted_s"][a],
                      f"{res['rollout_predicted_s']['k=0'] / res['rollout_predicted_s'][a] * statistics.median(t) / base - 1:+.1%}",
                      al.get(a, float("nan"))]
                     for a, t in res["rollout_seconds"].items()])
        fixed = {a: statistics.median(t) for a, t in res["rollout_seconds"].items() if a.startswith("k=") and a != "k=0"}
        best = min(fixed, key=fixed.get)
        print(f"chosen vs best fixed ({best}): {fixed[best] / statistics.median(res['rollout_seconds']['chosen']):.3f}x; "
              f"pilot acceptance {res.get('rollout_pilot_acceptance')}")
        if res.get("rollout_no_spec_engine_s"):
            ns = statistics.median(res["rollout_no_spec_engine_s"])
            print(f"no-spec ENGINE (not interleaved): {ns:.2f}s = {ns / base:.2f} x the spec engine's k=0 arm; "
                  f"best fixed k vs no-spec engine {ns / fixed[best]:.2f}x")


def plot(results: dict, path: Path) -> None:
    """Measured (solid, min-max band) vs predicted (dashed, table model) speed-up by batch size, a line per k."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, (method, res) in zip(axes[0], results.items()):
        pred = {(m["b"], m["k"]): m["predicted"] for m in res["model_check"] if m.get("model", "table") == "table"}
        ks = sorted({s["k"] for s in res["summary"] if s["k"]})
        for i, k in enumerate(ks):
            rows = sorted((s for s in res["summary"] if s["k"] == k), key=lambda s: s["b"])
            bs = [s["b"] for s in rows]
            c = f"C{i}"
            ax.plot(bs, [s["speedup"] for s in rows], "-o", color=c, label=f"k={k} measured")
            ax.fill_between(bs, [s["speedup_min"] for s in rows], [s["speedup_max"] for s in rows], color=c, alpha=0.12)
            ax.plot(bs, [pred.get((b, k), float("nan")) for b in bs], "--", color=c)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequences in the batch")
        ax.set_ylabel("speed-up over k=0 (dashed: model, fitted on k=1,3)")
        ax.set_title(f"{method}: where speculation pays")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", choices=["heavy", "toy"], default="heavy")
    ap.add_argument("--batches", type=_ints, default=[1, 2, 4, 8, 16])
    ap.add_argument("--ks", type=_ints, default=[1, 2, 3, 5])
    ap.add_argument("--fit-ks", type=_ints, default=[1, 3], help="ks the cost model is calibrated on")
    ap.add_argument("--calib-batches", type=_ints, default=None,
                    help="plain-only batch sizes measuring verify(T) past the sweep (default: up to max(b) * (max(k)+1))")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                    help="cpu = this process's CPU seconds (robust on a shared machine; vLLM runs in-process, 1 thread)")
    ap.add_argument("--max-tokens", type=int, default=16, help="tokens per request in the sweep (<= the trained 64)")
    ap.add_argument("--methods", default="eagle3,ngram")
    ap.add_argument("--rollout-requests", type=int, default=16, help="0 = skip the tapering-rollout comparison")
    ap.add_argument("--from-json", help="re-analyse the rows of an earlier run's JSON (explicit reuse: measures nothing)")
    ap.add_argument("--toy-trajectory", action="store_true", help="also measure a toy policy rollout's trajectory")
    args = ap.parse_args()
    if args.calib_batches is None:
        top = max(args.batches) * (max(args.ks) + 1)
        args.calib_batches = [b for b in (48, 64, 96, 128, 192, 256, 384, 512) if max(args.batches) < b <= top]
    global CLOCK
    CLOCK = args.clock
    t0 = time.time()
    if args.from_json:
        old = json.loads(Path(args.from_json).read_text())
        for key in ("batches", "ks", "max_tokens", "rounds", "methods", "target", "clock", "calib_batches"):
            setattr(args, key, old["args"].get(key, []))
        CLOCK = args.clock
        redone = {m: reanalyse(m, res, args) for m, res in old["methods"].items()}
        for m, res in redone.items():
            report(m, res)
        plot(redone, Path(args.from_json).with_suffix(".png"))
        return
    if args.target == "toy":  # the toy policy and its EAGLE-3 draft: a verifier too cheap to dominate
        base, build_info, prompts = _toy_base()
    else:
        base = build(HeavyConfig())
        build_info = json.loads((base / "build.json").read_text())
        prompts = json.loads((base / "prompts.json").read_text())
    toy = toy_trajectory(64) if args.toy_trajectory else None
    n = args.rollout_requests
    if toy and n:  # the toy rollout's length profile, scaled to the lengths the draft was trained on
        srt = sorted(toy["lengths"])
        lengths = [max(2, round(srt[int(i * (len(srt) - 1) / max(n - 1, 1))] * 40 / max(srt))) for i in range(n)]
    else:
        lengths = [max(2, round(40 * (i + 1) / n)) for i in range(n)] if n else []
    results = {m: run_method(m, base, prompts, args, lengths) for m in args.methods.split(",")}
    for m, res in results.items():
        report(m, res)
        out = Path(__file__).resolve().parent / "results" / f"spec_speed_{args.target}_costs_{m}.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(res["costs"], indent=1))  # rollout.k_costs of the GRPO recipe
    if toy:
        tr = toy["trajectory"]
        print(f"\ntoy rollout (32 prompts x 8, T=1, max_num_seqs 64): {len(tr)} decode steps; alive at 0/25/50/75/90% "
              f"of steps: {[tr[int(f * (len(tr) - 1))] for f in (0, .25, .5, .75, .9)]}; "
              f"share of steps with <= 8 alive: {sum(b <= 8 for b in tr) / len(tr):.0%}")
    print(f"\nwall {time.time() - t0:.0f}s, load average {os.getloadavg()}; machine shared with other sessions")
    plot(results, Path(__file__).resolve().parent / "results" / f"spec_speed_{args.target}_{args.methods.replace(',', '-')}.png")
    write_json(f"spec_speed_{args.target}_{args.methods.replace(',', '-')}", {"args": vars(args), "heavy": build_info, "methods": results, "toy_trajectory": toy,
                              "greedy": True, "clock": CLOCK, "measured_on": "training prompts (a random target does not generalise)",
                              "threads": os.environ.get("OMP_NUM_THREADS"), "load_end": os.getloadavg()})


if __name__ == "__main__":
    main()
