"""vLLM engines as Ray actors, driven as one pool: generate across all, push and refit into all.

`RayEnginePool` starts one `Engine` per Ray actor (vLLM's parallel state is process-global, so
one engine per process), splits each generate call over the engines and runs the parts at once,
pushes every draft and refits every policy into every engine through `EngineSwapper` (one
payload in Ray's object store for all engines, the RPCs in flight together), and sums the
engines' spec-decode counters. It keeps the latest policy and draft it shipped (object-store
references, version, checksum), so a dead engine actor can be replaced by one brought up to
date before it serves: `restart(i)`, or automatically with `RayConfig(restart_dead=True)`.
Without that, a dead actor raises `EngineDiedError` naming the engine and both ways on; stopping
loses nothing, since the policy and the draft live in the trainer.

`EngineActor` is the handle of one actor, shaped like `Engine` (`generate`, `collective_rpc`,
`spec_counters`, `reset_prefix_cache`, `shutdown`), so `EngineSwapper` and the GRPO loop take it
unchanged. It knows nothing of GRPO or of how drafts are trained.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch

from ..metrics import SpecCounters
from ..ray_utils import RayConfig, actor_options, import_ray, init_ray, is_actor_death, wait_started
from .payload import read_safetensors_dir
from .swap import EngineSwapper, PushResult
from .vllm import Completion, Engine, EngineConfig, request_seed


class EngineDiedError(RuntimeError):
    """An engine actor's process is gone; `index` names it in the pool."""

    def __init__(self, index: int, name: str, cause: BaseException, held: str = ""):
        self.index, self.name = index, name
        super().__init__(f"engine actor {index} ({name}) died: {type(cause).__name__}: {_first_line(cause)}. Its "
                         f"weights are gone.{held} Either call pool.restart({index}) (or run with "
                         "RayConfig(restart_dead=True)) to start a replacement that is brought up to date before it "
                         "serves, or stop: nothing of the run is lost, the policy and the draft live in the trainer")


class _EngineServer:
    """The actor body: one in-process `Engine` (VLLM_ENABLE_V1_MULTIPROCESSING=0 in its env)."""

    def __init__(self, cfg: EngineConfig, threads: int):
        torch.set_num_threads(threads)
        self.engine = Engine(cfg)

    def info(self) -> dict:
        return {"pid": os.getpid(), "start_seconds": self.engine.start_seconds,
                "cpu_fix_applied": self.engine.cpu_fix_applied}

    def generate(self, prompts: list[list[int]], kw: dict) -> list[list[Completion]]:
        return self.engine.generate(prompts, **kw)

    def collective_rpc(self, method: str, args: tuple, kwargs: dict, payload: bytes | None = None) -> list:
        # `payload` comes as a top-level argument so Ray resolves its object-store reference here
        if payload is not None:
            kwargs = {**kwargs, "payload": payload}
        return self.engine.collective_rpc(method, args, kwargs)

    def spec_counters(self) -> SpecCounters:
        return self.engine.spec_counters()

    def reset_prefix_cache(self) -> bool:
        return self.engine.reset_prefix_cache()

    def shutdown(self) -> None:
        self.engine.shutdown()


class _Shipper:
    """Puts a push payload into Ray's object store once, however many engines receive it."""

    def __init__(self):
        self.payload: bytes | None = None  # the last payload put (held, so its id() stays unique)
        self.ref = None  # its object reference

    def ref_for(self, payload: bytes):
        if payload is not self.payload:
            self.payload, self.ref = payload, import_ray().put(payload)
        return self.ref


class _Pending:
    """An RPC in flight on one actor; `result()` waits for it (the EngineSwapper protocol)."""

    def __init__(self, handle: "EngineActor", ref, what: str):
        self.handle, self.ref, self.what = handle, ref, what

    def result(self):
        return self.handle._get(self.ref, self.what)


