"""What each experiment draws and tabulates from its runs (``degradation``, ``wd_ablation``, ``depth_table``,
``augment_ablation``), and the gradient-flow computation at initialisation."""
from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from ddp_resnet import config as config_mod
from ddp_resnet import plots, rundir
from ddp_resnet.experiments.registry import ENSEMBLE_OF, PAPER_CIFAR10_ERROR
from ddp_resnet.experiments.runner import ExperimentPlan, Run, collect

CURVES_FIGSIZE_PER_PANEL = (6.0, 4.5)  # degradation.png / wd_ablation.png: 600 x 450 px per panel
GRADIENT_FIGSIZE = (12.0, 5.0)  # gradient_flow.png: 1200 x 500
DEPTH_FIGSIZE = (6.0, 4.5)  # depth_sweep.png: 600 x 450
ABLATION_FIGSIZE = (14.0, 5.0)  # augment_ablation.png: 1400 x 500
ABLATION_KEYS = ["tip", "overrides", "final_test_error", "delta_vs_baseline", "best_test_error", "final_train_error",
                 "steps"]


def _tested(records: list[dict]) -> list[dict]:
    return [r for r in records if "test_acc" in r]


def run_summary(run: Run, path: Path, records: list[dict]) -> dict:
    """Best / final test error, final train error, steps, training time of one run."""
    tested = _tested(records)
    best = max(tested, key=lambda r: r["test_acc"]) if tested else None
    return {
        "run": run.label, "dir": str(path), "steps": records[-1].get("step", 0), "epochs": len(records),
        "best_test_error": 100 - best["test_acc"] if best else None,
        "best_epoch": best["epoch"] + 1 if best else None,
        "final_test_error": 100 - tested[-1]["test_acc"] if tested else None,
        "final_train_error": 100 - records[-1]["train_acc"],
        "train_time_s": sum(float(r.get("epoch_time_s", 0.0)) for r in records),
    }


