"""Figures show every run: each series' colour is in the saved PNG's plot area (a one-point series included), train
curves come per logging interval from steps.jsonl (per epoch without it), short series say how many points they have."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from PIL import Image

from ddp_resnet import experiments, plots, report

STEPS_PER_EPOCH, LOG_EVERY = 40, 2  # 20 steps.jsonl records per epoch
COLOUR_TOLERANCE = 30  # per channel, 0..255: a series' pixels, anti-aliased edges aside
MIN_PIXELS = 20  # a series counts as drawn with at least this many pixels of its colour in the plot area
MIN_NEAR_POINT = 8  # ... and a short series with at least this many within NEAR px of each of its points
NEAR = 5


# ----------------------------------------------------------------------------------------------- synthetic runs
def write_run(path, epochs: int, eval_every: int = 1, steps: bool = True, level: float = 0.0, trend: float = 5.0,
              model: str = "resnet20"):
    """A run directory as the trainer writes it: config.yaml, metrics.jsonl and (with ``steps``) steps.jsonl.

    Train accuracy rises 20 -> 60 % and test accuracy by ``trend`` from 75 % (both shifted by ``level``), so train
    and test points lie far apart; epochs are evaluated every ``eval_every`` and at the end.
    """
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"model": {"name": model}, "data": {"dataset": "synthetic"}}))
    total = epochs * STEPS_PER_EPOCH
    intervals = [{"step": s, "epoch": (s - 1) // STEPS_PER_EPOCH, "images": 128 * s,
                  "loss": 2.3 - 1.2 * s / total - level / 20, "acc": 20 + 40 * s / total + level,
                  "lr": 0.1 * (1 - s / total) + 0.01, "img_per_s": 900.0, "data_wait": 0.1, "grad_norm": 1.5,
                  "time": 1.7e9 + s, "mem_gib": 1.0}
                 for s in range(LOG_EVERY, total + 1, LOG_EVERY)]
    records = []
    for epoch in range(epochs):
        done = (epoch + 1) / epochs
        record = {"epoch": epoch, "step": (epoch + 1) * STEPS_PER_EPOCH, "train_loss": 2.3 - 1.2 * done - level / 20,
                  "train_acc": 20 + 40 * done + level, "lr": 0.1 * (1 - done) + 0.01, "epoch_time_s": 10.0,
                  "img_per_s": 900.0}
        if (epoch + 1) % eval_every == 0 or epoch == epochs - 1:
            record.update(test_loss=3.2 - 0.3 * done - level / 20, test_acc=75 + trend * done + level, test_top5=95.0)
        records.append(record)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if steps:
        (path / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in intervals))
    return path


@pytest.fixture
def drawn(monkeypatch):
    """{file name: (figure, path)} of every figure saved while the test runs."""
    figures = {}
    real = plots.save

    def save(fig, path):
        path = real(fig, path)
        figures[path.name] = (fig, path)
        return path

    monkeypatch.setattr(plots, "save", save)
    return figures


# ----------------------------------------------------------------------------------------------- pixels
def _png(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def _colour_mask(png: np.ndarray, color) -> np.ndarray:
    from matplotlib.colors import to_rgb

    target = np.array(to_rgb(color)) * 255
    return np.abs(png - target).max(axis=-1) <= COLOUR_TOLERANCE


def _rows_cols(bbox, height: int, inset: int = 0) -> tuple[slice, slice]:
    """A display bounding box (origin bottom left) as PNG row / column slices (origin top left)."""
    x0, y0, x1, y1 = bbox.extents
    return (slice(max(0, int(height - y1) + inset), int(height - y0) - inset),
            slice(max(0, int(x0) + inset), int(x1) - inset))


def data_lines(ax) -> list:
    """The axes' labelled data series (reference lines such as axvline / axhline are left out)."""
    return [line for line in ax.get_lines()
            if line.get_transform() is ax.transData and not line.get_label().startswith("_")]


