"""`python -m ddp_resnet.report RUN_DIR [key=value ...] [--images N] [--out DIR]`: figures and a summary of a run.

Reads the run directory the trainer wrote (``metrics.jsonl``, ``steps.jsonl``, ``best_eval.json``, ``checkpoints/``)
and writes into ``RUN_DIR/report/`` (or ``--out``):

* ``training.png``: 2 x 2 panels (loss, accuracy, learning rate, train-test gap) against epochs, best epoch
  marked; train curves per logging interval (``steps.jsonl``; per epoch for runs without it), test per evaluation;
* ``confusion.png``: the best epoch's confusion matrix (rows: true class, normalised per row);
* ``per_class.txt``, ``per_class.csv``, ``per_class.png``: per-class precision / recall / F1 / support;
* ``predictions.png``: test images with their true and predicted labels, correct (green) and incorrect (red),
  predicted by ``checkpoints/best.pt`` (else ``last.pt``) rebuilt from the checkpoint's own config;
* ``summary.md``: best accuracy and epoch, final train-test gap, total training time.

``key=value`` overrides apply to the checkpoint's config before the test images are read (e.g.
``data.root=/elsewhere`` when the dataset moved); if the data cannot be read, the image grid is skipped with a
warning and everything else is still written.

Plotting needs matplotlib (``pip install "ddp_resnet[plots]"``); without it the command prints one line saying
so and exits with 2. Exit codes: 0 written, 2 unusable run directory or missing matplotlib.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

import torch

from ddp_resnet import plots, rundir
from ddp_resnet.exitcodes import OK as EXIT_OK
from ddp_resnet.exitcodes import USAGE as EXIT_USAGE
from ddp_resnet.rundir import format_duration

TRAINING_FIGSIZE = (12.0, 8.0)  # inches; PNG pixels = inches x plots.DPI (1200 x 800)
CONFUSION_FIGSIZE = (8.0, 7.0)  # 800 x 700
TABLE_WIDTH, TABLE_ROW_H, TABLE_MARGIN_H = 8.0, 0.25, 1.0  # per_class.png: 800 x (100 + 25 x (rows + 1))
TABLE_MAX_CLASSES = 40  # more classes: the PNG shows the lowest-F1 ones (the text file has all)
GRID_COLS, CELL_W, CELL_H = 8, 1.5, 1.75  # predictions.png: 1200 x 175 per row of 8 images
SCAN_LIMIT = 1024  # test images looked at (at most) to find correct and incorrect predictions


class ReportError(RuntimeError):
    """A run directory that cannot be reported on, described in one line."""


# ----------------------------------------------------------------------------------------------- numbers
def per_class_metrics(confusion: list[list[int]]) -> dict:
    """Precision, recall, F1 (percent) and support per class from a confusion matrix (rows true, cols predicted).

    Returns ``{"classes": [{precision, recall, f1, support}, ...], "accuracy", "macro": {...}, "weighted": {...}}``;
    a class never predicted has precision 0, a class without samples recall 0.
    """
    matrix = torch.tensor(confusion, dtype=torch.float64)
    tp = matrix.diag()
    support = matrix.sum(1)
    predicted = matrix.sum(0)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp)) * 100
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp)) * 100
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), torch.zeros_like(tp))
    classes = [{"precision": p, "recall": r, "f1": f, "support": int(s)}
               for p, r, f, s in zip(precision.tolist(), recall.tolist(), f1.tolist(), support.tolist())]
    total = float(support.sum())
    weights = support / max(total, 1.0)

    def average(w: torch.Tensor) -> dict:
        return {"precision": float((precision * w).sum()), "recall": float((recall * w).sum()),
                "f1": float((f1 * w).sum()), "support": int(total)}

    n = max(len(classes), 1)
    return {"classes": classes, "accuracy": float(tp.sum() / max(total, 1.0) * 100),
            "macro": average(torch.full_like(tp, 1.0 / n)), "weighted": average(weights)}


def table_rows(metrics: dict, class_names: list[str]) -> list[tuple[str, dict]]:
    """(label, numbers) rows: one per class, then macro and weighted averages."""
    rows = [(name, m) for name, m in zip(class_names, metrics["classes"])]
    return rows + [("macro avg", metrics["macro"]), ("weighted avg", metrics["weighted"])]


def format_table(metrics: dict, class_names: list[str]) -> str:
    """A fixed-width text table of per-class precision / recall / F1 / support."""
    rows = table_rows(metrics, class_names)
    width = max([len("class")] + [len(label) for label, _ in rows])
    lines = [f"{'class':<{width}}  {'precision':>9}  {'recall':>7}  {'F1':>7}  {'support':>7}"]
    lines.append("-" * len(lines[0]))
    for i, (label, m) in enumerate(rows):
        if i == len(rows) - 2:
            lines.append("-" * len(lines[0]))
        lines.append(f"{label:<{width}}  {m['precision']:>8.2f}%  {m['recall']:>6.2f}%  {m['f1']:>6.2f}%  "
                     f"{m['support']:>7d}")
    lines.append(f"{'accuracy':<{width}}  {'':>9}  {'':>7}  {metrics['accuracy']:>6.2f}%  "
                 f"{rows[-1][1]['support']:>7d}")
    return "\n".join(lines) + "\n"


def summary_numbers(records: list[dict], best: dict) -> dict:
    """Best accuracy and its (1-based) epoch, the final train-test gap, total training time, throughput."""
    tested = [r for r in records if "test_acc" in r]
    last = tested[-1] if tested else None
    total_time = sum(float(r.get("epoch_time_s", 0.0)) for r in records)
    rates = [r["img_per_s"] for r in records if r.get("img_per_s")]
    return {
        "best_acc": float(best["test_acc"]), "best_epoch": int(best["epoch"]) + 1,
        "best_top5": best.get("test_top5"), "epochs": len(records), "steps": int(records[-1].get("step", 0)),
        "final_test_acc": float(last["test_acc"]) if last else None,
        "final_train_acc": float(last["train_acc"]) if last else None,
        "final_gap": float(last["train_acc"] - last["test_acc"]) if last else None,
        "final_epoch": int(last["epoch"]) + 1 if last else None,
        "total_time_s": total_time, "mean_img_per_s": sum(rates) / len(rates) if rates else None,
    }


def write_summary(path: Path, run_dir: Path, numbers: dict, config: dict, figures: list[str],
                  notes: list[str]) -> None:
    """summary.md: a short markdown table of the run's headline numbers, and links to the figures."""
    model = (config.get("model") or {}).get("name", "?")
    dataset = (config.get("data") or {}).get("dataset", "?")
    n = numbers
    lines = [f"# Run report: {run_dir.name}", "",
             f"{model} on {dataset}: {n['epochs']} epochs, {n['steps']} optimizer steps.", "",
             "| | |", "|---|---|",
             f"| best test accuracy | {n['best_acc']:.2f}% (epoch {n['best_epoch']} of {n['epochs']}) |"]
    if n["best_top5"] is not None:
        lines.append(f"| top-5 at the best epoch | {n['best_top5']:.2f}% |")
    if n["final_gap"] is not None:
        lines.append(f"| final train-test gap | {n['final_gap']:+.2f} points (epoch {n['final_epoch']}: train "
                     f"{n['final_train_acc']:.2f}%, test {n['final_test_acc']:.2f}%) |")
    exact = f"{n['total_time_s']:.1f} s; " if n["total_time_s"] >= 60 else ""
    lines.append(f"| total training time | {format_duration(n['total_time_s'])} "
                 f"({exact}sum of the epochs' training time, evaluation excluded) |")
    if n["mean_img_per_s"] is not None:
        lines.append(f"| mean throughput | {n['mean_img_per_s']:.0f} images/s |")
    lines.append("")
    lines.append("Train accuracy is the running accuracy over each epoch's augmented batches, so the gap is "
                 "indicative.")
    lines.append("")
    for name in figures:
        lines.append(f"![{Path(name).stem}]({name})")
    if notes:
        lines += [""] + [f"- note: {note}" for note in notes]
    path.write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------- figures
