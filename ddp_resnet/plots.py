"""Shared plotting helpers for reports and experiments (matplotlib is optional: the ``[plots]`` extra).

matplotlib is imported only inside :func:`new_figure`, and figures are drawn on the Agg canvas directly (no
pyplot, no global backend switch), so importing this module never needs matplotlib or a display.
Every series is drawn by :func:`draw_series`; a run's curves come from :func:`train_points` (steps.jsonl, else
metrics.jsonl) and :func:`eval_points` (one per evaluation).
"""
from __future__ import annotations

import math
from pathlib import Path

from ddp_resnet import rundir

PLOTS_HINT = 'plotting needs matplotlib: pip install "ddp_resnet[plots]" (or pip install matplotlib)'
SPARSE = 30  # a series with fewer points gets a marker on each point (a single point shows)
TOO_FEW = 3  # ... and with fewer than this, its legend label says how many points it has
DPI = 100  # every figure is written at this resolution: a W x H inch figure is a (W*DPI) x (H*DPI) pixel PNG


class MissingMatplotlib(ImportError):
    """matplotlib is not installed; the message says how to install it."""


def require_matplotlib() -> None:
    """Raise MissingMatplotlib (one line, with the install command) when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except ImportError:
        raise MissingMatplotlib(PLOTS_HINT) from None


def new_figure(width_in: float, height_in: float):
    """A matplotlib Figure of the given size (inches at DPI) bound to an Agg canvas."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save(fig, path: str | Path) -> Path:
    """Write the figure as a PNG of exactly its size (no tight bounding box) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def size_px(width_in: float, height_in: float) -> tuple[int, int]:
    """The pixel size of a PNG written by :func:`save` for a figure of this size."""
    return int(round(width_in * DPI)), int(round(height_in * DPI))


# ----------------------------------------------------------------------------------------------- series
def point_note(count: int) -> str:
    """A legend suffix for a series too short to be a curve (' (1 point)', ' (no points)'); '' otherwise."""
    if count >= TOO_FEW:
        return ""
    return " (no points)" if count == 0 else f" ({count} point{'s' if count > 1 else ''})"


def draw_series(axes, xs: list, ys: list, label: str | None = None, color=None, linestyle: str = "-",
                linewidth: float = 1.5, marker: str = "o"):
    """Plot one series (None / non-finite y left out) so that even one point shows; returns its Line2D.

    Every figure draws its series through here: markers when there are fewer than SPARSE points (larger below
    TOO_FEW), and the point count in the legend label when the series is too short to be a curve.
    """
    points = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
    count = len(points)
    (line,) = axes.plot([x for x, _ in points], [y for _, y in points], linestyle=linestyle, color=color,
                        linewidth=linewidth, marker=marker if count < SPARSE else None,
                        markersize=6 if count < TOO_FEW else 3,
                        label=None if label is None else label + point_note(count))
    return line


# ----------------------------------------------------------------------------------------------- run curves
def fractional_epochs(steps: list[dict], records: list[dict]) -> list[float]:
    """Where each steps.jsonl record lies on the 1-based epoch axis: epoch e's steps fall in (e, e + 1], its last
    step at e + 1 (where metrics.jsonl puts the epoch). Epochs without a metrics record take the last known length."""
    ends = {r["epoch"]: r["step"] for r in records}
    lengths = [ends[e] - ends.get(e - 1, 0) for e in sorted(ends) if ends[e] > ends.get(e - 1, 0)]
    per_epoch = lengths[-1] if lengths else max([s["step"] for s in steps] + [1])
    xs = []
    for s in steps:
        epoch = s["epoch"]
        start = 0 if epoch == 0 else ends.get(epoch - 1, ends.get(epoch, (epoch + 1) * per_epoch) - per_epoch)
        end = ends.get(epoch, start + per_epoch)
        xs.append(epoch + min(1.0, max(0.0, (s["step"] - start) / max(end - start, 1))))
    return xs


def _error(acc: float | None) -> float | None:
    """Top-1 error in percent from an accuracy in percent (None stays None)."""
    return None if acc is None else 100 - acc


def interval_points(run_dir: str | Path, records: list[dict]) -> list[dict]:
    """The training curve from steps.jsonl, one {step, epoch (1-based, fractional), loss, acc, error, lr, source} per
    logging interval; [] when the run has no steps.jsonl (written before it existed)."""
    steps = [s for s in rundir.read_jsonl(Path(run_dir) / rundir.STEPS, skip_bad=True) if "step" in s and "epoch" in s]
    return [{"step": s["step"], "epoch": x, "loss": s.get("loss"), "acc": s.get("acc"), "error": _error(s.get("acc")),
             "lr": s.get("lr"), "source": rundir.STEPS} for s, x in zip(steps, fractional_epochs(steps, records))]


def epoch_points(records: list[dict]) -> list[dict]:
    """The training curve from metrics.jsonl, one {step, epoch (1-based), loss, acc, error, lr, source} per epoch."""
    return [{"step": r.get("step", 0), "epoch": r["epoch"] + 1, "loss": r.get("train_loss"), "acc": r.get("train_acc"),
             "error": _error(r.get("train_acc")), "lr": r.get("lr"), "source": rundir.METRICS} for r in records]


def train_points(run_dir: str | Path, records: list[dict]) -> list[dict]:
    """A run's training curve: per logging interval (:func:`interval_points`), or per epoch (:func:`epoch_points`)
    when that has more points (no steps.jsonl, or train.log_every longer than an epoch)."""
    intervals = interval_points(run_dir, records)
    return intervals if len(intervals) >= len(records) else epoch_points(records)


def eval_points(records: list[dict]) -> list[dict]:
    """The evaluated epochs as {step, epoch (1-based), loss, acc, error, top5} (one per evaluation)."""
    return [{"step": r.get("step", 0), "epoch": r["epoch"] + 1, "loss": r.get("test_loss"), "acc": r["test_acc"],
             "error": _error(r["test_acc"]), "top5": r.get("test_top5")} for r in records if "test_acc" in r]


def error_curves(axes, runs: list[tuple[str, list[dict], list[dict]]], x_key: str = "step", colors=None) -> None:
    """Training error (dashed) and test error (solid) in percent of several runs on one axes (He et al. Fig. 6).

    ``runs`` holds (label, train points, test points) as :func:`train_points` / :func:`eval_points` give them;
    ``x_key`` is "step" (iterations, as in the paper) or "epoch" (1-based, fractional for the train points).
    """
    palette = colors or [f"C{i}" for i in range(10)]
    for i, (label, train, test) in enumerate(runs):
        color = palette[i % len(palette)]
        draw_series(axes, [p[x_key] for p in train], [p["error"] for p in train], f"{label} train", color, "--", 1.2)
        draw_series(axes, [p[x_key] for p in test], [p["error"] for p in test], f"{label} test", color, "-", 1.8)
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("iterations" if x_key == "step" else x_key)
    axes.set_ylabel("error (%)")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8, ncol=1 if len(runs) <= 3 else 2)  # one column leaves room for the points