class EngineActor:
    """Handle of one engine actor, shaped like `engine.vllm.Engine`; calls block like Engine's,
    the `*_async` ones return at once."""

    def __init__(self, index: int, cfg: EngineConfig, ray_cfg: RayConfig, shipper: _Shipper):
        ray = import_ray()
        self.index, self.name, self._shipper = index, f"draftadapt-engine-{index}-{os.urandom(3).hex()}", shipper
        self._ray_cfg = ray_cfg
        opts = actor_options(ray_cfg, {"VLLM_ENABLE_V1_MULTIPROCESSING": "1" if cfg.multiprocessing else "0"})
        self.actor = ray.remote(_EngineServer).options(name=self.name, max_restarts=0, **opts).remote(
            cfg, ray_cfg.omp_threads)
        self._ready = self.actor.info.remote()
        self.info: dict | None = None

    def wait_ready(self) -> dict:
        """Block until the engine is up; returns its pid and start seconds."""
        if self.info is None:
            self.info = self._get(self._ready, "start", started=False)
        return self.info

    def generate_async(self, prompts: Sequence[Sequence[int]], **kw) -> _Pending:
        return _Pending(self, self.actor.generate.remote([list(map(int, p)) for p in prompts], kw), "generate")

    def generate(self, prompts: Sequence[Sequence[int]], **kw) -> list[list[Completion]]:
        return self.generate_async(prompts, **kw).result()

    def collective_rpc_async(self, method: str, args: tuple = (), kwargs: dict | None = None) -> _Pending:
        kwargs = dict(kwargs or {})
        payload = kwargs.pop("payload", None)
        ref = self._shipper.ref_for(payload) if isinstance(payload, bytes) else payload
        return _Pending(self, self.actor.collective_rpc.remote(method, tuple(args), kwargs, ref), method)

    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None) -> list:
        return self.collective_rpc_async(method, args, kwargs).result()

    def spec_counters(self) -> SpecCounters:
        return self._get(self.actor.spec_counters.remote(), "spec_counters")

    def reset_prefix_cache(self) -> bool:
        return self._get(self.actor.reset_prefix_cache.remote(), "reset_prefix_cache")

    def shutdown(self) -> None:
        """Stop the engine, then the actor; a dead actor is left as it is."""
        ray = import_ray()
        try:
            ray.get(self.actor.shutdown.remote())
        except ray.exceptions.RayActorError:
            pass
        ray.kill(self.actor)

    def _get(self, ref, what: str, started: bool = True):
        ray = import_ray()
        try:
            return ray.get(ref) if started else wait_started(ref, f"engine actor {self.index} ({self.name})",
                                                             self._ray_cfg)
        except ray.exceptions.RayActorError as exc:
            raise EngineDiedError(self.index, self.name, exc) from exc


class _Shipped(NamedTuple):
    version: int
    ref: Any  # object-store reference of the safetensors payload
    checksum: str | None  # trainer-side digest (None when pushed unverified)


