"""GRPO loop parts on a tiny policy with a fake engine: collation, the update, the draft's capture."""
import torch

from conftest import tiny_model
from draftadapt.engine.vllm import Completion
from draftadapt.grpo.loop import UpdateConfig, collate, collect_rollouts, policy_update


class FakeEngine:
    """Returns scripted completions; log-probs come from the policy itself (on-policy)."""

    def __init__(self, policy, completions):
        self.policy, self.completions = policy, completions

    def generate(self, prompts, n, **kw):
        out = []
        for i, p in enumerate(prompts):
            group = []
            for c in self.completions[i * n:(i + 1) * n]:
                ids = torch.tensor([p + c])
                with torch.no_grad():
                    lp = torch.log_softmax(self.policy(input_ids=ids).logits[0, :-1], -1)
                lps = [float(lp[len(p) - 1 + j, t]) for j, t in enumerate(c)]
                group.append(Completion(list(p), list(c), lps, "stop", ""))
            out.append(group)
        return out


def _rollouts(policy):
    prompts = [[1, 5, 6], [1, 7]]
    comps = [[10, 11], [12], [13, 14, 15], [16], [20], [21, 22], [23], [24, 25]]
    good = {10, 13, 20, 23}
    eng = FakeEngine(policy, comps)
    return collect_rollouts(eng, prompts, lambda i, text: float(text.split()[0] in {str(g) for g in good}),
                            lambda ids: " ".join(map(str, ids)), 4, 1.0, 8, [2], policy_version=3)


def test_collate_pads_and_marks_completions():
    r = _rollouts(tiny_model("llama", layers=2, hidden=32, vocab=64))
    b = collate(r, pad_id=0)
    assert b.input_ids.shape == (8, 6)
    assert b.completion_mask[2].tolist() == [False, False, False, True, True, True]
    assert b.attention_mask[1].tolist() == [1, 1, 1, 1, 0, 0]
    assert b.old_logprobs[0, 3] == r.logprobs[0][0]
    assert r.policy_version == 3 and r.rewards.tolist() == [1, 0, 1, 0, 1, 0, 1, 0]


def test_update_raises_the_likelihood_of_rewarded_completions():
    torch.manual_seed(0)
    policy = tiny_model("llama", layers=2, hidden=32, vocab=64)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    r0 = _rollouts(policy)
    for _ in range(5):
        stats = policy_update(policy, opt, _rollouts(policy), 0, UpdateConfig(micro_batch=3))
    r1 = _rollouts(policy)
    good = [i for i in range(8) if r0.rewards[i] > 0]
    bad = [i for i in range(8) if r0.rewards[i] == 0]
    gain = lambda i: sum(r1.logprobs[i]) - sum(r0.logprobs[i])  # noqa: E731
    assert min(gain(i) for i in good) > 0 and max(gain(i) for i in bad) < 0
    assert stats.logprob_mismatch < 1e-5, "on-policy: recomputed log-probs equal the engine's"


def test_capture_in_the_update_leaves_the_policy_gradient_bit_identical():
    from draftadapt.adapter import AdapterConfig, DraftAdapter
    from draftadapt.drafts.eagle3 import Eagle3Draft

    def grads(with_adapter):
        torch.manual_seed(0)
        policy = tiny_model("llama", layers=8, hidden=32, vocab=64)
        opt = torch.optim.SGD(policy.parameters(), lr=0.0)
        adapter = None
        if with_adapter:
            draft = Eagle3Draft.from_target(policy.config)
            adapter = DraftAdapter(draft, policy.get_input_embeddings(), AdapterConfig(min_tokens=1))
        policy_update(policy, opt, _rollouts(policy), 0, UpdateConfig(micro_batch=4), adapter)
        return [p.grad.clone() for p in policy.parameters()], adapter

    plain, _ = grads(False)
    captured, adapter = grads(True)
    assert all(torch.equal(a, b) for a, b in zip(plain, captured))
    assert adapter.worker.cache_info().sequences == 8
