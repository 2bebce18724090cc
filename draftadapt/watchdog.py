"""Draft-health watchdog: catch a draft that is stale, zeroed or never reloaded before it costs days.

The most reported silent failure of spec decode in RL (vLLM #52479, verl #6661, miles #1926,
SGLang #27718 / #31674): after a weight sync, a sleep/wake or an engine restart the engine drafts
with weights that are not the ones last pushed, acceptance sits at ~1.0 and nothing errors.

`DraftWatchdog` wraps an `EngineSwapper` and is the adapter's sink (a `DraftSink`), so it sees
every push. It runs two checks:

1. weights (`check_engines`, after every push, refit, restart and wake): each engine's served
   draft version equals the latest pushed version, and the digest of the draft read back through
   the engine equals the digest of the pushed state;
2. acceptance (`check_step`, once per step, on that step's counter delta): the acceptance length
   collapsed toward 1.0, or a draft position's acceptance is ~0, while the draft's training
   accuracy (per TTT step, a proxy for per-position acceptance) says the draft should do well.

An alarm is repaired (the latest version is pushed again to the engines that lost it: the
worker forgets its version, then a full, verified push) or raised, per `WatchdogConfig.on_alarm`.
An acceptance alarm on an engine whose weights check out cannot be repaired by a re-push (the
served policy moved away from the draft: push a draft trained on it) and is raised or warned,
per `WatchdogConfig.on_unrepairable`. An acceptance alarm always reads the served draft back
(digest), whatever `check_digest` says for the routine checks.

`DraftAdapter` puts one around its sink by default (`AdapterConfig.watchdog`, with `ADAPTER`:
repair, version-only routine checks, warn when a re-push cannot help - the adapter's own training
and push are then the remedy) and reports each step's alarms and repairs as `draft/watchdog_*`
metrics (`WatchdogStep`). Costs: one `draftadapt_info` RPC per engine after each push; one copy of
the pushed tensors in host memory (what a repair re-pushes); a read-back only on an alarm.
It knows nothing of training; the engine side goes through the swapper's engines' RPCs.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple, Sequence

import torch

from .metrics import SpecCounters

log = logging.getLogger("draftadapt.watchdog")
ACTIONS = ("repair", "raise", "warn")
UNREPAIRABLE = ("raise", "warn")


class DraftHealthError(RuntimeError):
    """The engines' draft is not healthy and the watchdog was told not to (or could not) repair it."""


@dataclass(frozen=True)
class WatchdogConfig:
    on_alarm: str = "repair"  # "repair" (re-push the latest version, then raise if still bad) | "raise" | "warn"
    check_digest: bool = True  # read the served draft back after every push/refit/restart/wake (one RPC + a digest)
    min_drafts: int = 20  # acceptance checks skip steps with fewer verification rounds (too noisy)
    collapse_fraction: float = 0.3  # alarm when AL - 1 < this x (AL expected from training accuracy - 1)
    min_expected_gain: float = 0.3  # ... only when the expected AL - 1 is at least this (the draft should draft)
    position_floor: float = 0.02  # alarm when a position's acceptance rate is below this ...
    position_expected: float = 0.3  # ... while training accuracy at that draft step is at least this
    on_unrepairable: str = "raise"  # an acceptance alarm with the right weights served (a re-push cannot help):
    #   "raise" | "warn" (log it and report it; the adapter's next training and push are the remedy)
    history: int = 1000  # checks kept in DraftWatchdog.history (the newest; `checks` counts them all)

    def __post_init__(self) -> None:
        if self.on_alarm not in ACTIONS:
            raise ValueError(f"WatchdogConfig.on_alarm={self.on_alarm!r}; choose one of {ACTIONS}")
        if self.on_unrepairable not in UNREPAIRABLE:
            raise ValueError(f"WatchdogConfig.on_unrepairable={self.on_unrepairable!r}; choose one of {UNREPAIRABLE}")
        if self.history < 1:
            raise ValueError(f"WatchdogConfig.history={self.history}; keep at least 1 check")


# What DraftAdapter uses by default: repair a lost draft, check versions after every push (the push itself verified
# the digest), read the draft back only on an acceptance alarm, and never stop a run for an alarm a re-push cannot fix.
ADAPTER = WatchdogConfig(on_alarm="repair", check_digest=False, on_unrepairable="warn")


@dataclass
class Alarm:
    kind: str  # "stale_version" | "digest" | "acceptance_collapse" | "dead_position"
    engine: int | None  # engine index (None: the summed counters)
    detail: str
    repaired: bool = False


@dataclass
class Health:
    ok: bool
    alarms: list[Alarm] = field(default_factory=list)
    acceptance_length: float | None = None
    expected_acceptance_length: float | None = None