def _write_csv(path: Path, keys: list[str], rows: list[dict]) -> None:
    """One row per dict, the given columns; floats with 4 decimals, missing values empty."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(keys)
        for r in rows:
            writer.writerow(["" if r[k] is None else (f"{r[k]:.4f}" if isinstance(r[k], float) else r[k])
                             for k in keys])


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def write_results(path: Path, title: str, summaries: list[dict]) -> Path:
    """results.md: one row per run."""
    lines = [f"# {title}", "",
             "| run | best test error (%) | at epoch | final test error (%) | final train error (%) | steps | "
             "training time (s) |", "|---|---|---|---|---|---|---|"]
    for s in summaries:
        lines.append(f"| {s['run']} | {_fmt(s['best_test_error'])} | {s['best_epoch'] or '-'} | "
                     f"{_fmt(s['final_test_error'])} | {_fmt(s['final_train_error'])} | {s['steps']} | "
                     f"{s['train_time_s']:.1f} |")
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------- analyses
def _family(label: str) -> str:
    return re.sub(r"\d.*$", "", label) or label


def _curves(members) -> list[tuple[str, list[dict], list[dict]]]:
    """(label, train points per logging interval (per epoch without steps.jsonl), test points) of each run."""
    return [(run.label, plots.train_points(path, records), plots.eval_points(records))
            for run, path, records in members]


def analyze_degradation(plan: ExperimentPlan, warn=print) -> list[Path]:
    """degradation.png: train (dashed, per logging interval) / test (solid, per evaluation) error vs iterations
    (optimizer steps, as in He et al. Fig. 6), one panel per family (plain, resnet); results.md."""
    found = collect(plan, warn)
    families = list(dict.fromkeys(_family(run.label) for run, _, _ in found))
    w, h = CURVES_FIGSIZE_PER_PANEL
    fig = plots.new_figure(w * len(families), h)
    axes = fig.subplots(1, len(families), squeeze=False, sharey=True)[0]
    depths = sorted({int(re.sub(r"\D", "", run.label) or 0) for run, _, _ in found})
    colors = {d: f"C{i}" for i, d in enumerate(depths)}
    for ax, family in zip(axes, families):
        members = [member for member in found if _family(member[0].label) == family]
        plots.error_curves(ax, _curves(members), x_key="step",
                           colors=[colors[int(re.sub(r"\D", "", run.label) or 0)] for run, _, _ in members])
        ax.set_title({"plain": "plain nets", "resnet": "ResNets"}.get(family, family or "runs"))
    fig.suptitle("CIFAR-10 degradation: training error (dashed) and test error (solid)"
                 if _dataset(found) == "cifar10" else "training error (dashed) and test error (solid)")
    fig.tight_layout()
    paths = [plots.save(fig, plan.out / "degradation.png")]
    paths.append(write_results(plan.out / "results.md", "Degradation: plain vs residual nets",
                               [run_summary(run, path, records) for run, path, records in found]))
    return paths


def analyze_wd_ablation(plan: ExperimentPlan, warn=print) -> list[Path]:
    """wd_ablation.png: error and loss curves of each weight decay against epochs; results.md.

    Train curves are per logging interval (steps.jsonl) at fractional epochs (:func:`plots.fractional_epochs`: an
    interval's step within its epoch's steps), per epoch for runs without steps.jsonl; test curves per evaluation.
    """
    found = collect(plan, warn)
    w, h = CURVES_FIGSIZE_PER_PANEL
    fig = plots.new_figure(2 * w, h)
    ax_err, ax_loss = fig.subplots(1, 2)
    curves = _curves(found)
    plots.error_curves(ax_err, curves, x_key="epoch")
    ax_err.set_title("error: train (dashed), test (solid)")
    for i, (label, train, test) in enumerate(curves):
        plots.draw_series(ax_loss, [p["epoch"] for p in train], [p["loss"] for p in train], f"{label} train", f"C{i}",
                          "--", 1.2)
        plots.draw_series(ax_loss, [p["epoch"] for p in test], [p["loss"] for p in test], f"{label} test", f"C{i}",
                          "-", 1.8)
    from matplotlib.ticker import MaxNLocator

    ax_loss.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy loss")
    ax_loss.set_title("loss")
    ax_loss.grid(True, alpha=0.3)
    ax_loss.legend(fontsize=8)
    fig.suptitle("weight decay ablation")
    fig.tight_layout()
    paths = [plots.save(fig, plan.out / "wd_ablation.png")]
    paths.append(write_results(plan.out / "results.md", "Weight decay ablation",
                               [run_summary(run, path, records) for run, path, records in found]))
    return paths


def _dataset(found) -> str:
    for _, path, _ in found:
        config = rundir.read_config(path)
        if config:
            return (config.get("data") or {}).get("dataset", "")
    return ""


def count_parameters(run_dir: Path) -> int | None:
    """Trainable-parameter count of a run's network, from its last checkpoint (None without one)."""
    from ddp_resnet import checkpoint as ckpt

    path = run_dir / "checkpoints" / "last.pt"
    if not path.is_file():
        return None
    try:
        state = ckpt.Saved(path, ckpt.load(path, "cpu")).weights()
    except ckpt.CheckpointError:
        return None
    return sum(v.numel() for k, v in state.items()
               if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))


