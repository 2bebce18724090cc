"""`ExternalAsyncLLM`: a vLLM `AsyncLLM` (what verl and SkyRL hold in their rollout actors) as an engine.

`EngineSwapper` is synchronous; an AsyncLLM's calls are coroutines on the event loop that serves it.
This wrapper submits them to that loop from another thread (`asyncio.run_coroutine_threadsafe`) and
waits, so the swapper's guarantees (versions, validation, digest, verification, rollback) are the
worker extension's, unchanged. It never runs on the serving loop's own thread: a blocking wait there
would deadlock the loop, so such a call is refused. Counters come from the process's Prometheus
registry (`vllm.v1.metrics.reader.get_metrics_snapshot`, what `LLM.get_metrics` reads).
"""
from __future__ import annotations

import asyncio
from concurrent.futures import Future
from typing import Any

from ..metrics import SpecCounters
from . import guard


class ExternalAsyncLLM:
    """An `AsyncLLM` started elsewhere (with `worker_extension_cls=...DraftSwapExtension` and
    `disable_log_stats=False`), seen as an engine. `loop`: the running event loop that serves it,
    in another thread than the callers'."""

    def __init__(self, async_llm, loop: asyncio.AbstractEventLoop):
        if not loop.is_running():
            raise ValueError("ExternalAsyncLLM needs the event loop that serves the AsyncLLM, running (in another "
                             "thread): the swapper's calls are submitted to it")
        self.llm, self.loop = async_llm, loop
        vllm_config = getattr(async_llm, "vllm_config", None)
        if vllm_config is not None:
            guard.check_vllm_config(vllm_config)

    def collective_rpc_async(self, method: str, args: tuple = (), kwargs: dict | None = None) -> Future:
        """Submit the RPC and return at once (`EngineSwapper` pushes such engines all at once)."""
        return self._submit(self.llm.collective_rpc(method, args=tuple(args), kwargs=kwargs or {}))

    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None) -> list:
        return self.collective_rpc_async(method, args, kwargs).result()

    def reset_prefix_cache(self) -> bool:
        return bool(self._submit(self.llm.reset_prefix_cache()).result())

    def sleep(self, level: int = 2) -> None:
        self._submit(self.llm.sleep(level)).result()

    def wake_up(self) -> None:
        self._submit(self.llm.wake_up()).result()

    def is_sleeping(self) -> bool:
        return bool(self._submit(self.llm.is_sleeping()).result())

    def spec_counters(self) -> SpecCounters:
        """Cumulative counters of this process's engines (one AsyncLLM per process: vLLM keeps one
        Prometheus registry, and a newer engine's metrics replace an older one's)."""
        from vllm.v1.metrics.reader import get_metrics_snapshot

        return SpecCounters.from_vllm_metrics(get_metrics_snapshot())

    def _submit(self, coro: Any) -> Future:
        if _on_loop_thread(self.loop):
            coro.close()
            raise RuntimeError("ExternalAsyncLLM called on the thread of the event loop that serves the AsyncLLM: a "
                               "blocking push there deadlocks it; call the swapper from another thread (e.g. "
                               "await loop.run_in_executor(None, swapper.push_draft, state, version))")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)


def _on_loop_thread(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
