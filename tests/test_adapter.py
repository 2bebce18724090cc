"""DraftAdapter: capture -> cache -> training -> pushes at step boundaries, exact resume, clear errors."""
from __future__ import annotations

import io
from dataclasses import dataclass

import pytest
import torch
from conftest import tiny_model

from draftadapt.adapter import AdapterConfig, DraftAdapter, LocalDraftWorker
from draftadapt.cache import CacheConfig
from draftadapt.checkpoint import draft_state_for_push
from draftadapt.drafts.eagle3 import Eagle3Draft
from draftadapt.metrics import SpecCounters
from draftadapt.trainer import TrainerConfig
from draftadapt.ttt import ttt_loss

B, T, PROMPT = 4, 24, 6  # sequences per step, tokens per sequence, prompt tokens (no loss)
V = 1147  # tiny_model's default vocab


@pytest.fixture(scope="module")
def policy():
    model = tiny_model("llama", layers=8, hidden=64)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # a peaked teacher: a random head is near-uniform, nothing to learn
    return model


@dataclass
class FakeResult:
    version: int
    pushed: bool
    skipped_reason: str | None = None


class FakeSink:
    """Records pushes; serves cumulative spec counters built from one acceptance length per step."""

    def __init__(self, step_al=(), refuse=(), drafts=100, k=3):
        self.pushes: list[int] = []
        self.states: list[dict] = []
        self.refuse, self.calls = set(refuse), 0
        self.cumulative = [SpecCounters(0, 0, 0, (0,) * k)]  # served at construction: the baseline
        for al in step_al:
            acc = round((al - 1) * drafts)
            per_pos = (min(acc, drafts), max(0, min(acc - drafts, drafts)), max(0, acc - 2 * drafts))
            self.cumulative.append(self.cumulative[-1] + SpecCounters(drafts, k * drafts, acc, per_pos))

    def push_draft(self, state, version):
        self.pushes.append(version)
        self.states.append({k: v.clone() for k, v in state.items()})
        ok = version not in self.refuse
        return FakeResult(version, ok, None if ok else "engine refused")

    def spec_counters(self):
        out = self.cumulative[min(self.calls, len(self.cumulative) - 1)]
        self.calls += 1
        return out


def make_adapter(policy, sink=None, seed=1, cache=CacheConfig(max_tokens=4096), **cfg):
    torch.manual_seed(seed)
    draft = Eagle3Draft.from_target(policy.config, target_head=policy.lm_head.weight)
    config = AdapterConfig(**{"train_steps": 4, "batch_tokens": B * T, "min_tokens": 1, "acceptance_drop": None,
                              **cfg})
    return DraftAdapter(draft, policy.get_input_embeddings(), config, TrainerConfig(lr=3e-3), cache, sink=sink)


def rollout_ids(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g)


def add_rollouts(adapter, policy, version, seed=None):
    """One captured log-prob forward (right-padded, prompt masked), handed to on_rollouts."""
    ids = rollout_ids(version if seed is None else seed)
    am = torch.ones(B, T, dtype=torch.long)
    am[0, T - 5:] = 0  # one shorter sequence
    completion = torch.arange(T)[None, :].expand(B, T) >= PROMPT
    with adapter.capture(policy) as cap:
        policy(input_ids=ids, attention_mask=am).logits.sum()
    batch = cap.rollout_batch(ids, attention_mask=am, completion_mask=completion, policy_version=version)
    return adapter.on_rollouts(batch), batch


def run(adapter, policy, versions, seed_of=lambda v: v, **kw):
    out = []
    for v in versions:
        add_rollouts(adapter, policy, v, seed_of(v))
        out.append(adapter.on_step_end(v, **kw))
    return out


def test_captured_features_reach_the_cache_and_training_lowers_the_draft_loss(policy):
    adapter = make_adapter(policy)
    stored, batch = add_rollouts(adapter, policy, version=0)
    assert stored == B and adapter.worker.cache.num_tokens == B * T - 5
    # the hooks took the draft's aux layers: they equal a plain forward's hidden_states there
    ids = rollout_ids(0)
    with torch.no_grad():
        hs = policy(input_ids=ids[1:], output_hidden_states=True).hidden_states
    aux = torch.cat([hs[i] for i in adapter.worker.draft.config.aux_layer_ids], -1)  # [B-1, T, 3H]
    assert batch.aux_hidden.dtype == torch.bfloat16, "capture casts to the cache's storage dtype on the device"
    torch.testing.assert_close(batch.aux_hidden[T - 5:T - 5 + T].float(), aux[0].bfloat16().float(), rtol=1e-2, atol=1e-2)
    held = batch.to_draft_batch()

    def eval_loss():
        with torch.no_grad():
            return float(ttt_loss(adapter.worker.draft, held, policy.get_input_embeddings(), steps=3, decay=0.8).loss)

    before = eval_loss()
    stats = [adapter.on_step_end(0)] + run(adapter, policy, range(1, 6), seed_of=lambda v: v % 2)
    assert all(s.train is not None and s.train.steps == 4 for s in stats)
    assert eval_loss() < 0.6 * before, f"draft loss on step-0 features {before:.3f} -> {eval_loss():.3f}"