def invisible_series(fig, path) -> list[str]:
    """Labels of the series whose colour is (nearly) absent from the saved PNG's plot area, legends masked out, or,
    for a series too short to be a curve, absent around one of its points."""
    png = _png(path)
    height = png.shape[0]
    missing = []
    for ax in fig.axes:
        legend = ax.get_legend()
        for line in data_lines(ax):
            mask = _colour_mask(png, line.get_color())
            area = np.zeros_like(mask)
            area[_rows_cols(ax.get_window_extent(), height, inset=3)] = True
            if legend is not None:
                area[_rows_cols(legend.get_window_extent(), height)] = False
            if (mask & area).sum() < MIN_PIXELS:
                missing.append(f"{line.get_label()}: {(mask & area).sum()} px")
                continue
            xy = np.column_stack([line.get_xdata(), line.get_ydata()]).astype(float)
            for x, y in line.get_transform().transform(xy) if len(xy) < plots.TOO_FEW else ():
                row, col = int(height - y), int(x)
                near = mask[max(0, row - NEAR):row + NEAR + 1, max(0, col - NEAR):col + NEAR + 1].sum()
                if near < MIN_NEAR_POINT:
                    missing.append(f"{line.get_label()}: {near} px around its point ({x:.0f}, {y:.0f})")
    return missing


def labels(fig) -> list[str]:
    """Every data series' legend label in the figure."""
    return [line.get_label() for ax in fig.axes for line in data_lines(ax)]


def assert_every_series_shows(figure) -> None:
    """Every series of the figure is drawn in its PNG, and the PNG's plot areas are not blank."""
    fig, path = figure
    assert fig.axes and all(data_lines(ax) for ax in fig.axes), f"{path.name}: an empty panel"
    missing = invisible_series(fig, path)
    assert not missing, f"{path.name}: series not drawn: {missing}"


# ----------------------------------------------------------------------------------------------- the checker itself
def test_the_pixel_check_catches_a_one_point_line_and_passes_the_shared_helper(tmp_path):
    for helper in (False, True):
        fig = plots.new_figure(6, 4.5)
        ax = fig.add_subplot(1, 1, 1)
        ax.plot(range(1, 41), [90 - x for x in range(1, 41)], "--", color="C0", label="train")  # same colour
        if helper:
            plots.draw_series(ax, [40], [20.0], "test", "C0")
        else:  # how the error curves used to draw a run's single evaluation: a line without markers
            ax.plot([40], [20.0], "-", color="C0", linewidth=1.8, label="test")
        ax.legend()
        path = plots.save(fig, tmp_path / f"helper{helper}.png")
        missing = invisible_series(fig, path)
        assert (missing == []) if helper else (len(missing) == 1 and missing[0].startswith("test: 0 px")), missing
        assert labels(fig) == ["train", "test (1 point)" if helper else "test"]


