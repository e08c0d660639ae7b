"""What a search shows: one row per trial, ``search.csv`` and ``search.md``, ``best.yaml``, the plots, the
progress line. Rewritten after every finished trial, each file atomically."""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ddp_resnet import config as config_mod
from ddp_resnet import plots, rundir
from ddp_resnet.rundir import format_duration
from ddp_resnet.search.trial import trial_dir

PLOTS = "plots"


@dataclass
class Row:
    """One trial as the table shows it."""

    number: int
    state: str  # COMPLETE | PRUNED | FAIL | RUNNING | WAITING
    params: dict
    best: float | None  # the best value of the metric over the trial's epochs
    best_epoch: int | None  # 1-based
    epochs: int  # epochs with a metrics record
    wall_s: float
    history: list = field(default_factory=list)  # [(epoch, value)]
    note: str = ""


def read_history(out: Path, number: int, metric: str) -> tuple[list, int]:
    """Trial ``number``'s ``[(epoch, value)]`` of the metric (1-based epochs) and its number of epoch records."""
    records = [r for r in rundir.read_metrics(trial_dir(out, number), skip_bad=True) if "epoch" in r]
    return [(int(r["epoch"]) + 1, float(r[metric])) for r in records if r.get(metric) is not None], len(records)


def best_of(history: list, maximize: bool) -> tuple[int, float] | None:
    """The best ``(epoch, value)`` (the first of equal ones), or None."""
    return (max if maximize else min)(history, key=lambda h: h[1]) if history else None


def trial_rows(study, out: Path, metric: str, maximize: bool, now: float) -> list[Row]:
    """Every trial of the study with what its directory holds."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        history, epochs = read_history(out, t.number, metric)
        best = best_of(history, maximize)
        wall = float(t.user_attrs.get("wall_s", 0.0))
        if t.state.name == "RUNNING" and t.user_attrs.get("launched_at"):
            wall += max(0.0, now - float(t.user_attrs["launched_at"]))
        rows.append(Row(t.number, t.state.name, dict(t.params), best[1] if best else None, best[0] if best else None,
                        epochs, wall, history, str(t.user_attrs.get("note", ""))))
    return rows


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_params(params: dict) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in params.items())


def csv_text(rows: list[Row], keys: list[str], metric: str) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["trial", "state", *keys, metric, "best_epoch", "epochs", "wall_s", "note"])
    for r in rows:
        writer.writerow([r.number, r.state, *[r.params.get(k, "") for k in keys],
                         "" if r.best is None else r.best, r.best_epoch or "", r.epochs, round(r.wall_s, 1), r.note])
    return buf.getvalue()


def table(rows: list[Row], keys: list[str], metric: str, best: int | None) -> str:
    """The markdown table (the best trial in bold)."""
    head = ["trial", "state", *keys, f"best {metric}", "epochs", "wall"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [str(r.number), r.state, *[_fmt(r.params.get(k)) for k in keys],
                 _fmt(r.best) + (f" (epoch {r.best_epoch})" if r.best_epoch else ""), str(r.epochs),
                 format_duration(r.wall_s)]
        if r.number == best:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best_trial(study):
    """The best COMPLETE trial, or None."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE" and t.value is not None]
    if not complete:
        return None
    return study.best_trial


def best_config(out: Path, number: int) -> dict | None:
    """The resolved config of trial ``number``, made ready to train again: its own run directory
    (``runs/<search>-best``), ``ckpt.resume=auto``, no ``train.trial``; None when it has none."""
    tree = rundir.read_config(trial_dir(out, number))
    if not tree:
        return None
    tree["output_dir"] = f"runs/{out.name}-best"
    tree.setdefault("ckpt", {})["resume"] = "auto"
    tree.setdefault("train", {})["trial"] = ""
    return config_mod.to_dict(config_mod.from_dict(tree))


def write_best_yaml(out: Path, trial, metric: str) -> Path | None:
    tree = best_config(out, trial.number)
    if tree is None:
        return None
    path = out / "best.yaml"
    params = format_params(trial.params)
    header = (f"# The best trial of the search in {out}: trial {trial.number}, {metric} {trial.value:.4g} ({params}).\n"
              f"# Its resolved config, in a fresh run directory:  python -m ddp_resnet.train --config {path}\n")
    rundir.write_text_atomic(path, header + yaml.safe_dump(tree, sort_keys=False))
    return path


def progress_line(row: Row, done: int, total: int, best_row: Row | None, metric: str, elapsed: float,
                  finished_here: int) -> str:
    """``trial n/N: STATE, metric=..., best so far ... (trial k), elapsed, ETA``."""
    value = f"{metric}={_fmt(row.best)}" + (f" (epoch {row.best_epoch} of {row.epochs})" if row.best_epoch else "")
    best = f"best so far {_fmt(best_row.best)} (trial {best_row.number})" if best_row else "no trial complete yet"
    left = max(0, total - done)
    eta = format_duration(elapsed / finished_here * left) if finished_here and left else ("0 s" if not left else "?")
    note = f" ({row.note})" if row.note else ""
    return (f"trial {done}/{total}: {row.state}{note}, {value}, {best}, elapsed {format_duration(elapsed)}, "
            f"ETA {eta}")


