"""GPU checks of issue 17, run as a script (spawn-safe): `python tests/gpu_engine_script.py OUT.json [TP]`.

A tiny random bf16 Llama target with random EAGLE-3 drafts on a CUDA vLLM 0.32 engine started with
`weight_transfer_config={"backend": "ipc"}` and sleep mode: draft pushes over vLLM's native CUDA
IPC transfer (verified on every rank), the real `sleep(level=2)` / `wake_up()` lifecycle (a push
made while asleep is deferred; at wake-up the policy and the latest draft are restored and
checked), greedy outputs equal before sleep and after wake. Written from vLLM's source on a
machine without a GPU: see tests/test_gpu_engine.py.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch


def main(out: str, tp: int = 1) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from draftadapt.checkpoint import draft_state_for_push, save_eagle3
    from draftadapt.drafts.eagle3 import Eagle3Draft
    from draftadapt.engine.swap import EngineSwapper
    from draftadapt.engine.vllm import Engine, EngineConfig, SpecConfig
    from draftadapt.toy.tokenizer import save_tokenizer

    root = Path(tempfile.mkdtemp(prefix="gpu-checks-"))
    cfg = LlamaConfig(vocab_size=1147, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, torch_dtype="bfloat16")
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(root / "target", safe_serialization=True)
    save_tokenizer(root / "target")
    drafts = []
    for seed in range(4):
        torch.manual_seed(seed)
        drafts.append(Eagle3Draft.from_target(cfg, aux_layer_ids=(1, 2, 3)).to(torch.bfloat16))
    draft_dir = save_eagle3(drafts[0], root / "draft", cfg)
    states = [draft_state_for_push(d) for d in drafts]
    ecfg = EngineConfig(model=str(root / "target"), spec=SpecConfig("eagle3", 3, model=str(draft_dir)),
                        multiprocessing=True, tensor_parallel_size=tp, gpu_memory_utilization=0.3,
                        extra={"weight_transfer_config": {"backend": "ipc"}, "enable_sleep_mode": True})
    rec: dict = {"tp": tp}
    prompts = [[1, 5, 6, 7], [1, 9, 10, 11, 12]]
    with Engine(ecfg) as engine:
        swapper = EngineSwapper(engine, transport="native")  # opt-in: auto is in-place until a GPU run verifies it
        rec["transport"], rec["native"] = swapper.transport, list(swapper.native_draft_update)

        def checks(kind="draft"):
            return [{k: c[k] for k in ("rank", "version", "ok", "problem")}
                    for c in engine.collective_rpc("draftadapt_check", kwargs=dict(kind=kind, verify="full"))]

        r1 = swapper.push_draft(states[1], 1)
        r2 = swapper.push_draft(states[2], 2, verify="full")
        rec["pushes"] = [dict(verified=r.verified, seconds=r.seconds) for r in (r1, r2)]
        rec["checks_after_push"] = checks()
        rec["refit"] = swapper.refit_policy(str(root / "target"), 1).verified
        greedy = lambda: [o[0].token_ids for o in engine.generate(prompts, temperature=0.0, max_tokens=16)]  # noqa: E731
        rec["greedy_before"] = greedy()
        swapper.sleep(level=2)
        rec["sleeping"] = engine.is_sleeping()
        r3 = swapper.push_draft(states[3], 3)
        rec["deferred"] = (not r3.pushed) and "deferred" in (r3.skipped_reason or "")
        rec["wake_report"] = swapper.wake_up()
        rec["draft_version_after_wake"] = swapper.draft_version
        rec["checks_after_wake"] = checks()
        rec["policy_checks_after_wake"] = checks("policy")
        rec["greedy_after"] = greedy()
    Path(out).write_text(json.dumps(rec))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1)