def test_series_label_says_how_many_points_and_sparse_series_get_markers():
    fig = plots.new_figure(6, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    one = plots.draw_series(ax, [1], [2.0], "a")
    two = plots.draw_series(ax, [1, 2, 3], [2.0, None, float("nan")], "b")
    some = plots.draw_series(ax, range(5), [1.0] * 5, "c")
    many = plots.draw_series(ax, range(plots.SPARSE), [1.0] * plots.SPARSE, "d")
    none = plots.draw_series(ax, [1], [None], "e")
    assert [line.get_label() for line in (one, two, some, many, none)] == [
        "a (1 point)", "b (1 point)", "c", "d", "e (no points)"]
    assert [line.get_marker() for line in (one, some, many)] == ["o", "o", "None"]
    assert one.get_markersize() > some.get_markersize()


def test_steps_map_onto_fractional_epochs():
    records = [{"epoch": 0, "step": 10}, {"epoch": 1, "step": 20}]
    steps = [{"step": s, "epoch": e} for s, e in ((5, 0), (10, 0), (15, 1), (20, 1), (25, 2))]
    assert plots.fractional_epochs(steps, records) == [0.5, 1.0, 1.5, 2.0, 2.5]  # epoch 2 not finished: 10 steps


# ----------------------------------------------------------------------------------------------- the figures
RUNS = {"one epoch": {"epochs": 1}, "four epochs, evaluated every second": {"epochs": 4, "eval_every": 2}}


@pytest.mark.parametrize("shape", RUNS)
def test_report_training_figure_shows_interval_train_curves_and_every_evaluation(tmp_path, drawn, shape):
    run = write_run(tmp_path / "run", **RUNS[shape])
    report.make_report(run, tmp_path / "report", warn=lambda _: None)
    fig, _ = drawn["training.png"]
    assert_every_series_shows(drawn["training.png"])
    epochs = RUNS[shape]["epochs"]
    loss = {line.get_label(): line for line in data_lines(fig.axes[0])}
    assert len(loss["train"].get_xdata()) == epochs * STEPS_PER_EPOCH // LOG_EVERY  # per interval, not per epoch
    assert loss["train"].get_xdata()[0] == pytest.approx(LOG_EVERY / STEPS_PER_EPOCH)
    evaluated = [1] if epochs == 1 else [2, 4]  # 1-based epochs
    test = "test (1 point)" if epochs == 1 else "test (2 points)"
    assert list(loss[test].get_xdata()) == evaluated
    assert "intervals of steps.jsonl" in fig.get_suptitle()


def test_report_without_steps_jsonl_falls_back_to_the_epochs(tmp_path, drawn):
    run = write_run(tmp_path / "run", epochs=1, steps=False)
    report.make_report(run, tmp_path / "report", warn=lambda _: None)
    fig, _ = drawn["training.png"]
    assert_every_series_shows(drawn["training.png"])
    assert {"train (1 point)", "test (1 point)", "test top-1 (1 point)"} <= set(labels(fig))
    assert "train: per epoch" in fig.get_suptitle()


@pytest.mark.parametrize("shape", RUNS)
def test_degradation_figure_shows_every_run_against_iterations(tmp_path, drawn, shape):
    out = tmp_path / "deg"
    for i, name in enumerate(("plain20", "resnet20")):
        write_run(out / f"name{name}", **RUNS[shape], level=-12.0 * i, model=name)
    assert experiments.main(["degradation", "--analyze-only", "--out", str(out),
                             "--sweep", "model.name=plain20,resnet20"]) == 0
    fig, _ = drawn["degradation.png"]
    assert_every_series_shows(drawn["degradation.png"])
    epochs = RUNS[shape]["epochs"]
    for ax, name in zip(fig.axes, ("plain20", "resnet20")):
        lines = {line.get_label().split(" (")[0]: line for line in data_lines(ax)}
        assert max(lines[f"{name} train"].get_xdata()) == epochs * STEPS_PER_EPOCH  # iterations
        assert len(lines[f"{name} train"].get_xdata()) == epochs * STEPS_PER_EPOCH // LOG_EVERY
        assert ax.get_xlabel() == "iterations"
    if epochs == 1:
        assert "resnet20 test (1 point)" in labels(fig)


def test_wd_ablation_figure_draws_interval_curves_at_fractional_epochs(tmp_path, drawn):
    out = tmp_path / "wd"
    write_run(out / "weight_decay5e-4", epochs=1)
    write_run(out / "weight_decay1e-4", epochs=1, level=-12.0, steps=False)  # an older run: per epoch
    assert experiments.main(["wd_ablation", "--analyze-only", "--out", str(out)]) == 0
    fig, _ = drawn["wd_ablation.png"]
    assert_every_series_shows(drawn["wd_ablation.png"])
    assert {"weight_decay=5e-4 test (1 point)", "weight_decay=1e-4 train (1 point)"} <= set(labels(fig))
    for ax in fig.axes:
        train = next(line for line in data_lines(ax) if line.get_label() == "weight_decay=5e-4 train")
        assert len(train.get_xdata()) == STEPS_PER_EPOCH // LOG_EVERY and max(train.get_xdata()) == 1.0


def test_depth_sweep_figure_shows_short_sweeps(tmp_path, drawn):
    out = tmp_path / "depth"
    for i, name in enumerate(("resnet20", "resnet32")):
        write_run(out / f"name{name}", epochs=4, eval_every=2, level=-12.0 * i, trend=-5.0, model=name)
    assert experiments.main(["depth_sweep", "--analyze-only", "--out", str(out),
                             "--sweep", "model.name=resnet20,resnet32"]) == 0
    assert_every_series_shows(drawn["depth_sweep.png"])
    assert labels(drawn["depth_sweep.png"][0]) == ["final test error (2 points)", "best test error (2 points)"]


def test_gradient_flow_figure_shows_every_network(tmp_path, drawn):
    assert experiments.main(["gradient_flow", "--smoke", "--out", str(tmp_path / "grad"), "--sweep",
                             "model.name=plain20,resnet20", "data.synthetic_image_size=8",
                             "data.synthetic_test_size=16", "data.eval_batch_size=16"]) == 0
    assert_every_series_shows(drawn["gradient_flow.png"])
    assert labels(drawn["gradient_flow.png"][0]) == ["plain20", "resnet20"]
