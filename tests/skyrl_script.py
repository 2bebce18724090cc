"""Run by tests/test_skyrl.py with the SkyRL environment's Python (.venv-skyrl, `make setup-skyrl`):
draftadapt's SkyRL adapter on SkyRL 0.4.0's own classes, tiny random llama policy, CPU.

Real SkyRL code exercised: `FSDPPolicyWorkerBase.forward` -> `PolicyWorkerBase._forward_micro_batch`
-> `HFModelWrapper.forward` (the policy log-prob recompute, with its in-place temperature divide),
`RayPPOTrainer._fire` + SkyRL's `CallbackHandler` (how `on_step_end` reaches callbacks) and
`WorkerDispatch.save_weights_for_sampler` (the weight-sync entry point, non-colocated path:
pause generation, broadcast from the policy workers, resume, bump the weight version).
Stand-ins (recording only): the Ray actor group of policy workers (its `broadcast_to_inference_engines`
needs NCCL/CUDA-IPC senders) and the inference-engine client (SkyRL's vLLM HTTP servers).
Python 3.11 shims (SkyRL 0.4.0 declares >= 3.12), each the minimum to import and run on CPU:
- pydantic refuses `typing.TypedDict` on Python < 3.12 (skyrl/tinker/types.py::RenderedModelInput):
  typing.TypedDict is pointed at typing_extensions.TypedDict before SkyRL is imported;
- `flash_attn.bert_padding` (imported at the top of model_wrapper.py; flash-attn builds with CUDA
  only): a module whose two functions raise if called - they are only used with
  remove_microbatch_padding, which stays off;
- `torch.cuda.current_device()` (where `_forward_micro_batch` moves the micro-batch) returns "cpu".
Prints one line `SKYRL_RESULT {json}`; any failed check raises (exit code 1).
"""
from __future__ import annotations

import asyncio
import importlib.machinery
import inspect
import json
import sys
import time
import types
import typing

import typing_extensions

typing.TypedDict = typing_extensions.TypedDict
_fa, _bp = types.ModuleType("flash_attn"), types.ModuleType("flash_attn.bert_padding")
_fa.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
_bp.__spec__ = importlib.machinery.ModuleSpec("flash_attn.bert_padding", None)


def _no_flash_attn(*args, **kwargs):
    raise RuntimeError("flash-attn is not installed here (CUDA only): keep remove_microbatch_padding off")


_bp.pad_input = _bp.unpad_input = _no_flash_attn
_fa.bert_padding = _bp
sys.modules.update({"flash_attn": _fa, "flash_attn.bert_padding": _bp})

import torch  # noqa: E402

torch.cuda.current_device = lambda: "cpu"

import ray  # noqa: E402
from skyrl.backends.skyrl_train.training_batch import TrainingInputBatch  # noqa: E402
from skyrl.backends.skyrl_train.workers.fsdp.fsdp_worker import FSDPPolicyWorkerBase  # noqa: E402
from skyrl.backends.skyrl_train.workers.model_wrapper import HFModelWrapper  # noqa: E402
from skyrl.backends.skyrl_train.workers.worker_dispatch import WorkerDispatch  # noqa: E402
from skyrl.train.config import SkyRLTrainConfig  # noqa: E402
from skyrl.train.trainer import RayPPOTrainer  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

from draftadapt.adapter import AdapterConfig, DraftAdapter  # noqa: E402
from draftadapt.cache import CacheConfig  # noqa: E402
from draftadapt.drafts.eagle3 import Eagle3Draft  # noqa: E402
from draftadapt.integrations.skyrl import attach  # noqa: E402
from draftadapt.trainer import TrainerConfig  # noqa: E402

EVENTS: list[str] = []  # the order things happened in, across SkyRL's sync and draftadapt's push


class PolicyActorGroup:
    """Stands in for SkyRL's PPORayActorGroup of FSDP policy workers: records the method the
    dispatch runs on them and returns what Ray would (an ObjectRef per worker)."""

    actor_infos: list = []

    def async_run_ray_method(self, dispatch_type, method_name, *args, **kwargs):
        EVENTS.append(method_name)
        return [ray.put(None)]


class EngineClient:
    """Stands in for SkyRL's RemoteInferenceClient (vLLM HTTP servers): records the calls."""

    def __getattr__(self, name):
        async def call(*args, **kwargs):
            EVENTS.append(name)
        if name == "increment_weight_version":
            return lambda: EVENTS.append(name)
        return call


