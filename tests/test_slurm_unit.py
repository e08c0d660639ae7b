"""The SLURM launcher without SLURM: argument checks, the generated sbatch script, sweeps, requeue decisions."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ddp_resnet import exitcodes
from ddp_resnet.rundir import read_jsonl
from ddp_resnet.slurm import job, submit, sweep

REPO = Path(__file__).resolve().parents[1]
GPU_RECIPE = """\
output_dir: {out}
model:
  name: resnet20
data:
  dataset: synthetic
  batch_size: 256
train:
  epochs: 2
"""


@pytest.fixture()
def recipe(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(GPU_RECIPE.format(out=tmp_path / "run"))
    return path


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch):
    """Behave the same whether or not SLURM is installed here: no sinfo, no sbatch."""
    monkeypatch.setattr(submit, "slurm_available", lambda: False)


def run_main(capsys, *argv):
    code = submit.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


GPU_ARGS = ("--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu", "--time", "240")


# ------------------------------------------------------------------------------------------------ small parts
@pytest.mark.parametrize("text,minutes", [
    ("240", 240), ("30:00", 30), ("30:01", 31), ("4:00:00", 240), ("1-00", 1440), ("1-2:30", 1590),
    ("0-01:00:01", 61),
])
def test_parse_time(text, minutes):
    assert submit.parse_time(text) == minutes


@pytest.mark.parametrize("text", ["", "4h", "1:2:3:4", "-5"])
def test_parse_time_rejects(text):
    with pytest.raises(submit.UsageError, match="--time"):
        submit.parse_time(text)


def test_split_values_keeps_brackets():
    assert sweep.split_values("0.1, 0.2,[30,60],(1,2)") == ["0.1", "0.2", "[30,60]", "(1,2)"]


def test_sweep_product_and_names():
    sweeps = sweep.parse_sweeps(["optim.lr=0.05,0.1,0.2", "optim.weight_decay=1e-4,5e-4"])
    points = sweep.point_names(sweeps)
    assert len(points) == 6
    assert points[0] == (["optim.lr=0.05", "optim.weight_decay=1e-4"], "lr0.05_weight_decay1e-4")
    assert points[-1] == (["optim.lr=0.2", "optim.weight_decay=5e-4"], "lr0.2_weight_decay5e-4")
    assert len({name for _, name in points}) == 6


def test_sweep_names_disambiguate():
    same_last = sweep.point_names(sweep.parse_sweeps(["optim.lr=0.1", "finetune.lr=0.2"]))
    assert same_last[0][1] == "optim.lr0.1_finetune.lr0.2"
    clash = sweep.point_names(sweep.parse_sweeps(["data.root=a/b,a-b"]))  # both slug to root a-b
    assert [n for _, n in clash] == ["0_roota-b", "1_roota-b"]


@pytest.mark.parametrize("items,match", [
    (["optim.lr"], "expected key=v1"),
    (["optim.lr=0.1,"], "empty value"),
    (["optim.lr=0.1", "optim.lr=0.2"], "given twice"),
    (["optim.lr=0.1,0.1"], "repeated value"),
    (["output_dir=a,b"], "not allowed"),
])
def test_parse_sweeps_rejects(items, match):
    with pytest.raises(sweep.SweepError, match=match):
        sweep.parse_sweeps(items)


def test_classify_stop():
    assert job.classify_stop(100, 3600, 120) == "preemption"
    assert job.classify_stop(3600 - 120 - 30, 3600, 120) == "timeout"
    assert job.classify_stop(3600 - 120 - job.TIMEOUT_GRACE_S - 1, 3600, 120) == "preemption"
    assert job.classify_stop(10**6, None, 120) == "preemption"  # no limit: never a time-out
    assert job.classify_stop(10, 120, 120) == "timeout"  # a limit inside the warning window


def test_slurm_durations():
    assert job.parse_duration("00:01:05") == 65
    assert job.parse_duration("1-00:00:00") == 86400
    assert job.parse_duration("05:00") == 300
    assert job.parse_duration("UNLIMITED") is None


# ------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("extra,match", [
    (["optim.lrr=0.1"], "unknown config key 'optim.lrr'"),
    (["--sweep", "optim.nope=1,2"], "unknown config key 'optim.nope'"),
    (["--sweep", "optim.lr=0.1,-1"], r"optim.lr: must be > 0.*sweep point optim.lr=-1"),
    (["model.name=resnet9000"], "model.name: unknown model"),
    (["data.batch_size=100"], "not divisible by world size 16"),
    (["--gpus-per-node", "-1"], "--gpus-per-node: must be >= 0"),
    (["--tasks-per-node", "0"], "--tasks-per-node: must be > 0"),
    (["--tasks-per-node", "4"], "must equal --gpus-per-node 8"),
    (["--nodes", "0"], "--nodes: must be > 0"),
    (["--time", "1", "--signal-delay-s", "120"], "--signal-delay-s 120 must be shorter"),
    (["--signal", "KILL"], "--signal: unknown signal 'KILL'"),
    (["--mem", "lots"], "--mem: cannot read"),
    (["--max-timeouts", "-1"], "--max-timeouts: must be >= 0"),
    (["train.device=cpu"], "use --gpus-per-node 0 for a CPU job"),
    (["--local"], "--local runs on this machine only"),
    (["--bogus"], "unrecognized arguments"),
    (["notanoverride"], "not of the form key.sub=value"),
])
def test_bad_arguments_exit_2_with_one_line(capsys, recipe, tmp_path, extra, match):
    code, out, err = run_main(capsys, "--config", recipe, *GPU_ARGS, "--dry-run", *extra)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ddp_resnet.slurm: error: ")
    assert re.search(match, lines[0]), lines[0]
    assert not (tmp_path / "run").exists()


def test_missing_config_file(capsys, tmp_path):
    code, _, err = run_main(capsys, "--config", tmp_path / "nope.yaml", *GPU_ARGS)
    assert code == 2 and "config file not found" in err


def test_cpu_job_rejects_cuda(capsys, recipe):
    code, _, err = run_main(capsys, "--config", recipe, "--gpus-per-node", "0", "--tasks-per-node", "2",
                            "train.device=cuda", "--dry-run")
    assert code == 2 and "cuda needs --gpus-per-node > 0" in err


def test_without_slurm_submission_points_to_local_or_dry_run(capsys, recipe):
    code, _, err = run_main(capsys, "--config", recipe, *GPU_ARGS)
    assert code == 2 and "--local or --dry-run" in err


def test_unknown_partition(capsys, recipe, monkeypatch):
    monkeypatch.setattr(submit, "slurm_available", lambda: True)
    monkeypatch.setattr(submit, "slurm_partitions", lambda: ["cpu", "debug"])
    code, _, err = run_main(capsys, "--config", recipe, *GPU_ARGS)
    assert code == 2
    assert err.strip() == "ddp_resnet.slurm: error: --partition: 'gpu' does not exist; available: cpu, debug"


def test_help_and_checks_work_without_submitit(recipe):
    code = (
        "import sys; sys.modules['submitit'] = None\n"  # importing submitit now fails
        "from ddp_resnet.slurm import submit\n"
        f"args = submit.parse_args(['--config', {str(recipe)!r}, '--gpus-per-node', '0', '--tasks-per-node', '2',"
        " '--dry-run'])\n"
        "plan = submit.make_plan(args)\n"
        "assert plan.world_size == 2, plan\n"
        "submit.main(['--help'])\n"
    )
    res = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "--gpus-per-node" in res.stdout and "--sweep" in res.stdout


# ------------------------------------------------------------------------------------------------ dry run
def sbatch_lines(out: str) -> dict:
    flags = {}
    for line in out.splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --"):].partition("=")
            flags[key] = value or True
    return flags


def test_dry_run_gpu_script(capsys, recipe, tmp_path):
    code, out, err = run_main(capsys, "--config", recipe, *GPU_ARGS, "--account", "proj", "--qos", "high",
                              "--constraint", "a100", "--cpus-per-task", "10", "--mem", "480G", "--job-name",
                              "r50", "--dry-run", "optim.lr=0.2")
    assert code == 0, err
    flags = sbatch_lines(out)
    assert flags["nodes"] == "2"
    assert flags["ntasks-per-node"] == "8"
    assert flags["gpus-per-node"] == "8"
    assert flags["partition"] == "gpu"
    assert flags["time"] == "240"
    assert flags["signal"] == "USR2@120"
    assert flags["requeue"] is True
    assert flags["account"] == "proj" and flags["qos"] == "high" and flags["constraint"] == "a100"
    assert flags["cpus-per-task"] == "10" and flags["mem"] == "480G" and flags["job-name"] == "r50"
    assert "array" not in flags
    srun = [line for line in out.splitlines() if line.startswith("srun ")]
    assert len(srun) == 1 and "--kill-on-bad-exit=1" in srun[0] and "submitit.core._submit" in srun[0]
    run_dir = str(tmp_path / "run")
    assert f"output_dir={run_dir}" in out and "optim.lr=0.2" in out
    assert "nothing submitted" in out
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


def test_dry_run_cpu_job_and_signal(capsys, recipe):
    code, out, err = run_main(capsys, "--config", recipe, "--gpus-per-node", "0", "--tasks-per-node", "2",
                              "--signal", "term", "--signal-delay-s", "60", "--time", "0:30:00", "--dry-run")
    assert code == 0, err
    flags = sbatch_lines(out)
    assert flags["ntasks-per-node"] == "2" and flags["nodes"] == "1"
    assert "gpus-per-node" not in flags and "partition" not in flags
    assert flags["signal"] == "TERM@60" and flags["time"] == "30"
    assert "export SUBMITIT_PREEMPT_SIGNAL=TERM" in out
    assert "train.device=cpu dist.backend=gloo" in out


def test_dry_run_sweep_is_one_array(capsys, recipe, tmp_path):
    code, out, err = run_main(capsys, "--config", recipe, *GPU_ARGS, "--dry-run", "--sweep", "optim.lr=0.05,0.1,0.2",
                              "--sweep", "optim.weight_decay=1e-4,5e-4", "--array-parallelism", "2")
    assert code == 0, err
    assert sbatch_lines(out)["array"] == "0-5%2"
    for name in ("lr0.05_weight_decay1e-4", "lr0.2_weight_decay5e-4"):
        assert str(tmp_path / "run" / name) in out


def test_plan_sweep_points(recipe, tmp_path):
    args = submit.parse_args(["--config", str(recipe), *GPU_ARGS, "--sweep", "optim.lr=0.1,0.2", "train.epochs=3",
                             "--dry-run"])
    plan = submit.make_plan(args)
    assert plan.world_size == 16 and len(plan.points) == 2
    point = plan.points[1]
    assert point.overrides == ("optim.lr=0.2",)
    assert point.output_dir == str(tmp_path / "run" / "lr0.2")
    assert point.argv == ("--config", str(recipe), "train.epochs=3", "optim.lr=0.2", f"output_dir={point.output_dir}")
    assert plan.log_dir == str(tmp_path / "run" / "slurm")


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text("model:\n  name: resnet20\n")
    args = submit.parse_args(["--config", "r.yaml", "output_dir=runs/a", "--gpus-per-node", "0", "--log-dir", "logs",
                              "--dry-run"])
    plan = submit.make_plan(args)
    assert plan.points[0].argv[:2] == ("--config", str(tmp_path / "r.yaml"))
    assert plan.points[0].argv[-1] == f"output_dir={tmp_path / 'runs' / 'a'}"
    assert "output_dir=runs/a" not in plan.points[0].argv
    assert plan.log_dir == str(tmp_path / "logs")
    assert plan.points[0].argv[2:4] == ("train.device=cpu", "dist.backend=gloo")


def test_local_executor_parameters(recipe):
    plan = submit.make_plan(submit.parse_args(["--config", str(recipe), "--gpus-per-node", "0",
                                             "--tasks-per-node", "2", "--local", "--time", "5"]))
    assert plan.cluster == "local"
    params = submit.executor_parameters(plan)
    assert params == {"timeout_min": 5, "tasks_per_node": 2, "signal_delay_s": 120}


# ------------------------------------------------------------------------------------------------ the task
def make_task(tmp_path, cluster="slurm", max_timeouts=2):
    return job.TrainTask(["--config", "x.yaml"], cluster, 3600, 120, max_timeouts, str(tmp_path))


@pytest.fixture()
def scontrol(monkeypatch):
    """Fake `scontrol show job` fields and record `scontrol requeue` calls."""
    state = {"fields": {"JobState": "RUNNING", "RunTime": "00:10:00", "TimeLimit": "01:00:00"}, "calls": [],
             "rc": 0}
    monkeypatch.setattr(job, "slurm_job_fields", lambda job_id: dict(state["fields"]))

    def fake_run(cmd, **kwargs):
        state["calls"].append(cmd)
        return subprocess.CompletedProcess(cmd, state["rc"], "", "" if state["rc"] == 0 else "Job not running")

    monkeypatch.setattr(job.subprocess, "run", fake_run)
    return state


def records(tmp_path, job_id="123"):
    return read_jsonl(tmp_path / f"{job_id}_requeues.jsonl")


def test_preemption_requeues(tmp_path, scontrol):
    with pytest.raises(SystemExit) as exc:
        make_task(tmp_path).requeue_or_fail("123", started=time.time())
    assert exc.value.code == 0
    assert scontrol["calls"] == [["scontrol", "requeue", "123"]]
    (rec,) = records(tmp_path)
    assert rec["reason"] == "preemption" and rec["requeue"] and rec["run_s"] >= 600


def test_timeouts_requeue_up_to_the_limit(tmp_path, scontrol):
    scontrol["fields"]["RunTime"] = "00:58:30"  # inside the warning window of a 1 h limit
    task = make_task(tmp_path, max_timeouts=2)
    for _ in range(2):
        with pytest.raises(SystemExit):
            task.requeue_or_fail("123", started=time.time())
    with pytest.raises(RuntimeError, match=r"time limit 3 time\(s\)"):
        task.requeue_or_fail("123", started=time.time())
    assert [r["reason"] for r in records(tmp_path)] == ["timeout"] * 3
    assert [r["requeue"] for r in records(tmp_path)] == [True, True, False]
    assert len(scontrol["calls"]) == 2
    # preemptions still requeue after that
    scontrol["fields"]["RunTime"] = "00:05:00"
    with pytest.raises(SystemExit):
        task.requeue_or_fail("123", started=time.time())
    assert records(tmp_path)[-1]["reason"] == "preemption"


def test_requeue_skipped_when_scheduler_already_requeues(tmp_path, scontrol):
    scontrol["fields"]["JobState"] = "PENDING"
    with pytest.raises(SystemExit) as exc:
        make_task(tmp_path).requeue_or_fail("123", started=time.time())
    assert exc.value.code == job.EXIT_STOPPED and scontrol["calls"] == []


def test_failed_requeue_exits_stopped(tmp_path, scontrol):
    scontrol["rc"] = 1
    with pytest.raises(SystemExit) as exc:
        make_task(tmp_path).requeue_or_fail("123", started=time.time())
    assert exc.value.code == job.EXIT_STOPPED


def test_local_requeue_uses_submitit_restart_code(tmp_path):
    with pytest.raises(SystemExit) as exc:
        make_task(tmp_path, cluster="local").requeue_or_fail("123", started=time.time())
    assert exc.value.code == job.LOCAL_REQUEUE_EXIT


@pytest.fixture()
def local_task_env():
    """Variables of a task started by submitit's local executor (rank 1 of 2, job 4242)."""
    pytest.importorskip("submitit")
    saved = dict(os.environ)  # the task writes RANK, MASTER_PORT, ... into os.environ: restore it all after
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS"):
        os.environ.pop(key, None)
    os.environ.update(SUBMITIT_EXECUTOR="local", SUBMITIT_LOCAL_JOB_ID="4242", SUBMITIT_LOCAL_NTASKS="2",
                      SUBMITIT_LOCAL_GLOBALID="1", SUBMITIT_LOCAL_LOCALID="1", SUBMITIT_LOCAL_NODEID="0",
                      SUBMITIT_LOCAL_JOB_NUM_NODES="1")
    yield
    os.environ.clear()
    os.environ.update(saved)