class WatchdogStep(NamedTuple):
    """What the watchdog saw over one adapter step (pushes and the step's counter check)."""

    alarms: list[Alarm]  # every alarm raised since the previous step, repaired or not
    repairs: int  # re-pushes made to repair them
    expected_acceptance_length: float | None  # AL the served draft's training accuracy implies (None: unknown)

    def as_dict(self) -> dict[str, float]:
        """`draft/watchdog_alarms` and `draft/watchdog_repairs` every step (0.0 when healthy: a chart needs the
        zeros), `draft/watchdog_alarm-{kind}` per kind seen, `draft/watchdog_expected_acceptance_length` when known."""
        out = {"draft/watchdog_alarms": float(len(self.alarms)), "draft/watchdog_repairs": float(self.repairs)}
        for a in self.alarms:
            key = f"draft/watchdog_alarm-{a.kind}"
            out[key] = out.get(key, 0.0) + 1.0
        if self.expected_acceptance_length is not None:
            out["draft/watchdog_expected_acceptance_length"] = self.expected_acceptance_length
        return out


def watchdog_for(sink, config: WatchdogConfig = ADAPTER) -> "DraftWatchdog | None":
    """The watchdog for an adapter's sink: the sink itself when it is one, a new one around an engine swapper
    (anything with `engines` and `expected`), None for any other sink (nothing to read back)."""
    if isinstance(sink, DraftWatchdog):
        return sink
    if hasattr(sink, "engines") and hasattr(sink, "expected"):
        return DraftWatchdog(sink, config)
    return None


def expected_acceptance_length(step_acc: Sequence[float]) -> float:
    """AL implied by per-step draft accuracy a_i (position i accepted only if all before were):
    1 + sum_i prod_{j<=i} a_j. Top-1 agreement approximates acceptance at temperature 0."""
    al, run = 1.0, 1.0
    for a in step_acc:
        run *= float(a)
        al += run
    return al


