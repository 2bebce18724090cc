"""EAGLE-3 draft checkpoints in and out: ours (= what vLLM 0.32 loads), SpecForge/EAGLE, speculators.

Ours is a directory with `config.json` (`LlamaForCausalLMEagle3`, llama sizes, `eagle_config`) and
`model.safetensors` holding exactly the tensors vLLM's drafter owns: no `embed_tokens` (vLLM then
shares the target's), no `t2d` (vLLM skips it), no `d2t` when the draft vocab is the full vocab
(vLLM has no parameter for it then). Writes are atomic. Nothing here imports vLLM.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_write_dir, readable_tempdir, recover_parked, sweep_leftovers  # noqa: F401 (re-exported)
from .drafts.eagle3 import Eagle3Config, Eagle3Draft, check_aux_layer_ids, default_aux_layer_ids, target_rope_parameters

CONFIG = "config.json"
WEIGHTS = "model.safetensors"


def draft_state_for_push(draft: Eagle3Draft) -> dict[str, torch.Tensor]:
    """The tensors vLLM's drafter owns, named as its `load_weights` reads them (checkpoint side)."""
    state = {k: v.detach() for k, v in draft.state_dict().items() if k != "t2d"}
    if draft.config.full_vocab:
        del state["d2t"]
    return state


def eagle3_hf_config(draft: Eagle3Draft, target_config=None) -> dict[str, Any]:
    """config.json content vLLM maps to `Eagle3LlamaForCausalLM`. With target_config, max_position_embeddings
    is at least the target's: an EAGLE draft runs at the target's positions (a draft config saying 2048 under-sizes
    the rotary cache of vLLMs before #48894; 0.32 raises it itself), and no supported rope type
    (SUPPORTED_ROPE_TYPES) reads it, so the draft computes the same cos/sin either way."""
    c = draft.config
    tc = target_config.get_text_config() if hasattr(target_config, "get_text_config") else target_config
    max_pos = max(c.max_position_embeddings, getattr(tc, "max_position_embeddings", None) or 0)
    return {
        "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama",
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim, "hidden_act": "silu", "rms_norm_eps": c.rms_norm_eps,
        "rope_parameters": dict(c.rope_parameters), "rope_theta": c.rope_parameters.get("rope_theta", 10000.0),
        "max_position_embeddings": max_pos, "num_hidden_layers": 1,
        "vocab_size": c.vocab_size, "draft_vocab_size": c.draft_vocab_size, "target_hidden_size": c.target_hidden_size,
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
        "norm_before_residual": c.norm_before_residual,
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(c.aux_layer_ids), "use_aux_hidden_state": True},
    }


def check_against_target(cfg: Eagle3Config, target_config) -> None:
    """The draft fits the target: same vocab, same hidden size, aux ids inside its layers. The
    error names both sides' sizes and the fix."""
    tc = target_config.get_text_config() if hasattr(target_config, "get_text_config") else target_config
    draft = (cfg.vocab_size, cfg.target_hidden_size)
    target = (tc.vocab_size, tc.hidden_size)
    if draft != target:
        raise ValueError(f"the draft was built for another target: draft (vocab_size, target_hidden_size) = {draft}, "
                         f"the target's (vocab_size, hidden_size) = {target}; build the draft from this target's "
                         "config (Eagle3Draft.from_target(AutoConfig.from_pretrained(target_dir))) and train it, or "
                         "serve it with the target it was trained for")
    try:
        check_aux_layer_ids(cfg.aux_layer_ids, tc.num_hidden_layers)
    except ValueError as exc:
        raise ValueError(f"the draft does not fit the target: {exc}; build the draft with aux_layer_ids inside the "
                         "target's layers (Eagle3Draft.from_target(target_config, aux_layer_ids=...))") from exc