class RayEnginePool:
    """N engine actors serving one policy + draft; see the module docstring.

    >>> pool = RayEnginePool(EngineConfig(model=policy_dir, spec=SpecConfig("eagle3", 3, model=draft_dir)), 2)
    >>> outs = pool.generate(prompts, n=8, temperature=1.0, max_tokens=64)   # split over both engines
    >>> pool.push_draft(state, version=1); pool.refit_policy(policy.state_dict(), version=1)
    """

    def __init__(self, cfg: EngineConfig, num_engines: int, ray_cfg: RayConfig = RayConfig()):
        if num_engines < 1:
            raise ValueError(f"num_engines={num_engines}; use >= 1")
        init_ray(ray_cfg)
        self.cfg, self.ray_cfg, self._shipper = cfg, ray_cfg, _Shipper()
        self.engines = [EngineActor(i, cfg, ray_cfg, self._shipper) for i in range(num_engines)]
        self.restarts = 0  # engine actors replaced so far
        self._latest: dict[str, _Shipped] = {}  # kind -> the newest payload every engine accepted
        self._seen = [SpecCounters() for _ in self.engines]  # last counters read per engine
        self._offset = SpecCounters()  # counters of replaced engines, so the sum never goes back
        try:
            self._run(lambda: [e.wait_ready() for e in self.engines])
            self.swapper = EngineSwapper(self.engines)
        except BaseException:
            self.shutdown()
            raise

    # 1) serving --------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], *, seed: int | None = None, **kw) -> list[list[Completion]]:
        """`Engine.generate` over the pool: contiguous shares of the prompts, one per engine, all at
        once; prompt i still gets `request_seed(seed, i, n)` (seed + i*n), as in one engine. A dead
        engine's share is re-run on its replacement when RayConfig.restart_dead is set."""
        n, samples = len(self.engines), kw.get("n", 1)
        bounds = [len(prompts) * j // n for j in range(n + 1)]
        parts: list[Any] = [None] * n
        for j in range(n):  # start every share before waiting on any
            lo, hi = bounds[j], bounds[j + 1]
            if hi > lo:
                parts[j] = self.engines[j].generate_async(prompts[lo:hi], seed=request_seed(seed, lo, samples), **kw)
        out: list[list[Completion]] = []
        for j, part in enumerate(parts):
            if part is None:
                continue
            lo, hi = bounds[j], bounds[j + 1]
            out += self._run(part.result, lambda: self.engines[j].generate(
                prompts[lo:hi], seed=request_seed(seed, lo, samples), **kw))
        return out

    def spec_counters(self) -> SpecCounters:
        """Cumulative spec-decode counters summed over the engines; a replaced engine counts with
        its counters as last read, so the sum never goes back."""
        pending = [e.actor.spec_counters.remote() for e in self.engines]
        for i, ref in enumerate(pending):
            self._seen[i] = self._run(lambda: self.engines[i]._get(ref, "spec_counters"),
                                      lambda: self.engines[i].spec_counters())
        return sum(self._seen, self._offset)

    # 2) weights -------------------------------------------------------------------------------
    def push_draft(self, state: Mapping[str, torch.Tensor], version: int, *, verify: bool = True) -> PushResult:
        """`EngineSwapper.push_draft` into every engine (a DraftSink for `DraftAdapter`)."""
        return self._push("draft", state, version, verify)

    def refit_policy(self, state_or_dir: Mapping[str, torch.Tensor] | str | os.PathLike, version: int, *,
                     verify: bool = True) -> PushResult:
        """`EngineSwapper.refit_policy` into every engine; a checkpoint dir is read here and
        shipped as bytes, since engine actors on other nodes cannot read the driver's disk."""
        state = read_safetensors_dir(state_or_dir) if isinstance(state_or_dir, (str, os.PathLike)) else state_or_dir
        return self._push("policy", state, version, verify)

    @property
    def draft_version(self) -> int | None:
        return self.swapper.draft_version

    @property
    def policy_version(self) -> int | None:
        return self.swapper.policy_version

    def _push(self, kind: str, state, version: int, verify: bool) -> PushResult:
        method = "push_draft" if kind == "draft" else "refit_policy"
        # looked up at call time: a restart replaces the swapper
        result = self._run(lambda: getattr(self.swapper, method)(state, version, verify=verify))
        if result.pushed:
            self._latest[kind] = _Shipped(version, self._shipper.ref, result.checksum)
        return result

    # 3) dead engines ----------------------------------------------------------------------------
    def restart(self, index: int) -> dict:
        """Replace engine `index` by a fresh actor serving the latest policy and draft the pool
        shipped (same versions, verified against the same checksums); returns its info."""
        old = self.engines[index]
        try:
            old.shutdown()
        except Exception:  # noqa: BLE001  (it is being replaced because it failed)
            pass
        self._offset, self._seen[index] = self._offset + self._seen[index], SpecCounters()
        new = EngineActor(index, self.cfg, self.ray_cfg, self._shipper)
        self.engines[index] = new
        info = new.wait_ready()
        swapper = EngineSwapper(self.engines)  # knows the new engine's ranks: a TP engine takes pushes in two phases
        for kind in ("policy", "draft"):  # the policy first: the drafter shares its embedding
            if kind in self._latest:
                s = self._latest[kind]
                kw = dict(kind=kind, version=s.version, expected_checksum=s.checksum, payload=s.ref)
                outs = new.collective_rpc("draftadapt_push", kwargs=swapper._kw(index, kw))
                swapper._settle(index, kind, s.version, None, outs)  # all ranks keep it, or all restore and raise
        new.reset_prefix_cache()
        self.swapper = EngineSwapper(self.engines)  # re-reads the versions every engine serves
        self.restarts += 1
        return info

    def _run(self, call: Callable[[], Any], retry: Callable[[], Any] | None = None) -> Any:
        """Run `call`; on an engine death restart the engine and run `retry` (default: `call`)
        once when RayConfig.restart_dead is set, else raise EngineDiedError with what the pool holds."""
        try:
            return call()
        except Exception as exc:  # noqa: BLE001  (only deaths are handled; the rest re-raised)
            died = _died(exc)
            if died is None:
                raise
            if not self.ray_cfg.restart_dead:
                raise EngineDiedError(died.index, died.name, died.__cause__ or died, self._held()) from exc
        self.restart(died.index)
        return (retry or call)()

    def _held(self) -> str:
        held = [f"{k} version {s.version}" for k, s in sorted(self._latest.items())]
        return f" The pool holds {' and '.join(held)} for a replacement." if held else ""

    def shutdown(self) -> None:
        for e in self.engines:
            try:
                e.shutdown()
            except Exception:  # noqa: BLE001  (shutting down: a dead actor has nothing to stop)
                pass

    def __enter__(self) -> "RayEnginePool":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _died(exc: BaseException | None) -> EngineDiedError | None:
    """The EngineDiedError in an exception's cause chain (EngineSwapper wraps per-engine errors)."""
    while exc is not None:
        if isinstance(exc, EngineDiedError):
            return exc
        if is_actor_death(exc):
            return None
        exc = exc.__cause__
    return None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


class Engines(NamedTuple):
    engine: Any  # has generate / spec_counters / shutdown: an Engine or a RayEnginePool
    swapper: Any  # has push_draft / refit_policy / spec_counters: an EngineSwapper or the pool


def make_engines(cfg: EngineConfig, num_engines: int = 1, use_ray: bool = False,
                 ray_cfg: RayConfig = RayConfig()) -> Engines:
    """One in-process engine and its swapper, or a pool of `num_engines` engine actors that is
    both; either way `collect_rollouts(engines.engine, ...)` and `DraftAdapter(sink=engines.swapper)`."""
    if not use_ray:
        if num_engines != 1:
            raise ValueError(f"num_engines={num_engines} needs use_ray=True: one in-process vLLM engine per process")
        engine = Engine(cfg)
        return Engines(engine, EngineSwapper([engine]))
    pool = RayEnginePool(cfg, num_engines, ray_cfg)
    return Engines(pool, pool)