def fake_train(monkeypatch, code):
    import types

    calls = []

    def main(argv):
        calls.append((list(argv), dict(os.environ)))
        return code

    monkeypatch.setitem(sys.modules, "ddp_resnet.train", types.SimpleNamespace(main=main, EXIT_STOPPED=75))
    import ddp_resnet

    monkeypatch.setattr(ddp_resnet, "train", sys.modules["ddp_resnet.train"], raising=False)
    return calls


def test_task_sets_rendezvous_for_local_executor(tmp_path, local_task_env, monkeypatch):
    calls = fake_train(monkeypatch, 0)
    result = make_task(tmp_path, cluster="local")()
    assert result["exit_code"] == 0 and result["rank"] == 1
    argv, env = calls[0]
    assert argv == ["--config", "x.yaml"]
    from ddp_resnet.distributed import slurm_port

    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("1", "2", "1")
    assert env["MASTER_ADDR"] == "127.0.0.1" and env["MASTER_PORT"] == str(slurm_port("4242"))


def test_task_failure_raises(tmp_path, local_task_env, monkeypatch):
    fake_train(monkeypatch, 1)
    with pytest.raises(RuntimeError, match="exited with code 1 on rank 1"):
        make_task(tmp_path, cluster="local")()


def test_task_stop_on_other_rank_exits_0(tmp_path, local_task_env, monkeypatch):
    import signal

    fake_train(monkeypatch, 75)
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM)}
    try:
        with pytest.raises(SystemExit) as exc:
            make_task(tmp_path, cluster="local")()
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
    assert exc.value.code == 0  # only rank 0 requeues; others must not trip --kill-on-bad-exit
    assert records(tmp_path, "4242") == []


