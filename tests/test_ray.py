"""Engines and the draft trainer as Ray actors: one local Ray session, two engine actors.

Ray's temp files go to a short temp dir and token auth is off, so nothing lands in the home
directory (a first `ray.init` with auth on writes a token under ~/.ray).
"""
import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from conftest import on_cpu_build, require
from test_swap import FAKE_SPEC, FakeEngine, _fake_state

PROMPTS = [[1, 4, 50, 7, 48, 9], [1, 5, 6, 7], [1, 9, 30, 8], [1, 6, 7, 8, 9], [1, 5, 9]]


@pytest.fixture(scope="module")
def ray_session():
    ray = require("ray")  # setup installs it: a broken Ray fails, never skips

    from draftadapt.ray_utils import RayConfig, init_ray

    if ray.is_initialized():
        pytest.skip("Ray is already initialised in this process (these tests start their own)")
    token = Path.home() / ".ray"
    had_token_dir = token.exists()
    old = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's unix sockets live under it
    init_ray(RayConfig(num_cpus=2, temp_dir=tmp))
    yield
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)
    if old is None:
        os.environ.pop("RAY_AUTH_MODE")
    else:
        os.environ["RAY_AUTH_MODE"] = old
    assert had_token_dir or not token.exists(), "Ray wrote into ~/.ray"


class FakeActor(FakeEngine):
    """A FakeEngine that runs RPCs "in the background": dispatch and wait are separate events."""

    def __init__(self, name, log):
        super().__init__(FAKE_SPEC)
        self.name, self.log = name, log

    def collective_rpc_async(self, method, args=(), kwargs=None):
        self.log.append(f"send {self.name}")
        outer = self

        class Pending:
            def result(self):
                outer.log.append(f"wait {outer.name}")
                return outer.collective_rpc(method, args, kwargs)

        return Pending()


def test_swapper_dispatches_to_background_engines_before_waiting_and_names_a_failing_one():
    from draftadapt.engine.swap import EngineSwapper

    log = []
    engines = [FakeActor("a", log), FakeActor("b", log)]
    swapper = EngineSwapper(engines)
    res = swapper.push_draft(_fake_state(), 1)
    assert log == ["send a", "send b", "wait a", "wait b"], "a push must reach every actor before waiting on one"
    assert res.verified and len(res.engine_seconds) == 2 and swapper.draft_version == 1
    engines[0].fail_next = True
    with pytest.raises(RuntimeError, match=r"failed on engine 0 \(engines \[\] already serve it \(later engines may"):
        swapper.push_draft(_fake_state(), 2)
    assert swapper.push_draft(_fake_state(), 2).pushed and swapper.draft_version == 2


def test_make_engines_refuses_several_in_process_engines():
    from draftadapt.engine.ray_pool import make_engines
    from draftadapt.engine.vllm import EngineConfig

    with pytest.raises(ValueError, match="use_ray=True"):
        make_engines(EngineConfig(model="unused"), num_engines=2, use_ray=False)


def _served(engine, kind):
    """(version, checksum of the weights the engine computes with) for one engine handle."""
    from draftadapt.engine.swap import checksum, tensors_from_bytes

    version = engine.collective_rpc("draftadapt_info")[0]["versions"][kind]
    return version, checksum(tensors_from_bytes(engine.collective_rpc("draftadapt_state", kwargs={"kind": kind})[0]))


def _noisy(state, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in state.items()}


