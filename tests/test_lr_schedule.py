"""The draft trainer's learning-rate schedule: warm-up, then constant or a cosine / linear decay."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_config

from draftadapt.batch import DraftBatch
from draftadapt.drafts.eagle3 import Eagle3Draft
from draftadapt.trainer import DraftTrainer, TrainerConfig

V, H = 128, 64


def trainer(**kw) -> DraftTrainer:
    torch.manual_seed(0)
    draft = Eagle3Draft.from_target(tiny_config("llama", layers=8, hidden=H, vocab=V))
    return DraftTrainer(draft, torch.nn.Embedding(V, H), TrainerConfig(**{"lr": 1e-3, **kw}))


def batch() -> DraftBatch:
    g = torch.Generator().manual_seed(0)
    valid = torch.ones(2, 8, dtype=torch.bool)
    return DraftBatch(torch.randint(0, V, (2, 8), generator=g), torch.randn(2, 8, 3 * H, generator=g),
                      torch.randn(2, 8, V, generator=g).log_softmax(-1), valid.clone(), valid)


def test_default_schedule_is_unchanged_warmup_then_constant():
    t = trainer(warmup_steps=4)
    assert [t.lr_at(s) for s in (0, 1, 3, 4, 10_000)] == pytest.approx([2.5e-4, 5e-4, 1e-3, 1e-3, 1e-3])


@pytest.mark.parametrize("schedule, mid", [("cosine", 0.5 * (1 + math.cos(math.pi * 0.25))), ("linear", 0.75)])
def test_decay_after_warmup_reaches_the_floor_and_stays(schedule, mid):
    t = trainer(warmup_steps=2, lr_schedule=schedule, lr_decay_steps=8, lr_min_ratio=0.2)
    lrs = [t.lr_at(s) for s in range(14)]
    assert lrs[:3] == pytest.approx([5e-4, 1e-3, 1e-3]), "warm-up ends at the peak, where the decay starts"
    assert lrs[4] == pytest.approx(1e-3 * (0.2 + 0.8 * mid)), "a quarter of the way down"
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:])) and lrs[3] < 1e-3, "non-increasing after the peak"
    assert lrs[10:] == pytest.approx([2e-4] * 4), "lr_min_ratio * lr once the decay is over"


def test_the_optimizer_steps_with_the_scheduled_lr():
    t = trainer(lr_schedule="linear", lr_decay_steps=2, lr_min_ratio=0.0)
    b = batch()
    used = [t.step(b).lr for _ in range(3)]
    assert used == pytest.approx([1e-3, 5e-4, 0.0])
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(0.0)


def test_a_state_saved_before_the_schedule_fields_existed_resumes():
    t = trainer()
    state = t.state_dict()
    for key in ("lr_schedule", "lr_decay_steps", "lr_min_ratio"):
        del state["config"][key]
    trainer().load_state_dict(state)
    with pytest.raises(ValueError, match="config"):
        trainer(lr_schedule="cosine", lr_decay_steps=5).load_state_dict(state)


@pytest.mark.parametrize("kw, needle", [({"lr_schedule": "step"}, "choose one of"),
                                        ({"lr_schedule": "cosine"}, "lr_decay_steps >= 1"),
                                        ({"lr_min_ratio": 1.5}, "lr_min_ratio")])
def test_a_bad_schedule_names_the_fix(kw, needle):
    with pytest.raises(ValueError, match=needle):
        TrainerConfig(**kw)


class FakeEngine:
    """Engine.generate's signature: n fixed completions per prompt, recording the call."""

    def generate(self, prompts, *, n, temperature, max_tokens, logprobs, seed, stop_token_ids):
        from draftadapt.engine.vllm import Completion

        self.call = dict(n=n, temperature=temperature, seed=seed)
        return [[Completion(list(p), [(7 * j + k) % V for k in range(1, 9)], None, "length", "") for j in range(n)]
                for p in prompts]


def test_offline_training_from_own_samples_follows_the_schedule(tmp_path):
    from conftest import tiny_model

    from draftadapt.checkpoint import load_eagle3
    from draftadapt.offline import train_from_own_samples

    target, engine = tiny_model("llama", layers=4, hidden=H, vocab=V), FakeEngine()
    cfg = TrainerConfig(lr=2e-3, warmup_steps=1, lr_schedule="cosine", lr_decay_steps=4, lr_min_ratio=0.0)
    res = train_from_own_samples(engine, target, [[1, 2, 3], [4, 5]], steps=6, n=3, draft_vocab_size=32,
                                 aux_layer_ids=(1, 2, 3), config=cfg, out_dir=tmp_path / "d", progress=False)
    assert engine.call == {"n": 3, "temperature": 1.0, "seed": 0}
    assert len(res.sequences) == 6 and res.completion_tokens == 48
    assert [h.lr for h in res.history] == pytest.approx([2e-3, 2e-3, 1e-3 * (1 + math.cos(math.pi / 4)), 1e-3,
                                                          1e-3 * (1 - math.cos(math.pi / 4)), 0.0])
    assert load_eagle3(tmp_path / "d").config.draft_vocab_size == 32


def test_an_lr_burst_falls_from_its_factor_and_ends_with_its_steps():
    """The post-refresh burst (AdapterConfig.vocab_refresh_lr): the schedule's lr x a factor falling (cosine) from
    `factor` to 0.1 x factor over `steps` updates; after them, and outside the block, the schedule alone."""
    t = trainer(lr_schedule="cosine", lr_decay_steps=20)
    t.step(batch())
    with t.lr_burst(4, 3.0):
        lrs = [t.step(batch()).lr for _ in range(5)]
    after = t.step(batch()).lr
    scale = [3.0 * (0.1 + 0.45 * (1 + math.cos(math.pi * i / 4))) for i in range(4)] + [1.0]
    assert lrs == pytest.approx([t.lr_at(1 + i) * s for i, s in enumerate(scale)])
    assert after == pytest.approx(t.lr_at(6))
    with t.lr_burst(4, 1.0):
        assert t.step(batch()).lr == pytest.approx(t.lr_at(7)), "factor 1 leaves the schedule alone"
    with pytest.raises(ValueError, match="factor > 0"), t.lr_burst(4, 0.0):
        pass
