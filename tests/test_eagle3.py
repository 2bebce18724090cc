"""Eagle3Draft: names vLLM loads, sizes from the target, a forward equal to vLLM's; draft vocab."""
from __future__ import annotations

import math
import textwrap

import pytest
import torch
from conftest import require, tiny_config, tiny_model
from vllm_parity_helpers import run_parity_script

from draftadapt.drafts.eagle3 import Eagle3Draft, apply_rope, default_aux_layer_ids
from draftadapt.drafts.vocab import build_draft_vocab, full_vocab

# What vLLM 0.32's Eagle3LlamaForCausalLM.load_weights consumes (llama_eagle3.py:420-470): names
# without "lm_head" get "model." prepended, LlamaModel's mapper turns "midlayer." into
# "layers.0." and stacks q/k/v -> qkv_proj, gate/up -> gate_up_proj; "d2t" becomes
# draft_id_to_target_id (a parameter only when draft_vocab_size != vocab_size); "t2d" is skipped.
VLLM_EAGLE3_NAMES = {
    "fc.weight", "norm.weight", "lm_head.weight",
    "midlayer.hidden_norm.weight", "midlayer.input_layernorm.weight", "midlayer.post_attention_layernorm.weight",
    "midlayer.self_attn.q_proj.weight", "midlayer.self_attn.k_proj.weight", "midlayer.self_attn.v_proj.weight",
    "midlayer.self_attn.o_proj.weight",
    "midlayer.mlp.gate_proj.weight", "midlayer.mlp.up_proj.weight", "midlayer.mlp.down_proj.weight",
}


def test_parameter_names_and_shapes_are_what_vllm_eagle3_loader_reads():
    target = tiny_config("qwen3", layers=8, hidden=64, vocab=300)
    draft = Eagle3Draft.from_target(target, build_draft_vocab([range(300)], 300, 100))
    params = {n: tuple(p.shape) for n, p in draft.named_parameters()}
    assert set(params) == VLLM_EAGLE3_NAMES, f"unexpected/missing: {set(params) ^ VLLM_EAGLE3_NAMES}"
    h, d = 64, target.head_dim
    assert params["fc.weight"] == (h, 3 * h)
    assert params["midlayer.self_attn.q_proj.weight"] == (4 * d, 2 * h), "q/k/v read [embedding ; hidden] (2H)"
    assert params["midlayer.self_attn.k_proj.weight"] == (2 * d, 2 * h)
    assert params["lm_head.weight"] == (100, h)
    buffers = dict(draft.named_buffers())
    assert buffers["d2t"].dtype == torch.long and buffers["d2t"].shape == (100,)
    assert buffers["t2d"].dtype == torch.bool and buffers["t2d"].shape == (300,)
    assert not any("embed" in n for n in draft.state_dict()), "the target embedding must never be part of the draft"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_from_target_copies_attention_and_rope_sizes(arch):
    cfg = tiny_config(arch, layers=8, hidden=64, vocab=300)
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": 123456.0}
    cfg.rms_norm_eps = 1e-5
    c = Eagle3Draft.from_target(cfg).config
    assert (c.num_attention_heads, c.num_key_value_heads, c.hidden_size) == (4, 2, 64)
    assert c.head_dim == (getattr(cfg, "head_dim", None) or 16)
    assert c.rope_parameters["rope_theta"] == 123456.0 and c.rms_norm_eps == 1e-5
    assert c.intermediate_size == cfg.intermediate_size and c.max_position_embeddings == 512


def test_default_aux_ids_are_vllm_hidden_state_indices():
    assert default_aux_layer_ids(8) == (2, 4, 5)  # outputs of layers 1, 3, 4 = inputs of 2, 4, 5
    assert default_aux_layer_ids(32) == (2, 16, 29)
    with pytest.raises(ValueError, match="not distinct"):
        default_aux_layer_ids(4)  # (2, 2, 1) crashes vLLM