def read_eagle3_config(path: str | os.PathLike, target_config=None) -> Eagle3Config:
    """The Eagle3Config of a checkpoint dir (ours, SpecForge/EAGLE or speculators), weights unread;
    checked against target_config when given (which also supplies default aux ids, as in vLLM)."""
    path = Path(path)
    if not (path / CONFIG).is_file():
        raise ValueError(f"{path} has no {CONFIG}; expected an EAGLE-3 checkpoint directory")
    raw = json.loads((path / CONFIG).read_text())
    cfg = _parse_speculators_config(raw, target_config) if _is_speculators(raw) else _parse_config(raw, target_config)
    if target_config is not None:
        check_against_target(cfg, target_config)
    return cfg


def save_eagle3(draft: Eagle3Draft, out_dir: str | os.PathLike, target_config=None) -> Path:
    """Write config.json + model.safetensors into out_dir atomically (an existing checkpoint there
    is replaced whole or left untouched). Checks the draft against target_config when given."""
    if target_config is not None:
        check_against_target(draft.config, target_config)
    state = {k: v.contiguous().cpu() for k, v in draft_state_for_push(draft).items()}
    config = eagle3_hf_config(draft, target_config)

    def write(tmp: Path) -> None:
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})

    return atomic_write_dir(out_dir, write)


def speculators_config(draft: Eagle3Draft, verifier: str | None = None, verifier_architectures=(),
                        num_speculative_tokens: int = 3) -> dict[str, Any]:
    """config.json of the `speculators` layout, with the fields vLLM 0.32 validates
    (transformers_utils/configs/speculators/base.py) and reads (algos.py::update_eagle3)."""
    layer = {k: v for k, v in eagle3_hf_config(draft).items()
             if k not in ("architectures", "eagle_config", "draft_vocab_size", "target_hidden_size",
                          "norm_before_residual")}
    c = draft.config
    return {
        "architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3", "speculators_version": "0.2.0",
        "transformer_layer_config": layer, "draft_vocab_size": c.draft_vocab_size,
        "target_hidden_size": c.target_hidden_size, "norm_before_residual": c.norm_before_residual,
        "eagle_aux_hidden_state_layer_ids": list(c.aux_layer_ids),
        "speculators_config": {
            "algorithm": "eagle3", "default_proposal_method": "greedy",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": num_speculative_tokens}],
            "verifier": {"name_or_path": verifier, "architectures": list(verifier_architectures)},
        },
    }


def save_speculators(draft: Eagle3Draft, out_dir: str | os.PathLike, target_config=None, verifier: str | None = None,
                     num_speculative_tokens: int = 3) -> Path:
    """Write the draft in the `speculators` layout (atomically): config with `speculators_config`,
    the one layer named `layers.0.*`, `d2t` and `t2d` when the draft vocab is reduced.
    `load_eagle3` reads it back; vLLM serves it as an eagle3 draft."""
    if target_config is not None:
        check_against_target(draft.config, target_config)
    state = {("layers.0." + k[len("midlayer."):] if k.startswith("midlayer.") else k): v.contiguous().cpu()
             for k, v in draft_state_for_push(draft).items()}
    if not draft.config.full_vocab:
        state["t2d"] = draft.t2d.detach().cpu().contiguous()
    archs = list(getattr(target_config, "architectures", None) or []) if target_config is not None else []
    config = speculators_config(draft, verifier, archs, num_speculative_tokens)

    def write(tmp: Path) -> None:
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})

    return atomic_write_dir(out_dir, write)


