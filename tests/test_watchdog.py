"""The draft-health watchdog: faults injected into engines (fake and live) are caught and repaired
or raised; a healthy draft raises no alarm.

Faults: zeroed drafter weights (sleep/wake, a broken sync), a stale version after an engine
restart, a policy refit after which the draft no longer matches (acceptance collapses while the
draft's training accuracy is high).
"""
import pytest
import torch

from draftadapt.metrics import SpecCounters
from draftadapt.watchdog import DraftHealthError, DraftWatchdog, WatchdogConfig, expected_acceptance_length

SPEC = {"fc.weight": [[4, 12], "torch.float32"], "lm_head.weight": [[8, 4], "torch.float32"]}


class FakeEngine:
    """The worker protocol in plain Python, with the fault hook of engine/swap_worker.py."""

    def __init__(self):
        self.version, self.weights, self.pushes = None, None, 0

    def collective_rpc(self, method, args=(), kwargs=None):
        from draftadapt.engine.swap import checksum, tensors_from_bytes, tensors_to_bytes

        kw = kwargs or {}
        if method == "draftadapt_info":
            return [{"versions": {"draft": self.version, "policy": None}, "draft": SPEC, "policy": {},
                     "draft_forbidden": {}, "vocab_size": 8, "native_draft_update": False, "draft_method": "eagle3"}]
        if method == "draftadapt_push":
            if self.version is not None and kw["version"] <= self.version:
                return [{"pushed": False, "checksum": None, "phases": {}}]
            self.weights, self.version = tensors_from_bytes(kw["payload"]), kw["version"]
            self.pushes += 1
            return [{"pushed": True, "checksum": checksum(self.weights), "phases": {}}]
        if method == "draftadapt_state":
            return [tensors_to_bytes(self.weights)]
        if method == "draftadapt_inject_fault":
            self.weights = {k: torch.zeros_like(v) for k, v in self.weights.items()}
            return [{"faulted": "draft"}]
        if method == "draftadapt_forget_version":
            old, self.version = self.version, None
            return [old]
        raise AssertionError(method)

    def reset_prefix_cache(self):
        return True

    def spec_counters(self):
        return SpecCounters()


def _state(seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*shape, generator=g) for k, (shape, _) in SPEC.items()}


def _watchdog(on_alarm="repair", n=2, history=1000):
    from draftadapt.engine.swap import EngineSwapper

    engines = [FakeEngine() for _ in range(n)]
    wd = DraftWatchdog(EngineSwapper(engines), WatchdogConfig(on_alarm=on_alarm, history=history))
    wd.push_draft(_state(1), 1)
    return wd, engines


def test_a_healthy_push_raises_no_alarm():
    wd, engines = _watchdog()
    assert wd.history[-1].ok and not wd.history[-1].alarms and wd.repairs == 0
    assert [e.pushes for e in engines] == [1, 1]


def test_the_history_keeps_the_newest_checks_and_counts_them_all():
    wd, _ = _watchdog(history=3)
    for v in range(2, 7):
        wd.push_draft(_state(v), v)
    assert wd.checks == 6 and len(wd.history) == 3, "a long run's watchdog keeps a bounded history"
    assert all(h.ok for h in wd.history)


def test_zeroed_weights_are_caught_by_digest_and_repaired_by_a_re_push():
    wd, engines = _watchdog()
    engines[1].collective_rpc("draftadapt_inject_fault")
    health = wd.after_wake()
    assert health.ok and [(a.kind, a.engine, a.repaired) for a in health.alarms] == [("digest", 1, True)]
    assert torch.equal(engines[1].weights["fc.weight"], _state(1)["fc.weight"]), "the latest version serves again"
    assert [e.pushes for e in engines] == [1, 2] and wd.repairs == 1


def test_a_stale_version_after_restart_is_repaired_or_raised_per_setting():
    for on_alarm in ("repair", "raise"):
        wd, engines = _watchdog(on_alarm)
        engines[0].__init__()  # restarted: start-up draft, no version
        if on_alarm == "raise":
            with pytest.raises(DraftHealthError, match="serves draft version None, the latest push was 1"):
                wd.after_restart()
        else:
            assert [a.kind for a in wd.after_restart().alarms] == ["stale_version"]
            assert engines[0].version == 1 and wd.repairs == 1


def test_warn_mode_records_without_acting(caplog):
    wd, engines = _watchdog("warn")
    engines[0].collective_rpc("draftadapt_inject_fault")
    health = wd.check_engines()
    assert not health.ok and health.alarms[0].kind == "digest"
    assert not wd.after_wake().ok and wd.repairs == 0 and "digest" in caplog.text


