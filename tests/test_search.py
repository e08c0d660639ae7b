"""Hyper-parameter search (``python -m ddp_resnet.search``): trials are ordinary runs in DIR/trials/NNNN, pruned in
the trial at an epoch boundary (exit 79), the study continues after SIGTERM or kill -9 with every interrupted trial
resumed exactly, SLURM trials form a job array, bad input is refused before anything is written.

Runs are tiny (ResNet-20 on 16 px synthetic images, 4 steps per epoch, CPU); one 6-trial search is shared.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, assert_bitwise_equal, child_env, ok, weights
from ddp_resnet import exitcodes
from ddp_resnet.search import cli as search_cli

optuna = pytest.importorskip("optuna")

TINY = [
    "model.name=resnet20", "data.dataset=synthetic", "data.synthetic_train_size=128", "data.synthetic_test_size=64",
    "data.synthetic_image_size=16", "data.batch_size=32", "data.workers=0", "train.device=cpu",
    "train.log_every=1000", "dist.timeout_s=60", "ckpt.keep=1",
]
SPACE = ["--space", "optim.lr=log:1e-5:0.5", "train.label_smoothing=float:0:0.2"]
GOOD, BAD = "optim.lr=0.05,train.label_smoothing=0", "optim.lr=1e-5,train.label_smoothing=0.2"
# Trials 0 and 1 learn (the same point: equal values, so neither prunes the other), 2 and 4 cannot (lr 1e-5): with
# 2 in parallel, trial 2 starts only once 0 or 1 has completed, and the median pruner (after 2 epochs) stops both
# bad ones. Trials 3 and 5 may or may not be pruned.
ENQUEUE = [GOOD, GOOD, BAD, "optim.lr=0.03,train.label_smoothing=0.05", BAD, "optim.lr=0.1,train.label_smoothing=0"]


def search_cmd(out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "ddp_resnet.search", *TINY, *args, "--out", str(out)]


def run_search(out: Path, *args: str, env: dict | None = None, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(search_cmd(out, *args), cwd=REPO, env=child_env(env), capture_output=True, text=True,
                          timeout=timeout)


def study_trials(out: Path) -> list:
    from ddp_resnet.search import study as study_mod

    store = study_mod.storage(out / study_mod.JOURNAL)
    return optuna.load_study(storage=store, study_name=study_mod.STUDY_NAME).get_trials(deepcopy=False)


def table_rows(out: Path) -> list[dict]:
    with open(out / "search.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def search6(tmp_path_factory):
    """A 6-trial search, 2 at a time, median pruner after 2 of 3 epochs, the points enqueued (no randomness)."""
    out = tmp_path_factory.mktemp("search") / "s6"
    args = ["train.epochs=3", *SPACE, "--trials", "6", "--parallel", "2", "--sampler", "random", "--pruner", "median",
            "--pruner-startup", "1", "--prune-after", "2"]
    for point in ENQUEUE:
        args += ["--enqueue", point]
    start = time.time()
    proc = run_search(out, *args)
    return {"out": out, "proc": proc, "args": args, "seconds": time.time() - start}


@pytest.mark.slow
def test_a_six_trial_search_finishes_with_pruned_trials_a_table_and_plots(search6):
    out, proc = search6["out"], ok(search6["proc"])
    rows = table_rows(out)
    assert [int(r["trial"]) for r in rows] == list(range(6))
    states = [t.state.name for t in study_trials(out)]
    assert len(states) == 6 and set(states) <= {"COMPLETE", "PRUNED"}, states
    assert states[0] == states[1] == "COMPLETE" and states[2] == states[4] == "PRUNED", states
    assert [r["state"] for r in rows] == states
    progress = [line for line in proc.stdout.splitlines() if line.startswith("trial ")]
    assert [line.split(":")[0] for line in progress] == [f"trial {n}/6" for n in range(1, 7)], proc.stdout
    assert all("best so far" in line and "elapsed" in line and "ETA" in line for line in progress)
    for number, state in enumerate(states):
        folder = out / "trials" / f"{number:04d}"
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert len(records) == (3 if state == "COMPLETE" else 2) == int(rows[number]["epochs"])
        assert (folder / "config.yaml").is_file() and (folder / "checkpoints" / "last.pt").is_file()
        assert list((folder / "tb").iterdir()), "no TensorBoard events"
        if state == "PRUNED":  # it stopped after epoch 2, that epoch's checkpoint written
            log = (folder / "train.log").read_text()
            assert f"exiting with {exitcodes.PRUNED}" in log and "prunes trial" in log
            assert (folder / "checkpoints" / "epoch_0001.pt").is_file()
            assert torch_step(folder / "checkpoints" / "last.pt") == 8
    markdown = (out / "search.md").read_text()
    assert markdown.count("\n| ") == 8 and "best.yaml" in markdown  # header, rule, 6 trials
    names = {p.name for p in (out / "plots").iterdir()}
    assert {"history.png", "importances.png", "slice_optim_lr.png", "slice_train_label_smoothing.png"} <= names


def torch_step(path: Path) -> int:
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=True)["step"])


@pytest.mark.slow
def test_best_yaml_is_the_winning_recipe_and_trains(search6, tmp_path):
    out = search6["out"]
    ok(search6["proc"])
    trials = study_trials(out)
    best = max((t for t in trials if t.state.name == "COMPLETE"), key=lambda t: t.value)
    saved = yaml.safe_load((out / "best.yaml").read_text())
    trial_cfg = yaml.safe_load((out / "trials" / f"{best.number:04d}" / "config.yaml").read_text())
    assert saved["optim"]["lr"] == best.params["optim.lr"] == trial_cfg["optim"]["lr"]
    assert saved["train"]["trial"] == "" and saved["ckpt"]["resume"] == "auto"
    assert saved["output_dir"] == f"runs/{out.name}-best"
    for cfg in (saved, trial_cfg):
        cfg.pop("output_dir")
        cfg["train"].pop("trial")
    assert saved == trial_cfg
    proc = ok(subprocess.run([sys.executable, "-m", "ddp_resnet.train", "--config", str(out / "best.yaml"),
                              f"output_dir={tmp_path / 'best'}", "train.epochs=1"], cwd=REPO, env=child_env(),
                             capture_output=True, text=True, timeout=300))
    assert "done:" in proc.stdout and (tmp_path / "best" / "checkpoints" / "last.pt").is_file()


@pytest.mark.slow
def test_the_same_command_on_a_finished_search_runs_nothing_and_another_search_is_refused(search6, capsys):
    out = search6["out"]
    ok(search6["proc"])
    again = ok(run_search(out, *search6["args"]))
    assert "6/6 trials finished" in again.stdout and "trial 1/6" not in again.stdout
    assert len(study_trials(out)) == 6 and len(list((out / "trials").iterdir())) == 6
    code = search_cli.main([*TINY, "train.epochs=3", "--space", "optim.lr=log:1e-4:0.5", "--trials", "6", "--out",
                            str(out)])
    err = capsys.readouterr().err
    assert code == exitcodes.USAGE and len(err.strip().splitlines()) == 1
    assert "holds another search" in err and "space" in err


def _wait(predicate, proc: subprocess.Popen, what: str, timeout_s: float = 180) -> None:
    deadline = time.time() + timeout_s
    while not predicate():
        assert proc.poll() is None, f"the search ended before {what}: {proc.communicate()}"
        assert time.time() < deadline, f"never: {what}"
        time.sleep(0.1)


def _wait_unlocked(folder: Path, timeout_s: float = 60) -> None:
    """Until the trial process (an orphan of a killed search) has stopped and let go of its directory."""
    from ddp_resnet.rundir import is_locked

    deadline = time.time() + timeout_s
    while is_locked(folder):
        assert time.time() < deadline, f"{folder} stayed locked"
        time.sleep(0.2)


def _logged_step(folder: Path) -> int:
    """The newest step in the trial's steps.jsonl (train.log_every=1: one record per step; a resume drops the
    records after its checkpoint)."""
    from ddp_resnet import rundir

    records = rundir.read_jsonl(folder / "steps.jsonl", skip_bad=True)
    return int(records[-1]["step"]) if records else 0


@pytest.mark.slow
def test_a_killed_search_continues_with_exactly_n_trials_and_interrupted_ones_resume_bitwise(search6, tmp_path):
    """Two trials of the first point of the shared search, both running: stopped with SIGTERM, started again and
    killed with kill -9 (the kernel hands each trial a SIGTERM), started again: exactly 2 trials, each resumed
    twice mid-epoch, both bitwise equal to the shared search's uninterrupted trial 0."""
    out, folders = tmp_path / "s2", [tmp_path / "s2" / "trials" / f"{n:04d}" for n in (0, 1)]
    args = ["train.epochs=3", "train.log_every=1", *SPACE, "--trials", "2", "--parallel", "2", "--pruner", "none",
            "--enqueue", GOOD, "--enqueue", GOOD]
    slow = child_env({"DDP_RESNET_TEST_STEP_DELAY_S": "0.3"})  # every trial step takes >= 0.3 s
    first = subprocess.Popen(search_cmd(out, *args), cwd=REPO, env=slow, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    _wait(lambda: all((f / "checkpoints" / "last.pt").is_file() for f in folders), first, "both trials' epoch 1")
    first.send_signal(signal.SIGTERM)
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == exitcodes.STOPPED, stdout + stderr
    assert "stopping the running trials" in stdout and "run the same command again" in stdout
    stopped = [torch_step(f / "checkpoints" / "last.pt") for f in folders]
    assert all(4 < step < 12 for step in stopped), stopped  # mid-run, not at an epoch end
    second = subprocess.Popen(search_cmd(out, *args), cwd=REPO, env=slow, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    _wait(lambda: all(_logged_step(f) > step for f, step in zip(folders, stopped)), second, "both trials resumed")
    second.kill()  # kill -9
    second.wait(timeout=30)
    for folder in folders:
        _wait_unlocked(folder)
    third = ok(run_search(out, *args))
    assert "0/2 trials finished; 2 trial(s) that were running continue" in third.stdout
    trials = study_trials(out)
    assert [t.number for t in trials] == [0, 1] and all(t.state.name == "COMPLETE" for t in trials)
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["0000", "0001"]
    assert [int(r["trial"]) for r in table_rows(out)] == [0, 1]
    reference = search6["out"] / "trials" / "0000"  # the same recipe and point, never interrupted
    for folder, trial in zip(folders, trials):
        log = (folder / "train.log").read_text()
        assert log.count("stop signal: checkpoint written") == 2 and log.count(f"resumed from {folder}") == 2, log
        assert sorted(trial.intermediate_values) == [1, 2, 3]
        assert_bitwise_equal(weights(folder / "checkpoints" / "last.pt"),
                             weights(reference / "checkpoints" / "last.pt"))


@pytest.mark.slow
def test_a_longer_study_with_a_pruned_two_process_trial(search6, tmp_path):
    """The shared study, copied and extended to 7 trials, the 7th a bad point on 2 processes (--nproc-per-trial 2):
    rank 0 decides, the trainer's all-reduce stops both ranks after epoch 2; the 6 finished trials stay."""
    import shutil

    out = tmp_path / "s7"
    shutil.copytree(search6["out"], out)
    from ddp_resnet.search import study as study_mod

    optuna.load_study(storage=study_mod.storage(out / study_mod.JOURNAL), study_name=study_mod.STUDY_NAME
                      ).enqueue_trial({"optim.lr": 1e-5, "train.label_smoothing": 0.2})
    args = [a if a != "6" else "7" for a in search6["args"]]
    proc = ok(run_search(out, *args, "--nproc-per-trial", "2"))
    assert "6/7 trials finished" in proc.stdout and "trial 7/7: PRUNED" in proc.stdout, proc.stdout
    trials = study_trials(out)
    assert [t.state.name for t in trials[:6]] == [t.state.name for t in study_trials(search6["out"])]
    assert trials[6].state.name == "PRUNED" and len(table_rows(out)) == 7
    log = (out / "trials" / "0006" / "train.log").read_text()
    assert "world 2 (torchrun, gloo, cpu)" in log and "prunes trial 6 at epoch 2" in log
    assert torch_step(out / "trials" / "0006" / "checkpoints" / "last.pt") == 8  # two epochs, then both ranks left


@pytest.mark.parametrize("space, message", [
    (["optim.lrx=log:0.01:1.0"], "unknown config key 'optim.lrx'; did you mean optim.lr?"),
    (["optim.lr=log:1.0:0.01"], "the range is inverted"),
    (["optim.lr=log:0:1.0"], "a log range needs LO > 0"),
    (["optim.weight_decay=log:-1e-3:1e-3"], "a log range needs LO > 0"),
    (["data.auto_augment=choice:none,fancyaugment"], "data.auto_augment: unknown value 'fancyaugment'; valid "
                                                     "choices: none, trivialaugment, randaugment, autoaugment"),
    (["train.label_smoothing=float:0:1"], "train.label_smoothing: must be in [0, 1)"),  # an end point refused
    (["data.auto_augment=float:0:1"], "data.auto_augment is a choice key"),
    (["optim.lr=normal:0:1"], "unknown kind 'normal'"),
    (["optim.lr=log:0.01:1", "optim.lr=log:0.1:1"], "optim.lr given twice"),
    (["output_dir=choice:a,b"], "output_dir cannot be searched"),
])
def test_a_bad_space_is_refused_in_one_line_before_anything_is_written(tmp_path, capsys, space, message):
    out = tmp_path / "never"
    code = search_cli.main(["--config", str(REPO / "configs/cifar10_resnet18.yaml"), "--space", *space,
                            "--trials", "4", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == exitcodes.USAGE and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_other_bad_arguments_are_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "never"
    cases = [(["optim.lr=0.1", *SPACE, "--trials", "2"], "given as an override and in --space"),
             ([*SPACE], "--trials: required"),
             ([*SPACE, "--trials", "2", "--sampler", "grid"], "is continuous"),
             (["--space", "optim.lr=log:0.01:0.1", "--trials", "2", "--enqueue", "optim.lr=0.5"], "outside the"),
             ([*SPACE, "--trials", "2", "output_dir=x"], "use --out")]
    for args, message in cases:
        assert search_cli.main([*TINY, *args, "--out", str(out)]) == exitcodes.USAGE
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    assert search_cli.main([*TINY, *SPACE, "--trials", "2", "--out", str(tmp_path / "used")]) == exitcodes.USAGE
    assert "holds files but no search" in capsys.readouterr().err


def test_without_optuna_the_search_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna now raises ImportError
    out = tmp_path / "never"
    code = search_cli.main([*TINY, *SPACE, "--trials", "2", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == exitcodes.USAGE and len(err.splitlines()) == 1 and 'pip install -e ".[search]"' in err, err
    assert not out.exists()
    from ddp_resnet.config import ConfigError
    from ddp_resnet.search import reporter
    from ddp_resnet.search.trial import write_json

    info = {"journal": str(tmp_path / "j"), "study": "search", "number": 0, "metric": "test_acc",
            "direction": "maximize", "pruner": {"name": "none", "prune_after": 1, "startup": 1}}
    write_json(tmp_path / "trial.json", info)
    with pytest.raises(ConfigError, match=r"train.trial: .*pip install -e \"\.\[search\]\""):
        reporter.reporter(str(tmp_path / "trial.json"))


def test_the_space_syntax_and_the_grid():
    from ddp_resnet.search.space import parse_enqueue, parse_space

    lr, smoothing, epochs, augment = parse_space([
        "optim.lr=log:0.01:1.0", "train.label_smoothing=float:0:0.2:0.05", "train.epochs=int:2:8:3",
        "data.auto_augment=choice:none,autoaugment"])
    assert (lr.kind, lr.low, lr.high, lr.grid(), lr.override(0.1)) == ("log", 0.01, 1.0, None, "optim.lr=0.1")
    assert smoothing.grid() == [0.0, 0.05, 0.1, 0.15, 0.2] and epochs.grid() == [2, 5, 8]
    assert epochs.override(5) == "train.epochs=5" and augment.override("none") == "data.auto_augment=none"
    assert parse_enqueue("optim.lr=0.5,data.auto_augment=autoaugment", [lr, augment]) == {
        "optim.lr": 0.5, "data.auto_augment": "autoaugment"}
    assert os.fspath(search_cli.trial_dir("/x", 7)) == "/x/trials/0007"
    from ddp_resnet.search import study as study_mod
    from ddp_resnet.search.driver import suggest

    grid = [smoothing, augment]  # 5 x 2 points: every one once, and telling the last one does not raise
    study = optuna.create_study(direction="maximize", sampler=study_mod.make_sampler("grid", grid, seed=0))
    points = []
    for _ in range(10):
        trial = study.ask()
        points.append(tuple(suggest(trial, p, grid=True) for p in grid))
        study.tell(trial, 1.0)
    assert len(set(points)) == 10 and {p[1] for p in points} == {"none", "autoaugment"}


# ------------------------------------------------------------------------------------------------------- SLURM
@pytest.mark.slurm
@pytest.mark.slow
def test_a_four_trial_search_runs_as_one_slurm_job_array(tmp_path):
    try:
        import slurm_cluster as sc
    except ImportError:  # tests/ imported as a package
        from tests import slurm_cluster as sc
    why = sc.ensure_cluster()
    if why:
        pytest.skip(why)
    out = tmp_path / "slurm4"
    proc = ok(run_search(out, "train.epochs=2", "--space", "optim.lr=log:0.01:0.2", "--trials", "4", "--parallel", "4",
                         "--sampler", "random", "--pruner", "none", "--slurm", "--gpus-per-node", "0",
                         "--tasks-per-node", "1", "--time", "10", timeout=600))
    trials = study_trials(out)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4, proc.stdout
    jobs = [t.user_attrs["slurm_job"] for t in trials]
    assert len({job.split("_")[0] for job in jobs}) == 1 and sorted(job.split("_")[1] for job in jobs) == [
        "0", "1", "2", "3"], jobs  # one array, one task per trial
    assert "submitted 4 trial(s) as one job array" in proc.stdout
    for number, job in enumerate(jobs):
        folder = out / "trials" / f"{number:04d}"
        assert len((folder / "metrics.jsonl").read_text().splitlines()) == 2
        assert "world 1 (slurm" in (out / "slurm" / f"{job}_0_log.out").read_text()
    assert len(table_rows(out)) == 4 and (out / "best.yaml").is_file()



@pytest.mark.slow
def test_a_trainer_that_refuses_to_start_stops_the_search_and_the_path_may_be_fixed(tmp_path, capsys):
    """A bad data path fails every trial alike: the first refusal (exit 2) stops the search with exit 2, the trial
    left RUNNING (the next start runs it, as any interrupted trial); data.root may change for that start (it does
    not change what a run computes), another value of a key that does is refused."""
    out = tmp_path / "s1"
    args = ["data.dataset=imagefolder", "data.image_size=16", "train.epochs=1", *SPACE, "--trials", "3"]
    refused = run_search(out, f"data.root={tmp_path / 'missing'}", *args)
    assert refused.returncode == exitcodes.USAGE, refused.stdout + refused.stderr
    assert "trial 0 refused to start: error: data.root" in refused.stdout, refused.stdout
    assert [t.state.name for t in study_trials(out)] == ["RUNNING"]
    argv = [*TINY, f"data.root={tmp_path / 'images'}", *args, "--out", str(out)]
    parsed, _ = search_cli.parse_args(argv)
    assert search_cli.make_spec(parsed, None, argv).out == out  # accepted: the same search
    other = [*TINY, "data.dataset=imagefolder", "data.image_size=24", *args[2:], "--out", str(out)]
    assert search_cli.main(other) == exitcodes.USAGE
    assert "holds another search (overrides:" in capsys.readouterr().err


def test_the_recipe_header_gives_a_search_command_that_validates(tmp_path):
    """configs/experiments/search_cifar10_resnet18.yaml: its header's command (and the --smoke variant) passes every
    check of the search (nothing is trained here)."""
    import re
    import shlex

    path = REPO / "configs/experiments/search_cifar10_resnet18.yaml"
    header = " ".join(line.lstrip("#").strip().rstrip("\\") for line in path.read_text().splitlines()
                      if line.startswith("#"))
    command = re.search(r"python -m ddp_resnet\.search (.*?--out \S+)", header).group(1)
    argv = [a.replace("DIR", str(tmp_path / "data")) for a in shlex.split(command)]
    assert "--config" in argv and "configs/experiments/search_cifar10_resnet18.yaml" in argv
    for extra in ([], ["--smoke", "--trials", "6", "--parallel", "2", "--pruner-startup", "1", "--prune-after", "2"]):
        args, slurm = search_cli.parse_args([*argv[:-2], *extra, "--out", str(tmp_path / "s")])
        args.config = str(REPO / args.config)
        spec = search_cli.make_spec(args, slurm, argv)
        assert [p.key for p in spec.params] == ["optim.lr", "optim.weight_decay", "train.label_smoothing",
                                                "data.auto_augment"]
    assert spec.trials == 6 and "data.dataset=synthetic" in spec.overrides and not (tmp_path / "s").exists()
