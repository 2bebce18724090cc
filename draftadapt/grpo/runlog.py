"""Run logging a person can follow: JSONL (always), TensorBoard (when installed), a PNG plot."""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

log = logging.getLogger("draftadapt.grpo")


class RunLogger:
    """Appends one JSON object per step to `metrics.jsonl`; mirrors scalars to TensorBoard."""

    def __init__(self, out_dir: str | Path, tensorboard: bool = True):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = self.out / "metrics.jsonl"
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out / "tb"))
            except ImportError:
                log.warning("tensorboard is not installed (pip install tensorboard): logging to JSONL only")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def truncate_after(self, step: int) -> None:
        """Drop rows past `step` (a resumed run rewrites the steps it redoes). Atomic (temp file +
        rename): a run killed here keeps the old log whole rather than an emptied one."""
        if not self.path.exists():
            return
        rows = [r for r in self.rows() if r["step"] <= step]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with tmp.open("w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def rows(self) -> list[dict]:
        """The logged rows; a last line cut short by a crash mid-write is dropped with a warning
        (a resume redoes that step), a bad line anywhere else is an error."""
        if not self.path.exists():
            return []
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        rows = []
        for i, line in enumerate(lines):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                if i != len(lines) - 1:
                    raise ValueError(f"{self.path} line {i + 1} is not JSON ({exc}): the log is corrupt") from exc
                log.warning("%s: dropped a last line cut short by a crash (%d chars)", self.path, len(line))
        return rows

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


LABELS = {"spec_acceptance_length": "rollouts (served draft)", "probe/acceptance_length_adapted": "adapted (probe)",
          "probe/acceptance_length_frozen": "first draft kept frozen (probe)"}


def plot_run(rows: list[dict], png: str | Path,
             keys: tuple[str | tuple[str, ...], ...] = ("reward", "accuracy", "spec_acceptance_length"),
             title: str = "") -> Path | None:
    """One panel per key over steps (a tuple of keys: one panel, one labelled curve each, titled by
    the first); returns the PNG path (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install matplotlib): no plot")
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2))
    for ax, panel in zip(axes, keys):
        curves = (panel,) if isinstance(panel, str) else panel
        for key in curves:
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=LABELS.get(key, key))
        if len(curves) > 1 and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.set_title(curves[0])
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return Path(png)