def load_eagle3(path: str | os.PathLike, target_embed=None, target_config=None) -> Eagle3Draft:
    """Load an EAGLE-3 draft from ours, the SpecForge/EAGLE layout (`midlayer.*`) or the
    speculators layout (`speculators_config`, `layers.0.*`).

    target_embed: the target's embedding ([V, H] weight or module), checked against the draft.
    target_config: checked against the draft; supplies the default aux layer ids when the
    checkpoint names none (as vLLM does). Raises ValueError naming every missing, unexpected or
    mis-shaped tensor.
    """
    recover_parked(path)
    path = Path(path)
    cfg = read_eagle3_config(path, target_config)
    speculators = _is_speculators(json.loads((path / CONFIG).read_text()))
    if target_embed is not None:
        weight = getattr(target_embed, "weight", target_embed)
        if tuple(weight.shape) != (cfg.vocab_size, cfg.hidden_size):
            raise ValueError(f"target embedding has shape {tuple(weight.shape)}, the draft expects "
                             f"(vocab_size, hidden_size) = {(cfg.vocab_size, cfg.hidden_size)}")
    tensors = _read_tensors(path)
    if speculators:
        prefix = "layers.0."  # speculators names the one layer as vLLM does internally
        tensors = {("midlayer." + k[len(prefix):] if k.startswith(prefix) else k): v for k, v in tensors.items()}
    draft = Eagle3Draft(cfg)
    _load_into(draft, tensors, path)
    return draft


def _is_speculators(raw: dict[str, Any]) -> bool:
    return "speculators_model_type" in raw or "speculators_config" in raw


def _parse_config(raw: dict[str, Any], target_config) -> Eagle3Config:
    """Our / SpecForge config.json: a llama config plus the EAGLE-3 fields."""
    eagle = raw.get("eagle_config") or {}
    if not eagle.get("use_aux_hidden_state", True):
        raise ValueError("eagle_config.use_aux_hidden_state is false: that is an EAGLE-1 head, not EAGLE-3")
    ids = raw.get("eagle_aux_hidden_state_layer_ids") or eagle.get("eagle_aux_hidden_state_layer_ids")
    for key in ("norm_before_fc", "fc_norm", "norm_output"):
        if raw.get(key) or eagle.get(key):
            raise ValueError(f"config sets {key}: that EAGLE-3 variant is not supported by Eagle3Draft")
    return _layer_config(raw, ids, raw.get("draft_vocab_size"), raw.get("target_hidden_size"),
                         bool(raw.get("norm_before_residual", False)), target_config)


def _parse_speculators_config(raw: dict[str, Any], target_config) -> Eagle3Config:
    """speculators config: `transformer_layer_config` + algorithm fields, read as vLLM 0.32 reads
    them (transformers_utils/configs/speculators/algos.py::update_eagle3)."""
    if raw.get("speculators_model_type") != "eagle3":
        raise ValueError(f"speculators_model_type={raw.get('speculators_model_type')!r}; only 'eagle3' is supported")
    layer = raw.get("transformer_layer_config") or {}
    if layer.get("model_type", "llama") != "llama":
        raise ValueError(f"transformer_layer_config.model_type={layer.get('model_type')!r}: vLLM serves that as a"
                         " different architecture; only 'llama' draft layers are supported")
    for key in ("norm_before_fc", "fc_norm", "norm_output"):
        if raw.get(key):
            raise ValueError(f"speculators config sets {key}: that EAGLE-3 variant is not supported by Eagle3Draft")
    # vLLM's default for a speculators checkpoint that does not say is norm_before_residual=True.
    return _layer_config(layer, raw.get("eagle_aux_hidden_state_layer_ids"), raw.get("draft_vocab_size"),
                         raw.get("target_hidden_size"), bool(raw.get("norm_before_residual", True)), target_config)


