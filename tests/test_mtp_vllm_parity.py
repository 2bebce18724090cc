"""[N] MTP parity with vLLM's own module: our exported MTP layer, loaded into vLLM 0.32's `MiMoMTP`
(`vllm/model_executor/models/mimo_mtp.py`, built as the engine's proposer builds it), gives the same
logits as `MTPDraft` + `ttt.unroll` for every draft step vLLM runs.

The export is a real MiMo checkpoint written by `toy.mtp.write_mimo` (trunk + `mtp_state_for_push`),
read back from disk through `MiMoMTP.load_weights` (which must consume every tensor of the layer).
Only vLLM's paged-attention backend is swapped for a plain cached causal SDPA (the CPU backend needs
a scheduler's metadata); its projections, rotary embedding, fused norms, MLP, weight mapping and
logits processor are vLLM's. Draft steps as the proposer runs them: step 1 over positions 0..b
(token i+1 at position i, the target's pre-norm state), steps 2-3 one position each, fed back the
step before's output (post final_layernorm), always MTP layer 0 (spec_step_idx 0).
Tolerance: max |vLLM - ours| < 1e-4 on fp32 logits of magnitude ~1-10 (same argmax everywhere).
Runs in a subprocess: vLLM's distributed state is process-global (~15 s).
"""
import textwrap

import pytest

from conftest import require
from vllm_parity_helpers import run_parity_script

SCRIPT = textwrap.dedent("""
    import socket, sys
    from pathlib import Path
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    sys.path.insert(0, sys.argv[1])
    from vllm_parity_helpers import CachedCausalAttention
    from conftest import tiny_model
    from draftadapt.capture import FeatureCapture
    from draftadapt.drafts.mtp import MTPDraft, mtp_state_for_push
    from draftadapt.toy.mtp import mimo_config, qwen2_trunk, write_mimo
    from draftadapt.toy.tokenizer import save_tokenizer
    from draftadapt.ttt import unroll
    from vllm.config import ModelConfig, ParallelConfig, SpeculativeConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.model_executor.model_loader.utils import process_weights_after_loading
    from vllm.model_executor.models.mimo_mtp import MiMoMTP

    work, T, L = Path(sys.argv[2]), 20, 2
    # 1) a MiMo policy (a Llama converted exactly) with a random, far-from-identity MTP layer, exported
    llama = tiny_model("llama", layers=L, hidden=128)  # head_dim 32 (CPU attention rejects 16)
    with torch.no_grad():
        llama.lm_head.weight.mul_(5)
    cfg = mimo_config(llama.config.to_dict(), num_mtp_layers=1)
    save_tokenizer(work / "tok")
    policy = AutoModelForCausalLM.from_pretrained(
        write_mimo(work / "tmp", cfg, qwen2_trunk(llama.state_dict(), L), {}, work / "tok").model_dir).eval()
    draft = MTPDraft.from_target(policy.config, policy.lm_head)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in draft.named_parameters():
            p.copy_((1.0 if name.endswith("layernorm.weight") else 0.0) + 0.15 * torch.randn(p.shape, generator=g))
    mimo = write_mimo(work / "mimo", cfg, qwen2_trunk(llama.state_dict(), L), mtp_state_for_push(draft), work / "tok")
    # 2) ours: capture the pre-norm state, unroll 3 draft steps
    ids = torch.randint(3, cfg["vocab_size"], (1, T), generator=g)
    with FeatureCapture(policy, aux_layer_ids=(), final_prenorm=True) as cap, torch.no_grad():
        policy(input_ids=ids)
    batch = cap.rollout_batch(input_ids=ids).to_draft_batch()
    with torch.no_grad():
        ours = unroll(draft, batch, policy.get_input_embeddings(), 3)  # 3 x [1, T, V]
    # 3) vLLM's module, from the exported checkpoint on disk
    mc = ModelConfig(model=str(mimo.model_dir), tokenizer=str(mimo.tokenizer_dir), skip_tokenizer_init=True,
                     dtype="float32", max_model_len=256, enforce_eager=True)
    pc = ParallelConfig()
    sc = SpeculativeConfig(method="mtp", num_speculative_tokens=3, target_model_config=mc,
                           target_parallel_config=pc)
    vc = VllmConfig(model_config=mc, speculative_config=sc, parallel_config=pc)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with set_current_vllm_config(vc), torch.no_grad():
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{port}")
        initialize_model_parallel(1, 1)
        model = MiMoMTP(vllm_config=vc)
        tensors = load_file(str(mimo.model_dir / "model.safetensors"))
        loaded = model.load_weights(tensors.items())
        unloaded = sorted(n for n, _ in model.named_parameters() if n not in loaded)
        assert not unloaded, f"vLLM's MiMoMTP left parameters unloaded from our export: {unloaded}"
        process_weights_after_loading(model, mc, torch.device("cpu"))
        attn = model.model.mtp_layers[str(L)].mtp_block.self_attn
        worst = 0.0
        for base in (0, 7, T - 4):
            attn.attn = CachedCausalAttention(attn.num_heads, attn.num_kv_heads, attn.head_dim)
            h = batch.final_hidden[0, :base + 1]
            out = model(ids[0, 1:base + 2], torch.arange(base + 1), h)
            got = [model.compute_logits(out[-1:])[0]]
            for k in (2, 3):
                out = model(ids[0, base + k:base + k + 1], torch.tensor([base + k - 1]), out[-1:])
                got.append(model.compute_logits(out)[0])
            for k in range(3):
                want = ours[k][0, base]
                err = (got[k] - want).abs().max().item()
                worst = max(worst, err)
                assert err < 1e-4, f"base {base} step {k + 1}: max |vLLM - ours| = {err}"
                assert int(got[k].argmax()) == int(want.argmax()), f"base {base} step {k + 1}: argmax differs"
                assert want.abs().max() > 1.0, "logits too flat for the comparison to mean anything"
    print(f"MTP PARITY OK max_err={worst:.2e}")
""")


@pytest.mark.vllm
def test_vllms_mimo_mtp_loads_our_export_and_its_draft_steps_equal_ours(tmp_path):
    require("vllm")
    print(run_parity_script(SCRIPT, "MTP PARITY OK", tmp_path))
