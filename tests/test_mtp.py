"""Native MTP draft: vLLM's MiMo MTP layer reproduced, the Llama->MiMo conversion exact, capture of
the pre-norm state, TTT training through the same trainer and adapter, pushes without shared tensors."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import tiny_config, tiny_model

from draftadapt.adapter import AdapterConfig, DraftAdapter
from draftadapt.capture import FeatureCapture
from draftadapt.drafts.mtp import MTPDraft, load_mtp_state, mtp_state_for_push
from draftadapt.trainer import TrainerConfig
from draftadapt.ttt import unroll

# The 16 tensors vLLM 0.32's MiMoMTP.load_weights reads per MTP layer (checked on the real engine too).
VLLM_MIMO_MTP_NAMES = {f"model.mtp_layers.0.{n}" for n in (
    "token_layernorm.weight", "hidden_layernorm.weight", "input_proj.weight", "final_layernorm.weight",
    "input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.o_proj.weight",
    *(f"self_attn.{p}_proj.{w}" for p in "qkv" for w in ("weight", "bias")),
    *(f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")))}


@pytest.fixture(scope="module")
def policy():
    model = tiny_model("qwen2", layers=4, hidden=64)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # a peaked teacher: a random head is near-uniform, nothing to learn
    return model


def randomized(draft: MTPDraft, seed: int = 0) -> MTPDraft:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in draft.named_parameters():
            base = 1.0 if name.endswith("layernorm.weight") else 0.0
            p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
    return draft


def causal(b: int, t: int) -> torch.Tensor:
    return torch.ones(t, t, dtype=torch.bool).tril().expand(b, t, t)


def test_parameter_names_are_the_ones_vllm_loads(policy):
    draft = MTPDraft.from_target(policy.config, policy.lm_head, num_mtp_layers=2)
    names = set(mtp_state_for_push(draft))
    assert {n for n in names if ".0." in n} == VLLM_MIMO_MTP_NAMES
    assert len(names) == 2 * len(VLLM_MIMO_MTP_NAMES)
    assert not any("embed_tokens" in n or "lm_head" in n for n in names)  # shared with the policy, never pushed


def test_mtp_layer_matches_a_qwen2_decoder_layer_wrapped_as_vllm_runs_it():
    """vLLM's MiMoMultiTokenPredictorLayer = norms -> input_proj(cat(hidden, embed)) -> Qwen2 block
    -> residual -> final_layernorm, with the embedding zeroed at position 0."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

    cfg = tiny_config("qwen2", layers=2, hidden=64)
    cfg._attn_implementation = "eager"
    draft = randomized(MTPDraft.from_target(cfg, torch.zeros(cfg.vocab_size, 64)))
    m = draft.midlayer
    block = Qwen2DecoderLayer(cfg, layer_idx=0).eval()
    missing, _ = block.load_state_dict(m.state_dict(), strict=False)
    assert not missing
    b, t = 2, 9
    emb, hidden = torch.randn(b, t, 64), torch.randn(b, t, 64)
    pos = torch.arange(t).expand(b, t)
    ours = draft(emb, hidden, pos, causal(b, t))
    with torch.no_grad():
        e = torch.where(pos[..., None] == 0, 0.0, emb)
        x = m.input_proj(torch.cat([m.hidden_layernorm(hidden), m.token_layernorm(e)], -1))
        rope = Qwen2RotaryEmbedding(cfg)(x, pos)
        mask = torch.zeros(b, 1, t, t).masked_fill(~causal(b, t)[:, None], float("-inf"))
        ref = m.final_layernorm(block(x, attention_mask=mask, position_ids=pos, position_embeddings=rope))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_llama_converts_to_mimo_exactly():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from draftadapt.toy.mtp import mimo_config, qwen2_trunk

    llama = tiny_model("llama", layers=3, hidden=64)
    with torch.no_grad():
        llama.lm_head.weight.mul_(5)
    cfg = mimo_config(llama.config.to_dict(), num_mtp_layers=1)
    assert cfg["architectures"] == ["MiMoForCausalLM"] and cfg["num_nextn_predict_layers"] == 1
    assert cfg["model_type"] == "qwen2" and not cfg["tie_word_embeddings"] and not cfg["use_sliding_window"]
    qwen = Qwen2ForCausalLM(Qwen2Config.from_dict(cfg)).eval()
    qwen.load_state_dict(qwen2_trunk(llama.state_dict(), 3), strict=True)
    ids = torch.randint(0, 1147, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(qwen(input_ids=ids).logits, llama(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_capture_keeps_the_state_entering_the_final_norm_and_no_aux(policy):
    ids = torch.randint(3, 1147, (2, 12))
    with FeatureCapture(policy, aux_layer_ids=(), final_prenorm=True) as pre, torch.no_grad():
        policy(input_ids=ids)
    with FeatureCapture(policy, aux_layer_ids=(), capture_final_hidden=True) as post, torch.no_grad():
        policy(input_ids=ids)
    a, b = pre.rollout_batch(input_ids=ids), post.rollout_batch(input_ids=ids)
    assert a.aux_hidden.shape == (24, 0) and a.final_hidden.shape == (24, 64)
    assert not torch.allclose(a.final_hidden, b.final_hidden)
    torch.testing.assert_close(policy.model.norm(a.final_hidden), b.final_hidden)
    with pytest.raises(ValueError, match="captures no hidden state"):
        FeatureCapture(policy, aux_layer_ids=())


def test_unroll_step_one_is_the_plain_forward_and_later_steps_feed_the_output_back(policy):
    draft = randomized(MTPDraft.from_target(policy.config, policy.lm_head))
    ids = torch.randint(3, 1147, (2, 10))
    with FeatureCapture(policy, aux_layer_ids=(), final_prenorm=True) as cap, torch.no_grad():
        policy(input_ids=ids)
    batch = cap.rollout_batch(input_ids=ids).to_draft_batch()
    with torch.no_grad():
        logits = unroll(draft, batch, policy.get_input_embeddings(), steps=2)
        emb = policy.get_input_embeddings()(torch.cat([ids[:, 1:], ids[:, :1] * 0], 1))
        pos = torch.arange(10).expand(2, 10)
        out1 = draft(emb, batch.final_hidden, pos, causal(2, 10))
        torch.testing.assert_close(logits[0], out1 @ policy.lm_head.weight.T)
        # step 2 at base 0: token 2 at position 1, hidden = step 1's output at base 0, keys of step 1
        # at position 0 plus its own
        m = draft.midlayer
        q1, k1, v1, _ = m.project(emb, batch.final_hidden, pos)
        e2 = policy.get_input_embeddings()(ids[:, 2:3])
        q, k, v, res = m.project(e2, out1[:, :1], pos[:, 1:2])
        from draftadapt.drafts.eagle3 import attend
        att = attend(q, torch.cat([k1[:, :, :1], k], 2), torch.cat([v1[:, :, :1], v], 2),
                     torch.ones(2, 1, 2, dtype=torch.bool))
        torch.testing.assert_close(logits[1][:, 0], (m.finish(att, res) @ policy.lm_head.weight.T)[:, 0])


@dataclass
class FakeResult:
    version: int
    pushed: bool
    skipped_reason: str | None = None
    verified: bool = True


class FakeSink:
    def __init__(self):
        self.states = []

    def push_draft(self, state, version):
        self.states.append({k: v.clone() for k, v in state.items()})
        return FakeResult(version, True)

    def spec_counters(self):
        from draftadapt.metrics import SpecCounters

        return SpecCounters(0, 0, 0, (0, 0, 0))


def test_the_adapter_trains_an_mtp_draft_detached_from_the_policy_and_pushes_only_its_layers(policy):
    """Selecting MTP is configuration: the same DraftAdapter, capture, cache, trainer and push."""
    torch.manual_seed(0)
    draft = MTPDraft.from_target(policy.config, policy.lm_head, num_mtp_layers=2)
    layer1 = {k: v.clone() for k, v in draft.model.mtp_layers[1].state_dict().items()}
    sink = FakeSink()
    adapter = DraftAdapter(draft, policy.get_input_embeddings(), AdapterConfig(train_steps=40, min_tokens=1),
                           TrainerConfig(lr=3e-3, ttt_steps=3), sink=sink)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    ids = torch.randint(3, 1147, (4, 24))
    completion = torch.arange(24).expand(4, 24) >= 6
    loss_before = _loss(draft, policy, ids, completion)
    with adapter.capture(policy) as cap:
        logits = policy(input_ids=ids).logits
        logits.float().log_softmax(-1).mean().backward()  # the policy's own loss
    grads = {n: p.grad.clone() for n, p in policy.named_parameters()}
    adapter.on_rollouts(cap.rollout_batch(input_ids=ids, completion_mask=completion, policy_version=0))
    stats = adapter.on_step_end(1)
    # read BEFORE any zero_grad: 40 draft steps must have added nothing to the policy's own gradients
    # (the shared lm_head and embedding above all)
    added = [n for n, p in policy.named_parameters() if not torch.equal(p.grad, grads[n])]
    assert not added, f"draft training wrote gradients into the policy's {added}"
    policy.zero_grad(set_to_none=True)
    assert stats.pushed and stats.train.steps == 40
    assert _loss(draft, policy, ids, completion) < 0.7 * loss_before
    assert set(sink.states[0]) == set(mtp_state_for_push(draft)) and not any("embed" in k for k in sink.states[0])
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items()), "the policy's weights changed"
    assert all(torch.equal(grads[n], p.grad) for n, p in _grads_again(policy, ids).items()), "capture changed grads"
    policy.zero_grad(set_to_none=True)
    # vLLM never runs a second MTP layer: it is pushed unchanged, not trained
    assert all(torch.equal(v, draft.model.mtp_layers[1].state_dict()[k]) for k, v in layer1.items())


def _policy_touched(policy, run) -> list[str]:
    """Names of the policy's parameters that got a gradient or changed while `run()` ran."""
    policy.zero_grad(set_to_none=True)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    run()
    touched = [n for n, p in policy.named_parameters() if p.grad is not None or not torch.equal(p, before[n])]
    policy.zero_grad(set_to_none=True)
    return touched


@pytest.mark.parametrize("leak", [None, "lm_head", "embedding"])
def test_draft_training_sends_no_gradient_into_the_shared_head_or_embedding(policy, monkeypatch, leak):
    """The MTP draft reads the policy's lm_head and embedding (vLLM shares both): after draft steps
    they have no gradient and are bit-identical. The same check, with either read left attached
    (a head or embedding the draft could train), names the leaked tensor - so it can fail."""
    import draftadapt.ttt as ttt

    if leak == "lm_head":
        monkeypatch.setattr(MTPDraft, "head_weight", lambda self: self._head[0].weight)
    elif leak == "embedding":
        monkeypatch.setattr(ttt, "_embed_weight", lambda embed: embed.weight)
    draft = randomized(MTPDraft.from_target(policy.config, policy.lm_head))
    adapter = DraftAdapter(draft, policy.get_input_embeddings(), AdapterConfig(train_steps=3, min_tokens=1),
                           TrainerConfig(lr=3e-3, ttt_steps=3))
    ids = torch.randint(3, 1147, (2, 16))
    with adapter.capture(policy) as cap, torch.no_grad():
        policy(input_ids=ids)
    adapter.on_rollouts(cap.rollout_batch(input_ids=ids, policy_version=0))
    draft_before = {k: v.clone() for k, v in draft.state_dict().items()}
    stats = []
    touched = _policy_touched(policy, lambda: stats.append(adapter.on_step_end(1)))
    assert stats[0].train.steps == 3 and not all(torch.equal(v, draft.state_dict()[k]) for k, v in draft_before.items())
    want = {None: [], "lm_head": ["lm_head.weight"], "embedding": ["model.embed_tokens.weight"]}[leak]
    assert touched == want, f"policy tensors touched by draft training: {touched}"


def _grads_again(policy, ids) -> dict:
    """The policy's gradients of the same loss without any capture."""
    policy(input_ids=ids).logits.float().log_softmax(-1).mean().backward()
    out = dict(policy.named_parameters())
    return out


def _loss(draft, policy, ids, completion) -> float:
    """The 3-step TTT loss of `draft` on the test batch (features from a plain capture)."""
    from draftadapt.ttt import ttt_loss

    with FeatureCapture(policy, aux_layer_ids=(), final_prenorm=True) as cap, torch.no_grad():
        policy(input_ids=ids)
    batch = cap.rollout_batch(input_ids=ids, completion_mask=completion).to_draft_batch()
    with torch.no_grad():
        return float(ttt_loss(draft, batch, policy.get_input_embeddings(), steps=3).loss)


def test_load_mtp_state_reads_a_whole_checkpoint_and_names_missing_tensors(policy):
    a = randomized(MTPDraft.from_target(policy.config, policy.lm_head))
    b = MTPDraft.from_target(policy.config, policy.lm_head)
    ckpt = {**mtp_state_for_push(a), "model.layers.0.mlp.up_proj.weight": torch.zeros(1)}
    load_mtp_state(b, ckpt)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    del ckpt["model.mtp_layers.0.input_proj.weight"]
    with pytest.raises(ValueError, match="input_proj"):
        load_mtp_state(b, ckpt)


def test_on_rollouts_names_a_missing_final_hidden_state(policy):
    from draftadapt.capture import RolloutBatch

    adapter = DraftAdapter(MTPDraft.from_target(policy.config, policy.lm_head), policy.get_input_embeddings())
    n = 8
    batch = RolloutBatch(input_ids=torch.arange(n), cu_seqlens=torch.tensor([0, n]), aux_hidden=torch.zeros(n, 0),
                         loss_mask=torch.ones(n, dtype=torch.bool), teacher_logprobs=torch.zeros(n, 1147))
    with pytest.raises(ValueError, match="final_hidden is missing"):
        adapter.on_rollouts(batch)