def _layer_config(layer: dict[str, Any], ids, draft_vocab_size, target_hidden_size, norm_before_residual: bool,
                  target_config) -> Eagle3Config:
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size"):
        if key not in layer:
            raise ValueError(f"draft config has no {key!r}")
    if layer.get("num_hidden_layers", 1) != 1:
        raise ValueError(f"draft config has num_hidden_layers={layer['num_hidden_layers']}; only 1 is supported")
    if layer.get("hidden_act", "silu") != "silu":
        raise ValueError(f"draft config has hidden_act={layer['hidden_act']!r}; vLLM's Llama layer needs 'silu'")
    if not ids:
        if target_config is None:
            raise ValueError("the draft config names no eagle_aux_hidden_state_layer_ids; pass target_config="
                             " so the default (2, L//2, L-3) can be used, as vLLM does")
        tc = target_config.get_text_config() if hasattr(target_config, "get_text_config") else target_config
        ids = default_aux_layer_ids(tc.num_hidden_layers)
    heads = layer["num_attention_heads"]
    return Eagle3Config(
        hidden_size=layer["hidden_size"], intermediate_size=layer["intermediate_size"], num_attention_heads=heads,
        num_key_value_heads=layer.get("num_key_value_heads") or heads,
        head_dim=layer.get("head_dim") or layer["hidden_size"] // heads,
        rms_norm_eps=layer.get("rms_norm_eps", 1e-6), vocab_size=layer["vocab_size"],
        draft_vocab_size=draft_vocab_size or layer["vocab_size"],
        target_hidden_size=target_hidden_size or layer["hidden_size"], aux_layer_ids=tuple(ids),
        max_position_embeddings=layer.get("max_position_embeddings", 2048),
        rope_parameters=target_rope_parameters(SimpleNamespace(**layer)), norm_before_residual=norm_before_residual,
    )


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError

    try:
        return load_file(str(file))
    except SafetensorError as e:
        raise ValueError(f"{file} is not a readable safetensors file ({e}): it is truncated or corrupt (an "
                         f"interrupted copy?); export the draft again (checkpoint.save_eagle3) or restore it") from e


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in _load_safetensors(path / shard).items()}
    if (path / WEIGHTS).is_file():
        return _load_safetensors(path / WEIGHTS)
    if (path / "pytorch_model.bin").is_file():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise ValueError(f"{path} has no {WEIGHTS}, model.safetensors.index.json or pytorch_model.bin")


def _load_into(draft: Eagle3Draft, tensors: dict[str, torch.Tensor], path: Path) -> None:
    cfg = draft.config
    tensors = dict(tensors)
    if tensors.pop("embed_tokens.weight", None) is not None:
        warnings.warn(f"{path}: dropped embed_tokens.weight; the draft uses the target's embedding (as vLLM does"
                      " when the checkpoint carries none)", stacklevel=3)
    d2t, t2d = tensors.pop("d2t", None), tensors.pop("t2d", None)
    problems = []
    if cfg.full_vocab and d2t is not None and bool(d2t.any()):
        problems.append(f"d2t is not all zeros although draft_vocab_size == vocab_size == {cfg.vocab_size}")
    if not cfg.full_vocab and d2t is None:
        problems.append(f"missing d2t (draft_vocab_size {cfg.draft_vocab_size} < vocab_size {cfg.vocab_size})")
    if d2t is not None and tuple(d2t.shape) != (cfg.draft_vocab_size,):
        problems.append(f"d2t: shape {tuple(d2t.shape)}, expected {(cfg.draft_vocab_size,)}")
        d2t = None
    expected = {k: tuple(v.shape) for k, v in draft.state_dict().items() if k not in ("d2t", "t2d")}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = [f"{k}: shape {tuple(tensors[k].shape)}, expected {expected[k]}"
              for k in sorted(set(expected) & set(tensors)) if tuple(tensors[k].shape) != expected[k]]
    problems += ([f"missing {missing}"] if missing else []) + ([f"unexpected {unexpected}"] if unexpected else [])
    if problems or shapes:
        raise ValueError(f"{path}: EAGLE-3 weights do not fit the config: " + "; ".join(problems + shapes))
    draft.load_state_dict(tensors, strict=False)
    if d2t is not None and not cfg.full_vocab:
        draft.set_vocab(d2t.long())
    if t2d is not None and not torch.equal(t2d.bool(), draft.t2d):
        raise ValueError(f"{path}: t2d disagrees with d2t (t2d marks {int(t2d.bool().sum())} tokens)")