@pytest.mark.slow
@pytest.mark.vllm
def test_two_engine_actors_share_pushes_refits_counters_and_survive_a_dead_actor(ray_session, toy_policy_dir,
                                                                                  toy_draft_dir):
    from transformers import AutoModelForCausalLM

    from draftadapt.checkpoint import draft_state_for_push, load_eagle3
    from draftadapt.engine.ray_pool import EngineDiedError, RayEnginePool
    from draftadapt.engine.vllm import EngineConfig, SpecConfig
    from draftadapt.ray_utils import RayConfig

    cfg = EngineConfig(model=str(toy_policy_dir), spec=SpecConfig("eagle3", 3, model=str(toy_draft_dir)),
                       max_num_seqs=16)
    with RayEnginePool(cfg, 2, RayConfig(actor_cpus=0.5)) as pool:
        e0, e1 = pool.engines
        assert e0.info["pid"] != e1.info["pid"]
        if on_cpu_build():  # the lossless fix exists for the CPU build's bug only
            assert all(e.info["cpu_fix_applied"] for e in pool.engines)
        # 1) generation is split over both engines, in order, and their counters are summed
        greedy = dict(n=1, temperature=0.0, max_tokens=24, logprobs=False)
        split = pool.generate(PROMPTS, **greedy)
        whole = e0.generate(PROMPTS, **greedy)
        assert [c[0].token_ids for c in split] == [c[0].token_ids for c in whole], "the split changed the outputs"
        sampled = pool.generate(PROMPTS, n=2, temperature=1.0, max_tokens=24, seed=3)
        assert [len(g) for g in sampled] == [2] * len(PROMPTS)
        per_engine = [e.spec_counters() for e in pool.engines]
        assert all(c.drafts > 0 for c in per_engine), f"an engine served nothing: {per_engine}"
        assert pool.spec_counters() == per_engine[0] + per_engine[1]
        # 2) a draft push and a policy refit reach both engines, verified against the trainer's digest
        draft = _noisy(draft_state_for_push(load_eagle3(toy_draft_dir)), 0.01, seed=1)
        pushed = pool.push_draft(draft, 1)
        assert pushed.verified and len(pushed.engine_seconds) == 2
        policy = AutoModelForCausalLM.from_pretrained(toy_policy_dir, dtype=torch.float32).state_dict()
        refit = pool.refit_policy(_noisy(policy, 0.002, seed=2), 1)
        assert refit.verified and (pool.draft_version, pool.policy_version) == (1, 1)
        for e in pool.engines:
            assert _served(e, "draft") == (1, pushed.checksum) and _served(e, "policy") == (1, refit.checksum)
        # 3) one GRPO step with the pool as engine and sink, the draft trained in an actor, unchanged loop parts
        grpo_step(pool, toy_policy_dir, toy_draft_dir, version=2)
        before = pool.spec_counters()
        # 4) a dead actor is named, with both ways on (restart, or stop)
        import ray

        ray.kill(e1.actor)
        with pytest.raises(EngineDiedError, match=r"engine actor 1 .*pool.restart\(1\).*or stop") as err:
            pool.generate(PROMPTS, **greedy)
        assert "draft version 2 and policy version 2" in str(err.value)
        # 5) with restart_dead the next call restarts it, brought up to date before it serves: same
        #    versions and checksums as engine 0, the same greedy outputs, counters that never go back
        pool.ray_cfg = dataclasses.replace(pool.ray_cfg, restart_dead=True)
        served = [_served(e0, kind) for kind in ("draft", "policy")]
        after = pool.generate(PROMPTS, **greedy)
        assert pool.restarts == 1 and pool.engines[1].info["pid"] != e1.info["pid"]
        assert [_served(pool.engines[1], kind) for kind in ("draft", "policy")] == served
        assert [c[0].token_ids for c in after] == [c[0].token_ids for c in e0.generate(PROMPTS, **greedy)]
        assert pool.spec_counters().drafts > before.drafts, "the summed counters went back after the restart"
        again = pool.push_draft(_noisy(draft, 0.01, seed=3), 3)
        assert again.verified and (pool.draft_version, pool.policy_version) == (3, 2)
        for e in pool.engines:
            assert _served(e, "draft") == (3, again.checksum) and _served(e, "policy") == served[1]