@pytest.mark.parametrize("ids, match", [((2, 2, 5), "distinct"), ((5, 2, 4), "increasing"), ((2, 4, 8), "0..7")])
def test_bad_aux_layer_ids_are_refused(ids, match):
    with pytest.raises(ValueError, match=match):
        Eagle3Draft.from_target(tiny_config("llama", layers=8), aux_layer_ids=ids)


def test_lm_head_starts_from_target_head_rows_at_draft_vocab():
    target = tiny_model("llama", layers=8, hidden=64, vocab=300)
    vocab = build_draft_vocab([[5, 5, 7, 9, 299, 299, 299]], 300, 4)
    draft = Eagle3Draft.from_target(target.config, vocab, target_head=target.lm_head.weight)
    assert draft.target_ids().tolist() == [5, 7, 9, 299]
    assert torch.equal(draft.lm_head.weight, target.lm_head.weight[[5, 7, 9, 299]])


def test_rope_is_neox_style_as_transformers_llama():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = tiny_config("llama", layers=8, hidden=64)
    for rope in ({"rope_type": "default", "rope_theta": 5e5},
                 {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}):
        cfg.rope_parameters = rope
        draft = Eagle3Draft.from_target(cfg)
        x = torch.randn(2, 4, 9, 16)
        pos = torch.randint(0, 500, (2, 9))
        cos, sin = LlamaRotaryEmbedding(cfg)(x, pos)
        want, _ = apply_rotary_pos_emb(x, x, cos, sin)
        torch.testing.assert_close(apply_rope(x, pos, draft.midlayer.inv_freq), want, atol=1e-5, rtol=1e-5)