def test_task_is_checkpointable(tmp_path):
    pytest.importorskip("submitit")
    task = make_task(tmp_path)
    delayed = task.checkpoint()
    assert delayed.function is task


# ------------------------------------------------------------------------------------------------ output
def test_submitted_table(capsys, recipe):
    plan = submit.make_plan(submit.parse_args(["--config", str(recipe), *GPU_ARGS, "--sweep", "optim.lr=0.1,0.2",
                                             "--dry-run"]))
    subs = [submit.Submitted(p, f"77_{p.index}", "o", "e") for p in plan.points]
    submit.print_submitted(plan, subs)
    out = capsys.readouterr().out
    assert "job_id  overrides     output_dir" in out
    assert f"77_1    optim.lr=0.2  {plan.points[1].output_dir}" in out
    submit.write_sweep_index(plan, subs)
    index = json.loads((Path(plan.output_dir) / "sweep.json").read_text())
    assert index["keys"] == ["optim.lr"] and index["jobs"][1]["job_id"] == "77_1"


# ------------------------------------------------------------------------------------------------ scripts
SCRIPTS = ["slurm/train.sbatch", "launch/single_node.sh", "launch/multi_node.sh", "launch/debug_single_gpu.sh",
           "launch/cpu_smoke.sh", ".ci/slurm_setup.sh"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_shell_scripts_parse(script):
    res = subprocess.run(["bash", "-n", str(REPO / script)], check=False, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_sbatch_template_contract():
    text = (REPO / "slurm" / "train.sbatch").read_text()
    for needle in ("#SBATCH --signal=USR2@120", "#SBATCH --requeue", "#SBATCH --ntasks-per-node=8",
                   "#SBATCH --gpus-per-node=8", "srun --kill-on-bad-exit=1", "-m ddp_resnet.train",
                   f"EXIT_STOPPED={exitcodes.STOPPED}", 'scontrol requeue "$SLURM_JOB_ID"'):
        assert needle in text, needle


def test_submit_script_help(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, str(REPO / "slurm" / "submit.py"), "--help"], check=False,
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "--gpus-per-node" in res.stdout


def test_the_job_side_the_sbatch_template_and_the_package_agree_on_the_stop_code():
    assert job.EXIT_STOPPED == exitcodes.STOPPED == 75
    text = (REPO / "slurm" / "train.sbatch").read_text()
    assert re.findall(r"^EXIT_STOPPED=(\d+)$", text, re.M) == [str(exitcodes.STOPPED)]


def test_the_sbatch_template_asks_the_same_requeue_policy(tmp_path, scontrol, monkeypatch):
    """`python -m ddp_resnet.slurm.job` (what slurm/train.sbatch runs): exit 0 = requeue, 3 = not; recorded."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert job.main(["--state-dir", str(tmp_path)]) == job.EXIT_NO_REQUEUE  # not inside a job
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    scontrol["fields"]["RunTime"] = "00:58:30"  # inside the warning window of the 1 h limit: a time-out
    assert job.main(["--state-dir", str(tmp_path), "--max-timeouts", "1"]) == 0
    assert job.main(["--state-dir", str(tmp_path), "--max-timeouts", "1"]) == job.EXIT_NO_REQUEUE
    scontrol["fields"]["RunTime"] = "00:05:00"  # a preemption always requeues
    assert job.main(["--state-dir", str(tmp_path), "--max-timeouts", "1"]) == 0
    assert [(r["reason"], r["requeue"]) for r in records(tmp_path)] == [
        ("timeout", True), ("timeout", False), ("preemption", True)]
    assert scontrol["calls"] == []  # deciding never requeues by itself: the template runs scontrol
    text = (REPO / "slurm" / "train.sbatch").read_text()
    assert "-m ddp_resnet.slurm.job --state-dir" in text
