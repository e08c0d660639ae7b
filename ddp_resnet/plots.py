"""Shared plotting helpers for reports and experiments (matplotlib is optional: the ``[plots]`` extra).

matplotlib is imported only inside :func:`new_figure`, and figures are drawn on the Agg canvas directly (no
pyplot, no global backend switch), so importing this module never needs matplotlib or a display.
"""
from __future__ import annotations

from pathlib import Path

PLOTS_HINT = 'plotting needs matplotlib: pip install "ddp_resnet[plots]" (or pip install matplotlib)'
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


def error_curves(axes, runs: list[tuple[str, list[dict]]], x_key: str = "step", colors=None) -> None:
    """Training error (dashed) and test error (solid) in percent of several runs on one axes (He et al. Fig. 6).

    ``runs`` holds (label, metrics records); records without test numbers (epochs not evaluated) are skipped
    for the test curve only.
    """
    palette = colors or [f"C{i}" for i in range(10)]
    for i, (label, records) in enumerate(runs):
        color = palette[i % len(palette)]
        xs = [r[x_key] if x_key != "epoch" else r["epoch"] + 1 for r in records]
        axes.plot(xs, [100 - r["train_acc"] for r in records], linestyle="--", color=color, linewidth=1.2,
                  label=f"{label} train")
        tested = [(x, r) for x, r in zip(xs, records) if "test_acc" in r]
        axes.plot([x for x, _ in tested], [100 - r["test_acc"] for _, r in tested], linestyle="-", color=color,
                  linewidth=1.8, label=f"{label} test")
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("iterations" if x_key == "step" else x_key)
    axes.set_ylabel("error (%)")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8, ncol=2)
