"""The pieces the full-depth realistic run adds (draftadapt/toy/realistic.py): documents made of several
rollouts, and the policy's log-probs per chunk of positions (no [T, V] tensor), equal to the one-block ones."""
from __future__ import annotations

import torch

from draftadapt.toy.realistic import _documents, chunked_logprobs


def test_documents_put_rollouts_back_to_back_and_cycle_them_to_a_length():
    prompts, rollouts = [[1, 2], [3, 4]], [[5, 6, 7], [8, 9, 10]]
    assert _documents(prompts, rollouts, 1) == [([1, 2, 5, 6, 7], [0, 0, 1, 1, 1]), ([3, 4, 8, 9, 10], [0, 0, 1, 1, 1])]
    (ids, comp), = _documents(prompts, rollouts, 2, length=13)
    assert ids == [1, 2, 5, 6, 7, 3, 4, 8, 9, 10, 1, 2, 5]
    assert comp == [False, False, True, True, True, False, False, True, True, True, False, False, True]


def test_chunked_logprobs_and_their_gradients_equal_the_full_logits_ones():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(1, 37, 16, requires_grad=True)
    targets = torch.randint(0, 50, (1, 37))
    full = head(hidden).float().log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    g_full = torch.autograd.grad(full.sum(), [hidden, head.weight])
    part = chunked_logprobs(head, hidden, targets, chunk=8)  # 5 chunks, the last one short
    g_part = torch.autograd.grad(part.sum(), [hidden, head.weight])
    torch.testing.assert_close(part, full)
    for a, b in zip(g_part, g_full):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        torch.testing.assert_close(chunked_logprobs(head, hidden, targets, chunk=8), full)