def plot_training(records: list[dict], best_epoch: int, path: Path, train: list[dict] | None = None) -> Path:
    """2 x 2: loss, accuracy, learning rate, train-test gap against (1-based) epochs; the best epoch is marked.

    Train curves are drawn from ``train`` (:func:`plots.train_points`: per logging interval from steps.jsonl), by
    default from metrics.jsonl's per-epoch train numbers; test curves and the gap have one point per evaluation.
    """
    fig = plots.new_figure(*TRAINING_FIGSIZE)
    axes = fig.subplots(2, 2)
    train = train or plots.epoch_points(records)
    per_interval = bool(train) and train[0]["source"] == rundir.STEPS
    tested = plots.eval_points(records)
    t_x, x = [p["epoch"] for p in tested], [p["epoch"] for p in train]

    ax = axes[0][0]
    plots.draw_series(ax, x, [p["loss"] for p in train], "train", "C0", "--")
    plots.draw_series(ax, t_x, [p["loss"] for p in tested], "test", "C1")
    ax.set_title("loss")
    ax = axes[0][1]
    plots.draw_series(ax, x, [p["acc"] for p in train], "train", "C0", "--")
    plots.draw_series(ax, t_x, [p["acc"] for p in tested], "test top-1", "C1")
    if any(p["top5"] is not None for p in tested):
        plots.draw_series(ax, t_x, [p["top5"] for p in tested], "test top-5", "C2", ":")
    best = next((p for p in tested if p["epoch"] == best_epoch), None)
    if best is not None:
        ax.plot([best_epoch], [best["acc"]], "*", color="red", markersize=12, zorder=1.5,  # under the test point
                label=f"best {best['acc']:.2f}% (epoch {best_epoch})")
    ax.set_title("accuracy (%)")
    ax = axes[1][0]
    lrs = [p["lr"] for p in train]
    plots.draw_series(ax, x, lrs, "lr (per logging interval)" if per_interval else "lr (end of epoch)", "C2")
    positive = [v for v in lrs if v is not None and v > 0]
    if positive and max(positive) / min(positive) > 50:
        ax.set_yscale("log")
    ax.set_title("learning rate")
    ax = axes[1][1]
    gaps = [r["train_acc"] - r["test_acc"] for r in records if "test_acc" in r]
    plots.draw_series(ax, t_x, gaps, "train - test accuracy", "C3")
    ax.axhline(0, color="gray", linewidth=0.8)
    ax.set_title("train-test gap (accuracy points)")
    from matplotlib.ticker import MaxNLocator

    for row in axes:
        for ax in row:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.axvline(best_epoch, color="red", linestyle=":", linewidth=1.0, label="best epoch")
            ax.set_xlabel("epoch")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    source = f"train: {len(train)} intervals of steps.jsonl" if per_interval else "train: per epoch"
    fig.suptitle(f"training: best test accuracy at epoch {best_epoch} ({source})")
    fig.tight_layout()
    return plots.save(fig, path)


