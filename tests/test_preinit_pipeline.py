"""Pre-init pipeline: bounded feature shards that resume to the same features, training that resumes
to the same draft, the speculators export vLLM reads, and the whole pipeline on the real engine
(local DAPO-schema file, regeneration, interruptions, resume, acceptance length)."""
import json
import os
import random
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from draftadapt.preinit import features
from draftadapt.preinit.features import CaptureConfig, TrainConfig, TrainSequence, capture_to_shards, train_from_shards
from draftadapt.trainer import DraftTrainer, TrainerConfig

ROOT = Path(__file__).resolve().parents[1]


def _sequences(n: int, vocab: int, seed: int = 0) -> list[TrainSequence]:
    rng = random.Random(seed)
    return [TrainSequence([rng.randrange(3, vocab) for _ in range(rng.randint(6, 20))], 3) for _ in range(n)]


def _shard_tensors(directory: Path) -> dict:
    from safetensors.torch import load_file

    manifest = json.loads((directory / "manifest.json").read_text())
    return {s["file"]: load_file(str(directory / s["file"])) for s in manifest["shards"]}


def _fail_on_call(monkeypatch, obj, name: str, n: int) -> None:
    """Make obj.name raise on its n-th call (a crash in the middle of a stage)."""
    real, calls = getattr(obj, name), [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            raise RuntimeError(f"injected crash at call {n} of {name}")
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, name, wrapped)


@pytest.fixture(scope="module")
def small():
    target = tiny_model("llama", layers=8, hidden=64, vocab=64)
    return target, _sequences(22, 64), torch.arange(0, 64, 2)  # draft vocab: 32 even ids


def test_capture_shards_are_bounded_loadable_and_resume_to_the_same_features(tmp_path, small, monkeypatch):
    from draftadapt.cache import HiddenStateCache, iter_shards
    from draftadapt.offline import extract_features

    target, seqs, vocab_ids = small
    cfg = CaptureConfig(batch_size=4, shard_max_bytes=6000, teacher_dtype="float16")
    full = capture_to_shards(target, seqs, tmp_path / "full", vocab_ids, None, cfg, progress=False)
    manifest = json.loads((tmp_path / "full" / "manifest.json").read_text())
    assert full["shards"] > 2 and manifest["complete"]
    assert all(s["bytes"] <= cfg.shard_max_bytes or s["num_sequences"] == 1 for s in manifest["shards"])
    assert full["bytes_per_token"] == 3 * 64 * 2 + 32 * 2 + 8 + 1, "bf16 aux + fp16 teacher + id + mask"
    # 1) a crash while writing the third shard, then a rerun: only the rest is captured
    _fail_on_call(monkeypatch, features, "write_shard", 3)
    with pytest.raises(RuntimeError, match="injected crash"):
        capture_to_shards(target, seqs, tmp_path / "resumed", vocab_ids, None, cfg, progress=False)
    monkeypatch.undo()
    partial = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert len(partial["shards"]) == 2 and not partial["complete"]
    again = capture_to_shards(target, seqs, tmp_path / "resumed", vocab_ids, None, cfg, progress=False)
    assert again["captured_now"] == len(seqs) - sum(s["num_sequences"] for s in partial["shards"])
    a, b = _shard_tensors(tmp_path / "full"), _shard_tensors(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for name in a:
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), f"{name}:{key} differs after resume"
    # 2) the shards are a HiddenStateCache save, and hold what the reference HF forward computes
    cache = HiddenStateCache.load(tmp_path / "resumed")
    assert len(cache) == len(seqs) and cache.num_tokens == sum(len(s.ids) for s in seqs)
    first = next(iter_shards(tmp_path / "resumed"))
    (ref,) = extract_features(target, [seqs[0].ids], (2, 4, 5), vocab_ids, batch_size=1)
    torch.testing.assert_close(first.aux_hidden.float(), ref.aux_hidden[0], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(first.teacher_logprobs.float(), ref.teacher_logprobs[0], rtol=1e-2, atol=2e-2)
    assert first.loss_mask.tolist() == [i + 1 >= 3 and i + 1 < len(seqs[0].ids) and bool(ref.loss_mask[0, i])
                                        for i in range(len(seqs[0].ids))]


def test_training_resumes_from_its_checkpoint_to_the_same_draft(tmp_path, small, monkeypatch):
    from draftadapt.drafts.eagle3 import Eagle3Draft

    target, seqs, vocab_ids = small
    capture_to_shards(target, seqs, tmp_path / "f", vocab_ids, None, CaptureConfig(batch_size=4, shard_max_bytes=6000),
                      progress=False)
    embed = target.get_input_embeddings().weight.detach()
    cfg = TrainConfig(steps=6, batch_size=3, checkpoint_every=2, trainer=TrainerConfig(lr=1e-3, ttt_steps=2))

    def new_draft(seed: int):
        torch.manual_seed(seed)
        return Eagle3Draft.from_target(target.config, vocab_ids - torch.arange(32), target_head=target.lm_head.weight)

    ref = new_draft(0)
    train_from_shards(ref, embed, tmp_path / "f", cfg, tmp_path / "ref.pt", progress=False)
    _fail_on_call(monkeypatch, DraftTrainer, "step", 6)  # crash in step 6, after the step-4 checkpoint
    with pytest.raises(RuntimeError, match="injected crash"):
        train_from_shards(new_draft(0), embed, tmp_path / "f", cfg, tmp_path / "run.pt", progress=False)
    monkeypatch.undo()
    resumed = new_draft(1)  # a different init: the checkpoint must restore everything
    stats = train_from_shards(resumed, embed, tmp_path / "f", cfg, tmp_path / "run.pt", progress=False)
    assert stats["steps_now"] == 2
    for k, v in ref.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), f"{k} differs after resume"