def test_acceptance_collapse_against_training_accuracy():
    wd, engines = _watchdog()
    acc = (0.8, 0.7, 0.6)  # expects AL 1 + 0.8 + 0.56 + 0.336 = 2.70
    assert expected_acceptance_length(acc) == pytest.approx(2.696)
    good = SpecCounters(drafts=100, draft_tokens=300, accepted=150, accepted_per_pos=(70, 50, 30))
    assert wd.check_step(good, acc).ok
    assert wd.check_step(SpecCounters(drafts=5, draft_tokens=15), acc).ok, "too few drafts to judge"
    dead = SpecCounters(drafts=100, draft_tokens=300, accepted=80, accepted_per_pos=(80, 0, 0))
    with pytest.raises(DraftHealthError, match="position 1 accepts 0.000"):  # weights fine: cannot repair
        wd.check_step(dead, acc)
    collapsed = SpecCounters(drafts=100, draft_tokens=300, accepted=3, accepted_per_pos=(3, 0, 0))
    with pytest.raises(DraftHealthError, match="policy moved"):
        wd.check_step(collapsed, acc)
    # a draft that never learned (low training accuracy) is not an alarm: it is just a poor draft
    assert wd.check_step(collapsed, (0.05, 0.01, 0.0)).ok
    # the same collapse with zeroed weights is repaired by a re-push
    engines[0].collective_rpc("draftadapt_inject_fault")
    health = wd.check_step(collapsed, acc)
    assert health.ok and {a.kind for a in health.alarms} >= {"acceptance_collapse", "digest"} and wd.repairs == 1


def test_bad_setting_names_the_choices():
    with pytest.raises(ValueError, match="repair"):
        WatchdogConfig(on_alarm="ignore")


# --------------------------------------------------------------------------- a live engine

@pytest.mark.vllm
@pytest.mark.slow
def test_faults_on_a_live_engine_are_caught(toy_policy_dir, toy_draft_dir, tmp_path):
    """Toy policy + EAGLE-3 draft: zeroed drafter weights (caught by digest and by acceptance,
    repaired), a restart that comes back with the start-up draft (stale version, repaired), and a
    refit to another policy with the draft left as it was (acceptance collapse vs training accuracy,
    raised: a re-push cannot fix it)."""
    from draftadapt.checkpoint import draft_state_for_push, load_eagle3
    from draftadapt.engine.swap import EngineSwapper
    from draftadapt.engine.vllm import Engine, EngineConfig, SpecConfig
    from draftadapt.toy.eval import encode_prompt, eval_problems
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(toy_policy_dir)
    prompts = [encode_prompt(tok, p.prompt) for p in eval_problems(16, seed=3)]
    cfg = EngineConfig(model=str(toy_policy_dir), spec=SpecConfig("eagle3", 3, model=str(toy_draft_dir)), max_num_seqs=32)
    state = draft_state_for_push(load_eagle3(toy_draft_dir))
    acc = (0.75, 0.6, 0.5)  # what training on this policy reports for the toy draft (AL ~2.7 measured)

    def step(wd):
        c0 = wd.spec_counters()
        wd.swapper.engines[0].generate(prompts, n=4, temperature=1.0, max_tokens=48, logprobs=False)
        return wd.check_step(wd.spec_counters() - c0, acc)

    eng = Engine(cfg)
    try:
        wd = DraftWatchdog(EngineSwapper(eng), WatchdogConfig(on_alarm="repair"))
        assert wd.push_draft(state, 1).pushed and wd.history[-1].ok
        healthy = step(wd)
        assert healthy.ok and healthy.acceptance_length > 2.0, healthy
        # 1) zeroed weights, version unchanged: the acceptance check trips, the digest finds it, re-push
        eng.collective_rpc("draftadapt_inject_fault", kwargs={"kind": "draft"})
        h = step(wd)
        assert {a.kind for a in h.alarms} >= {"acceptance_collapse", "digest"} and wd.repairs == 1, h
        assert step(wd).acceptance_length > 2.0, "the repaired draft drafts again"
        # 2) restart: the new engine serves the start-up draft under no version
        eng.shutdown()
        eng = Engine(cfg)
        wd.swapper.engines[0] = eng
        h = wd.after_restart()
        assert [a.kind for a in h.alarms] == ["stale_version"] and h.ok and wd.repairs == 2
        # 3) refit to a different policy (a fresh init of the same architecture), draft untouched:
        #    acceptance collapses, the weights check out
        torch.manual_seed(5)
        moved = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(toy_policy_dir))
        wd.refit_policy(moved.state_dict(), 2)
        assert wd.history[-1].ok, "a refit must leave the pushed draft in place"
        with pytest.raises(DraftHealthError, match="policy moved"):
            step(wd)
    finally:
        eng.shutdown()


# --------------------------------------------------------------------------- on by default in the adapter