def plot_confusion(confusion: list[list[int]], class_names: list[str], path: Path) -> Path:
    """The confusion matrix, each row normalised to the class's test images (counts written for <= 20 classes)."""
    matrix = torch.tensor(confusion, dtype=torch.float64)
    rows = matrix / matrix.sum(1, keepdim=True).clamp(min=1)
    n = matrix.shape[0]
    fig = plots.new_figure(*CONFUSION_FIGSIZE)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(rows.numpy(), cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if n <= 30:
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        ax.set_xticklabels(class_names, rotation=60, ha="right", fontsize=8)
        ax.set_yticklabels(class_names, fontsize=8)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                count = int(matrix[i, j])
                if count:
                    ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                            color="white" if rows[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"confusion matrix ({int(matrix.sum())} test images, accuracy "
                 f"{float(matrix.diag().sum() / matrix.sum().clamp(min=1) * 100):.2f}%)")
    fig.tight_layout()
    return plots.save(fig, path)


def table_figsize(num_rows: int) -> tuple[float, float]:
    """per_class.png's size in inches for a table of num_rows body rows (plus the header)."""
    return TABLE_WIDTH, TABLE_MARGIN_H + TABLE_ROW_H * (num_rows + 1)


def plot_table(metrics: dict, class_names: list[str], path: Path) -> Path:
    """The per-class table as an image (the lowest-F1 TABLE_MAX_CLASSES classes when there are more)."""
    rows = table_rows(metrics, class_names)
    body, averages = rows[:-2], rows[-2:]
    title = "per-class precision / recall / F1"
    if len(body) > TABLE_MAX_CLASSES:
        body = sorted(body, key=lambda row: row[1]["f1"])[:TABLE_MAX_CLASSES]
        title += f" ({TABLE_MAX_CLASSES} lowest-F1 of {len(rows) - 2} classes; all in per_class.txt)"
    shown = body + averages
    cells = [[label, f"{m['precision']:.2f}%", f"{m['recall']:.2f}%", f"{m['f1']:.2f}%", str(m["support"])]
             for label, m in shown]
    cells.append(["accuracy", "", "", f"{metrics['accuracy']:.2f}%", str(averages[-1][1]["support"])])
    fig = plots.new_figure(*table_figsize(len(cells)))
    ax = fig.add_axes([0.02, 0.02, 0.96, 1 - 0.02 - 0.5 / fig.get_figheight()])
    ax.axis("off")
    table = ax.table(cellText=cells, colLabels=["class", "precision", "recall", "F1", "support"],
                     loc="upper center", cellLoc="right", colLoc="right", bbox=[0, 0, 1, 1])
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    for (row, col), cell in table.get_celld().items():
        if row == 0:
            cell.set_text_props(weight="bold")
            cell.set_facecolor("#dde6f0")
        elif row > len(body):
            cell.set_facecolor("#f2f2f2")
        elif col == 3:  # shade F1 from red (0) to green (100)
            f1 = shown[row - 1][1]["f1"] / 100
            cell.set_facecolor((1 - 0.45 * f1, 0.55 + 0.45 * f1, 0.6))
    fig.suptitle(title, fontsize=11)
    return plots.save(fig, path)


def unnormalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """Normalized N x C x H x W float images -> N x H x W x C floats in [0, 1] for display."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (images.float().cpu() * std_t + mean_t).clamp(0, 1).permute(0, 2, 3, 1).contiguous()


def grid_figsize(num_images: int) -> tuple[float, float]:
    """predictions.png's size in inches for num_images images."""
    rows = max(1, math.ceil(num_images / GRID_COLS))
    return GRID_COLS * CELL_W, rows * CELL_H


def plot_predictions(samples: dict, path: Path) -> Path:
    """A grid of test images titled 'true / predicted', green when correct, red when wrong."""
    images, labels, preds, names = samples["images"], samples["labels"], samples["preds"], samples["class_names"]
    n = len(labels)
    fig = plots.new_figure(*grid_figsize(n))
    rows = max(1, math.ceil(n / GRID_COLS))
    axes = fig.subplots(rows, GRID_COLS, squeeze=False)
    for k, ax in enumerate(ax for row in axes for ax in row):
        ax.axis("off")
        if k >= n:
            continue
        ax.imshow(images[k].numpy(), interpolation="nearest")
        right = labels[k] == preds[k]
        ax.set_title(f"true: {names[labels[k]]}\npred: {names[preds[k]]}", fontsize=7,
                     color="green" if right else "red")
    height = fig.get_figheight()
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.55 / height, wspace=0.1, hspace=0.45)
    fig.text(0.5, 1 - 0.12 / height, "test images: true / predicted class (green correct, red wrong)",
             ha="center", va="top", fontsize=9)
    return plots.save(fig, path)


