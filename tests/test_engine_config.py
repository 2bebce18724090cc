"""EngineConfig: fast CPU defaults here, GPU-ready settings elsewhere (no engine started)."""
import json

import pytest


def _ckpt(tmp_path, dtype):
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": dtype} if dtype else {}))
    return str(tmp_path)


def test_cpu_defaults_stay_the_fast_test_settings(tmp_path):
    from draftadapt.engine.vllm import EngineConfig

    got = EngineConfig(model=_ckpt(tmp_path, "bfloat16")).resolved(cpu=True)
    assert got == dict(dtype="float32", max_model_len=512, max_num_seqs=32, enforce_eager=True, tensor_parallel_size=1)


@pytest.mark.parametrize("stored, served", [("float32", "bfloat16"), ("float16", "float16"), ("bfloat16", "bfloat16"),
                                            (None, "bfloat16")])
def test_gpu_settings_take_the_checkpoint_dtype_and_vllm_defaults(tmp_path, stored, served):
    from draftadapt.engine.vllm import EngineConfig

    got = EngineConfig(model=_ckpt(tmp_path, stored), tensor_parallel_size=4, multiprocessing=True,
                       gpu_memory_utilization=0.5).resolved(cpu=False)
    assert got == dict(dtype=served, enforce_eager=False, tensor_parallel_size=4, gpu_memory_utilization=0.5), \
        "max_model_len and max_num_seqs must be left to vLLM (the model config / its batch defaults)"
    given = EngineConfig(model=_ckpt(tmp_path, stored), dtype="float32", max_model_len=4096, max_num_seqs=256,
                         enforce_eager=True).resolved(cpu=False)
    assert (given["dtype"], given["max_model_len"], given["max_num_seqs"], given["enforce_eager"]) == \
        ("float32", 4096, 256, True)


def test_tensor_parallel_needs_multiprocessing(tmp_path):
    from draftadapt.engine.vllm import EngineConfig

    with pytest.raises(ValueError, match="multiprocessing=True"):
        EngineConfig(model=_ckpt(tmp_path, None), tensor_parallel_size=2)
