"""The per-step token budget: which windows of a step's rollouts the draft trains on, decided
before any feature leaves the device.

A real RL step holds 67M-268M tokens (512 prompts x 16 samples x 8k-32k); the draft trains on a
few hundred thousand. So capture cuts every sequence into windows of at most `window` positions
(true positions kept: a window starting at offset s carries positions s, s+1, ...), gives each
window with a training target a uniform random priority, and keeps per step (policy version) the
highest-priority windows that fit `tokens` positions: a reservoir over ALL micro-batches of the
step, without knowing the ones still to come. Every such window, hence every target token, has
the same chance to be kept (up to the window that ends the fill: a long one is a little more
often the one that does not fit; windows of one length, the long-rollout case, are exact). A later micro-batch may push
out an earlier pick; what is stored never exceeds the budget, and a window that cannot make it
into the reservoir as it stands is never copied. With `fraction` each window is first kept with
that probability (a Bernoulli thinning: every target token kept with probability `fraction`).
Priorities come from a generator seeded by (seed, policy version, call), so a rerun keeps the same
windows. Cost: O(W log W) per micro-batch for W windows; nothing here touches feature tensors.

The same keep rule (`reservoir_keep`) runs in `HiddenStateCache.add` over the stored windows of
a version, so the cache holds exactly what `StepSampler` admitted and did not push out since.
It knows nothing of models, engines or the trainer.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class Windows(NamedTuple):
    """W windows over N packed rows (sequences back to back, `cu_seqlens` [B+1])."""

    start: torch.Tensor  # [W] int64: first packed row of the window
    length: torch.Tensor  # [W] int64: positions in the window (<= max_len)
    offset: torch.Tensor  # [W] int64: position of its first row inside its sequence
    targets: torch.Tensor  # [W] int64: loss-mask positions in the window (0: nothing to train on)

    def rows(self, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows [M], positions [M], lengths [W']) of the kept windows (all when keep is None), in order."""
        start, length, offset = (self.start, self.length, self.offset) if keep is None else \
            (self.start[keep], self.length[keep], self.offset[keep])
        within = torch.arange(int(length.sum()), device=length.device) - torch.repeat_interleave(
            length.cumsum(0) - length, length)  # [M] index inside its window
        rows = torch.repeat_interleave(start, length) + within
        return rows, torch.repeat_interleave(offset, length) + within, length


def cut_windows(cu_seqlens: torch.Tensor, loss_mask: torch.Tensor, max_len: int) -> Windows:
    """Tile each sequence from its start into windows of at most `max_len` positions.

    cu_seqlens: [B+1] int64; loss_mask: [N] bool. A window keeps its sequence's true positions; its
    first positions lose the context before it (the price of windowing), one per boundary loses its
    last training target (the next token lies in the next window).
    """
    if max_len < 1:
        raise ValueError(f"window length {max_len}; use a positive number of positions")
    lens = cu_seqlens.diff()
    per_seq = (lens + max_len - 1) // max_len  # [B] windows per sequence
    seq = torch.repeat_interleave(torch.arange(lens.numel(), device=lens.device), per_seq)  # [W]
    first = torch.repeat_interleave(per_seq.cumsum(0) - per_seq, per_seq)
    offset = (torch.arange(seq.numel(), device=lens.device) - first) * max_len
    length = torch.minimum(lens[seq] - offset, torch.full_like(offset, max_len))
    start = cu_seqlens[:-1][seq] + offset
    csum = torch.cat([loss_mask.new_zeros(1, dtype=torch.long), loss_mask.long().cumsum(0)])
    return Windows(start, length, offset, csum[start + length] - csum[start])


def reservoir_keep(priority: torch.Tensor, sizes: torch.Tensor, budget: int,
                   floor: float = -float("inf")) -> tuple[torch.Tensor, float]:
    """(keep [W] bool, floor): the highest-priority windows above `floor` whose sizes, summed in
    priority order, stay within `budget` (the longest such prefix); the new floor is the priority of
    the first window that did not fit (it and everything below it can never be kept again). Applying
    it to A, then to (kept A) + B with A's floor keeps what one pass over A + B keeps, so a stream of
    micro-batches and one pass over the whole step agree."""
    order = priority.argsort(descending=True, stable=True)
    p = priority[order]
    over = (sizes[order].cumsum(0) > budget) & (p > floor)
    keep = torch.zeros_like(over)
    keep[order] = (p > floor) & ~over
    return keep, max(floor, float(p[over][0])) if bool(over.any()) else floor


class BudgetStats(NamedTuple):
    """One step's budget, in positions (tokens) unless named otherwise."""

    budget: int  # positions the step may keep at most
    rollout_tokens: int  # training targets (completion tokens) in the step's captured forwards
    rollout_positions: int  # all real positions of those forwards (prompt + completion)
    captured_tokens: int  # positions copied off the device (a later window may have pushed some out)
    kept_tokens: int  # positions of this step's windows kept at the end of the step (<= budget)
    kept_windows: int  # windows kept
    windowed_sequences: int  # sequences longer than the window, cut into several windows

    def as_dict(self) -> dict[str, float]:
        return {f"draft/{k}": float(v) for k, v in self._asdict().items()}