def summary_md(spec, rows: list[Row], best, plots_written: list[str], plot_note: str) -> str:
    counts = {s: sum(r.state == s for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")}
    lines = [f"# Search: {spec.config or 'defaults'}", "",
             f"- command: `{spec.command}`",
             f"- space: {'; '.join(p.describe() for p in spec.params)}",
             f"- {spec.sampler} sampler (seed {spec.seed}), {spec.pruner} pruner; {spec.metric} ({spec.direction}); "
             f"a trial's value is its best epoch",
             f"- trials: {len(rows)}/{spec.trials} started: " + ", ".join(f"{v} {k.lower()}" for k, v in counts.items()
                                                                           if v)]
    if best is not None:
        lines.append(f"- best: trial {best.number}, {spec.metric} {best.value:.4g} "
                     f"({format_params(best.params)}); train it: "
                     f"`python -m ddp_resnet.train --config {spec.out / 'best.yaml'}`")
    lines += ["", table(rows, [p.key for p in spec.params], spec.metric, best.number if best else None), ""]
    if plots_written:
        lines += ["Plots: " + ", ".join(f"`{PLOTS}/{name}`" for name in plots_written), ""]
    elif plot_note:
        lines += [plot_note, ""]
    return "\n".join(lines)


def write_all(study, spec, now: float) -> tuple[list[Row], str]:
    """Rewrite search.csv, search.md, best.yaml and the plots; returns the rows and a note on the plots ('' when
    drawn)."""
    out, keys = spec.out, [p.key for p in spec.params]
    rows = trial_rows(study, out, spec.metric, spec.direction == "maximize", now)
    best = best_trial(study)
    rundir.write_text_atomic(out / "search.csv", csv_text(rows, keys, spec.metric))
    if best is not None:
        write_best_yaml(out, best, spec.metric)
    try:
        written, note = draw_plots(out / PLOTS, study, rows, spec), ""
    except plots.MissingMatplotlib as exc:
        written, note = [], f"plots skipped: {exc}"
    rundir.write_text_atomic(out / "search.md", summary_md(spec, rows, best, written, note))
    return rows, note


# ----------------------------------------------------------------------------------------------- plots
def draw_plots(folder: Path, study, rows: list[Row], spec) -> list[str]:
    """history.png, importances.png (2+ complete trials, 2+ parameters), slice_<key>.png; the names written."""
    plots.require_matplotlib()
    done = [r for r in rows if r.best is not None and r.state in ("COMPLETE", "PRUNED")]
    if not done:
        return []
    written = [_history(folder, done, spec)]
    complete = [r for r in rows if r.state == "COMPLETE"]
    if len(complete) >= 2 and len(spec.params) >= 2:
        name = _importances(folder, study, spec)
        written += [name] if name else []
    for param in spec.params:
        written.append(_slice(folder, done, param, spec))
    return written


def _history(folder: Path, done: list[Row], spec) -> str:
    fig = plots.new_figure(7, 4)
    ax = fig.add_subplot(1, 1, 1)
    for state, marker, color in (("COMPLETE", "o", "tab:blue"), ("PRUNED", "x", "tab:gray")):
        points = [(r.number, r.best) for r in done if r.state == state]
        if points:
            ax.scatter(*zip(*points), marker=marker, color=color, label=state.lower())
    better = max if spec.direction == "maximize" else min
    running, line = None, []
    for r in sorted((r for r in done if r.state == "COMPLETE"), key=lambda r: r.number):
        running = r.best if running is None else better(running, r.best)
        line.append((r.number, running))
    if line:
        ax.step(*zip(*line), where="post", color="tab:red", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"best {spec.metric} of the trial")
    ax.set_title("optimization history")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    plots.save(fig, folder / "history.png")
    return "history.png"


def _importances(folder: Path, study, spec) -> str | None:
    """PED-ANOVA importances (Optuna's, numpy only); None when the study cannot give them yet."""
    import warnings

    from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scores = get_param_importances(study, evaluator=PedAnovaImportanceEvaluator())
    except (ValueError, RuntimeError, ZeroDivisionError):
        return None
    if not scores or not all(math.isfinite(v) for v in scores.values()):
        return None
    fig = plots.new_figure(7, 1.2 + 0.5 * len(scores))
    ax = fig.add_subplot(1, 1, 1)
    names = list(scores)[::-1]
    ax.barh(names, [scores[n] for n in names], color="tab:blue")
    ax.set_xlabel("importance (PED-ANOVA)")
    ax.set_title(f"parameter importances for {spec.metric}")
    fig.tight_layout()
    plots.save(fig, folder / "importances.png")
    return "importances.png"


def _slice(folder: Path, done: list[Row], param, spec) -> str:
    fig = plots.new_figure(6, 4)
    ax = fig.add_subplot(1, 1, 1)
    for state, marker, color in (("COMPLETE", "o", "tab:blue"), ("PRUNED", "x", "tab:gray")):
        points = [(r.params[param.key], r.best) for r in done if r.state == state and param.key in r.params]
        if points:
            xs, ys = zip(*points)
            ax.scatter([str(x) for x in xs] if param.kind == "choice" else xs, ys, marker=marker, color=color,
                       label=state.lower())
    if param.kind == "log":
        ax.set_xscale("log")
    ax.set_xlabel(param.key)
    ax.set_ylabel(f"best {spec.metric}")
    ax.set_title(f"slice: {param.key}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    name = f"slice_{param.key.replace('.', '_')}.png"
    plots.save(fig, folder / name)
    return name