def grpo_step(pool, policy_dir, draft_dir, version: int) -> None:
    """Rollouts from the pool, the policy update with capture, refit, the adapter's push to both."""
    import random

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from draftadapt.adapter import AdapterConfig, DraftAdapter
    from draftadapt.cache import CacheConfig
    from draftadapt.checkpoint import load_eagle3
    from draftadapt.grpo.loop import UpdateConfig, collect_rollouts, policy_update
    from draftadapt.ray_utils import RayConfig
    from draftadapt.ray_worker import RayDraftWorker
    from draftadapt.toy.eval import encode_prompt
    from draftadapt.toy.task import reward, sample_problem
    from draftadapt.trainer import TrainerConfig

    tok = AutoTokenizer.from_pretrained(policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    worker = RayDraftWorker(load_eagle3(draft_dir), policy.get_input_embeddings(), TrainerConfig(), CacheConfig(), 512,
                            ray_cfg=RayConfig(actor_cpus=0.5))
    adapter = DraftAdapter.with_worker(worker, AdapterConfig(train_steps=1, min_tokens=0, batch_tokens=512), sink=pool)
    problems = [sample_problem(random.Random(i)) for i in range(4)]
    r = collect_rollouts(pool, [encode_prompt(tok, p.prompt) for p in problems],
                         lambda i, text: reward(problems[i], text),
                         lambda ids: tok.decode(ids, skip_special_tokens=True),
                         group_size=2, temperature=1.0, max_tokens=48, stop_token_ids=[tok.eos_token_id],
                         policy_version=version - 1, seed=0)
    assert len(r.completions) == 8 and all(len(lp) == len(c) for lp, c in zip(r.logprobs, r.completions))
    policy_update(policy, torch.optim.AdamW(policy.parameters(), lr=1e-4), r, tok.pad_token_id, UpdateConfig(), adapter)
    assert pool.refit_policy(policy.state_dict(), version).verified
    stats = adapter.on_step_end(version)
    assert stats.pushed and stats.push_result.verified and stats.spec.drafts > 0, stats.push_reason
    assert (pool.draft_version, pool.policy_version) == (version, version)
    worker.shutdown()


def _features(policy, adapter, version, seed):
    """One captured batch of toy-task-like token rows through the policy's own forward."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(20, 120, (4, 40), generator=g)
    mask = torch.ones_like(ids)
    completion = torch.zeros_like(ids, dtype=torch.bool)
    completion[:, 8:] = True
    with torch.no_grad(), adapter.capture(policy) as cap:
        policy(input_ids=ids, attention_mask=mask)
    return cap.rollout_batch(input_ids=ids, attention_mask=mask, completion_mask=completion, policy_version=version)


@pytest.mark.slow
def test_draft_trainer_actor_trains_like_the_local_worker_and_follows_the_policy(ray_session, toy_policy_dir,
                                                                               toy_draft_dir):
    from transformers import AutoModelForCausalLM

    from draftadapt.adapter import AdapterConfig, DraftAdapter
    from draftadapt.cache import CacheConfig
    from draftadapt.checkpoint import load_eagle3
    from draftadapt.ray_utils import RayConfig
    from draftadapt.ray_worker import RayDraftWorker
    from draftadapt.trainer import TrainerConfig

    policy = AutoModelForCausalLM.from_pretrained(toy_policy_dir, dtype=torch.float32).eval()
    # the vocab refresh runs only in-process (on by default there): off, so both adapters train alike
    acfg = AdapterConfig(train_steps=2, min_tokens=0, batch_tokens=96, vocab_refresh_uncovered=None)
    tcfg, ccfg = TrainerConfig(lr=1e-3), CacheConfig()
    local = DraftAdapter(load_eagle3(toy_draft_dir), policy.get_input_embeddings(), acfg, tcfg, ccfg)
    worker = RayDraftWorker(load_eagle3(toy_draft_dir), policy.get_input_embeddings(), tcfg, ccfg, acfg.batch_tokens,
                            acfg.seed, ray_cfg=RayConfig(actor_cpus=0.5))
    remote = DraftAdapter.with_worker(worker, acfg)
    start = worker.state_for_push()
    for version in range(3):
        if version == 2:  # the policy moves: the actor must train against the new embedding too
            with torch.no_grad():
                policy.get_input_embeddings().weight.mul_(1.5)
        batch = _features(policy, local, version, seed=version)
        assert local.on_rollouts(batch) == remote.on_rollouts(batch) == 4
        a, b = local.on_step_end(version), remote.on_step_end(version)
        assert b.train.steps == 2 and b.train.loss == pytest.approx(a.train.loss, rel=1e-5, abs=1e-6)
    mine, theirs = local.worker.state_for_push(), worker.state_for_push()
    assert all(torch.allclose(mine[k], theirs[k], atol=1e-5) for k in mine), "the actor trained differently"
    assert any(not torch.equal(start[k], theirs[k]) for k in start), "the actor's draft did not train"
    assert worker.cache_info() == local.worker.cache_info()
    # asynchronous: train returns the previous run's stats at once, the run goes on in the actor
    worker.asynchronous = True
    first, second = worker.train(3), worker.train(1)
    assert first.steps == 0 and second.steps == 3
    assert worker.state_dict()["trainer"]["steps_done"] == 2 * 3 + 3 + 1
    worker.shutdown()