class StepSampler:
    """Draws window priorities and admits windows against the step's reservoir; see the module docstring.

    `select` is called by capture (before any copy), `record` by the adapter once a batch is stored,
    `end_step` at the step boundary. Holds only (priority, size) per kept window: O(budget / window).
    """

    def __init__(self, tokens: int, fraction: float | None = None, window: int = 2048, seed: int = 0):
        if not isinstance(tokens, int) or tokens < 1:
            raise ValueError(f"budget tokens={tokens!r}; use a positive number of positions per step")
        if fraction is not None and not 0 < fraction <= 1:
            raise ValueError(f"budget fraction={fraction!r}; use a value in (0, 1] or None")
        self.tokens, self.fraction, self.seed = tokens, fraction, seed
        self.window = min(window, tokens)  # a window longer than the budget could never be kept
        self._kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # version -> (priority [K], sizes [K])
        self._floor: dict[int, float] = {}  # version -> reservoir floor (budget.reservoir_keep)
        self._calls: dict[int, int] = {}  # version -> select calls so far (seeds the next draw)
        self._counts = dict.fromkeys(("rollout_tokens", "rollout_positions", "captured_tokens",
                                      "windowed_sequences"), 0)

    def priorities(self, version: int, targets: torch.Tensor) -> torch.Tensor:
        """[W] float64 priorities (uniform in [0, 1); -inf = not a candidate: no training target, or
        thinned out by `fraction`); reproducible from (seed, version, call number)."""
        call = self._calls.get(version, 0)
        self._calls[version] = call + 1
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + version) * 1_000_003 + call)
        u = torch.rand(targets.numel(), 2, generator=g, dtype=torch.float64)
        prio = torch.where(targets.cpu() > 0, u[:, 0], torch.full_like(u[:, 0], -torch.inf))
        if self.fraction is not None:
            prio = torch.where(u[:, 1] < self.fraction, prio, torch.full_like(prio, -torch.inf))
        return prio

    def select(self, version: int, windows: Windows) -> tuple[torch.Tensor, torch.Tensor]:
        """(keep [W] bool, priority [W] float64): the windows worth copying now, given what the
        step's reservoir holds. Counts the step's rollout tokens."""
        c = self._counts
        c["rollout_tokens"] += int(windows.targets.sum())
        c["rollout_positions"] += int(windows.length.sum())
        c["windowed_sequences"] += int((windows.offset == self.window).sum())  # one second window per cut sequence
        prio = self.priorities(version, windows.targets)
        sizes = windows.length.cpu()  # each <= self.window <= self.tokens
        cand = torch.isfinite(prio)
        old_p, old_s = self._kept.get(version, (prio[:0], sizes[:0]))
        keep, _ = reservoir_keep(torch.cat([old_p, prio[cand]]), torch.cat([old_s, sizes[cand]]), self.tokens,
                                 self._floor.get(version, -float("inf")))
        admit = torch.zeros_like(cand)
        admit[cand] = keep[old_p.numel():]
        c["captured_tokens"] += int(sizes[admit].sum())
        return admit, prio

    def record(self, version: int, priority: torch.Tensor, sizes: torch.Tensor) -> None:
        """Windows handed to the cache (those with a training target): the reservoir as the cache keeps it."""
        old_p, old_s = self._kept.get(version, (priority[:0].cpu(), sizes[:0].cpu()))
        p, s = torch.cat([old_p, priority.cpu()]), torch.cat([old_s, sizes.cpu()])
        keep, self._floor[version] = reservoir_keep(p, s, self.tokens, self._floor.get(version, -float("inf")))
        self._kept[version] = (p[keep], s[keep])

    def end_step(self, version: int, staleness_window: int) -> BudgetStats:
        """The step's counts; forgets versions older than the window and resets the counts."""
        p, s = self._kept.get(version, (torch.zeros(0), torch.zeros(0, dtype=torch.long)))
        stats = BudgetStats(budget=self.tokens, kept_tokens=int(s.sum()), kept_windows=int(p.numel()), **self._counts)
        for old in [v for v in self._kept if v < version - staleness_window]:
            self._kept.pop(old)
            self._calls.pop(old, None)
            self._floor.pop(old, None)
        self._counts = dict.fromkeys(self._counts, 0)
        return stats

    def state_dict(self) -> dict:
        return {"kept": {v: (p.clone(), s.clone()) for v, (p, s) in self._kept.items()}, "calls": dict(self._calls),
                "counts": dict(self._counts), "floor": dict(self._floor)}

    def load_state_dict(self, state: dict) -> None:
        self._kept = {int(v): (p.clone(), s.clone()) for v, (p, s) in state["kept"].items()}
        self._calls, self._counts, self._floor = dict(state["calls"]), dict(state["counts"]), dict(state["floor"])
