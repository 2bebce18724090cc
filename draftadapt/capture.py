"""Capture target features for draft training during the policy's log-prob recompute forward.

`FeatureCapture` puts forward hooks on an HF causal LM for the forward the RL loop runs anyway
(with gradients on: the policy loss comes from it). The hooks only keep references to the aux
hidden states, the final hidden state and the logits (tensors the forward made anyway); when the
loop calls `rollout_batch` with the masks, a `StepSampler` (budget.py) picks the windows worth
training on, and only their rows are gathered, get a teacher, are cast to the storage dtype and
cross to the host (one copy, pinned and non_blocking from CUDA). `RolloutBatch` is the packed,
validated result (`draftadapt/batch.py`); `to_draft_batch` pads it into the trainer's `DraftBatch`.
It does not train, cache or know about engines, and it never changes the policy's forward or its
gradients: hooks never write, and never ask for `output_hidden_states`.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from functools import partial

import torch
from torch import nn

from . import faults
from .batch import MISSING_LOGPROB, TEACHERS, RolloutBatch, Teacher, teacher_from_logits  # noqa: F401  (re-exported)
from .budget import StepSampler, cut_windows
from .drafts.eagle3 import check_aux_layer_ids, default_aux_layer_ids

# (layer list, final norm) attribute names of the decoder bodies we know (Llama/Qwen, GPT-2, OPT).
_STACKS = (("layers", "norm"), ("h", "ln_f"), ("layers", "final_layer_norm"))


def resolve_aux_layer_ids(aux_layer_ids, num_layers: int) -> tuple[int, ...]:
    """The draft's aux ids (vLLM's default when None), checked as the draft checks them; ()
    captures no aux layer (a native MTP draft reads only the last hidden state)."""
    if aux_layer_ids is not None and len(tuple(aux_layer_ids)) == 0:
        return ()
    ids = default_aux_layer_ids(num_layers) if aux_layer_ids is None else aux_layer_ids
    return check_aux_layer_ids(tuple(ids), num_layers)


def find_decoder_stack(model: nn.Module) -> tuple[nn.ModuleList, nn.Module]:
    """(decoder layer list, final norm): the outermost module holding both, so DDP/FSDP/PEFT
    wrappers and `model.model.layers` / `model.model.norm` (Llama, Qwen2, Qwen3) are found alike."""
    for module in model.modules():  # pre-order: outermost first
        for layers_name, norm_name in _STACKS:
            layers, norm = getattr(module, layers_name, None), getattr(module, norm_name, None)
            if isinstance(layers, nn.ModuleList) and len(layers) > 0 and isinstance(norm, nn.Module):
                return layers, norm
    raise ValueError(f"could not find the decoder layers of {type(model).__name__} (looked for a module with "
                     f"{' / '.join(f'.{a} + .{b}' for a, b in _STACKS)}); pass layers=<the nn.ModuleList> and "
                     "final_norm=<the final norm module> to FeatureCapture")


class FeatureCapture:
    """Hooks that copy target features out of the top-level forward of the policy.

        with FeatureCapture(policy, draft_vocab_ids=ids) as cap:
            logits = policy(input_ids=ids, attention_mask=am).logits   # the usual log-prob forward
            loss.backward()
        batch = cap.rollout_batch(input_ids=ids, attention_mask=am, completion_mask=cm, policy_version=v)

    Captured tensors are detached copies of the kept rows only (hidden states cast to `store_dtype`,
    the teacher to `teacher_dtype`, moved to CPU with `offload_to_cpu`), so the policy's loss and
    gradients are bit-identical with and without capture. Until `rollout_batch` the hooks hold
    references to the forward's aux inputs and logits: call it right after the forward (before
    backward) and peak memory is the forward's own; an in-place change of those tensors in between
    is detected and refused. With a `sampler`, sequences are cut into windows and only the windows
    the step's reservoir admits are copied; without one every real token is kept, one row per
    sequence. Only hooks run while the top-level forward is active are recorded, so
    gradient-checkpoint recomputation in backward is ignored. Each forward is one pending capture;
    `rollout_batch` consumes them oldest first. `teacher`: "draft_vocab" (log-probs at
    `draft_vocab_ids`, the full vocab when None),
    "topk" (`top_k` ids + log-probs), or "final_hidden" (no logits work during the forward; the
    teacher and the top-token check come later from the frozen target head, in to_draft_batch).
    `final_prenorm=True` keeps the residual ENTERING the final norm as `final_hidden` (what vLLM
    feeds a MiMo MTP draft); with `aux_layer_ids=()` no aux layer is captured.
    `hook_logits=False` leaves the LM head unhooked (for callers that change the logits in place,
    e.g. SkyRL's `logits.div_(temperature)`): the batch then carries no teacher and
    `integrations.trl.with_head_teacher` builds it from the captured final hidden state.
    """

    def __init__(self, model: nn.Module, aux_layer_ids=None, draft_vocab_ids=None, teacher: str = "draft_vocab",
                 top_k: int = 0, capture_final_hidden: bool = False, store_dtype: torch.dtype | None = None,
                 offload_to_cpu: bool = False, layers: nn.ModuleList | None = None,
                 final_norm: nn.Module | None = None, final_prenorm: bool = False,
                 teacher_dtype: torch.dtype | None = None, sampler: StepSampler | None = None,
                 hook_logits: bool = True):
        if teacher not in TEACHERS:
            raise ValueError(f"teacher={teacher!r}; choose one of {TEACHERS}")
        if (teacher == "topk") != (top_k > 0):
            raise ValueError(f"top_k={top_k} with teacher={teacher!r}; set top_k > 0 exactly when teacher='topk'")
        if (layers is None) != (final_norm is None):
            raise ValueError("pass layers and final_norm together, or neither to find them automatically")
        self.model = model
        self.layers, self.final_norm = (layers, final_norm) if layers is not None else find_decoder_stack(model)
        self.aux_layer_ids = resolve_aux_layer_ids(aux_layer_ids, len(self.layers))
        ids = None if draft_vocab_ids is None else torch.as_tensor(draft_vocab_ids, dtype=torch.long)
        if ids is not None and (ids.dim() != 1 or ids.numel() == 0 or ids.min() < 0
                                or ids.unique().numel() != ids.numel()):
            raise ValueError("draft_vocab_ids must be a 1-D list of distinct target ids (draft id i -> target id)")
        self.draft_vocab_ids = ids
        get_head = getattr(model, "get_output_embeddings", None)
        self.lm_head = get_head() if callable(get_head) else None
        if teacher != "final_hidden" and self.lm_head is None:
            raise ValueError(f"{type(model).__name__} has no output embeddings to take logits from; "
                             "use teacher='final_hidden'")
        self.teacher, self.top_k, self.hook_logits = teacher, top_k, hook_logits
        if not hook_logits and teacher != "final_hidden" and not capture_final_hidden:
            raise ValueError("hook_logits=False captures no teacher: pass capture_final_hidden=True and build it with "
                             "integrations.trl.with_head_teacher")
        if final_prenorm and teacher == "final_hidden":
            raise ValueError("teacher='final_hidden' needs the post-norm state; final_prenorm=True is for MTP drafts")
        self.keep_final = capture_final_hidden or teacher == "final_hidden" or final_prenorm
        self.final_prenorm = final_prenorm
        if not self.aux_layer_ids and not self.keep_final:
            raise ValueError("aux_layer_ids=() captures no hidden state; pass capture_final_hidden=True or "
                             "final_prenorm=True (a native MTP draft)")
        self.store_dtype, self.teacher_dtype, self.offload_to_cpu = store_dtype, teacher_dtype, offload_to_cpu
        self.sampler = sampler
        self._handles: list = []
        self._current: dict | None = None
        self._pending: list[dict] = []

    # 1) hooks ---------------------------------------------------------------------------------
    def attach(self) -> "FeatureCapture":
        if self._handles:
            raise RuntimeError("FeatureCapture is already attached; call remove() first")
        h = self._handles
        h.append(self.model.register_forward_pre_hook(self._begin))
        h.append(self.model.register_forward_hook(self._end))
        for i in self.aux_layer_ids:
            h.append(self.layers[i].register_forward_pre_hook(partial(self._grab_aux, i), with_kwargs=True))
        if self.keep_final and self.final_prenorm:
            h.append(self.final_norm.register_forward_pre_hook(self._grab_final_input, with_kwargs=True))
        elif self.keep_final:
            h.append(self.final_norm.register_forward_hook(self._grab_final))
        if self.teacher != "final_hidden" and self.hook_logits:  # a final_hidden teacher: built by to_draft_batch
            h.append(self.lm_head.register_forward_hook(self._grab_logits))
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._current = None

    def __enter__(self) -> "FeatureCapture":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.remove()

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    def clear(self) -> None:
        self._pending.clear()

    def _ref(self, t: torch.Tensor) -> tuple[torch.Tensor, int]:
        """A reference (no copy) and the version counter it had, to detect in-place writes later."""
        return t.detach(), t._version

    def _begin(self, module, args) -> None:
        self._current = {"aux": {}}

    def _end(self, module, args, output) -> None:
        if self._current is not None and (self._current["aux"] or "final" in self._current):
            self._pending.append(self._current)
        self._current = None

    def _grab_aux(self, i: int, module, args, kwargs) -> None:
        if self._current is not None and i not in self._current["aux"]:  # first call only, if a layer is reused
            self._current["aux"][i] = self._ref(args[0] if args else kwargs["hidden_states"])

    def _grab_final(self, module, args, output) -> None:
        if self._current is not None and "final" not in self._current:
            self._current["final"] = self._ref(output)

    def _grab_final_input(self, module, args, kwargs) -> None:
        if self._current is not None and "final" not in self._current:
            self._current["final"] = self._ref(args[0] if args else kwargs["hidden_states"])

    def _grab_logits(self, module, args, logits) -> None:
        if self._current is not None and "logits" not in self._current:
            self._current["logits"] = self._ref(logits)

    # 2) packing -------------------------------------------------------------------------------
    def rollout_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      completion_mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                      policy_version: int = 0) -> RolloutBatch:
        """Pack the kept rows of the oldest pending forward into a RolloutBatch.

        Padded: input_ids [B, T] with attention_mask [B, T] (left or right padding). Packed:
        input_ids [N] or [R, L] (R rows of whole sequences) with cu_seqlens [B+1] over the flattened
        rows. completion_mask (laid out like input_ids, all True when None) marks completion
        tokens; the loss mask at n is completion[n+1]. With a sampler the result holds the admitted
        windows (true positions, priorities); it may hold no row at all (then cu_seqlens is [0]).
        """
        if not self._pending:
            raise RuntimeError("no captured forward: run the policy forward inside "
                               "`with FeatureCapture(...)` first")
        faults.kill_point("capture")  # (a crash-safety test's SIGKILL; nothing when unarmed)
        p = self._pending.pop(0)
        if len(p["aux"]) != len(self.aux_layer_ids) or (self.keep_final and "final" not in p):
            raise RuntimeError("the captured forward did not pass the hooked layers; was it this model's forward?")
        refs = {**{f"aux{i}": p["aux"][i] for i in self.aux_layer_ids}, **{k: p[k] for k in ("final", "logits")
                                                                            if k in p}}
        for name, (t, version) in refs.items():
            if t._version != version:
                raise RuntimeError(f"the policy's {name} tensor was changed in place after the forward; call "
                                   "rollout_batch before modifying logits or hidden states in place (e.g. logits /= T)")
        first = next(iter(refs.values()))[0]
        b, t, dev = first.shape[0], first.shape[1], first.device
        ids = input_ids.reshape(1, -1) if input_ids.dim() == 1 else input_ids
        if tuple(ids.shape) != (b, t):
            raise ValueError(f"input_ids has shape {tuple(input_ids.shape)} but the captured forward saw {(b, t)}")
        for name, m in (("attention_mask", attention_mask), ("completion_mask", completion_mask)):
            if m is not None and m.numel() != b * t:
                raise ValueError(f"{name} has shape {tuple(m.shape)}; make it match input_ids {tuple(input_ids.shape)}")
        # 1) real positions and sequence boundaries
        if cu_seqlens is not None:  # rows hold whole sequences back to back; cu indexes the flattened rows
            cu = cu_seqlens.to(device=dev, dtype=torch.long)
            if attention_mask is not None or not torch.isin(torch.arange(0, b * t + 1, t, device=dev), cu).all():
                raise ValueError("packed input: pass input_ids [N] or [R, L] with cu_seqlens over the flattened rows, "
                                 "no sequence crossing a row end, and no attention_mask")
            sel = torch.ones(b, t, dtype=torch.bool, device=dev)
        else:
            sel = torch.ones(b, t, dtype=torch.bool, device=dev) if attention_mask is None else attention_mask.bool()
            sel = sel.to(dev).reshape(b, t)
            lens = sel.sum(1)
            cu = torch.cat([lens.new_zeros(1), lens[lens > 0].cumsum(0)])
        flat = sel.reshape(-1).nonzero().squeeze(1)  # [N] index of each real token in the B*T grid
        # 2) next-token completion mask, cut at each sequence's last token; no teacher where logits were not kept
        comp = torch.ones_like(sel) if completion_mask is None else completion_mask.to(dev).bool().reshape(b, t)
        comp = comp.reshape(-1)[flat]
        loss_mask = torch.zeros_like(comp)
        loss_mask[:-1] = comp[1:]
        loss_mask[cu[1:] - 1] = False
        t_l = p["logits"][0].shape[1] if "logits" in p else t
        loss_mask &= flat % t >= t - t_l
        # 3) the windows worth training on, decided before anything is copied
        if self.sampler is not None:
            win = cut_windows(cu, loss_mask, self.sampler.window)
            keep, prio = self.sampler.select(int(policy_version), win)
            rows, pos, lens = win.rows(keep.to(dev))
            prio = prio[keep]
        else:
            rows, pos, lens, prio = torch.arange(flat.numel(), device=dev), None, cu.diff(), None
        src = flat[rows]  # [M] index of each kept token in the B*T grid
        # 4) gather, teacher and storage dtype on the device, one copy to the host
        aux = self._host(_gather_cat([p["aux"][i][0] for i in self.aux_layer_ids], src, self.store_dtype, first))
        kw, mask = {}, loss_mask[rows]
        if "logits" in p:
            logits, has = p["logits"][0], src % t >= t - t_l  # [M]: the forward kept logits there
            lrow = (src // t) * t_l + (src % t - (t - t_l))  # [M] row of the kept logits (logits_to_keep)
            tch = teacher_from_logits(logits.reshape(-1, logits.shape[-1]), self.draft_vocab_ids, self.top_k,
                                      rows=lrow[has], dtype=self.teacher_dtype)  # rows gathered per chunk
            if not self.top_k:  # a top-k teacher keeps target ids: to_draft_batch checks its top token against
                mask[has] &= tch.top_in_draft  # the draft vocab of the sampling time (features outlive a vocab refresh)
            everywhere = bool(has.all())  # the usual case: no second [M, Vd] to scatter into
            names = ("teacher_logprobs", "teacher_topk_ids", "teacher_topk_logprobs")
            for name, x in zip(names, tch[:3]):
                if x is not None:
                    if not everywhere:
                        x = x.new_zeros(src.numel(), *x.shape[1:]).index_copy_(0, has.nonzero()[:, 0], x)
                    kw[name] = self._host(x)
        if self.keep_final:
            kw["final_hidden"] = self._host(_gather_cat([p["final"][0]], src, self.store_dtype, first))
        out = RolloutBatch(input_ids=self._host(ids.to(dev).long().reshape(-1)[src]), aux_hidden=aux,
                           cu_seqlens=torch.cat([lens.new_zeros(1), lens.cumsum(0)]).to(self._where(dev)),
                           loss_mask=self._host(mask), policy_version=int(policy_version),
                           positions=None if pos is None else self._host(pos),
                           completion=None if completion_mask is None else self._host(comp[rows]),
                           priority=None if prio is None else prio.to(self._where(dev)), **kw)
        if dev.type == "cuda" and self.offload_to_cpu:
            torch.cuda.current_stream(dev).synchronize()  # the non_blocking copies have landed
        return out

    def _where(self, dev: torch.device) -> torch.device:
        return torch.device("cpu") if self.offload_to_cpu else dev

    def _host(self, x: torch.Tensor) -> torch.Tensor:
        """x itself on its device, or ONE copy to the host (pinned + non_blocking from CUDA)."""
        if not self.offload_to_cpu or x.device.type == "cpu":
            return x
        out = torch.empty(x.shape, dtype=x.dtype, pin_memory=x.device.type == "cuda")
        return out.copy_(x, non_blocking=True)


def _gather_cat(xs: list[torch.Tensor], src: torch.Tensor, dtype: torch.dtype | None,
                like: torch.Tensor) -> torch.Tensor:
    """[M, sum of H] in `dtype`, on the tensors' device: rows `src` of each x [B, T, H], side by side (no aux
    layers: [M, 0]). Written into one buffer, so the host copy that follows is a single one."""
    width = sum(x.shape[-1] for x in xs)
    out = torch.empty(src.numel(), width, dtype=dtype or like.dtype, device=like.device)
    col = 0
    for x in xs:
        if x.shape[-1] == 0:  # a zero-width state (a draft LM keeps no hidden state): nothing to gather
            continue
        out[:, col:col + x.shape[-1]] = x.reshape(-1, x.shape[-1]).index_select(0, src)
        col += x.shape[-1]
    return out


def measure_capture_overhead(model: nn.Module, input_ids: torch.Tensor, repeats: int = 5,
                             **capture_kwargs) -> float:
    """Fraction of forward+backward time that capture adds: median(on) / median(off) - 1.

    "On" includes the hooks, the teacher from the logits and `rollout_batch`; on and off runs
    alternate so drift in machine load hits both alike.
    """
    sync = torch.cuda.synchronize if input_ids.is_cuda else (lambda: None)

    def step(capture: bool) -> float:
        model.zero_grad(set_to_none=True)
        sync()
        start = time.perf_counter()
        with (FeatureCapture(model, **capture_kwargs) if capture else nullcontext()) as cap:
            logits = model(input_ids=input_ids, use_cache=False).logits
            logits.float().log_softmax(-1).mean().backward()
        if capture:
            cap.rollout_batch(input_ids=input_ids)
        sync()
        return time.perf_counter() - start

    step(False), step(True)  # warm-up
    off_on = torch.tensor([[step(False), step(True)] for _ in range(repeats)])  # [repeats, 2] seconds
    return float(off_on[:, 1].median() / off_on[:, 0].median() - 1.0)
