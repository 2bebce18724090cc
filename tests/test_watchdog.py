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


def _watchdog(on_alarm="repair", n=2):
    from draftadapt.engine.swap import EngineSwapper

    engines = [FakeEngine() for _ in range(n)]
    wd = DraftWatchdog(EngineSwapper(engines), WatchdogConfig(on_alarm=on_alarm))
    wd.push_draft(_state(1), 1)
    return wd, engines


def test_a_healthy_push_raises_no_alarm():
    wd, engines = _watchdog()
    assert wd.history[-1].ok and not wd.history[-1].alarms and wd.repairs == 0
    assert [e.pushes for e in engines] == [1, 1]


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
