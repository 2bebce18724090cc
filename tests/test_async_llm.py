"""vLLM's AsyncLLM (what verl and SkyRL hold in their rollout actors) with the in-process swapper."""
import asyncio
import threading

import pytest
import torch

from conftest import save_tiny

PROMPTS = [[1, 4, 50, 7, 48, 9], [1, 5, 6, 7]]


def _same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.vllm
def test_pushes_into_an_async_llm_are_versioned_verified_and_refused_when_bad(tmp_path):
    from transformers import AutoConfig
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from draftadapt.checkpoint import draft_state_for_push, save_eagle3
    from draftadapt.drafts.eagle3 import Eagle3Draft
    from draftadapt.engine.async_llm import ExternalAsyncLLM
    from draftadapt.engine.swap import EngineSwapper, tensors_from_bytes, tensors_to_bytes

    model_dir, tok_dir = save_tiny("llama", tmp_path, hidden=128, layers=4)
    config = AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(0)
    draft_dir = save_eagle3(Eagle3Draft.from_target(config, aux_layer_ids=(1, 2, 3)), tmp_path / "draft", config)
    args = AsyncEngineArgs(model=str(model_dir), tokenizer=str(tok_dir), dtype="float32", enforce_eager=True,
                           max_model_len=512, max_num_seqs=4, disable_log_stats=False,
                           speculative_config={"method": "eagle3", "model": str(draft_dir),
                                               "num_speculative_tokens": 3},
                           worker_extension_cls="draftadapt.engine.swap_worker.DraftSwapExtension")
    loop = asyncio.new_event_loop()  # the actor's loop, in its own thread
    threading.Thread(target=loop.run_forever, daemon=True).start()
    on_loop = lambda coro: asyncio.run_coroutine_threadsafe(coro, loop).result()  # noqa: E731

    async def start():
        return AsyncLLM.from_engine_args(args)

    async def generate():
        outs = []
        for i, p in enumerate(PROMPTS):
            async for out in llm.generate({"prompt_token_ids": p}, SamplingParams(temperature=0, max_tokens=16,
                                                                                  ignore_eos=True), f"r{i}"):
                pass
            outs.append(list(out.outputs[0].token_ids))
        return outs

    llm = on_loop(start())
    try:
        with pytest.raises(ValueError, match="ExternalAsyncLLM"):
            EngineSwapper(llm)
        engine = ExternalAsyncLLM(llm, loop)
        swapper = EngineSwapper(engine)
        served = lambda: tensors_from_bytes(engine.collective_rpc("draftadapt_state", args=("draft",))[0])  # noqa: E731
        before = on_loop(generate())
        torch.manual_seed(21)
        state = draft_state_for_push(Eagle3Draft.from_target(config, aux_layer_ids=(1, 2, 3)))
        result = swapper.push_draft(state, 1)
        assert result.pushed and result.verified and swapper.draft_version == 1
        assert _same(served(), state), "the AsyncLLM's drafter computes with the pushed weights"
        with pytest.raises(ValueError, match="non-finite"):
            swapper.push_draft({**state, "fc.weight": torch.full_like(state["fc.weight"], float("nan"))}, 2)
        bad_digest = {"kind": "draft", "version": 2, "expected_checksum": "0" * 16, "payload": tensors_to_bytes(state)}
        with pytest.raises(Exception, match="refused draft push of version 2"):  # the worker's own check
            engine.collective_rpc("draftadapt_push", kwargs=bad_digest)
        assert _same(served(), state) and swapper.draft_version == 1, "a refused push leaves the old draft serving"
        c0 = swapper.spec_counters()
        assert on_loop(generate()) == before, "greedy outputs do not depend on the draft"
        delta = swapper.spec_counters() - c0
        assert delta.drafts > 0 and delta.draft_tokens == 3 * delta.drafts, delta

        async def push_on_the_loop():  # the deadlock a blocking push on the serving loop would be
            return swapper.push_draft(state, 3)
        with pytest.raises(RuntimeError, match="deadlocks"):
            on_loop(push_on_the_loop())
    finally:
        llm.shutdown()
        loop.call_soon_threadsafe(loop.stop)
