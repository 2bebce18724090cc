"""A user's own model through the public API: seeded sampling, a tied-embedding policy refit,
drafts that do not fit refused early, the adapted draft exported, a raw vllm.LLM in the swapper."""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from conftest import tiny_config

PROMPTS = [[1, 4, 50, 7, 48, 9], [1, 5, 6, 7]]


def tied_qwen2(seed: int = 0, layers: int = 4, hidden: int = 128, vocab: int = 1147):
    """A tiny Qwen2 whose lm_head IS its input embedding (tie_word_embeddings=True)."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("qwen2", layers=layers, hidden=hidden, vocab=vocab)  # CPU attention needs head_dim >= 32
    cfg.tie_word_embeddings = True
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr(), "not tied"
    return model


def hf_greedy(model, prompts=PROMPTS, n=12):
    return [model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, eos_token_id=None)[0, len(p):].tolist()
            for p in prompts]


class Served(NamedTuple):
    engine: object
    model_dir: Path
    tok_dir: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The tied policy in one in-process engine (worker extension on), shared by this module."""
    from draftadapt.engine.vllm import Engine, EngineConfig
    from draftadapt.toy.tokenizer import save_tokenizer

    root = tmp_path_factory.mktemp("own")
    model_dir, tok_dir = root / "policy", root / "tokenizer"  # qwen2 trap: the tokenizer in its own dir
    tied_qwen2().save_pretrained(model_dir)
    save_tokenizer(tok_dir)
    engine = Engine(EngineConfig(model=str(model_dir), tokenizer=str(tok_dir), max_num_seqs=16))
    yield Served(engine, model_dir, tok_dir)
    engine.shutdown()


# ------------------------------------------------------------------ 1) seeds


@pytest.mark.vllm
def test_requests_of_one_call_never_share_random_streams(served):
    """vLLM seeds sample j of a request with (its seed) + j: seeds s + i made request 1's samples
    request 0's shifted by one (7 of 8 identical for the same prompt)."""
    got = served.engine.generate([PROMPTS[0], PROMPTS[0]], n=8, temperature=1.0, max_tokens=8, seed=0, logprobs=False)
    a, b = ([c.token_ids for c in group] for group in got)
    shifted = sum(b[j] == a[j + 1] for j in range(7))
    assert shifted == 0, f"{shifted} of 7 samples of request 1 are request 0's shifted by one"
    assert not set(map(tuple, a)) & set(map(tuple, b)), "two requests drew the same sample"
    again = served.engine.generate([PROMPTS[0], PROMPTS[0]], n=8, temperature=1.0, max_tokens=8, seed=0,
                                   logprobs=False)
    assert [[c.token_ids for c in g] for g in again] == [a, b], "seeded sampling must repeat exactly"


def test_request_seeds_are_spaced_by_the_samples_per_request():
    from draftadapt.engine.vllm import request_seed

    assert [request_seed(10, i, 8) for i in range(3)] == [10, 18, 26]
    assert request_seed(None, 3, 8) is None


# ------------------------------------------------------------------ 2) tied / aliased policy weights


@pytest.mark.vllm
def test_a_tied_policy_state_dict_refits_and_serves_like_hf_greedy(served):
    from draftadapt.engine.swap import EngineSwapper

    swapper = EngineSwapper(served.engine)
    before = [o[0].token_ids for o in served.engine.generate(PROMPTS, temperature=0.0, max_tokens=12)]
    new_policy = tied_qwen2(seed=1)
    state = new_policy.state_dict()
    assert "lm_head.weight" in state and "lm_head.weight" not in swapper.expected("policy"), "the case under test"
    assert swapper.refit_policy(state, 1).verified
    got = [o[0].token_ids for o in served.engine.generate(PROMPTS, temperature=0.0, max_tokens=12)]
    assert got == hf_greedy(new_policy) and got != before
    copies = {k: v.clone() for k, v in tied_qwen2(seed=2).state_dict().items()}  # as read from a file: no aliasing
    assert swapper.refit_policy(copies, 2).verified
    assert swapper.refit_policy(served.model_dir, 3).verified  # back, from the checkpoint dir


def test_aliases_are_dropped_and_a_head_the_engine_cannot_serve_is_refused():
    from draftadapt.engine.swap import drop_aliases

    spec = {"model.embed_tokens.weight": ((8, 4), "torch.float32"), "model.norm.weight": ((4,), "torch.float32")}
    embed, norm = torch.randn(8, 4), torch.ones(4)
    assert set(drop_aliases({"model.embed_tokens.weight": embed, "lm_head.weight": embed, "model.norm.weight": norm,
                             "extra.alias": norm}, spec)) == set(spec), "any alias of a listed tensor goes"
    assert set(drop_aliases({"model.embed_tokens.weight": embed, "lm_head.weight": embed.clone(),
                             "model.norm.weight": norm}, spec)) == set(spec), "an equal copy of a tied head goes"
    with pytest.raises(ValueError, match=r"lm_head.weight differs from model.embed_tokens.weight.*tie_word_embeddings"):
        drop_aliases({"model.embed_tokens.weight": embed, "lm_head.weight": embed + 1, "model.norm.weight": norm}, spec)
    kept = drop_aliases({"model.embed_tokens.weight": embed, "unknown": torch.zeros(3)}, spec)
    assert "unknown" in kept, "a name that aliases nothing is left for the push check to refuse"
    untied = {**spec, "lm_head.weight": ((8, 4), "torch.float32")}
    assert set(drop_aliases({"model.embed_tokens.weight": embed, "lm_head.weight": embed}, untied)) == {
        "model.embed_tokens.weight", "lm_head.weight"}, "an engine that lists both names gets both"