# ----------------------------------------------------------------------------------------------- predictions
def load_model(checkpoint: Path, overrides: list[str] | tuple = (), device: str = "cpu"):
    """(model in eval mode, config, data info) rebuilt from a training checkpoint's own config (fine-tuning
    settings aside: the checkpoint holds the trained weights). Raises ReportError / ConfigError in one line."""
    from ddp_resnet import build
    from ddp_resnet import checkpoint as ckpt
    from ddp_resnet import config as config_mod
    from ddp_resnet import data as data_mod

    try:
        saved = ckpt.Saved(checkpoint, ckpt.load(checkpoint, "cpu"))
        if saved.config is None:
            raise ReportError(f"checkpoint {checkpoint} holds no config to rebuild the model from")
        cfg = config_mod.resolve(None, overrides, base=saved.config_for_use())
        info = data_mod.describe(cfg.data)
        return build.network_from_weights(cfg, info, saved.weights(), checkpoint, torch.device(device)), cfg, info
    except ckpt.CheckpointError as exc:
        raise ReportError(str(exc)) from None


def _spread_over_classes(items: list, count: int) -> list:
    """Up to count items, taking the true classes in turn (test sets are often ordered by class)."""
    by_class: dict = {}
    for item in items:
        by_class.setdefault(item[1], []).append(item)
    chosen: list = []
    while len(chosen) < count and any(by_class.values()):
        for label in sorted(by_class):
            if by_class[label] and len(chosen) < count:
                chosen.append(by_class[label].pop(0))
    return chosen