def test_speculators_export_round_trips_and_vllm_reads_its_config(tmp_path):
    from vllm.transformers_utils.configs.speculators.base import SpeculatorsConfig

    from draftadapt.checkpoint import load_eagle3, save_speculators
    from draftadapt.drafts.eagle3 import Eagle3Draft

    target = tiny_model("llama", layers=8, hidden=64, vocab=64)
    draft = Eagle3Draft.from_target(target.config, torch.arange(0, 64, 2) - torch.arange(32))
    save_speculators(draft, tmp_path / "spec", target.config, verifier="/models/target", num_speculative_tokens=3)
    raw = json.loads((tmp_path / "spec" / "config.json").read_text())
    assert SpeculatorsConfig.extract_vllm_speculative_config(raw) == {"method": "eagle3", "num_speculative_tokens": 3}
    layer = SpeculatorsConfig.extract_transformers_pre_trained_config(json.loads(json.dumps(raw)))
    assert layer["architectures"] == ["Eagle3LlamaForCausalLM"] and layer["draft_vocab_size"] == 32
    assert layer["norm_before_residual"] is False and layer["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5]
    back = load_eagle3(tmp_path / "spec", target_config=target.config)
    for k, v in draft.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


@pytest.mark.vllm
@pytest.mark.slow
def test_pipeline_on_a_local_dapo_file_resumes_after_crashes_and_evaluates(tmp_path, toy_policy_dir, monkeypatch):
    """prepare -> regenerate (vLLM) -> vocab -> capture [crash] -> train [crash] -> export -> evaluate (vLLM)."""
    from draftadapt.toy.preinit_sources import toy_rows
    from draftadapt.preinit.pipeline import _Context, load_config, run_preinit

    rows = toy_rows("task", 24, seed=100) + [{"data_source": "x", "reward_model": {"ground_truth": "1"}},
                                              {"prompt": [], "reward_model": {"ground_truth": "1"}}]
    data = tmp_path / "dapo.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    cfg = load_config(ROOT / "recipes" / "preinit_toy_task.yaml", [
        f"run.target={toy_policy_dir}", f"run.out_dir={out}", "data.source=local", f"data.path={data}",
        "data.max_rows=null", "regen.max_prompts=16", "regen.chunk_prompts=8", "regen.samples_per_prompt=1",
        "regen.max_tokens=32", "capture.batch_size=4", "capture.shard_max_bytes=20000", "train.steps=12",
        "train.batch_size=4", "train.checkpoint_every=4", "eval.prompts=8", "eval.data.max_rows=8",
        "eval.max_tokens=32", "eval.samples_per_prompt=1", "eval.layout=speculators", "draft.draft_vocab_size=256"])
    # 1) crash while writing the second feature shard
    _fail_on_call(monkeypatch, features, "write_shard", 2)
    with pytest.raises(RuntimeError, match="injected crash"):
        run_preinit(cfg, progress=False)
    monkeypatch.undo()
    prep = json.loads((out / "stages" / "prepare.json").read_text())
    assert prep["bad_rows"]["counts"] == {"missing_column:prompt": 1, "empty_messages": 1}
    assert prep["train_samples"] == 24 and prep["eval_prompts"] == 8
    assert not (out / "stages" / "capture.json").exists()
    finished = {p: p.stat().st_mtime_ns for p in [*(out / "regen").iterdir(), out / "features" / "shard-00000.safetensors"]}
    # 2) rerun: regeneration is skipped; crash in training after the step-8 checkpoint
    _fail_on_call(monkeypatch, DraftTrainer, "step", 10)
    with pytest.raises(RuntimeError, match="injected crash"):
        run_preinit(cfg, progress=False)
    monkeypatch.undo()
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items()), "finished chunks/shards were rewritten"
    cap = json.loads((out / "stages" / "capture.json").read_text())
    assert cap["shards"] > 1 and cap["captured_now"] < cap["sequences"] == 16
    # 3) rerun: training continues from step 8, export, acceptance length through vLLM (speculators layout)
    result = run_preinit(cfg, progress=False)
    assert result["train"]["steps_now"] == 4 and result["regenerate"]["chunks"] == 2
    ev = result["evaluate"]
    assert ev["layout"] == "speculators" and ev["spec_num_drafts"] > 0
    # the counters are this evaluation's: every completion token came from the prefill or a
    # verification round (accepted + 1 each); only a round cut by max_tokens loses up to k tokens
    n_seqs, emitted = ev["prompts"] * 1, ev["prompts"] + ev["spec_num_drafts"] + ev["spec_num_accepted_tokens"]
    assert 0 <= emitted - ev["completion_tokens"] <= 3 * n_seqs, ev
    # 4) the interrupted run ends where an uninterrupted one does: same features, same draft
    ctx = _Context(cfg, out, progress=False)
    capture_to_shards(ctx.model, ctx.sequences(), tmp_path / "ref-f", ctx.new_draft().target_ids(), (2, 4, 5),
                      cfg.capture, pad_id=0, progress=False)
    a, b = _shard_tensors(out / "features"), _shard_tensors(tmp_path / "ref-f")
    assert all(torch.equal(a[f][k], b[f][k]) for f in a for k in a[f]) and a.keys() == b.keys()
    ref = ctx.new_draft()
    train_from_shards(ref, ctx.model.get_input_embeddings().weight.detach(), out / "features", cfg.train,
                      tmp_path / "ref.pt", progress=False)
    got = torch.load(out / "train" / "draft.pt")
    assert all(torch.equal(v, got[k]) for k, v in ref.state_dict().items()), "resumed training drifted"
    assert os.path.isfile(out / "draft" / "model.safetensors") and (out / "result.json").is_file()