@pytest.mark.vllm
def test_a_raw_vllm_llm_in_the_swapper_gets_counters(served):
    from draftadapt.engine.swap import EngineSwapper
    from draftadapt.engine.vllm import ExternalLLM
    from draftadapt.metrics import SpecCounters

    swapper = EngineSwapper(served.engine.llm)  # the vllm.LLM itself, as a framework would hand it over
    assert isinstance(swapper.engines[0], ExternalLLM)
    assert isinstance(swapper.spec_counters(), SpecCounters)


def test_an_engine_without_the_worker_extension_names_the_fix():
    from draftadapt.engine.swap import EngineSwapper

    class NoExtension:
        def collective_rpc(self, method, args=(), kwargs=None):
            raise AttributeError(f"'Worker' object has no attribute {method!r}")

        def get_metrics(self):
            return []

    with pytest.raises(RuntimeError, match="worker_extension_cls='draftadapt.engine.swap_worker.DraftSwapExtension'"):
        EngineSwapper(NoExtension())


def test_an_external_engine_without_stats_names_the_fix():
    from draftadapt.engine.vllm import ExternalLLM

    class NoStats:
        def get_metrics(self):
            raise AssertionError("Stat logging disabled")

    with pytest.raises(RuntimeError, match="disable_log_stats=False"):
        ExternalLLM(NoStats()).spec_counters()


# ------------------------------------------------------------------ 3) drafts that do not fit


def _draft_for(config, out, **kw):
    from draftadapt.checkpoint import save_eagle3
    from draftadapt.drafts.eagle3 import Eagle3Draft

    torch.manual_seed(0)
    return save_eagle3(Eagle3Draft.from_target(config, **kw), out)


@pytest.mark.vllm
def test_an_engine_refuses_a_draft_for_another_target_before_it_starts(served, tmp_path):
    from draftadapt.engine.vllm import Engine, EngineConfig, SpecConfig

    def start(draft, method="eagle3"):
        # the shared engine is alive: reaching vLLM would raise "another in-process vLLM engine"
        Engine(EngineConfig(model=str(served.model_dir), tokenizer=str(served.tok_dir),
                            spec=SpecConfig(method, 3, model=str(draft))))

    other = _draft_for(tiny_config("llama", layers=4, hidden=64, vocab=500), tmp_path / "other",
                       aux_layer_ids=(1, 2, 3))
    with pytest.raises(ValueError, match=r"\(500, 64\), the target's \(vocab_size, hidden_size\) = \(1147, 128\)"
                                         r".*Eagle3Draft.from_target"):
        start(other)
    deeper = _draft_for(tiny_config("llama", layers=12, hidden=128, vocab=1147), tmp_path / "deeper",
                        aux_layer_ids=(2, 6, 9))
    with pytest.raises(ValueError, match=r"refused before the engine started.*0\.\.3 for a 4-layer target"):
        start(deeper)
    small = tmp_path / "small-lm"
    tied_qwen2(layers=2, vocab=600).save_pretrained(small)
    with pytest.raises(ValueError, match="draft model's vocab_size=600, the target's vocab_size=1147"):
        start(small, "draft_model")


def test_an_adapter_refuses_an_embedding_that_does_not_fit_the_draft():
    from draftadapt.adapter import DraftAdapter
    from draftadapt.drafts.eagle3 import Eagle3Draft

    draft = Eagle3Draft.from_target(tiny_config("qwen2", layers=4, hidden=64, vocab=300), aux_layer_ids=(1, 2, 3))
    with pytest.raises(ValueError, match=r"embedding has shape \(400, 64\), the draft expects .* = \(300, 64\)"):
        DraftAdapter(draft, torch.nn.Embedding(400, 64))
    with pytest.raises(ValueError, match=r"shape \(300, 32\)"):
        DraftAdapter(draft, torch.zeros(300, 32))
    DraftAdapter(draft, torch.nn.Embedding(300, 64))


# ------------------------------------------------------------------ 4) export of the adapted draft


def test_the_adapted_draft_exports_through_the_adapter(tmp_path):
    from draftadapt.adapter import DraftAdapter
    from draftadapt.checkpoint import draft_state_for_push, load_eagle3
    from draftadapt.drafts.eagle3 import Eagle3Draft
    from draftadapt.drafts.vocab import build_draft_vocab

    config = tiny_config("qwen2", layers=4, hidden=64, vocab=300)
    vocab = build_draft_vocab([[i % 300 for i in range(0, 600, 3)]], 300, 50)
    draft = Eagle3Draft.from_target(config, vocab, aux_layer_ids=(1, 2, 3))
    adapter = DraftAdapter(draft, torch.nn.Embedding(300, 64))
    with torch.no_grad():
        adapter.draft.fc.weight.add_(1.0)  # stands in for online training
    out = adapter.export(tmp_path / "adapted", target_config=config)
    back = load_eagle3(out, target_config=config)
    want, got = draft_state_for_push(adapter.draft), draft_state_for_push(back)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert torch.equal(back.d2t, adapter.draft.d2t)
    with pytest.raises(ValueError, match="layout"):
        adapter.export(tmp_path / "x", layout="safetensors")