class RecordingSink:
    """The adapter's push target (an EngineSwapper / RemoteEngine in a real run): records pushes."""

    def __init__(self):
        self.pushes: list[tuple[int, dict]] = []

    def push_draft(self, state, version):
        EVENTS.append(f"push_draft:{version}")
        self.pushes.append((version, {k: v.clone() for k, v in state.items()}))
        return types.SimpleNamespace(pushed=True, skipped_reason=None)

    def spec_counters(self):
        from draftadapt.metrics import SpecCounters
        return SpecCounters()


def tiny_policy():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1147, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(config).eval()


def rollout_batch(gen: torch.Generator, batch: int = 4, prompt: int = 6, response: int = 10) -> TrainingInputBatch:
    """SkyRL's forward input: left-padded prompts + right-padded responses, `response_length` in metadata."""
    ids = torch.randint(3, 1147, (batch, prompt + response), generator=gen)
    am = torch.ones_like(ids)
    for b in range(batch):
        am[b, : b % 3] = 0  # left padding of the prompt
        am[b, prompt + response - (b % 4):] = 0  # right padding of the response
    ids[am == 0] = 0
    data = TrainingInputBatch({"sequences": ids, "attention_mask": am})
    data.metadata = {"response_length": response}
    return data


def logprobs(worker, data) -> torch.Tensor:
    out = worker.forward(data)  # SkyRL's policy worker forward, the inference (old log-prob) path
    return torch.tensor([row["logprobs"] for row in out.loss_fn_outputs])