class DraftWatchdog:
    """A DraftSink around an EngineSwapper that checks the draft after every push and every step.

    >>> wd = DraftWatchdog(EngineSwapper(engines), WatchdogConfig(on_alarm="repair"))
    >>> adapter = DraftAdapter(draft, embed, cfg, sink=wd)        # pushes go through the watchdog
    >>> wd.check_step(counters_delta, train_step_acc=stats.train.step_acc)
    >>> wd.after_restart()   # or after_wake(): engines came back with their start-up drafts
    """

    def __init__(self, swapper, config: WatchdogConfig = WatchdogConfig()):
        self.swapper, self.config = swapper, config
        self.latest: tuple[int, dict[str, torch.Tensor]] | None = None  # (version, state as the engines hold it)
        self._digest: str | None = None  # of latest's state, computed when first needed
        self.history: deque[Health] = deque(maxlen=config.history)  # the newest checks, bounded for long runs
        self.checks = 0  # checks made, all of them
        self.repairs = 0

    # ---- the DraftSink protocol (what the adapter calls)
    def push_draft(self, state: Mapping[str, torch.Tensor], version: int, **kw) -> Any:
        result = self.swapper.push_draft(state, version, **kw)
        if result.pushed or self.latest is None or version >= self.latest[0]:
            from .engine.payload import check_push

            cast = check_push(state, self.swapper.expected("draft"), "draft")
            self.latest, self._digest = (version, {k: v.detach().clone() for k, v in cast.items()}), None
        self._after("push")
        return result

    def spec_counters(self) -> SpecCounters:
        return self.swapper.spec_counters()

    def refit_policy(self, state_or_dir, version: int, **kw) -> Any:
        result = self.swapper.refit_policy(state_or_dir, version, **kw)
        self._after("refit")
        return result

    # ---- lifecycle events
    def after_restart(self) -> Health:
        """Engines were restarted (same objects, or re-created behind the same handles)."""
        return self._after("restart")

    def after_wake(self) -> Health:
        """Engines woke from sleep (level 2 drops weights; vLLM may reload the drafter from disk)."""
        return self._after("wake")

    # ---- checks
    def check_engines(self, digest: bool | None = None) -> Health:
        """Served version and (digest: default `config.check_digest`) read-back digest of every engine
        against the latest push. An engine of several workers (tensor parallel) is checked for its
        versions only: each worker reads back its own shard."""
        if self.latest is None:
            return Health(True)
        from .engine.payload import checksum, tensors_from_bytes

        version = self.latest[0]
        digest = self.config.check_digest if digest is None else digest
        alarms = []
        for i, eng in enumerate(self.swapper.engines):
            infos = eng.collective_rpc("draftadapt_info")
            served = sorted({info["versions"]["draft"] for info in infos}, key=str)
            if served != [version]:
                served = served[0] if len(served) == 1 else served
                alarms.append(Alarm("stale_version", i, f"engine {i} serves draft version {served}, the latest "
                                                        f"push was {version}"))
                continue
            if digest and len(infos) == 1:
                got = checksum(tensors_from_bytes(_one(eng.collective_rpc("draftadapt_state", kwargs={"kind": "draft"}))))
                if got != self._latest_digest():
                    alarms.append(Alarm("digest", i, f"engine {i} computes with draft weights of digest {got}, "
                                                     f"version {version} pushed {self._latest_digest()}"))
        return Health(not alarms, alarms)

    def check_step(self, counters: SpecCounters, train_step_acc: Sequence[float] | None = None) -> Health:
        """This step's counter delta against what the draft's training accuracy promises."""
        cfg = self.config
        if counters.drafts < cfg.min_drafts:
            return self._record(Health(True, acceptance_length=counters.acceptance_length))
        al = counters.acceptance_length
        expected = expected_acceptance_length(train_step_acc) if train_step_acc else None
        alarms = []
        if expected is not None and expected - 1 >= cfg.min_expected_gain and al - 1 < cfg.collapse_fraction * (expected - 1):
            alarms.append(Alarm("acceptance_collapse", None, f"acceptance length {al:.2f} while the draft's training "
                                                             f"accuracy {list(train_step_acc)} implies ~{expected:.2f}"))
        rates = counters.acceptance_rate_per_pos()
        for i, (rate, acc) in enumerate(zip(rates, train_step_acc or ())):
            if rate < cfg.position_floor and acc >= cfg.position_expected:
                alarms.append(Alarm("dead_position", None, f"draft position {i} accepts {rate:.3f} of its tokens, "
                                                           f"training accuracy at that step is {acc:.2f}"))
        health = Health(not alarms, alarms, al, expected)
        if alarms:
            health = self._handle(health, "step")
        return self._record(health)

    # ---- internals
    def _latest_digest(self) -> str:
        if self._digest is None:
            from .engine.payload import checksum

            self._digest = checksum(self.latest[1])
        return self._digest

    def _after(self, event: str) -> Health:
        if getattr(self.swapper, "_sleeping", lambda: False)():  # a push into sleeping engines is deferred to the
            return self._record(Health(True))  # wake-up: check then (after_wake)
        health = self.check_engines()
        if not health.ok:
            health = self._handle(health, event)
        return self._record(health)

    def _handle(self, health: Health, event: str) -> Health:
        msg = f"draft health alarm after {event}: " + "; ".join(a.detail for a in health.alarms)
        if self.config.on_alarm == "warn":
            log.warning("draftadapt watchdog: %s", msg)
            return health
        if self.config.on_alarm == "raise":
            raise DraftHealthError(msg + ". Fix: push the latest draft again (WatchdogConfig(on_alarm='repair') does "
                                         "it), or after a refit push a draft trained on the new policy")
        weights = health if any(a.engine is not None for a in health.alarms) else self.check_engines(digest=True)
        if weights.ok:  # acceptance alarm, served weights are right: a re-push cannot help
            why = (". The engines serve the latest pushed draft (digest checked), so its acceptance collapsed because "
                   "the served policy moved: push a draft trained on the current policy")
            if self.config.on_unrepairable == "warn":
                log.warning("draftadapt watchdog: %s%s", msg, why)
                return health
            raise DraftHealthError(msg + why)
        self._repair(sorted({a.engine for a in weights.alarms}))
        after = self.check_engines(digest=True)
        if not after.ok:
            raise DraftHealthError(msg + "; the repair (re-push of the latest version) did not help: "
                                   + "; ".join(a.detail for a in after.alarms) + ". Restart the engine")
        for a in health.alarms + weights.alarms:
            a.repaired = True
        log.warning("draftadapt watchdog: %s -> repaired by re-pushing draft version %s", msg, self.latest[0])
        return Health(True, health.alarms + [a for a in weights.alarms if a not in health.alarms],
                      health.acceptance_length, health.expected_acceptance_length)

    def _repair(self, engines: Sequence[int]) -> None:
        version, state = self.latest
        for i in engines:
            self.swapper.engines[i].collective_rpc("draftadapt_forget_version", kwargs={"kind": "draft"})
            # the swapper's own record of engine i must forget it too, or it skips the push
            self.swapper._versions["draft"][i] = None
        self.swapper.push_draft(state, version)
        self.repairs += 1

    def _record(self, health: Health) -> Health:
        self.history.append(health)
        self.checks += 1
        return health


def _one(results: list) -> Any:
    if len(results) != 1:
        raise RuntimeError(f"{len(results)} workers answered: the watchdog supports one worker per engine")
    return results[0]
