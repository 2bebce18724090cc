"""The policy's own samples of a prompt set, as training sequences for a draft.

`own_samples(engine, prompts, n, max_tokens)` asks anything with `Engine.generate`'s signature (a
vLLM `Engine`, `ExternalLLM`, the toy's `TorchSampler`) for `n` completions per prompt and returns
prompt + completion token ids with a loss mask over the positions whose NEXT token is a completion
token: what a draft must predict in RL rollouts.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import NamedTuple


class Rollouts(NamedTuple):
    sequences: list[list[int]]  # prompt + completion token ids
    loss_masks: list[list[bool]]  # True where the NEXT token is a completion token
    seconds: float
    tokens: int  # completion tokens generated


def own_samples(engine, prompts: Sequence[Sequence[int]], n: int, max_tokens: int, *, temperature: float = 1.0,
                stop_token_ids: Sequence[int] | None = None, seed: int | None = None) -> Rollouts:
    """`n` samples per prompt from `engine` at `temperature` (module docstring)."""
    t0 = time.perf_counter()
    outs = engine.generate(prompts, n=n, temperature=temperature, max_tokens=max_tokens, logprobs=False,
                           stop_token_ids=None if stop_token_ids is None else list(stop_token_ids), seed=seed)
    seqs, masks, toks = [], [], 0
    for prompt, group in zip(prompts, outs):
        for c in group:
            seqs.append([*prompt, *c.token_ids])
            masks.append([i + 1 >= len(prompt) for i in range(len(seqs[-1]))])
            toks += len(c.token_ids)
    return Rollouts(seqs, masks, time.perf_counter() - t0, toks)
