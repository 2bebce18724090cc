"""A top-k teacher trains without ever being densified to [B, T, Vd]: the loss reads it per chunk of
positions (`batch.teacher_dense`) and every training path samples it sparse; losses and gradients
equal those of the same teacher densified whole (the former path)."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from torch.utils._python_dispatch import TorchDispatchMode

import draftadapt.ttt as ttt
from draftadapt.batch import RolloutBatch
from draftadapt.drafts.eagle3 import Eagle3Draft
from draftadapt.drafts.mtp import MTPDraft
from draftadapt.drafts.vocab import build_draft_vocab
from draftadapt.strategy import strategy_loss
from draftadapt.ttt import ttt_loss

V, VD, H, TOPK = 200, 120, 64, 6
RTOL = 1e-6  # loss and gradients: sparse vs densified (the same fp32 arithmetic, only the teacher's storage differs)


def eagle3():
    torch.manual_seed(0)
    draft = Eagle3Draft.from_target(tiny_config("qwen3", layers=8, hidden=H, vocab=V),
                                    build_draft_vocab([torch.randint(0, V, (3000,))], V, VD))
    draft._init_weights(std=0.15)
    return draft, torch.nn.Embedding(V, H)


def mtp():
    torch.manual_seed(0)
    draft = MTPDraft.from_target(tiny_config("qwen2", layers=2, hidden=H, vocab=V), torch.nn.Linear(H, V, bias=False))
    with torch.no_grad():
        for name, p in draft.named_parameters():
            p.copy_((1.0 if name.endswith("layernorm.weight") else 0.0) + 0.15 * torch.randn(p.shape))
    return draft, torch.nn.Embedding(V, H)


def topk_rollout(arch: str, lengths=(17, 9, 24), seed: int = 3) -> RolloutBatch:
    """Three sequences with a top-k teacher over target ids (some outside the draft vocab)."""
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    logits = torch.randn(n, V, generator=g).mul(3)
    vals, ids = logits.topk(TOPK, -1)
    return RolloutBatch(input_ids=torch.randint(0, V, (n,), generator=g),
                        cu_seqlens=torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()]),
                        aux_hidden=torch.randn(n, 3 * H, generator=g) if arch == "eagle3" else torch.zeros(n, 0),
                        loss_mask=torch.rand(n, generator=g) < 0.8, teacher_topk_ids=ids,
                        teacher_topk_logprobs=vals - logits.logsumexp(-1, keepdim=True),
                        final_hidden=torch.randn(n, H, generator=g) if arch == "mtp" else None)


def both(arch: str, draft):
    rollout = topk_rollout(arch)
    ids = draft.target_ids()
    dense, sparse = rollout.to_draft_batch(ids), rollout.to_draft_batch(ids, sparse_teacher=True)
    assert dense.teacher_logprobs is not None and sparse.teacher_logprobs is None
    assert int((sparse.loss_mask & sparse.valid).sum()) > 10, "the batch must score positions"
    return dense, sparse


def loss_and_grads(draft, batch, embed, steps, loss, weight=None):
    if weight is None:
        res = ttt_loss(draft, batch, embed, steps=steps, loss=loss, tv_weight=0.7, chunk_elements=5 * VD)
    else:
        res = strategy_loss(draft, batch, embed, steps, 0.8, loss, weight)
    params = [p for p in draft.parameters() if p.requires_grad]
    return res, torch.autograd.grad(res.loss, params)


@pytest.mark.parametrize("arch", ["eagle3", "mtp"])
@pytest.mark.parametrize("loss", ["kl", "tv", "kl+tv", "top1"])
def test_sparse_top_k_teacher_gives_the_densified_teachers_loss_and_gradients(arch, loss):
    draft, embed = eagle3() if arch == "eagle3" else mtp()
    dense, sparse = both(arch, draft)
    for steps in (1, 2, 3):
        want, g_want = loss_and_grads(draft, dense, embed, steps, loss)
        got, g_got = loss_and_grads(draft, sparse, embed, steps, loss)
        msg = f"{arch} {loss} K={steps}"
        torch.testing.assert_close(got.loss, want.loss, rtol=RTOL, atol=0, msg=msg)
        for field in ("step_loss", "step_acc", "step_kl", "step_tv"):
            torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=RTOL, atol=1e-9, msg=msg)
        for a, b in zip(g_got, g_want):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-9, msg=msg)


def test_weighted_strategy_loss_is_the_same_with_a_sparse_teacher_and_matches_its_definition():
    draft, embed = eagle3()
    dense, sparse = both("eagle3", draft)
    weight = torch.rand(dense.valid.shape, generator=torch.Generator().manual_seed(5)) + 0.5
    want, g_want = loss_and_grads(draft, dense, embed, 3, "kl+tv", weight)
    got, g_got = loss_and_grads(draft, sparse, embed, 3, "kl+tv", weight)
    torch.testing.assert_close(got.loss, want.loss, rtol=RTOL, atol=0)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-9)
    # the definition: per step, the w-weighted mean of kl + tv over scored positions, steps weighted 0.8^(k-1)
    scored, total, steps = dense.loss_mask & dense.valid, 0.0, []
    with torch.no_grad():
        for k, logit in enumerate(ttt.unroll(draft, dense, embed, 3), start=1):
            sel = ttt.shift(scored, k) & dense.valid
            r, c = sel.nonzero(as_tuple=True)
            logp, logq = dense.teacher_logprobs[r, c + k].log_softmax(-1), logit[sel].log_softmax(-1)
            obj = (logp.exp() * (logp - logq)).sum(-1) + 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)
            w = weight[r, c + k]
            steps.append((w * obj).sum() / w.sum())
            total = total + 0.8 ** (k - 1) * steps[-1]
    torch.testing.assert_close(got.loss.detach(), total, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.step_loss, torch.stack(steps), rtol=1e-5, atol=1e-6)


class LargestVocabTensor(TorchDispatchMode):
    """Records the most rows of any tensor an op allocates (views excluded, e.g. the head's
    transpose [H, Vd]) whose last dim is Vd or Vd + 1."""

    def __init__(self, vd: int):
        super().__init__()
        self.vd, self.rows = vd, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] in (self.vd, self.vd + 1) and not func.is_view:
                self.rows = max(self.rows, t.numel() // t.shape[-1])
        return out


@pytest.mark.parametrize("arch", ["eagle3", "mtp"])
def test_no_tensor_over_the_draft_vocab_outgrows_one_chunk_of_positions(arch, monkeypatch):
    """The check that fails when the teacher (or the logits) is densified past a chunk: every
    [..., Vd] tensor built during loss + backward, and every teacher_dense call, stays <= chunk rows."""
    draft, embed = eagle3() if arch == "eagle3" else mtp()
    _, sparse = both(arch, draft)
    vd, chunk_rows = draft.config.draft_vocab_size, 5
    calls = []
    real = ttt.teacher_dense
    monkeypatch.setattr(ttt, "teacher_dense", lambda b, r, c: calls.append(r.numel()) or real(b, r, c))
    with LargestVocabTensor(vd) as mode:
        res = ttt_loss(draft, sparse, embed, steps=3, loss="kl+tv", chunk_elements=chunk_rows * vd)
        res.loss.backward()
    scored = int(res.step_tokens.sum())
    assert sum(calls) == scored and max(calls) <= chunk_rows, f"teacher read {calls} rows at a time"
    assert 0 < mode.rows <= chunk_rows, (
        f"a [{mode.rows}, {vd}] tensor was built; a chunk is {chunk_rows} rows, the batch "
        f"{sparse.valid.numel()} positions: something densified the teacher or the logits")


def test_distill_loss_reads_a_top_k_teacher_per_chunk_with_the_same_result():
    import draftadapt.distill as distill
    from conftest import tiny_model
    from draftadapt.drafts.draft_lm import DraftLM

    policy = tiny_model("llama", layers=2, hidden=64, vocab=V)
    draft = DraftLM.from_policy(policy, num_layers=1)
    rollout = topk_rollout("eagle3")
    rollout.aux_hidden = torch.zeros(rollout.num_tokens, 0)
    dense, sparse = rollout.to_draft_batch(draft.target_ids()), rollout.to_draft_batch(draft.target_ids(),
                                                                                          sparse_teacher=True)
    params = [p for p in draft.parameters() if p.requires_grad]
    want, got = distill.distill_loss(draft, dense, 7 * V), distill.distill_loss(draft, sparse, 7 * V)
    torch.testing.assert_close(got.loss, want.loss, rtol=RTOL, atol=0)
    assert got.tokens == want.tokens > 10 and float(got.acc) == float(want.acc)
    for a, b in zip(torch.autograd.grad(got.loss, params), torch.autograd.grad(want.loss, params)):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-9)


def train_through(kind: str, rollout: RolloutBatch, tmp_path) -> list:
    """The DraftBatches the trainer gets from `kind`'s training path after one add and 2 steps."""
    import torch.distributed as dist

    from draftadapt.cache import CacheConfig
    from draftadapt.distributed import DataParallelDraftWorker
    from draftadapt.ray_worker import _DraftServer
    from draftadapt.trainer import TrainerConfig
    from draftadapt.workers import BackgroundDraftWorker, LocalDraftWorker

    draft, embed = eagle3()
    args = (TrainerConfig(ttt_steps=2), CacheConfig(), 64)
    if kind == "dp":  # a one-rank group: the sampling path of every rank
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        worker = (DataParallelDraftWorker(draft, embed, *args) if kind == "dp" else
                  _DraftServer(draft, embed.weight.detach(), *args, 0, None, 1) if kind == "ray" else
                  LocalDraftWorker(draft, embed, *args))
        inner = worker.worker if kind == "ray" else worker
        seen, step = [], inner.trainer.step
        inner.trainer.step = lambda batch: seen.append(batch) or step(batch)
        inner.add(rollout)
        if kind == "background":
            worker = BackgroundDraftWorker(worker)
            worker.train(2)
            worker.close()
        else:
            worker.train(2, None) if kind == "ray" else worker.train(2)
    finally:
        if kind == "dp":
            dist.destroy_process_group()
    assert len(seen) == 2
    return seen


@pytest.mark.parametrize("kind", ["local", "background", "ray", "dp"])
@pytest.mark.parametrize("teacher", ["topk", "dense"])
def test_every_training_path_samples_a_top_k_cache_sparse_and_a_dense_one_dense(teacher, kind, tmp_path):
    rollout = topk_rollout("eagle3")
    if teacher == "dense":
        rollout = RolloutBatch(**{**vars(rollout), "teacher_topk_ids": None, "teacher_topk_logprobs": None,
                                  "teacher_logprobs": torch.randn(rollout.num_tokens, VD).log_softmax(-1)})
    for batch in train_through(kind, rollout, tmp_path):
        if teacher == "topk":
            assert batch.teacher_logprobs is None and batch.teacher_topk_ids.shape[-1] == TOPK, \
                f"{kind}: a top-k cache must reach the trainer sparse, not densified to [B, T, Vd]"
        else:
            assert batch.teacher_logprobs is not None and batch.teacher_logprobs.shape[-1] == VD
