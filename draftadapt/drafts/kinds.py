"""One record per draft kind (EAGLE-3 head, native MTP head, small draft LM), looked up once: the rest of
the library asks the kind instead of checking the draft's type.

A `DraftKind` says what capture must provide (`features`: the fused aux hidden states, the policy's
pre-norm last hidden state, or the teacher only), which loss trains it (`loss`: TTT or distillation),
which tensors a push carries (`push_state`), how it is saved and loaded, whether its draft vocab can be
re-targeted at run time, and the vLLM speculative method that serves it. The registry is keyed by draft
class (`kind_of(draft)`, through the class's MRO) and by vLLM method (`kind_for_method("eagle3")`).

The losses, the checkpoint formats and the push states live in modules above this folder (ttt.py,
distill.py, checkpoint.py), which import the draft models: a kind names them as "module:attribute" and
they are imported on first use, so drafts/ imports nothing above it. Adding a fourth kind: docs/new_draft_kind.md.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .draft_lm import DraftLM
from .eagle3 import Eagle3Draft
from .mtp import MTPDraft

FEATURES = ("aux_hidden", "final_hidden", None)  # the DraftBatch field step 1 reads; None: token ids only


def resolve(ref: str | Callable) -> Any:
    """The object a "package.module:attr.attr" reference names (imported on first use); a callable as is."""
    if callable(ref):
        return ref
    module, _, attrs = ref.partition(":")
    obj = importlib.import_module(module)
    for name in attrs.split("."):
        obj = getattr(obj, name)
    return obj


def _normed_head(draft: Eagle3Draft, x):
    return draft.norm(x), draft.lm_head.weight  # the draft's own norm and reduced-vocab head


def _shared_head(draft: MTPDraft, x):
    return x, draft.head_weight()  # the policy's shared head, frozen; the layer output is already normed


@dataclass(frozen=True)
class DraftKind:
    name: str  # in messages and docs, e.g. "EAGLE-3"
    draft_class: type[nn.Module]  # the model class (drafts/); subclasses are this kind too
    vllm_method: str  # vLLM SpeculativeConfig.method that serves it; its engine record: engine/methods.py
    features: str | None  # DraftBatch field step 1 reads: "aux_hidden" | "final_hidden" | None (teacher only)
    loss: str | Callable  # "module:callable" (or the callable): TrainerConfig -> trainer.LossFn, DraftTrainer's default
    push_state: str | Callable  # "module:callable": draft -> {name: tensor} vLLM's drafter owns, as load_weights reads
    saves: dict[str, str] = field(default_factory=dict)  # export layout -> "module:callable"(draft, out_dir,
    #   target_config) -> Path, the first the default; empty: not exported on its own
    load: str | None = None  # "module:callable"(path, ...) -> draft; None: built from the policy instead
    export_hint: str = ""  # what to do instead when save is None
    vocab_refresh: bool = False  # its reduced draft vocab can be re-targeted at run time (vocab_refresh.py)
    head: Callable | None = None  # (draft, x [N, H]) -> (x normed [N, H], head weight [Vd, H]): the TTT loss' head

    def __post_init__(self) -> None:
        if self.features not in FEATURES:
            raise ValueError(f"DraftKind.features={self.features!r}; use one of {FEATURES}")

    def make_loss(self, config) -> Callable:
        """The loss callable DraftTrainer steps with, for a TrainerConfig."""
        return resolve(self.loss)(config)

    def state_for_push(self, draft: nn.Module) -> dict:
        """The live tensors vLLM's drafter owns (no copy)."""
        return resolve(self.push_state)(draft)

    def export(self, draft: nn.Module, out_dir, target_config=None, layout: str | None = None):
        """Write `draft` as a checkpoint in `layout` (None: the kind's first, the one vLLM serves)."""
        if not self.saves:
            raise ValueError(f"export: {self.export_hint or f'a {self.name} draft has no checkpoint format of its own'}")
        layout = layout or next(iter(self.saves))
        if layout not in self.saves:
            raise ValueError(f"export: layout={layout!r}; choose " + " or ".join(map(repr, self.saves)))
        return resolve(self.saves[layout])(draft, out_dir, target_config)


_BY_CLASS: dict[type, DraftKind] = {}
_BY_METHOD: dict[str, DraftKind] = {}


def register(kind: DraftKind) -> DraftKind:
    """Add a kind to the registry; a class or vLLM method registered twice raises."""
    for key, table, what in ((kind.draft_class, _BY_CLASS, "draft class"), (kind.vllm_method, _BY_METHOD, "vLLM method")):
        if key in table and table[key] != kind:
            raise ValueError(f"{what} {key!r} is already registered as the {table[key].name} kind")
    _BY_CLASS[kind.draft_class] = _BY_METHOD[kind.vllm_method] = kind
    return kind


def unregister(kind: DraftKind) -> None:
    """Remove a kind (tests registering a fake one)."""
    _BY_CLASS.pop(kind.draft_class, None)
    _BY_METHOD.pop(kind.vllm_method, None)


def kind_of(draft: nn.Module | type) -> DraftKind:
    """The kind of a draft (or draft class): the registered class nearest in its MRO."""
    cls = draft if isinstance(draft, type) else type(draft)
    for base in cls.__mro__:
        if base in _BY_CLASS:
            return _BY_CLASS[base]
    raise ValueError(f"{cls.__name__} is not a registered draft kind (registered: "
                     f"{sorted(k.__name__ for k in _BY_CLASS)}); register it with "
                     "draftadapt.drafts.kinds.register(DraftKind(...)) - the steps are in docs/new_draft_kind.md")


def kind_for_method(method: str) -> DraftKind:
    """The kind a vLLM speculative method serves ("eagle3", "mtp", "draft_model")."""
    if method not in _BY_METHOD:
        raise ValueError(f"no draft kind is served by vLLM method {method!r}; registered: {sorted(_BY_METHOD)}")
    return _BY_METHOD[method]


EAGLE3 = register(DraftKind(
    name="EAGLE-3", draft_class=Eagle3Draft, vllm_method="eagle3", features="aux_hidden",
    loss="draftadapt.ttt:TTTLoss.from_config", push_state="draftadapt.checkpoint:draft_state_for_push",
    saves={"vllm": "draftadapt.checkpoint:save_eagle3", "speculators": "draftadapt.checkpoint:save_speculators"},
    load="draftadapt.checkpoint:load_eagle3", vocab_refresh=True,
    head=_normed_head))
MTP = register(DraftKind(
    name="MTP", draft_class=MTPDraft, vllm_method="mtp", features="final_hidden",
    loss="draftadapt.ttt:TTTLoss.from_config", push_state="draftadapt.drafts.mtp:mtp_state_for_push",
    load="draftadapt.drafts.mtp:load_mtp_state", head=_shared_head,
    export_hint="a native MTP draft is part of the policy checkpoint; write drafts.mtp.mtp_state_for_push(adapter.draft) "
                "into the policy's state dict instead"))
DRAFT_LM = register(DraftKind(
    name="draft LM", draft_class=DraftLM, vllm_method="draft_model", features=None,
    loss="draftadapt.distill:DistillLoss.from_config", push_state="draftadapt.drafts.draft_lm:draft_lm_state_for_push",
    saves={"vllm": "draftadapt.drafts.draft_lm:save_draft_lm"}, load="draftadapt.drafts.draft_lm:DraftLM.from_pretrained"))