def check_teacher(batches, data, policy, vocab, temperature) -> tuple[int, float]:
    """Every captured window's teacher equals log_softmax of the policy's raw logits (NOT divided by the
    sampling temperature, as SkyRL's forward does in place) at the draft vocab, at the same sequence
    and position. The teacher is rebuilt from the final hidden state, stored in the draft's hidden
    dtype (bf16): equal to 1e-2; the temperature-scaled log-probs are off by far more (checked).
    Returns (rows checked, max abs error)."""
    ids, am = data["sequences"], data["attention_mask"]
    pos = (am.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = policy(ids, attention_mask=am, position_ids=pos).logits.float()
    refs = [torch.log_softmax(x, -1) for x in (logits, logits / temperature)]
    real = [(ids[b][am[b].bool()], [r[b][am[b].bool()] for r in refs]) for b in range(ids.shape[0])]
    checked, err, err_scaled = 0, 0.0, 0.0
    for batch in batches:
        for s in batch.sequences():
            p = s.positions
            owner = [b for b, (tok, _) in enumerate(real) if len(tok) > p.max() and torch.equal(tok[p], s.input_ids)]
            assert len(owner) == 1, f"window at positions {p.tolist()} matches sequences {owner}"
            m = s.loss_mask
            want, scaled = (r[p] if vocab is None else r[p][:, vocab] for r in real[owner[0]][1])
            got = s.teacher_logprobs[m].float()
            err = max(err, float((got - want[m]).abs().max()))
            err_scaled = max(err_scaled, float((got - scaled[m]).abs().max()))
            checked += int(m.sum())
    assert checked > 0 and err < 1e-2, f"teacher off by {err} from the policy's log-probs ({checked} rows)"
    assert err_scaled > 0.1, f"the test cannot tell the temperature-scaled teacher apart (off by {err_scaled})"
    return checked, err


def main():
    t_start = time.perf_counter()
    # the premise: SkyRL's train() fires on_step_end BEFORE the step's weight sync
    src = inspect.getsource(RayPPOTrainer.train)
    fire, sync = src.index('self._fire("on_step_end"'), src.index("await self.dispatch.save_weights_for_sampler()", 
                                                                       src.index('self._fire("on_step_end"'))
    assert fire < sync, "SkyRL's train() no longer fires on_step_end before the weight sync: revisit the adapter"

    cfg = SkyRLTrainConfig()
    cfg.trainer.placement.colocate_all = False
    cfg.trainer.micro_forward_batch_size_per_gpu = 2
    cfg.trainer.algorithm.temperature = 0.7  # HFModelWrapper divides the logits by it in place

    policy = tiny_policy()
    worker = FSDPPolicyWorkerBase.__new__(FSDPPolicyWorkerBase)  # the Ray actor's body, without Ray/FSDP init
    worker.cfg = cfg.trainer
    worker.model = HFModelWrapper(policy, bf16=False)

    gen = torch.Generator().manual_seed(0)
    steps = [rollout_batch(gen) for _ in range(2)]
    plain = [logprobs(worker, d) for d in steps]  # before draftadapt is attached

    torch.manual_seed(1)
    draft = Eagle3Draft.from_target(policy.config, target_head=policy.lm_head.weight)
    draft0 = {k: v.clone() for k, v in draft.state_dict().items()}
    sink = RecordingSink()
    adapter = DraftAdapter(draft, policy.get_input_embeddings(),
                           AdapterConfig(train_steps=2, batch_tokens=128, min_tokens=1, acceptance_drop=None),
                           TrainerConfig(lr=3e-3), CacheConfig(max_tokens=50_000), sink=sink)

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        client = EngineClient()
        trainer = RayPPOTrainer(cfg, tracker=None, tokenizer=None, train_dataset=None, inference_engine_client=client,
                                generator=None)
        trainer.dispatch = WorkerDispatch(cfg, policy_actor_group=PolicyActorGroup(), inference_engine_client=client)

        captured = []  # a copy of each batch attach's capture hands to adapter.on_rollouts, for the teacher check
        on_rollouts = adapter.on_rollouts
        adapter.on_rollouts = lambda batch, *a, **k: (captured.append(batch), on_rollouts(batch, *a, **k))[1]
        callback = attach(trainer, adapter, policy_worker=worker)
        capture_fn = worker._forward_micro_batch

        asyncio.run(trainer.dispatch.save_weights_for_sampler())  # train start: policy 0, ends no step
        assert not callback.history and not sink.pushes, "the initial sync ran draftadapt's on_step_end"
        teacher_rows, teacher_err, per_step = 0, 0.0, []
        for n, data in enumerate(steps, start=1):
            trainer.global_step = n
            first = len(captured)
            lp = logprobs(worker, data)  # fwd_logprobs_values_reward's policy forward, under capture
            assert torch.equal(lp, plain[n - 1]), f"step {n}: capture changed SkyRL's log-probs"
            assert len(captured) - first == 2, f"step {n}: {len(captured) - first} micro-batches captured, expected 2"
            assert {b.policy_version for b in captured[first:]} == {n - 1}
            rows, e = check_teacher(captured[first:], data, policy, adapter.features.draft_vocab_ids,
                                    cfg.trainer.algorithm.temperature)
            teacher_rows, teacher_err = teacher_rows + rows, max(teacher_err, e)
            mark = len(EVENTS)
            trainer._fire("on_step_end", batch=None, metrics={})  # SkyRL's own step-end event (before the sync)
            assert len(callback.history) == n - 1 and len(sink.pushes) == n - 1, \
                f"step {n}: draftadapt trained/pushed at SkyRL's on_step_end, before the weight sync"
            asyncio.run(trainer.dispatch.save_weights_for_sampler())  # step 10 of train(): the policy sync
            step_events = EVENTS[mark:]
            per_step.append(step_events)
            assert len(callback.history) == n, f"step {n}: no on_step_end after the weight sync"
            b, r, p = (step_events.index(e) for e in ("broadcast_to_inference_engines", "resume_generation",
                                                      f"push_draft:{n}"))
            assert b < r < p, f"step {n}: events {step_events}: the draft must be pushed after the sync"
        assert worker._forward_micro_batch is capture_fn
    finally:
        ray.shutdown()

    h = callback.history
    assert [s.policy_version for s in h] == [1, 2]
    for s in h:
        assert s.train is not None and s.train.tokens > 0 and torch.isfinite(torch.tensor(s.train.loss)), \
            s.train_skipped_reason
        assert s.pushed and s.push_reason == "cadence", s.push_reason
    info = adapter.worker.cache_info()
    assert (info.oldest_version, info.newest_version) == (0, 1) and info.tokens > 0
    assert [v for v, _ in sink.pushes] == [1, 2]
    changed = sorted(k for k, v in sink.pushes[-1][1].items() if not torch.equal(v, draft0[k]))
    assert "fc.weight" in changed and "midlayer.self_attn.q_proj.weight" in changed, changed
    print("SKYRL_RESULT " + json.dumps({
        "teacher_rows_checked": teacher_rows, "teacher_max_abs_err": teacher_err, "captured_tokens": callback.tally["tokens"],
        "capture_seconds": round(callback.tally["seconds"], 4), "losses": [s.train.loss for s in h],
        "cache_tokens": info.tokens, "step_events": per_step, "changed_tensors": len(changed),
        "seconds": round(time.perf_counter() - t_start, 1)}))


if __name__ == "__main__":
    main()