@pytest.mark.vllm
@pytest.mark.slow
def test_the_adapter_repairs_a_zeroed_engine_draft_by_default_and_the_flag_turns_it_off(toy_policy_dir, toy_draft_dir,
                                                                                          caplog):
    """A DraftAdapter with an EngineSwapper sink and the default AdapterConfig: the toy policy's real rollouts,
    their features captured and trained on, one push (push_every=100). The engine's drafter weights are then
    zeroed (a lost draft: sleep/wake, a broken sync), version unchanged: the next step's counter check trips,
    the read-back finds the digest, the draft is re-pushed, and the step's metrics and the log say so; the step
    after drafts again. With AdapterConfig(watchdog=False) the same fault goes unseen and keeps serving."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from draftadapt.adapter import AdapterConfig, DraftAdapter
    from draftadapt.checkpoint import load_eagle3
    from draftadapt.engine.swap import EngineSwapper
    from draftadapt.engine.vllm import Engine, EngineConfig, SpecConfig
    from draftadapt.grpo.loop import collate, collect_rollouts
    from draftadapt.toy.eval import encode_prompt, eval_problems
    from draftadapt.trainer import TrainerConfig

    tok = AutoTokenizer.from_pretrained(toy_policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(toy_policy_dir, dtype=torch.float32).eval()
    prompts = [encode_prompt(tok, p.prompt) for p in eval_problems(16, seed=3)]
    cfg = EngineConfig(model=str(toy_policy_dir), spec=SpecConfig("eagle3", 3, model=str(toy_draft_dir)), max_num_seqs=32)

    def step(adapter, eng, v):
        """One RL step's draft side: rollouts (counted), their features captured, the boundary."""
        c0 = adapter.sink.spec_counters()
        r = collect_rollouts(eng, prompts, lambda i, text: 0.0, tok.decode, 2, 1.0, 48, [tok.eos_token_id], v, seed=v)
        counters = adapter.sink.spec_counters() - c0
        b = collate(r, tok.pad_token_id)
        with torch.no_grad(), adapter.capture(policy) as cap:
            policy(input_ids=b.input_ids, attention_mask=b.attention_mask)
        adapter.on_rollouts(cap.rollout_batch(b.input_ids, attention_mask=b.attention_mask,
                                              completion_mask=b.completion_mask, policy_version=v))
        return adapter.on_step_end(v, counters=counters)

    def run(eng, first, watchdog):
        """Versions first..first+3: push at the first, the fault after the second."""
        config = AdapterConfig(train_steps=2, batch_tokens=2048, min_tokens=1, push_every=100, acceptance_drop=None,
                               **({} if watchdog else {"watchdog": False}))
        adapter = DraftAdapter(load_eagle3(toy_draft_dir), policy.get_input_embeddings(), config,
                               TrainerConfig(lr=1e-5, ttt_steps=3), sink=EngineSwapper(eng))
        stats = [step(adapter, eng, first), step(adapter, eng, first + 1)]
        eng.collective_rpc("draftadapt_inject_fault", kwargs={"kind": "draft"})
        stats += [step(adapter, eng, first + 2), step(adapter, eng, first + 3)]
        return adapter, stats

    eng = Engine(cfg)
    try:
        caplog.set_level("WARNING", logger="draftadapt.watchdog")
        adapter, on = run(eng, 0, watchdog=True)
        assert adapter.watchdog is not None and adapter.sink is adapter.watchdog, "on by default around a swapper"
        assert on[0].pushed and [s.pushed for s in on[1:]] == [False, False, False]
        m = [s.as_dict() for s in on]
        assert m[1]["draft/watchdog_alarms"] == 0.0 and m[1]["spec_acceptance_length"] > 2.0, m[1]
        assert m[1]["draft/watchdog_expected_acceptance_length"] > 2.0, "the served draft's training accuracy"
        # the fault: this step's rollouts drafted with zeros; the check finds it and repairs before the push
        assert m[2]["spec_acceptance_length"] < 1.3, m[2]
        assert m[2]["draft/watchdog_alarm-acceptance_collapse"] == 1.0 and m[2]["draft/watchdog_alarm-digest"] == 1.0
        assert m[2]["draft/watchdog_repairs"] == 1.0 and all(a.repaired for a in on[2].watchdog.alarms)
        assert "repaired by re-pushing draft version 0" in caplog.text
        assert m[3]["spec_acceptance_length"] > 2.0 and m[3]["draft/watchdog_alarms"] == 0.0, "the re-pushed draft drafts"
        # off: the same fault, nothing checks, the zeroed draft keeps serving
        caplog.clear()
        adapter, off = run(eng, 10, watchdog=False)
        assert adapter.watchdog is None and off[0].pushed
        m = [s.as_dict() for s in off]
        assert not any(k.startswith("draft/watchdog") for row in m for k in row), "no watchdog metrics when off"
        assert m[1]["spec_acceptance_length"] > 2.0
        assert m[2]["spec_acceptance_length"] < 1.3 and m[3]["spec_acceptance_length"] < 1.3, m[3]
        assert "watchdog" not in caplog.text
    finally:
        eng.shutdown()