@torch.no_grad()
def predict_samples(checkpoint: Path, overrides: list[str] | tuple = (), num_images: int = 16,
                    device: str = "cpu") -> dict:
    """Up to num_images test images, about half predicted correctly and half incorrectly, spread over classes.

    Returns images (N x H x W x C in [0, 1], un-normalized), labels, preds, class_names and the counts scanned.
    """
    from ddp_resnet import config as config_mod
    from ddp_resnet import data as data_mod

    model, cfg, info = load_model(checkpoint, overrides, device)
    data_cfg = config_mod.replace(cfg, data={"workers": 0, "loader": "dataloader",
                                             "eval_batch_size": max(num_images, 64)}).data
    loader = data_mod.build_eval_loader(data_cfg, info, 0, 1, device)
    want_wrong = num_images // 2
    want_classes = [min(info.num_classes, num_images - want_wrong), min(info.num_classes, want_wrong)]
    right, wrong, scanned = [], [], 0
    stride = max(1, len(loader) // 16)  # look at batches from the whole test set (often ordered by class)
    for index, (images, labels) in enumerate(loader):
        if index % stride:
            continue
        preds = model(images).argmax(1)
        for img, y, p in zip(images, labels.tolist(), preds.tolist()):
            (right if y == p else wrong).append((img, y, p))
        scanned += labels.shape[0]
        if (len({y for _, y, _ in right}) >= want_classes[0] and len({y for _, y, _ in wrong}) >= want_classes[1]
                and len(wrong) >= want_wrong) or scanned >= SCAN_LIMIT:
            break
    wrong = _spread_over_classes(wrong, want_wrong)
    chosen = _spread_over_classes(right, num_images - len(wrong)) + wrong
    chosen = chosen[:num_images]
    if not chosen:
        raise ReportError("the test set is empty")
    stacked = torch.stack([img for img, _, _ in chosen])
    return {"images": unnormalize(stacked, info.mean, info.std), "labels": [y for _, y, _ in chosen],
            "preds": [p for _, _, p in chosen], "class_names": list(info.class_names), "scanned": scanned}


# ----------------------------------------------------------------------------------------------- the report
def make_report(run_dir: str | Path, out: str | Path | None = None, overrides: list[str] | tuple = (),
                num_images: int = 16, device: str = "cpu", warn=print) -> dict:
    """Write every figure, table and summary.md; returns {name: path}. Raises ReportError / MissingMatplotlib."""
    plots.require_matplotlib()
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"run directory {run_dir} does not exist")
    try:
        records = rundir.read_metrics(run_dir, required=True)
        best = rundir.read_best(run_dir, records)
    except rundir.RunDirError as exc:
        raise ReportError(str(exc)) from None
    config = rundir.read_config(run_dir)
    out = Path(out) if out else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    notes: list[str] = []
    numbers = summary_numbers(records, best)
    written["training.png"] = plot_training(records, numbers["best_epoch"], out / "training.png",
                                            plots.train_points(run_dir, records))
    if best.get("confusion"):
        names = best.get("class_names") or [str(i) for i in range(len(best["confusion"]))]
        written["confusion.png"] = plot_confusion(best["confusion"], names, out / "confusion.png")
        metrics = per_class_metrics(best["confusion"])
        (out / "per_class.txt").write_text(format_table(metrics, names))
        written["per_class.txt"] = out / "per_class.txt"
        with open(out / "per_class.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["class", "precision", "recall", "f1", "support"])
            for label, m in table_rows(metrics, names):
                writer.writerow([label, f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}",
                                 m["support"]])
        written["per_class.csv"] = out / "per_class.csv"
        written["per_class.png"] = plot_table(metrics, names, out / "per_class.png")
    else:
        notes.append("no best_eval.json with a confusion matrix: confusion and per-class figures skipped")
    checkpoint = rundir.find_checkpoint(run_dir)
    if checkpoint is None:
        notes.append("no checkpoint found: the prediction grid is skipped")
    else:
        from ddp_resnet.config import ConfigError

        try:
            samples = predict_samples(checkpoint, overrides, num_images, device)
            written["predictions.png"] = plot_predictions(samples, out / "predictions.png")
        except (ConfigError, ReportError, ValueError) as exc:
            notes.append(f"prediction grid skipped: {str(exc).splitlines()[0]}")
    for note in notes:
        warn(f"warning: {note}")
    figures = [name for name in ("training.png", "confusion.png", "per_class.png", "predictions.png")
               if name in written]
    write_summary(out / "summary.md", run_dir, numbers, config, figures, notes)
    written["summary.md"] = out / "summary.md"
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ddp_resnet.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run's output_dir (holds metrics.jsonl, best_eval.json, checkpoints/)")
    parser.add_argument("overrides", nargs="*", help="config overrides for reading the test images, "
                                                     "e.g. data.root=/data/cifar")
    parser.add_argument("--out", help="write here instead of RUN_DIR/report")
    parser.add_argument("--images", type=int, default=16, help="test images in the prediction grid (default 16)")
    parser.add_argument("--device", default="cpu", help="device for the predictions (default cpu)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Write the report; returns the exit code."""
    args = build_parser().parse_args(argv)
    from ddp_resnet.config import ConfigError

    try:
        if args.images < 1:
            raise ReportError(f"--images: must be > 0, got {args.images}")
        written = make_report(args.run_dir, args.out, args.overrides, args.images, args.device)
    except (plots.MissingMatplotlib, ReportError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    out = Path(written["summary.md"]).parent
    print(f"report written to {out}: {', '.join(sorted(written))}")
    return EXIT_OK


def cli() -> None:
    """Console entry point."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
