"""The GRPO objective: group-normalised advantages, clipped surrogate, token-level aggregation."""
import pytest
import torch

from draftadapt.grpo.objective import group_advantages, grpo_loss, token_logprobs


def test_advantages_are_normalised_within_each_group():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 3.0, 3.0, 3.0])
    a = group_advantages(r, 4)
    assert torch.allclose(a[:4], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-4)
    assert torch.all(a[4:] == 0), "a group with one reward carries no signal"
    assert torch.allclose(group_advantages(r, 4, scale=False)[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(r, 3)


def test_on_policy_loss_gradient_raises_the_logprob_of_positive_advantage_tokens():
    lp = torch.tensor([[-1.0, -2.0], [-1.5, -0.5]], requires_grad=True)
    mask = torch.ones(2, 2, dtype=torch.bool)
    out = grpo_loss(lp, lp.detach(), torch.tensor([1.0, -1.0]), mask)
    out.loss.backward()
    assert torch.all(lp.grad[0] < 0) and torch.all(lp.grad[1] > 0)  # descent raises row 0, lowers row 1
    assert float(out.ratio_mean) == 1.0 and float(out.clip_frac) == 0.0


def test_ratio_is_clipped_and_masked_tokens_do_not_count():
    old = torch.zeros(1, 3)
    lp = torch.tensor([[0.5, 0.0, 9.0]], requires_grad=True)  # ratio e^0.5 > 1.2 on token 0
    mask = torch.tensor([[True, True, False]])
    out = grpo_loss(lp, old, torch.tensor([1.0]), mask, clip_eps=0.2)
    out.loss.backward()
    assert lp.grad[0, 0] == 0, "a clipped token with positive advantage gets no gradient"
    assert lp.grad[0, 2] == 0, "a masked token gets no gradient"
    assert float(out.clip_frac) == pytest.approx(0.5)
    assert float(out.loss) == pytest.approx(-(1.2 + 1.0) / 2)


def test_kl_to_reference_is_zero_at_the_reference_and_positive_elsewhere():
    lp, mask = torch.tensor([[-1.0, -2.0]]), torch.ones(1, 2, dtype=torch.bool)
    assert float(grpo_loss(lp, lp, torch.tensor([0.0]), mask, ref_logprobs=lp, kl_coef=0.1).kl) == 0.0
    assert float(grpo_loss(lp, lp, torch.tensor([0.0]), mask, ref_logprobs=lp - 0.5, kl_coef=0.1).kl) > 0


def test_token_logprobs_match_a_direct_log_softmax():
    torch.manual_seed(0)
    logits, ids = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    lp = token_logprobs(logits, ids)
    assert lp[:, 0].abs().sum() == 0
    assert torch.allclose(lp[1, 3], torch.log_softmax(logits[1, 2], -1)[ids[1, 3]])
