"""The small external draft LM: truncation init, distillation, the adapter path, the vocab check."""
import json

import pytest
import torch

from conftest import save_tiny, tiny_model


def _batch(policy, cap_cls, seed=0, b=4, t=24, **cap_kw):
    """A captured RolloutBatch of random token sequences (last 2/3 of each row = completion)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, policy.config.vocab_size, (b, t), generator=g)
    cm = torch.zeros(b, t, dtype=torch.bool)
    cm[:, t // 3:] = True
    with cap_cls(policy, **cap_kw) as cap, torch.no_grad():
        policy(input_ids=ids)
    return cap.rollout_batch(ids, completion_mask=cm, policy_version=0)


def test_a_full_depth_copy_of_the_policy_has_zero_distillation_loss_and_a_truncated_one_does_not():
    from draftadapt.distill import TeacherCapture, distill_loss
    from draftadapt.drafts.draft_lm import DraftLM

    policy = tiny_model("llama", layers=4, hidden=64)
    batch = _batch(policy, TeacherCapture).to_draft_batch()
    same = distill_loss(DraftLM.from_policy(policy, num_layers=4), batch)
    assert same.tokens == int((batch.loss_mask & batch.valid).sum()) > 0
    assert float(same.loss.detach()) < 1e-5 and float(same.acc) == 1.0, "the policy itself must match its own teacher"
    short = distill_loss(DraftLM.from_policy(policy, num_layers=2), batch)
    assert float(short.loss.detach()) > 1e-3, "two of four layers cannot be the same function"


def test_teacher_capture_keeps_no_hidden_state_and_the_policy_gradients_are_unchanged():
    from draftadapt.distill import TeacherCapture

    policy = tiny_model("qwen3", layers=2, hidden=64)
    ids = torch.randint(3, 1000, (2, 16))
    policy(input_ids=ids).logits.float().log_softmax(-1).mean().backward()
    plain = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()
    with TeacherCapture(policy, teacher="topk", top_k=8) as cap:
        policy(input_ids=ids).logits.float().log_softmax(-1).mean().backward()
    batch = cap.rollout_batch(ids)
    assert all(torch.equal(a, p.grad) for a, p in zip(plain, policy.parameters()))
    assert batch.aux_hidden.shape == (32, 0) and batch.final_hidden is None and batch.teacher_logprobs is None
    assert batch.teacher_topk_ids.shape == (32, 8)


def test_default_teacher_is_full_at_small_vocabularies_and_topk_at_large_ones():
    from draftadapt.distill import default_teacher, teacher_bytes_per_token

    assert default_teacher(1147) == ("draft_vocab", 0)
    assert default_teacher(151_936) == ("topk", 64)
    assert teacher_bytes_per_token(1147, "draft_vocab") == 4588
    assert teacher_bytes_per_token(151_936, "topk", 64) == 768


class Sink:
    def __init__(self):
        self.pushes = []

    def push_draft(self, state, version):
        from types import SimpleNamespace

        self.pushes.append((version, {k: v.clone() for k, v in state.items()}))
        return SimpleNamespace(pushed=True, skipped_reason=None)

    def spec_counters(self):
        from draftadapt.metrics import SpecCounters

        return SpecCounters()


@pytest.mark.parametrize("teacher, top_k", [("draft_vocab", 0), ("topk", 16)])
def test_the_adapter_distils_and_pushes_a_draft_lm_through_the_same_three_calls(teacher, top_k):
    from draftadapt.adapter import AdapterConfig, DraftAdapter
    from draftadapt.cache import CacheConfig
    from draftadapt.drafts.draft_lm import DraftLM
    from draftadapt.trainer import TrainerConfig

    torch.manual_seed(0)
    policy = tiny_model("llama", layers=4, hidden=64)
    draft = DraftLM.from_policy(policy, num_layers=1)
    sink = Sink()
    adapter = DraftAdapter(draft, policy.get_input_embeddings(),
                           AdapterConfig(train_steps=8, batch_tokens=256, min_tokens=1, teacher=teacher, top_k=top_k),
                           TrainerConfig(lr=3e-3, ttt_steps=1), CacheConfig(), sink=sink)
    losses = []
    for v in range(3):
        g = torch.Generator().manual_seed(v)
        ids = torch.randint(3, 1000, (4, 32), generator=g)
        with adapter.capture(policy) as cap, torch.no_grad():
            policy(input_ids=ids)
        assert adapter.on_rollouts(cap.rollout_batch(ids, policy_version=v)) == 4
        stats = adapter.on_step_end(v + 1)
        losses.append(stats.train.loss)
        assert stats.pushed and stats.push_bytes > 0
    assert losses[-1] < losses[0], f"distillation must lower the loss: {losses}"
    names = set(sink.pushes[-1][1])
    assert names == {n for n, _ in draft.lm.named_parameters()} and "model.embed_tokens.weight" in names
    assert [v for v, _ in sink.pushes] == [1, 2, 3]


def test_a_draft_lm_with_another_vocab_or_tokenizer_is_refused_naming_both(tmp_path):
    from draftadapt.drafts.draft_lm import check_draft_lm

    target, tok = save_tiny("llama", tmp_path / "t", layers=2, hidden=64)
    check_draft_lm(target, target)  # itself: fine
    bigger, _ = save_tiny("llama", tmp_path / "d", layers=1, hidden=64, vocab=1200)
    with pytest.raises(ValueError, match=r"vocab_size=1200 .* target vocab_size=1147"):
        check_draft_lm(bigger, target)
    # same size, another tokenizer: two tokens swapped
    swapped = tmp_path / "swapped"
    save_tiny("llama", swapped, layers=1, hidden=64)
    path = swapped / "tiny-llama" / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"token id 10 is .* in the draft and .* in the target"):
        check_draft_lm(swapped / "tiny-llama", target)
