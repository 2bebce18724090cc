"""Reference speculative decoder in plain PyTorch: the lossless yardstick for engines.

Target = an HF causal LM, draft = `Eagle3Draft`. Chain drafts of length k: draft, verify in one
target forward, accept draft token t with probability min(1, p(t) / q(t)), on rejection sample
from the normalised residual max(0, p - q), a bonus token when all k are accepted. Greedy mode
accepts while the target's argmax agrees. Counters follow vLLM's convention (`SpecCounters`).

Written for clarity, not speed: every round re-runs the target over the whole prefix and the
draft's step 1 over every position (no KV caches). Draft step j >= 2 reproduces vLLM's proposer:
the draft's own pre-norm state is fed back, one position further, attending to the step-1 keys
of the prefix and the keys of its own earlier steps.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import nn

from .drafts.eagle3 import Eagle3Draft, attend
from .metrics import SpecCounters


class Verified(NamedTuple):
    tokens: list[int]  # emitted tokens: accepted drafts + one corrected or bonus token
    accepted: int  # number of draft tokens accepted


def verify(draft_tokens: torch.Tensor, draft_probs: torch.Tensor | None, target_probs: torch.Tensor,
           greedy: bool = False, generator: torch.Generator | None = None) -> Verified:
    """Rejection-sample one chain.

    draft_tokens: [k] int64; draft_probs: [k, V] the draft's proposal distributions, or None
    when drafts were argmax picks (q is then one-hot, as in vLLM's default greedy drafting);
    target_probs: [k+1, V] the target's distributions at the k drafted positions + the bonus.
    """
    k = draft_tokens.numel()
    out: list[int] = []
    for i in range(k):
        t = int(draft_tokens[i])
        p = target_probs[i]
        if greedy:
            if int(p.argmax()) != t:
                return Verified(out + [int(p.argmax())], i)
            out.append(t)
            continue
        q = draft_probs[i] if draft_probs is not None else torch.nn.functional.one_hot(
            draft_tokens[i], p.numel()).to(p.dtype)
        u = torch.rand((), generator=generator)
        if float(q[t]) > 0 and u < torch.clamp(p[t] / q[t], max=1.0):
            out.append(t)
            continue
        residual = torch.clamp(p - q, min=0)
        residual = residual / residual.sum() if residual.sum() > 0 else p
        return Verified(out + [int(torch.multinomial(residual, 1, generator=generator))], i)
    bonus = target_probs[k]
    nxt = int(bonus.argmax()) if greedy else int(torch.multinomial(bonus, 1, generator=generator))
    return Verified(out + [nxt], k)


class Proposal(NamedTuple):
    tokens: torch.Tensor  # [k] int64 target ids
    probs: torch.Tensor | None  # [k, V] proposal distributions over the target vocab, or None (argmax)


@torch.no_grad()
def propose(draft: Eagle3Draft, embed: nn.Embedding, aux: torch.Tensor, tokens: torch.Tensor, k: int,
            temperature: float = 1.0, sample: bool = False, generator: torch.Generator | None = None) -> Proposal:
    """Draft k tokens after `tokens` ([n] int64) from the target's aux states there ([n, 3*H_t])."""
    n = tokens.numel()
    assert n >= 2, "EAGLE-3 drafting needs a prefix of at least 2 tokens"
    target_ids = draft.target_ids()
    # 1) step 1 over every base position i = 0..n-2 (input token i+1, fused target state at i)
    hidden = draft.fuse(aux[None, : n - 1])  # [1, n-1, H]
    tok = embed(tokens[None, 1:])  # [1, n-1, H]
    pos = torch.arange(n - 1)[None]
    q, key, value, residual = draft.midlayer.project(tok, hidden, pos)
    causal = torch.ones(n - 1, n - 1, dtype=torch.bool).tril()[None]
    hidden = draft.midlayer.finish(attend(q, key, value, causal), residual)[:, -1:]  # [1, 1, H]
    keys, values = [key], [value]
    out, probs = [], []
    for j in range(1, k + 1):
        # 2) pick draft token j from the last position's logits over the draft vocab
        logits = draft.logits(hidden)[0, 0].float()  # [Vd]
        if sample:
            pd = torch.softmax(logits / max(temperature, 1e-6), -1)
            d = int(torch.multinomial(pd, 1, generator=generator))
            full = torch.zeros(draft.config.vocab_size)
            full[target_ids] = pd
            probs.append(full)
        else:
            d = int(logits.argmax())
        out.append(int(target_ids[d]))
        if j == k:
            break
        # 3) step j+1: own pre-norm state fed back at the next position; sees prefix + own steps
        q, key, value, residual = draft.midlayer.project(embed(torch.tensor([[out[-1]]])), hidden,
                                                         torch.tensor([[n - 2 + j]]))
        keys.append(key)
        values.append(value)
        mask = torch.ones(1, 1, n - 1 + j, dtype=torch.bool)
        hidden = draft.midlayer.finish(attend(q, torch.cat(keys, 2), torch.cat(values, 2), mask), residual)
    return Proposal(torch.tensor(out), torch.stack(probs) if sample else None)


class SpecOutput(NamedTuple):
    tokens: list[int]  # generated completion
    counters: SpecCounters  # vLLM-convention counters for this generation


@torch.no_grad()
def speculative_generate(target, draft: Eagle3Draft, prompt: Sequence[int], max_new_tokens: int, k: int = 3,
                         temperature: float = 1.0, eos_token_id: int | None = None,
                         sample_drafts: bool = False, generator: torch.Generator | None = None) -> SpecOutput:
    """Generate with EAGLE-3 speculative decoding; temperature 0 = greedy."""
    greedy = temperature <= 0
    embed = target.get_input_embeddings()
    aux_ids = list(draft.config.aux_layer_ids)
    seq = torch.tensor(list(prompt))
    drafts = accepted = 0
    per_pos = [0] * k
    # 0) as in vLLM, the prefill forward samples the first token; drafting starts after it
    first = torch.softmax(target(input_ids=seq[None]).logits[0, -1].float() / max(temperature, 1e-6), -1)
    nxt = int(first.argmax()) if greedy else int(torch.multinomial(first, 1, generator=generator))
    seq = torch.cat([seq, torch.tensor([nxt])])
    while seq.numel() - len(prompt) < max_new_tokens and nxt != eos_token_id:
        n = seq.numel()
        # 1) the target's aux states over the prefix (what the engine hands the drafter)
        hs = target(input_ids=seq[None], output_hidden_states=True).hidden_states
        aux = torch.cat([hs[i][0] for i in aux_ids], -1)  # [n, 3*H_t]
        prop = propose(draft, embed, aux, seq, k, temperature, sample_drafts and not greedy, generator)
        # 2) verify all k drafts in one target forward
        logits = target(input_ids=torch.cat([seq, prop.tokens])[None]).logits[0, n - 1:].float()  # [k+1, V]
        tprobs = torch.softmax(logits / (1.0 if greedy else temperature), -1)
        res = verify(prop.tokens, prop.probs, tprobs, greedy, generator)
        drafts, accepted = drafts + 1, accepted + res.accepted
        for i in range(res.accepted):
            per_pos[i] += 1
        new = res.tokens
        if eos_token_id is not None and eos_token_id in new:
            new = new[: new.index(eos_token_id) + 1]
        seq = torch.cat([seq, torch.tensor(new)])
        nxt = new[-1]
    out = seq[len(prompt):][:max_new_tokens].tolist()
    return SpecOutput(out, SpecCounters(drafts, drafts * k, accepted, tuple(per_pos)))