def test_pushes_follow_the_cadence(policy):
    sink = FakeSink()
    adapter = make_adapter(policy, sink, push_every=2, train_steps=1)
    stats = run(adapter, policy, range(7))
    assert sink.pushes == [0, 2, 4, 6]
    assert [s.pushed for s in stats] == [True, False] * 3 + [True]
    assert stats[1].push_reason == "not due; next cadence push at version 2" and stats[2].push_reason == "cadence"
    assert set(sink.states[0]) == set(draft_state_for_push(adapter.worker.draft)), "exactly the drafter's tensors"
    assert not any("embed" in k for k in sink.states[0]), "a push must never carry the shared embedding"
    assert stats[2].push_bytes > 0 and stats[2].last_pushed_version == 2 and stats[3].last_pushed_version == 2


def test_no_training_below_min_tokens_and_no_push_of_an_untrained_draft(policy):
    sink = FakeSink()
    adapter = make_adapter(policy, sink, min_tokens=B * T)  # one batch (B*T - 5 tokens) is not enough
    first, second = run(adapter, policy, range(2))
    assert first.train is None and "min_tokens" in first.train_skipped_reason
    assert not first.pushed and "not trained since the last push" in first.push_reason
    assert second.train is not None and second.pushed and sink.pushes == [1]


def test_a_version_is_never_pushed_twice(policy):
    sink = FakeSink(refuse={5})
    adapter = make_adapter(policy, sink, push_every=1)
    run(adapter, policy, [3])
    again = run(adapter, policy, [3])[0]  # same version again, with new weights trained
    assert again.train is not None and not again.pushed and "already pushed" in again.push_reason
    assert sink.pushes == [3]
    # a push the sink refused is not retried for that version either, but the next one is due
    refused, retry, nxt = run(adapter, policy, [5, 5, 6])
    assert not refused.pushed and "engine refused" in refused.push_reason and refused.last_pushed_version == 3
    assert "already pushed" in retry.push_reason and nxt.pushed
    assert sink.pushes == [3, 5, 6]


@pytest.mark.parametrize("reference", ["ema", "last_push"])
@pytest.mark.parametrize("source", ["sink", "argument"])
def test_an_acceptance_drop_triggers_an_off_cadence_push(policy, reference, source):
    al = [3.0, 3.0, 3.0, 2.5, 2.6, 2.6]  # the fresh draft recovers only partly: no second push
    pushes = {}
    for drop in (0.3, None):  # the control without the trigger must push on cadence only
        sink = FakeSink(al if source == "sink" else ())
        adapter = make_adapter(policy, sink, push_every=100, acceptance_drop=drop, acceptance_reference=reference,
                               ema_decay=0.5, train_steps=1)
        given = FakeSink(al)
        given.spec_counters()  # skip the baseline
        kw = (lambda v: {}) if source == "sink" else (lambda v: {"counters": given.spec_counters() - given.cumulative[v]})
        stats = [s for v in range(len(al)) for s in run(adapter, policy, [v], **kw(v))]
        pushes[drop] = sink.pushes
        assert [s.as_dict()["spec_acceptance_length"] for s in stats] == pytest.approx(al)
    assert pushes[None] == [0]
    assert pushes[0.3] == [0, 3], f"the drop 3.0 -> 2.5 at version 3 must push, nothing else; got {pushes[0.3]}"
    assert stats[3].acceptance_reference == pytest.approx(3.0)
    assert adapter.sink.calls == (len(al) + 1 if source == "sink" else 1), "counters passed in win over the sink"


def test_counters_that_go_back_mean_restarted_engines(policy):
    sink = FakeSink([3.0])
    sink.cumulative.append(SpecCounters(50, 150, 50, (50, 0, 0)))  # restarted: 50 drafts at AL 2.0 since
    adapter = make_adapter(policy, sink, train_steps=1)
    first, second = run(adapter, policy, range(2))
    assert first.spec.acceptance_length == 3.0
    assert second.spec == SpecCounters(50, 150, 50, (50, 0, 0)) and second.as_dict()["spec_acceptance_length"] == 2.0


def test_stale_features_are_dropped(policy):
    adapter = make_adapter(policy, staleness_window=1, train_steps=1)
    stats = run(adapter, policy, range(3))
    assert stats[1].dropped_stale == 0 and stats[2].dropped_stale == B
    assert (stats[2].cache.oldest_version, stats[2].cache.newest_version) == (1, 2)
    assert stats[2].as_dict()["draft/cache_lag_oldest"] == 1.0
    with pytest.warns(UserWarning, match="older than the staleness window"):
        stored, _ = add_rollouts(adapter, policy, version=0)
    assert stored == 0 and adapter.worker.cache_info().oldest_version == 1
    assert adapter.on_step_end(3).dropped_rollouts == B


