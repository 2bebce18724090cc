"""BackgroundDraftWorker: training in a thread, one step behind, equal to the inline worker bit for bit."""
from __future__ import annotations

import threading

import pytest
import torch
from test_adapter import B, FakeSink, add_rollouts, make_adapter, policy, run  # noqa: F401 (policy: fixture)

from draftadapt.adapter import DraftAdapter
from draftadapt.workers import BackgroundDraftWorker


def in_another_thread(fn):
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("out", fn()))
    t.start()
    t.join()
    return box["out"]


def background(policy, sink=None, **cfg):
    base = make_adapter(policy, **cfg)  # same seeds, config and initial draft as make_adapter's
    return DraftAdapter.with_worker(BackgroundDraftWorker(base.worker), base.config, sink)


def test_background_pushes_are_the_inline_pushes_one_step_later(policy):
    check_background_is_inline_one_step_later(policy)


def check_background_is_inline_one_step_later(policy):
    inline_sink, bg_sink = FakeSink(), FakeSink()
    inline = run(make_adapter(policy, inline_sink), policy, range(5))
    adapter = background(policy, bg_sink)
    bg = run(adapter, policy, range(5))
    adapter.worker.close()
    assert bg[0].train is None and "no draft training has finished yet" in bg[0].train_skipped_reason
    assert not bg[0].pushed, "nothing new to push before the first run finished"
    assert bg_sink.pushes == [1, 2, 3, 4] and inline_sink.pushes == [0, 1, 2, 3, 4]
    for got, want in zip(bg_sink.states, inline_sink.states[:4]):
        assert all(torch.equal(got[k], want[k]) for k in want), "the draft at boundary v = inline's at v-1"
    assert [s.train.loss for s in bg[1:]] == [s.train.loss for s in inline[:4]]
    assert bg[-1].cache == inline[-1].cache, "features reach the live cache as they arrive"


def test_the_run_computes_with_the_callers_thread_count_whatever_torchs_process_wide_count_says(policy):
    """The cause of the drift once seen after in-process engines: a new thread starts from torch's process-wide
    thread count (the last torch.set_num_threads from ANY thread), the caller computes with its own OpenMP count.
    Here the process-wide count is 1 (set from another thread, as an engine's thread may), the caller's 2: without
    the worker's pinning the thread's losses differ from inline's in the 7th digit (12.339170932 vs 12.339171171)."""
    main = torch.get_num_threads()
    torch._C.set_num_threads(2)  # torch._C's: an in-process vLLM CPU engine turns torch.set_num_threads into a no-op
    try:
        in_another_thread(lambda: torch._C.set_num_threads(1))
        assert (torch.get_num_threads(), in_another_thread(torch.get_num_threads)) == (2, 1), "the two counts differ"
        check_background_is_inline_one_step_later(policy)
    finally:
        torch._C.set_num_threads(main)


@pytest.mark.vllm
def test_bit_equality_holds_in_the_process_of_an_in_process_engine(policy, tmp_path):
    """In the same process as a vLLM engine that ran (VLLM_ENABLE_V1_MULTIPROCESSING=0, as Engine sets it): the
    CPU worker replaced torch.set_num_threads for the whole process; the background run still equals inline's."""
    from conftest import save_tiny

    from draftadapt.engine.vllm import Engine, EngineConfig

    model_dir, tok_dir = save_tiny("llama", tmp_path, hidden=128, layers=4)
    with Engine(EngineConfig(model=str(model_dir), tokenizer=str(tok_dir), max_num_seqs=4, worker_extension=None)) as eng:
        assert eng.generate([[1, 4, 50, 7]], n=2, temperature=1.0, max_tokens=8, logprobs=False)
    check_background_is_inline_one_step_later(policy)


def test_train_returns_while_its_run_goes_on_and_the_run_sees_only_its_inputs(policy):
    """A run started at boundary v trains on the features and the embedding of that moment:
    features added and policy updates made while it runs do not leak into it."""
    adapter = background(policy)
    worker = adapter.worker
    release, started = threading.Event(), threading.Event()
    train = worker.inner.train

    def gated(n):
        started.set()
        assert release.wait(30), "the test never released the run"
        return train(n)

    worker.inner.train = gated
    add_rollouts(adapter, policy, version=0)
    adapter.on_step_end(0)  # starts run 0 and returns while it is blocked
    assert started.wait(30) and not release.is_set()
    add_rollouts(adapter, policy, version=1)  # new features, and a policy step that moves the embedding
    embed = policy.get_input_embeddings().weight
    saved = embed.detach().clone()
    with torch.no_grad():
        embed.mul_(1.5)
    release.set()
    start_up = worker.state_for_push()  # before the next train(): the start-up weights, once run 0 finished
    adapter.on_step_end(1)  # collects run 0 (and starts run 1)
    state = worker.state_for_push()  # the weights run 0 left
    with torch.no_grad():
        embed.copy_(saved)
    worker.close()

    ref = make_adapter(policy)
    add_rollouts(ref, policy, version=0)
    ref.on_step_end(0)  # inline run 0: version-0 features, the unscaled embedding
    want = ref.worker.state_for_push()
    assert all(torch.equal(state[k], want[k]) for k in want)
    assert not all(torch.equal(start_up[k], want[k]) for k in want), "the check can fail"


def test_a_failure_in_the_thread_surfaces_at_the_next_call_and_stays(policy):
    adapter = background(policy)
    worker = adapter.worker

    def boom(batch):
        raise FloatingPointError("loss is NaN")

    worker.inner.trainer.step = boom
    add_rollouts(adapter, policy, version=0)
    adapter.on_step_end(0)  # the run fails in the thread
    add_rollouts(adapter, policy, version=1)  # may or may not see it yet: the run is asynchronous
    with pytest.raises(RuntimeError, match="background draft training failed .*loss is NaN") as err:
        adapter.on_step_end(1)
    assert isinstance(err.value.__cause__, FloatingPointError)
    for call in (worker.state_for_push, lambda: worker.train(1), worker.close):
        with pytest.raises(RuntimeError, match="background draft training failed"):
            call()


def test_a_run_checkpoint_resumes_losses_and_pushes(policy, tmp_path):
    from draftadapt.grpo.state import load_run, save_run

    sink = FakeSink()
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
    a = background(policy, sink, staleness_window=1)
    run(a, policy, range(3))
    save_run(tmp_path / "ckpt", 3, policy, optimizer, a)  # the recipe's checkpoint: features in ckpt/cache
    rest = run(a, policy, range(3, 6))
    a.worker.close()
    want = [(s.train.loss, s.pushed) for s in rest], sink.states[-3:]

    b = background(policy, FakeSink(), seed=2, staleness_window=1)
    assert load_run(tmp_path / "ckpt", policy, optimizer, b).step == 3
    got = run(b, policy, range(3, 6))
    b.worker.close()
    assert [(s.train.loss, s.pushed) for s in got] == want[0]
    assert all(torch.equal(x[k], y[k]) for x, y in zip(b.sink.states, want[1]) for k in y)
    assert got[0].cache.sequences == 2 * B, "the cache came back (versions 1 and 2 in the window)"