def analyze_depth(plan: ExperimentPlan, warn=print) -> list[Path]:
    """depth_table.md / depth_table.csv (test error vs depth) and, with matplotlib, depth_sweep.png."""
    found = collect(plan, warn)
    paper = _dataset(found) == "cifar10"
    rows = []
    for run, path, records in found:
        s = run_summary(run, path, records)
        digits = re.sub(r"\D", "", run.label)
        params = count_parameters(path)
        rows.append({"model": run.label, "depth": int(digits) if digits else None,
                     "params_M": params / 1e6 if params is not None else None,
                     "best_test_error": s["best_test_error"], "final_test_error": s["final_test_error"],
                     "final_train_error": s["final_train_error"], "steps": s["steps"],
                     "paper_test_error": PAPER_CIFAR10_ERROR.get(run.label) if paper else None})
    rows.sort(key=lambda r: (r["depth"] is None, r["depth"] or 0))
    keys = ["model", "depth", "params_M", "best_test_error", "final_test_error", "final_train_error", "steps",
            "paper_test_error"]
    _write_csv(plan.out / "depth_table.csv", keys, rows)
    lines = ["# Test error vs depth", "",
             "| model | depth | params (M) | best test error (%) | final test error (%) | final train error (%) | "
             "steps | He et al. 2015 (%) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['depth'] or '-'} | {_fmt(r['params_M'], 3)} | "
                     f"{_fmt(r['best_test_error'])} | {_fmt(r['final_test_error'])} | "
                     f"{_fmt(r['final_train_error'])} | {r['steps']} | {_fmt(r['paper_test_error'])} |")
    if paper:
        lines += ["", "He et al. 2015, Table 6 (CIFAR-10; ResNet-110: best of 5 runs, mean 6.61)."]
    (plan.out / "depth_table.md").write_text("\n".join(lines) + "\n")
    paths = [plan.out / "depth_table.md", plan.out / "depth_table.csv"]
    try:
        fig = plots.new_figure(*DEPTH_FIGSIZE)
    except plots.MissingMatplotlib as exc:
        warn(f"warning: depth_sweep.png skipped: {exc}")
        return paths
    ax = fig.add_subplot(1, 1, 1)
    drawn = [r for r in rows if r["depth"] is not None and r["final_test_error"] is not None]
    depths = [r["depth"] for r in drawn]
    plots.draw_series(ax, depths, [r["final_test_error"] for r in drawn], "final test error", "C0")
    plots.draw_series(ax, depths, [r["best_test_error"] for r in drawn], "best test error", "C1", "--", marker="s")
    with_paper = [r for r in drawn if r["paper_test_error"] is not None]
    if with_paper:
        plots.draw_series(ax, [r["depth"] for r in with_paper], [r["paper_test_error"] for r in with_paper],
                          "He et al. 2015", "k", ":", marker="^")
    ax.set_xlabel("depth (layers)")
    ax.set_ylabel("test error (%)")
    ax.set_xticks([r["depth"] for r in drawn])
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("test error vs depth")
    fig.tight_layout()
    paths.append(plots.save(fig, plan.out / "depth_sweep.png"))
    return paths


# ---------------------------------------------------------------------------------------------------- gradient flow
def block_groups(model: torch.nn.Module) -> list[tuple[str, list[torch.nn.Parameter]]]:
    """Parameters grouped per block, input to output: stem, layerS.B for every block, then the head."""
    groups: dict[str, list] = {}
    for name, param in model.named_parameters():
        parts = name.split(".")
        if parts[0].startswith("layer") and len(parts) > 2:
            key = ".".join(parts[:2])
        elif parts[0] == "fc":
            key = "fc"
        else:
            key = "stem"
        groups.setdefault(key, []).append(param)
    ordered = [k for k in groups if k == "stem"] + [k for k in groups if k not in ("stem", "fc")]
    return [(k, groups[k]) for k in ordered + [k for k in groups if k == "fc"]]