def test_resume_reproduces_losses_and_push_decisions(policy, tmp_path):
    al = [3.0, 3.0, 3.0, 2.6, 2.7, 2.7, 2.7]
    cfg = dict(push_every=2, acceptance_drop=0.3, staleness_window=1)
    a = make_adapter(policy, FakeSink(al), seed=1, **cfg)
    run(a, policy, range(3))
    buf = io.BytesIO()
    torch.save(a.state_dict(cache_dir=tmp_path / "ckpt-2"), buf)
    rest = run(a, policy, range(3, 7))
    want = [(s.train.loss, s.pushed, s.push_reason) for s in rest]
    assert [s.push_reason.split()[0] for s in rest] == ["acceptance", "not", "cadence", "not"], \
        "a drop at 3 against the saved EMA, cadence at 5: both need the restored counters"

    fresh = make_adapter(policy, FakeSink(al[3:]), seed=2, **cfg)
    assert [s.train.loss for s in run(fresh, policy, range(3, 7))] != [w[0] for w in want], "the check can fail"
    b = make_adapter(policy, FakeSink(al[3:]), seed=2, **cfg)
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=False))
    with pytest.raises(RuntimeError, match="versions must not go back"):
        b.on_step_end(1)
    assert [(s.train.loss, s.pushed, s.push_reason) for s in run(b, policy, range(3, 7))] == want


def test_wrong_order_and_bad_input_raise_naming_the_fix(policy):
    adapter = make_adapter(policy)
    run(adapter, policy, [3])
    with pytest.raises(RuntimeError, match=r"on_step_end\(policy_version=2\) after .*load_state_dict"):
        adapter.on_step_end(2)
    add_rollouts(adapter, policy, version=5)
    with pytest.raises(RuntimeError, match="already stored features of version 5"):
        adapter.on_step_end(4)
    _, batch = add_rollouts(adapter, policy, version=5)
    batch.aux_hidden = batch.aux_hidden[:, :64]
    with pytest.raises(ValueError, match="aux_hidden has width 64"):
        adapter.on_rollouts(batch)
    with pytest.raises(ValueError, match="aux_layer_ids"):
        adapter.capture(policy, aux_layer_ids=(1, 2, 3))


@pytest.mark.parametrize("field,value", [("push_every", -1), ("train_steps", 1.5), ("acceptance_reference", "max"),
                                         ("ema_decay", 1.0), ("acceptance_drop", -0.1), ("teacher", "topk")])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"AdapterConfig.{field}="):
        AdapterConfig(**{field: value})


def test_cache_window_and_final_hidden_teacher_are_checked(policy):
    with pytest.raises(ValueError, match="CacheConfig.staleness_window=3"):
        make_adapter(policy, cache=CacheConfig(staleness_window=3))
    with pytest.raises(ValueError, match="target_head"):
        make_adapter(policy, teacher="final_hidden")


def test_stats_flatten_to_the_names_rl_users_chart(policy):
    adapter = make_adapter(policy, FakeSink([2.5]))
    flat = run(adapter, policy, [0])[0].as_dict()
    for key in ("draft/loss", "draft/acc-step-0", "draft/acc-step-2", "draft/train_seconds", "draft/push_seconds",
                "draft/cache_tokens", "draft/cache_bytes", "draft/cache_lag_newest", "spec_acceptance_length",
                "spec_acceptance_rate-pos-0", "draft/pushed_version", "draft/acc_gain"):
        assert key in flat, f"{key} missing from {sorted(flat)}"
    assert all(isinstance(v, float) for v in flat.values())
    assert flat["spec_acceptance_length"] == pytest.approx(2.5) and flat["spec_acceptance_rate-pos-1"] == 0.5
    skipped = make_adapter(policy, min_tokens=10**6)
    assert "draft/loss" not in run(skipped, policy, [0])[0].as_dict(), "unknown values are left out, not NaN"


def test_any_worker_plugs_in_through_the_seam(policy):
    """The adapter reaches the draft only through DraftWorker calls: a wrapper that records them
    (as a Ray actor proxy would forward them) runs the same loop unchanged."""

    class Recording:
        def __init__(self, inner):
            self.inner, self.calls = inner, []

        def __getattr__(self, name):
            self.calls.append(name)
            return getattr(self.inner, name)

    base = make_adapter(policy)
    worker = Recording(LocalDraftWorker(base.worker.draft, policy.get_input_embeddings(), TrainerConfig(lr=3e-3),
                                        CacheConfig(max_tokens=4096), batch_tokens=B * T))
    sink = FakeSink()
    adapter = DraftAdapter.with_worker(worker, base.config, sink)
    stats = run(adapter, policy, range(2))
    assert all(s.train is not None for s in stats) and sink.pushes == [0, 1]
    assert {"feature_spec", "add", "drop_stale", "train", "state_for_push"} <= set(worker.calls)
