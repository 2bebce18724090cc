"""Offline EAGLE-3 training: features from a plain HF forward of the target, then TTT.

`extract_features` is the reference feature path (aux states = HF `hidden_states[i]` for the aux
ids, teacher = the target's full-vocab log-probs gathered at the draft vocab); the online capture
hooks must agree with it. `train_offline` chains vocab -> draft -> features -> trainer -> export
for pre-initialising a draft; `train_from_own_samples` first samples the training sequences from a
running engine (the policy's own completions). Recipes with datasets and shards build on them.
It does not start engines: callers pass one.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch

from . import batch as _batch
from .batch import AUTO_DENSE_MAX_VOCAB, AUTO_TOP_K, DraftBatch, teacher_from_logits
from .checkpoint import save_eagle3
from .drafts.eagle3 import Eagle3Draft
from .drafts.vocab import build_draft_vocab
from .sampling import own_samples
from .trainer import DraftTrainer, TrainerConfig, TrainStats


@torch.no_grad()
def extract_features(target, sequences: Sequence[Sequence[int]], aux_layer_ids: Sequence[int],
                     draft_target_ids: torch.Tensor, loss_masks: Sequence[Sequence[bool]] | None = None,
                     batch_size: int = 8, policy_version: int = 0, top_k: int | None = None) -> Iterator[DraftBatch]:
    """DraftBatches (right-padded) from one target forward per batch of sequences.

    draft_target_ids: [Vd] int64 target id of every draft id. loss_masks: per-sequence bools
    (True where the next token is a training target, e.g. completion positions); None = all.
    A position is also dropped when the target's top token is outside the draft vocab.
    top_k: the teacher kept: 0 = dense draft-vocab log-probs [B, T, Vd] fp32; k = the target's top-k as draft ids
    (`DraftBatch.teacher_topk_*`, 12 k bytes/token, read per loss chunk); None = dense up to a draft vocab of
    AUTO_DENSE_MAX_VOCAB ids, top-AUTO_TOP_K above (a dense fp32 teacher at Vd 32k is 128 KB/token). Memory
    beyond the forward's own logits: one chunk of rows upcast to fp32 at a time (`teacher_from_logits`).
    """
    device = next(target.parameters()).device
    ids = draft_target_ids.to(device)
    k = (0 if ids.numel() <= AUTO_DENSE_MAX_VOCAB else AUTO_TOP_K) if top_k is None else top_k
    t2d = torch.full((target.config.get_text_config().vocab_size,), -1, dtype=torch.long, device=device)
    t2d[ids] = torch.arange(ids.numel(), device=device)  # target id -> draft id, -1 outside the draft vocab
    for start in range(0, len(sequences), batch_size):
        seqs = [torch.as_tensor(s, dtype=torch.long) for s in sequences[start:start + batch_size]]
        lens = torch.tensor([len(s) for s in seqs])
        if int(lens.min()) < 2:
            raise ValueError(f"sequence {start + int(lens.argmin())} has {int(lens.min())} tokens; need >= 2")
        t = int(lens.max())
        valid = torch.arange(t)[None, :] < lens[:, None]  # [B, T]
        ids_bt = torch.zeros(len(seqs), t, dtype=torch.long)
        mask = valid.clone()
        for row, s in enumerate(seqs):
            ids_bt[row, : len(s)] = s
            if loss_masks is not None:
                mask[row, : len(s)] &= torch.as_tensor(loss_masks[start + row], dtype=torch.bool)
        valid, ids_bt, mask = valid.to(device), ids_bt.to(device), mask.to(device)
        out = target(input_ids=ids_bt, attention_mask=valid.long(), output_hidden_states=True)
        aux = torch.cat([out.hidden_states[i] for i in aux_layer_ids], dim=-1)  # [B, T, n*H_t]
        b, logits = len(seqs), out.logits.reshape(len(seqs) * t, -1)  # [B*T, V], the forward's own
        if k:
            tch = teacher_from_logits(logits, ids, k)  # top-k over the full vocab, per chunk of rows
            mask &= tch.top_in_draft.reshape(b, t)
            kw = dict(teacher_logprobs=None, teacher_topk_ids=t2d[tch.topk_ids].reshape(b, t, k),
                      teacher_topk_logprobs=tch.topk_logprobs.reshape(b, t, k), draft_vocab_size=ids.numel())
        else:  # row chunks of the full log_softmax: the same numbers as one log_softmax over [B, T, V]
            teacher = torch.empty(b * t, ids.numel(), device=device)  # [B*T, Vd] fp32
            c = max(1, _batch._CHUNK_ELEMENTS // logits.shape[-1])
            for a in range(0, b * t, c):
                lp = logits[a:a + c].float().log_softmax(-1)  # [c, V]
                teacher[a:a + c] = lp.index_select(-1, ids)
                mask.view(-1)[a:a + c] &= t2d[lp.argmax(-1)] >= 0
            kw = dict(teacher_logprobs=teacher.view(b, t, -1))
        del out, logits
        yield DraftBatch(input_ids=ids_bt, aux_hidden=aux, loss_mask=mask, valid=valid,
                         policy_version=policy_version, **kw)


def train_offline(target, sequences: Sequence[Sequence[int]], steps: int, draft: Eagle3Draft | None = None,
                  draft_vocab_size: int | None = None, aux_layer_ids: Sequence[int] | None = None,
                  config: TrainerConfig = TrainerConfig(), loss_masks: Sequence[Sequence[bool]] | None = None,
                  batch_size: int = 8, out_dir: str | os.PathLike | None = None, progress: bool = True) -> Eagle3Draft:
    """Train an EAGLE-3 draft for `target` (a transformers causal LM) on token sequences.

    1) draft vocab: the `draft_vocab_size` most frequent tokens the draft is trained to predict
       (the tokens after masked-in positions of `sequences`; None = the full vocab)
    2) draft: from the target config, lm_head initialised from the target head's rows
    3) features: one no-grad target forward per batch, kept in memory (O(N T n_aux H) floats and the teacher:
       dense Vd floats/token up to AUTO_DENSE_MAX_VOCAB, top-64 above; for large sets use the sharded
       pre-init, `draftadapt.preinit`)
    4) `steps` TTT updates cycling over the batches (lr schedule: `config`); 5) export to out_dir when given.
    """
    return _train(target, sequences, steps, draft, draft_vocab_size, aux_layer_ids, config, loss_masks, batch_size,
                  out_dir, progress)[0]


class OfflineResult(NamedTuple):
    draft: Eagle3Draft  # trained, in eval mode
    history: list[TrainStats]  # one entry per optimizer step (loss, per-step accuracy, lr)
    sequences: list[list[int]]  # prompt + sampled completion, the training data
    completion_tokens: int  # tokens the engine sampled


def train_from_own_samples(engine, target, prompts: Sequence[Sequence[int]], steps: int, *, n: int = 2,
                           max_tokens: int = 128, temperature: float = 1.0, stop_token_ids: Sequence[int] | None = None,
                           seed: int | None = 0, draft_vocab_size: int | None = None,
                           aux_layer_ids: Sequence[int] | None = None, config: TrainerConfig = TrainerConfig(),
                           batch_size: int = 8, out_dir: str | os.PathLike | None = None,
                           progress: bool = True) -> OfflineResult:
    """A first EAGLE-3 draft for a policy, in one call: sample `n` completions per prompt from
    `engine` (anything with `Engine.generate`'s signature, serving the policy), then `train_offline`
    on prompt + completion with the loss on completion positions only, and export to out_dir.

    The draft learns what the policy itself writes (its temperature-1 samples), which is what it
    must predict in RL rollouts. `target` is the same policy as a transformers model (features).
    Shut an in-process engine down before starting one that serves the exported draft."""
    # 1) the policy's own samples
    roll = own_samples(engine, prompts, n, max_tokens, temperature=temperature, stop_token_ids=stop_token_ids,
                       seed=seed)
    seqs, masks, tokens = roll.sequences, roll.loss_masks, roll.tokens
    seqs_masks = [(s, m) for s, m in zip(seqs, masks) if len(s) >= 2]
    if not seqs_masks:
        raise ValueError("the engine returned no completion to train on; raise max_tokens or check stop_token_ids")
    seqs, masks = map(list, zip(*seqs_masks))
    # 2) features + TTT + export
    draft, history = _train(target, seqs, steps, None, draft_vocab_size, aux_layer_ids, config, masks, batch_size,
                            out_dir, progress)
    return OfflineResult(draft, history, seqs, tokens)


def _train(target, sequences, steps, draft, draft_vocab_size, aux_layer_ids, config, loss_masks, batch_size, out_dir,
           progress) -> tuple[Eagle3Draft, list[TrainStats]]:
    tc = target.config.get_text_config()
    if draft is None:
        vocab = None
        if draft_vocab_size is not None and draft_vocab_size < tc.vocab_size:
            vocab = build_draft_vocab(_predicted(sequences, loss_masks), tc.vocab_size, draft_vocab_size)
        head = target.get_output_embeddings()
        draft = Eagle3Draft.from_target(tc, vocab, aux_layer_ids, target_head=None if head is None else head.weight)
    draft = draft.to(next(target.parameters()).device)
    batches = list(extract_features(target, sequences, draft.config.aux_layer_ids, draft.target_ids(),
                                    loss_masks=loss_masks, batch_size=batch_size))
    trainer = DraftTrainer(draft, target.get_input_embeddings(), config)
    history = trainer.fit(batches, steps, progress=progress)
    draft.eval()
    if out_dir is not None:
        save_eagle3(draft, out_dir, tc)
    return draft, history


def _predicted(sequences: Sequence[Sequence[int]], loss_masks: Sequence[Sequence[bool]] | None) -> list[list[int]]:
    """The tokens training predicts: s[i + 1] where mask[i] (all but the first without masks)."""
    if loss_masks is None:
        return [list(s[1:]) for s in sequences]
    return [[int(s[i + 1]) for i in range(len(s) - 1) if m[i]] for s, m in zip(sequences, loss_masks)]