def test_recipe_and_cli_run_without_engine_then_resume_as_a_no_op(tmp_path):
    """Dataset responses (no regeneration), no evaluation: the whole CPU path through the recipe and
    the CLI; a rerun skips every stage, a changed config is refused."""
    import importlib.util

    from conftest import save_tiny
    from draftadapt.cli import main as cli_main

    model_dir, _ = save_tiny("llama", tmp_path)
    spec = importlib.util.spec_from_file_location("preinit_recipe", ROOT / "recipes" / "preinit.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    args = [f"run.target={model_dir}", f"run.out_dir={tmp_path / 'run'}", "data.max_rows=24", "regen.enabled=false",
            "eval.prompts=0", "train.steps=4", "train.batch_size=4", "capture.batch_size=8"]
    first = recipe.main(["--preset", "toy-chat", "--quiet", *args])
    assert first["prepare"]["train_samples"] == 24 and first["regenerate"] == {"enabled": False, "seconds": 0.0}
    assert first["evaluate"] == {"prompts": 0} and first["capture"]["sequences"] == 24
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run" / "stages").iterdir()}
    cli_main(["preinit", "--config", str(ROOT / "recipes" / "preinit_toy_chat.yaml"), "--quiet", *args])
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run" / "stages").iterdir()} == stamps
    with pytest.raises(ValueError, match=r"differs in \['train.steps'\].*--fresh"):
        recipe.main(["--preset", "toy-chat", "--quiet", *args, "train.steps=5"])