def gradient_norms(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[list, float]:
    """([(block, L2 norm of its parameters' gradient)], loss) after one forward/backward in training mode."""
    model.train()
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    norms = []
    for key, params in block_groups(model):
        grads = [p.grad.detach().double() for p in params if p.grad is not None]
        norms.append((key, math.sqrt(sum(float((g * g).sum()) for g in grads)) if grads else 0.0))
    return norms, loss.item()


def run_gradient_flow(plan: ExperimentPlan, log=print) -> list[Path]:
    """Per-block gradient norms of each run's network at initialisation on the first test batch (no training)."""
    from ddp_resnet import build, distributed
    from ddp_resnet import data as data_mod

    results = []
    for run in plan.runs:
        cfg = config_mod.load(plan.recipe, list(run.argv[2:]))
        info = data_mod.describe(cfg.data)
        device = distributed.resolve_device(cfg.train.device, 0)
        data_cfg = config_mod.replace(cfg, data={"eval_batch_size": cfg.data.batch_size, "workers": 0}).data
        images, labels = next(iter(data_mod.build_eval_loader(data_cfg, info, 0, 1, device)))
        torch.manual_seed(cfg.train.seed)
        model = build.build_network(cfg, info, distributed.DistEnv(0, 1, 0, device, "", "single"))
        norms, loss = gradient_norms(model, images, labels)
        log(f"[gradient_flow] {run.label}: loss {loss:.4f}, gradient norm first block {norms[1][1]:.3e}, "
            f"last block {norms[-2][1]:.3e} ({len(norms)} groups, batch {labels.shape[0]})")
        results.append((run, norms, loss, int(labels.shape[0])))
    plan.out.mkdir(parents=True, exist_ok=True)
    with open(plan.out / "gradient_flow.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "index", "block", "grad_norm"])
        for run, norms, _, _ in results:
            for i, (key, norm) in enumerate(norms):
                writer.writerow([run.label, i, key, f"{norm:.6e}"])
    (plan.out / "gradient_flow.json").write_text(json.dumps(
        {run.label: {"loss": loss, "batch": batch, "blocks": [k for k, _ in norms], "grad_norm": [n for _, n in norms]}
         for run, norms, loss, batch in results}, indent=1))
    fig = plots.new_figure(*GRADIENT_FIGSIZE)
    ax = fig.add_subplot(1, 1, 1)
    longest = max(results, key=lambda r: len(r[1]))[1]
    for i, (run, norms, _, _) in enumerate(results):
        plots.draw_series(ax, list(range(len(norms))), [max(n, 1e-30) for _, n in norms], run.label, f"C{i}")
    ax.set_yscale("log")
    step = max(1, len(longest) // 30)
    ax.set_xticks(range(0, len(longest), step))
    ax.set_xticklabels([k for k, _ in longest][::step], rotation=70, fontsize=7)
    ax.set_xlabel("block (input -> output)")
    ax.set_ylabel("gradient L2 norm of the block's parameters")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title("gradient flow at initialisation (one batch, training-mode BatchNorm)")
    fig.tight_layout()
    return [plots.save(fig, plan.out / "gradient_flow.png"), plan.out / "gradient_flow.csv",
            plan.out / "gradient_flow.json"]


# ---------------------------------------------------------------------------------------------------- augment ablation
def evaluate_ensemble_of(plan: ExperimentPlan, found, warn=print) -> dict | None:
    """The ensemble of the baseline seeds' final checkpoints, evaluated by ``python -m ddp_resnet.evaluate`` (its
    JSON), or None (with a warning) when fewer than two have finished or the evaluation fails."""
    from ddp_resnet import evaluate

    paths = [str(path / "checkpoints" / "last.pt") for run, path, _ in found if run.label in ENSEMBLE_OF]
    paths = [p for p in paths if Path(p).is_file()]
    if len(paths) < 2:
        warn(f"warning: {len(paths)} of the baseline seeds {', '.join(ENSEMBLE_OF)} finished: no ensemble row")
        return None
    out = plan.out / "ensemble.json"
    if evaluate.main(["--checkpoint", *paths, "--json", str(out)]) != 0:
        warn("warning: evaluating the ensemble failed: no ensemble row")
        return None
    return json.loads(out.read_text())


def ablation_rows(found, ensemble: dict | None) -> list[dict]:
    """One row per run (and the ensemble): errors in percent and the final test error's change against the baseline."""
    rows = []
    for run, path, records in found:
        s = run_summary(run, path, records)
        rows.append({"tip": run.label, "overrides": " ".join(run.point_overrides) or "-",
                     "final_test_error": s["final_test_error"], "best_test_error": s["best_test_error"],
                     "final_train_error": s["final_train_error"], "steps": s["steps"]})
    if ensemble is not None:
        rows.append({"tip": f"ensemble of {len(ensemble['members'])}", "overrides": "averaged probabilities of "
                     + ", ".join(Path(m["checkpoint"]).parts[-3] for m in ensemble["members"]),
                     "final_test_error": 100 - ensemble["top1"], "best_test_error": None, "final_train_error": None,
                     "steps": None})
    base = next((r["final_test_error"] for r in rows if r["tip"] == "baseline"), None)
    for r in rows:
        known = base is not None and r["final_test_error"] is not None
        r["delta_vs_baseline"] = r["final_test_error"] - base if known else None
    return rows


def write_ablation_table(out: Path, rows: list[dict]) -> list[Path]:
    """augment_ablation.md and augment_ablation.csv."""
    _write_csv(out / "augment_ablation.csv", ABLATION_KEYS, rows)
    lines = ["# Augmentation and training tips, one at a time (ResNet-18 recipe)", "",
             "| tip | overrides | final test error (%) | vs baseline (points) | best test error (%) | "
             "final train error (%) | steps |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        delta = "-" if r["delta_vs_baseline"] is None else f"{r['delta_vs_baseline']:+.2f}"
        lines.append(f"| {r['tip']} | {r['overrides']} | {_fmt(r['final_test_error'])} | {delta} | "
                     f"{_fmt(r['best_test_error'])} | {_fmt(r['final_train_error'])} | {r['steps'] or '-'} |")
    (out / "augment_ablation.md").write_text("\n".join(lines) + "\n")
    return [out / "augment_ablation.md", out / "augment_ablation.csv"]


def _draw_final_errors(ax, rows: list[dict]) -> None:
    """Each tip's final test error as a point, the baseline's as a dashed line."""
    xs = list(range(len(rows)))
    plots.draw_series(ax, xs, [r["final_test_error"] for r in rows], "final test error", "C0", "none")
    base = next((r["final_test_error"] for r in rows if r["tip"] == "baseline"), None)
    if base is not None:
        plots.draw_series(ax, [xs[0], xs[-1]], [base, base], "baseline", "k", "--", 1.0, marker="")
    ax.set_xticks(xs)
    ax.set_xticklabels([r["tip"] for r in rows], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("final test error (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("final test error per tip")


def analyze_augment_ablation(plan: ExperimentPlan, warn=print) -> list[Path]:
    """augment_ablation.md / .csv (each tip's errors and change against the baseline, and the baseline seeds'
    ensemble) and augment_ablation.png (train and test error curves; final test error per tip)."""
    found = collect(plan, warn)
    rows = ablation_rows(found, evaluate_ensemble_of(plan, found, warn))
    paths = write_ablation_table(plan.out, rows)
    fig = plots.new_figure(*ABLATION_FIGSIZE)
    ax_curves, ax_final = fig.subplots(1, 2)
    colors = ["k" if run.label == "baseline" else f"C{i % 10}" for i, (run, _, _) in enumerate(found)]
    plots.error_curves(ax_curves, _curves(found), x_key="epoch", colors=colors)
    ax_curves.set_title("error: train (dashed), test (solid); baseline in black")
    _draw_final_errors(ax_final, rows)
    fig.suptitle("the seeds' tips one at a time")
    fig.tight_layout()
    return [plots.save(fig, plan.out / "augment_ablation.png"), *paths]


ANALYSES = {"degradation": analyze_degradation, "wd_ablation": analyze_wd_ablation, "depth_table": analyze_depth,
            "augment_ablation": analyze_augment_ablation}


def analyze(plan: ExperimentPlan, log=print) -> list[Path]:
    """Draw the experiment's figures and tables from its runs."""
    plan.out.mkdir(parents=True, exist_ok=True)
    if plan.experiment.analysis == "gradient_flow":
        return run_gradient_flow(plan, log)
    return ANALYSES[plan.experiment.analysis](plan, log)


