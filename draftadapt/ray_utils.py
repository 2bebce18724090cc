"""Ray plumbing shared by the engine actors and the draft-trainer actor: import, start, actor options.

The same code runs on one machine (`ray.init(num_cpus=...)` started here) and on a cluster
(`ray.init(address=...)` done by the caller before anything here runs: an initialised Ray is
used as it is). It does not decide what the actors do.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

# Environment every actor inherits from the driver when set here (threads, offline hub, vLLM mode).
_PASSED_ENV = ("PYTHONPATH", "OMP_WAIT_POLICY", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "VLLM_CPU_KVCACHE_SPACE",
               "VLLM_LOGGING_LEVEL", "DRAFTADAPT_CACHE", "DRAFTADAPT_DISABLE_CPU_FIX")


@dataclass(frozen=True)
class RayConfig:
    num_cpus: float | None = None  # ray.init(num_cpus=) when this process starts Ray; None = all cores
    temp_dir: str | None = None  # ray.init(_temp_dir=) when this process starts Ray; keep it short
    #   (Ray puts unix sockets under it, 107-byte path limit); None = Ray's default /tmp/ray
    actor_cpus: float = 1.0  # Ray CPU resource each actor reserves (scheduling only; threads below)
    actor_gpus: float = 0.0  # Ray GPU resource each actor reserves (1 for a GPU engine)
    omp_threads: int = 1  # OMP_NUM_THREADS / torch threads inside each actor
    start_timeout_s: float = 900.0  # an actor not up by then is reported (often: not enough free CPUs)
    restart_dead: bool = False  # a dead engine actor is restarted with the pool's latest policy and
    #   draft and the call retried; False = raise EngineDiedError and leave the choice to the caller

    def __post_init__(self) -> None:
        if self.actor_cpus < 0 or self.actor_gpus < 0 or self.omp_threads < 1 or self.start_timeout_s <= 0:
            raise ValueError(f"RayConfig needs actor_cpus, actor_gpus >= 0, omp_threads >= 1 and start_timeout_s > 0; "
                             f"got {self}")


def import_ray():
    try:
        import ray
    except ImportError as exc:
        raise ImportError("Ray actors need Ray: pip install 'draftadapt[ray]'") from exc
    return ray


def init_ray(cfg: RayConfig = RayConfig()):
    """Start a local Ray unless one is initialised already (a cluster connection is the caller's)."""
    ray = import_ray()
    if not ray.is_initialized():
        kw: dict[str, Any] = dict(num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=True)
        if cfg.temp_dir is not None:
            kw["_temp_dir"] = str(cfg.temp_dir)
        ray.init(**kw)
    return ray


def actor_options(cfg: RayConfig, extra_env: dict[str, str] | None = None) -> dict:
    """`.options(...)` for one actor: resources and the environment it must run with.

    PYTHONPATH is passed only when the driver has one (a source checkout); an installed
    draftadapt needs none. Threads are set per actor: Ray's default OMP_NUM_THREADS is the
    actor's CPU count, and spinning OpenMP threads on shared cores cost 5-10x here.
    """
    env = {k: os.environ[k] for k in _PASSED_ENV if k in os.environ}
    env.update(OMP_NUM_THREADS=str(cfg.omp_threads), **(extra_env or {}))
    return dict(num_cpus=cfg.actor_cpus, num_gpus=cfg.actor_gpus, runtime_env={"env_vars": env})


def is_actor_death(exc: BaseException) -> bool:
    """The actor process is gone (killed, crashed, its node lost), as opposed to a method raising."""
    ray = import_ray()
    return isinstance(exc, ray.exceptions.RayActorError)


def wait_started(ref, what: str, cfg: RayConfig):
    """ray.get of an actor's first call, with an error that says why it may never start."""
    ray = import_ray()
    try:
        return ray.get(ref, timeout=cfg.start_timeout_s)
    except ray.exceptions.GetTimeoutError as exc:
        raise RuntimeError(f"{what} did not start within RayConfig.start_timeout_s={cfg.start_timeout_s}: each actor "
                           f"reserves actor_cpus={cfg.actor_cpus}, actor_gpus={cfg.actor_gpus} and Ray has "
                           f"{ray.available_resources()} free; lower RayConfig.actor_cpus or add resources") from exc