def reference_step1_logits(draft: Eagle3Draft, embed: torch.Tensor, ids: torch.Tensor, aux: torch.Tensor):
    """Step-1 logits of one sequence written out position by position in float64, from the
    weights alone: [T-1, Vd] (position i reads token i+1, predicts token i+2)."""
    c, w = draft.config, {k: v.double() for k, v in draft.state_dict().items()}
    nh, nkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim

    def rms(x, name):
        return x / torch.sqrt((x * x).mean() + c.rms_norm_eps) * w[name]

    def rot(x, pos):  # x: [heads, d]; pairs (j, j + d/2) turn by pos * theta^(-2j/d)
        ang = pos * c.rope_parameters["rope_theta"] ** (-torch.arange(d // 2, dtype=torch.float64) * 2 / d)
        a, b = x[:, : d // 2], x[:, d // 2:]
        return torch.cat([a * ang.cos() - b * ang.sin(), b * ang.cos() + a * ang.sin()], dim=-1)

    hidden = aux.double() @ w["fc.weight"].T
    qs, ks, vs = [], [], []
    for i in range(len(ids) - 1):
        x = torch.cat([rms(embed[ids[i + 1]].double(), "midlayer.input_layernorm.weight"),
                       rms(hidden[i], "midlayer.hidden_norm.weight")])
        qs.append(rot((w["midlayer.self_attn.q_proj.weight"] @ x).view(nh, d), i))
        ks.append(rot((w["midlayer.self_attn.k_proj.weight"] @ x).view(nkv, d), i))
        vs.append((w["midlayer.self_attn.v_proj.weight"] @ x).view(nkv, d))
    out = []
    for i in range(len(qs)):
        heads = []
        for hq in range(nh):
            kv = hq // (nh // nkv)
            scores = torch.stack([qs[i][hq] @ ks[j][kv] for j in range(i + 1)]) / math.sqrt(d)
            heads.append(sum(p * vs[j][kv] for j, p in enumerate(scores.softmax(0))))
        h = w["midlayer.self_attn.o_proj.weight"] @ torch.cat(heads) + hidden[i]
        r = rms(h, "midlayer.post_attention_layernorm.weight")
        mlp = w["midlayer.mlp.down_proj.weight"] @ (torch.nn.functional.silu(w["midlayer.mlp.gate_proj.weight"] @ r)
                                                     * (w["midlayer.mlp.up_proj.weight"] @ r))
        out.append(w["lm_head.weight"] @ rms(h + mlp, "norm.weight"))
    return torch.stack(out)


def test_step1_forward_matches_position_by_position_reference():
    target = tiny_model("qwen3", layers=8, hidden=64, vocab=300)
    draft = Eagle3Draft.from_target(target.config, build_draft_vocab([range(0, 300, 2)], 300, 150))
    draft._init_weights(std=0.15)
    ids, aux, embed = torch.randint(0, 300, (12,)), torch.randn(12, 3 * 64), target.get_input_embeddings().weight
    t = len(ids) - 1
    with torch.no_grad():
        pre = draft(embed[ids[1:]][None], draft.fuse(aux[None, :t]), torch.arange(t)[None],
                    torch.ones(t, t, dtype=torch.bool).tril()[None])
        got = draft.logits(pre)[0]
    torch.testing.assert_close(got.double(), reference_step1_logits(draft, embed, ids, aux), atol=2e-4, rtol=1e-4)


# Runs in a subprocess: it builds vLLM's own Eagle3LlamaForCausalLM from our checkpoint (vLLM's
# config parsing + load_weights), swaps only the paged-attention kernel for a cached causal one,
# and replays vLLM's proposer sequence (first pass over 0..i, then steps on the own pre-norm
# state at positions i+1, i+2) against our TTT unroll.
VLLM_PARITY = textwrap.dedent("""
    import socket, sys
    from pathlib import Path
    import torch
    from transformers import AutoModelForCausalLM
    sys.path.insert(0, sys.argv[1])
    from vllm_parity_helpers import CachedCausalAttention
    from conftest import tiny_config
    from draftadapt.batch import DraftBatch
    from draftadapt.checkpoint import draft_state_for_push, save_eagle3
    from draftadapt.drafts.eagle3 import Eagle3Draft
    from draftadapt.drafts.vocab import build_draft_vocab
    from draftadapt.ttt import unroll
    from vllm.config import ModelConfig, ParallelConfig, SpeculativeConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.model_executor.model_loader.utils import process_weights_after_loading
    from vllm.model_executor.models.llama_eagle3 import Eagle3LlamaForCausalLM

    work, V, T = Path(sys.argv[2]), 300, 20
    cfg = tiny_config("llama", layers=8, hidden=64, vocab=V)
    cfg.head_dim, cfg.rope_parameters = 32, {"rope_type": "default", "rope_theta": 5e5}
    torch.manual_seed(0)
    target = AutoModelForCausalLM.from_config(cfg).eval()
    target.save_pretrained(work / "target")
    mc = ModelConfig(model=str(work / "target"), skip_tokenizer_init=True, dtype="float32", max_model_len=256,
                     enforce_eager=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for vd, nbr in ((100, False), (V, True)):
        vocab = build_draft_vocab([torch.randint(0, V, (2000,))], V, vd) if vd < V else None
        draft = Eagle3Draft.from_target(cfg, vocab, norm_before_residual=nbr)
        draft._init_weights(std=0.2)
        for name, p in draft.named_parameters():
            if name.endswith("norm.weight"):
                torch.nn.init.uniform_(p, 0.5, 1.5)
        out = save_eagle3(draft, work / f"draft{vd}", cfg)
        ids, aux = torch.randint(0, V, (1, T)), torch.randn(1, T, 3 * 64)
        ones = torch.ones(1, T, dtype=torch.bool)
        with torch.no_grad():
            batch = DraftBatch(ids, aux, torch.zeros(1, T, vd), ones, ones)
            ours = unroll(draft, batch, target.get_input_embeddings(), 3)
        pc = ParallelConfig()
        sc = SpeculativeConfig(method="eagle3", model=str(out), num_speculative_tokens=3, target_model_config=mc,
                               target_parallel_config=pc)
        vc = VllmConfig(model_config=mc, speculative_config=sc, parallel_config=pc)
        with set_current_vllm_config(vc), torch.no_grad():
            if vd < V:  # first round: a one-process "distributed" world, as a worker has
                init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                             distributed_init_method=f"tcp://127.0.0.1:{port}")
                initialize_model_parallel(1, 1)
            model = Eagle3LlamaForCausalLM(vllm_config=vc)
            model.load_weights(draft_state_for_push(draft).items())
            assert (model.draft_id_to_target_id is None) == (vd == V)
            model.model.embed_tokens.weight[:V] = target.get_input_embeddings().weight  # vLLM shares it
            process_weights_after_loading(model, mc, torch.device("cpu"))
            attn = model.model.layers[0].self_attn
            for base in (0, 7, T - 4):
                attn.attn = CachedCausalAttention(attn.num_heads, attn.num_kv_heads, attn.head_dim)
                fused = model.combine_hidden_states(aux[0, :base + 1])
                last, pre = model(ids[0, 1:base + 2], torch.arange(base + 1), fused)
                got, h = [model.compute_logits(last[-1:])[0]], pre[-1:]
                for k in (2, 3):
                    last, h = model(ids[0, base + k:base + k + 1], torch.tensor([base + k - 1]), h)
                    got.append(model.compute_logits(last)[0])
                for k in range(3):
                    assert int(torch.isinf(got[k]).sum()) == V - vd, "logits outside the draft vocab are -inf"
                    err = (got[k][draft.target_ids()] - ours[k][0, base]).abs().max().item()
                    assert err < 1e-4, f"vocab {vd} base {base} step {k + 1}: max |vLLM - ours| = {err}"
    print("PARITY OK")
""")


@pytest.mark.vllm
def test_vllm_loads_export_and_its_draft_steps_equal_ttt_unroll(tmp_path):
    require("vllm")
    run_parity_script(VLLM_PARITY, "PARITY OK", tmp_path)


def test_vocab_keeps_most_frequent_tokens_ties_to_lower_id():
    vocab = build_draft_vocab([[3, 3, 3, 8, 8, 1], torch.tensor([5, 8, 1, 9])], vocab_size=10, draft_vocab_size=3)
    # counts: 3->3, 8->3, 1->2, 5->1, 9->1: keep {3, 8} then 1 (the 2-count)
    assert vocab.target_ids.tolist() == [1, 3, 8]
    assert vocab.d2t.tolist() == [1, 2, 6]
    assert vocab.t2d.nonzero().flatten().tolist() == [1, 3, 8]
    tie = build_draft_vocab([[9, 5, 7]], vocab_size=10, draft_vocab_size=2)
    assert tie.target_ids.tolist() == [5, 7], "equal counts must go to the lower ids"
    assert math.isclose(vocab.coverage(), 8 / 10)


def test_full_vocab_has_zero_d2t_and_unseen_tokens_fill_by_id():
    assert torch.equal(build_draft_vocab([[4, 4]], 6, 6).d2t, torch.zeros(6, dtype=torch.long))
    assert torch.equal(full_vocab(6).d2t, torch.zeros(6, dtype=torch.long))
    assert build_draft_vocab([[4, 4]], 6, 3).target_ids.tolist() == [0, 1, 4]


def test_vocab_and_d2t_inputs_are_checked():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        build_draft_vocab([[1, 10]], 10, 3)
    with pytest.raises(ValueError, match="draft_vocab_size"):
        build_draft_vocab([[1]], 10, 11)
    draft = Eagle3Draft.from_target(tiny_config("llama", layers=8, vocab=10), build_draft_vocab([[1]], 10, 3))
    with pytest.raises(ValueError, match="twice"):
        draft.set_vocab(torch.tensor([0, 0, -1]))
