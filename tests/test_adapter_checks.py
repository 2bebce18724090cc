"""Every way of building an adapter - DraftAdapter(...), DraftAdapter.with_worker (inline and background
workers), DistributedDraftAdapter (owner and data-parallel) - runs the same checks (adapter_config.adapter_checks)
and gives its cache the step budget's bounds."""
from __future__ import annotations

import tempfile

import pytest
import torch
import torch.distributed as dist
from conftest import tiny_model

from draftadapt.adapter import AdapterConfig, DraftAdapter
from draftadapt.cache import CacheConfig
from draftadapt.distributed import DistributedDraftAdapter
from draftadapt.drafts.eagle3 import Eagle3Draft
from draftadapt.trainer import TrainerConfig
from draftadapt.workers import BackgroundDraftWorker, LocalDraftWorker

WAYS = ["constructor", "with_worker", "with_background_worker", "distributed_owner", "distributed_data_parallel"]
CONFIG = AdapterConfig(train_steps=2, batch_tokens=100, staleness_window=1)  # budget 200 positions per step
RAW = CacheConfig(max_tokens=10**9)  # what the caller passes: no per-version bound, no step-budget cap


@pytest.fixture(scope="module")
def policy():
    with tempfile.TemporaryDirectory() as tmp:  # one gloo process group of one rank for the distributed ways
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            yield tiny_model("llama", layers=8, hidden=64, vocab=300)
        finally:
            dist.destroy_process_group()


def build(way, policy, embed=None, config=CONFIG, cache=RAW, target_head=None):
    torch.manual_seed(0)
    draft = Eagle3Draft.from_target(policy.config)
    embed = policy.get_input_embeddings() if embed is None else embed
    if way == "constructor":
        return DraftAdapter(draft, embed, config, TrainerConfig(), cache, target_head=target_head)
    if way.startswith("with_"):
        worker = LocalDraftWorker(draft, embed, TrainerConfig(), cache, config.batch_tokens, target_head=target_head)
        worker = BackgroundDraftWorker(worker) if way == "with_background_worker" else worker
        return DraftAdapter.with_worker(worker, config)
    mode = way.removeprefix("distributed_")
    return DistributedDraftAdapter(draft, embed, config, TrainerConfig(), cache, mode=mode, target_head=target_head)


@pytest.mark.parametrize("way", WAYS)
def test_every_way_applies_the_step_budget_to_the_cache(policy, way):
    cache = build(way, policy).worker.cache_config
    budget = CONFIG.budget_tokens
    assert budget == 200 and cache.version_tokens == budget, f"{way}: the cache keeps one step's reservoir per version"
    assert cache.max_tokens == (CONFIG.staleness_window + 2) * budget, f"{way}: the cache is capped by the budget"


@pytest.mark.parametrize("way", WAYS)
def test_every_way_refuses_a_bad_embedding_and_cache_config_with_the_same_error(policy, way):
    with pytest.raises(ValueError, match=r"the embedding has shape \(300, 32\).*policy.get_input_embeddings"):
        build(way, policy, embed=torch.nn.Embedding(300, 32))
    with pytest.raises(ValueError, match="CacheConfig.staleness_window=3: the adapter drops stale features itself"):
        build(way, policy, cache=CacheConfig(staleness_window=3))
    with pytest.raises(ValueError, match="teacher='final_hidden' needs target_head"):
        build(way, policy, config=AdapterConfig(teacher="final_hidden"))


def test_a_worker_that_already_holds_features_is_not_rebudgeted(policy):
    from draftadapt.capture import FeatureCapture

    adapter = build("with_worker", policy)
    worker = LocalDraftWorker(adapter.worker.draft, policy.get_input_embeddings(), TrainerConfig(), RAW, 100)
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    with FeatureCapture(policy, aux_layer_ids=worker.draft.config.aux_layer_ids) as cap, torch.no_grad():
        policy(input_ids=ids)
    cm = torch.ones(1, 16, dtype=torch.bool)
    worker.add(cap.rollout_batch(ids, completion_mask=cm, policy_version=0))
    with pytest.raises(RuntimeError, match="the cache already holds features"):
        DraftAdapter.with_worker(worker, CONFIG)
