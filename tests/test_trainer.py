"""DraftTrainer and offline training: exact resume, draft-only updates, a run that learns."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import tiny_config, tiny_model

from draftadapt.batch import DraftBatch
from draftadapt.checkpoint import load_eagle3
from draftadapt.drafts.eagle3 import Eagle3Draft
from draftadapt.offline import extract_features, train_offline
from draftadapt.trainer import DraftTrainer, TrainerConfig
from draftadapt.ttt import ttt_loss

V, H = 128, 64


def random_batches(n, seed=0, b=4, t=16):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        valid = torch.ones(b, t, dtype=torch.bool)
        valid[0, t - 5:] = False
        out.append(DraftBatch(torch.randint(0, V, (b, t), generator=g), torch.randn(b, t, 3 * H, generator=g),
                              torch.randn(b, t, V, generator=g).mul(3).log_softmax(-1), valid.clone(), valid))
    return out


def make_trainer(seed=0, **kw):
    torch.manual_seed(seed)
    draft = Eagle3Draft.from_target(tiny_config("llama", layers=8, hidden=H, vocab=V))
    return DraftTrainer(draft, torch.nn.Embedding(V, H), TrainerConfig(**{"lr": 1e-3, "warmup_steps": 5, **kw}))


def test_resume_reproduces_the_loss_sequence():
    batches = random_batches(7)
    a = make_trainer(seed=0)
    for batch in batches[:3]:
        a.step(batch)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    rest_a = [a.step(batch).loss for batch in batches[3:]]

    b = make_trainer(seed=1)  # different init and a fresh optimizer, then the saved state
    b.embed = a.embed
    assert [b.step(batch).loss for batch in batches[3:]] != rest_a, "the check must be able to fail"
    b = make_trainer(seed=1)
    b.embed = a.embed
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=False))
    assert [b.step(batch).loss for batch in batches[3:]] == rest_a
    assert b.steps_done == a.steps_done == 7


def test_only_the_draft_is_updated():
    trainer = make_trainer()
    embed_before = trainer.embed.weight.detach().clone()
    draft_before = copy.deepcopy(trainer.draft.state_dict())
    trainer.step(random_batches(1)[0])
    assert torch.equal(trainer.embed.weight, embed_before) and trainer.embed.weight.grad is None
    changed = [k for k, v in trainer.draft.state_dict().items() if not torch.equal(v, draft_before[k])]
    assert set(changed) == {n for n, _ in trainer.draft.named_parameters()}, "every draft weight learns; maps do not"


def test_grad_clip_bounds_the_applied_gradient():
    trainer = make_trainer(grad_clip=1e-3)
    stats = trainer.step(random_batches(1)[0])
    applied = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.draft.parameters()]))
    assert stats.grad_norm > 1e-3 and float(applied) <= 1e-3 * 1.001


def test_warmup_ramps_lr_and_stats_flatten_to_floats():
    trainer = make_trainer(lr=3e-3, warmup_steps=3)
    assert [trainer.lr_at(s) for s in range(4)] == pytest.approx([1e-3, 2e-3, 3e-3, 3e-3])
    stats = trainer.step(random_batches(1)[0])
    flat = stats.as_dict()
    assert stats.lr == pytest.approx(1e-3) and stats.step == 1 and stats.tokens > 0
    assert {"loss", "loss_1", "loss_3", "acc_1", "acc_2", "acc_3", "grad_norm", "lr"} <= set(flat)
    assert all(isinstance(v, float) for v in flat.values())


def test_fit_cycles_a_list_and_stops_when_an_iterator_ends():
    batches = random_batches(2)
    assert len(make_trainer().fit(batches, steps=5, progress=False)) == 5
    assert len(make_trainer().fit(iter(batches), steps=5, progress=False)) == 2


@pytest.mark.parametrize("kw", [{"lr": 0}, {"ttt_steps": 0}, {"decay": 0}, {"grad_clip": -1}])
def test_trainer_config_refuses_bad_values(kw):
    with pytest.raises(ValueError, match="TrainerConfig"):
        TrainerConfig(**kw)


def test_resume_refuses_a_state_from_another_config():
    state = make_trainer(ttt_steps=3).state_dict()
    with pytest.raises(ValueError, match="config"):
        make_trainer(ttt_steps=2).load_state_dict(state)


def peaked_target(seed=0):
    """A tiny random Llama whose next-token distributions are sharp (a random head at init
    scale gives near-uniform ones), and 24 sequences sampled from it."""
    target = tiny_model("llama", seed=seed, layers=4, hidden=H, vocab=V)
    with torch.no_grad():
        target.lm_head.weight.mul_(20)
    g = torch.Generator().manual_seed(seed)
    seqs = torch.randint(0, V, (24, 3), generator=g)
    with torch.no_grad():
        for _ in range(25):
            probs = target(seqs).logits[:, -1].softmax(-1)
            seqs = torch.cat([seqs, torch.multinomial(probs, 1, generator=g)], 1)
    return target, seqs.tolist()


def test_features_equal_a_plain_forward_of_each_sequence():
    target, seqs = peaked_target()
    seqs = [seqs[0][:20], seqs[1]]
    ids = torch.tensor([3, 10, 40, 77])  # a 4-token draft vocab
    masks = [[i >= 5 for i in range(20)], [True] * 28]
    (batch,) = extract_features(target, seqs, (1, 2, 3), ids, loss_masks=masks, batch_size=2)
    assert batch.input_ids.shape == (2, 28) and batch.valid.sum(1).tolist() == [20, 28]
    for row, seq in enumerate(seqs):
        with torch.no_grad():
            out = target(torch.tensor([seq]), output_hidden_states=True)
        n = len(seq)
        aux = torch.cat([out.hidden_states[i] for i in (1, 2, 3)], -1)[0]
        torch.testing.assert_close(batch.aux_hidden[row, :n], aux, atol=1e-5, rtol=1e-4)
        logp = out.logits[0].log_softmax(-1)
        torch.testing.assert_close(batch.teacher_logprobs[row, :n], logp[:, ids], atol=1e-5, rtol=1e-4)
        want = torch.tensor(masks[row]) & torch.isin(logp.argmax(-1), ids)
        assert torch.equal(batch.loss_mask[row, :n], want)
    assert not batch.loss_mask[0, 20:].any()


def test_offline_training_lowers_ttt_loss_and_raises_later_step_accuracy(tmp_path):
    target, seqs = peaked_target()
    torch.manual_seed(0)
    draft = Eagle3Draft.from_target(target.config, aux_layer_ids=(1, 2, 3), target_head=target.lm_head.weight)
    before = copy.deepcopy(draft)
    embed = target.get_input_embeddings()
    config = TrainerConfig(lr=3e-3, ttt_steps=3, warmup_steps=5)
    trained = train_offline(target, seqs, steps=60, draft=draft, config=config, batch_size=12,
                            out_dir=tmp_path / "draft", progress=False)
    batches = list(extract_features(target, seqs, (1, 2, 3), draft.target_ids(), batch_size=24))
    with torch.no_grad():
        old, new = ttt_loss(before, batches[0], embed), ttt_loss(trained, batches[0], embed)
    assert float(new.loss) < 0.5 * float(old.loss), (old, new)
    assert (new.step_acc[1:] > old.step_acc[1:] + 0.3).all(), f"step 2/3 accuracy {old.step_acc} -> {new.step_acc}"
    assert (new.step_acc > 0.5).all(), new.step_acc
    assert not any(p.grad is not None for p in target.parameters()), "the target gets no gradient"
    exported = load_eagle3(tmp_path / "draft", target_embed=embed, target_config=target.config)
    assert torch.equal(exported.lm_head.weight, trained.lm_head.weight)


def test_bf16_autocast_keeps_fp32_master_weights_and_tracks_the_fp32_step():
    batches = random_batches(3)
    runs = {}
    for mode in ("off", "bf16"):
        trainer = make_trainer(seed=0, autocast=mode)
        runs[mode] = [trainer.step(b).loss for b in batches]
        assert all(p.dtype == torch.float32 for p in trainer.draft.parameters())
        assert all(v.dtype == torch.float32 for st in trainer.optimizer.state.values() for v in st.values()
                   if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() > 0)
    assert runs["off"] != runs["bf16"], "bf16 autocast must actually run in bf16"
    for a, b in zip(runs["off"], runs["bf16"]):
        assert abs(a - b) < 0.02 * abs(a), (runs["off"], runs["bf16"])


def test_trainer_device_and_loss_settings(monkeypatch):
    cfg = TrainerConfig()
    assert cfg.resolve_device(torch.device("cpu")).type == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cfg.resolve_device(torch.device("cpu")) == torch.device("cuda")
    assert cfg.autocast_dtype(torch.device("cuda")) == torch.bfloat16 and cfg.autocast_dtype(torch.device("cpu")) is None
    assert TrainerConfig(device="cpu").resolve_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.undo()
    batch = random_batches(1)[0]
    trainer = make_trainer(loss="kl+tv", tv_weight=0.5, device="cpu")
    want = ttt_loss(trainer.draft, batch, trainer.embed, steps=3, loss="kl+tv", tv_weight=0.5)
    assert abs(trainer.step(batch).loss - float(want.loss.detach())) < 1e-5
    with pytest.raises(ValueError, match="autocast"):
        TrainerConfig(autocast="fp16")
    with pytest.raises(ValueError, match="loss"):
        TrainerConfig(loss="js")
