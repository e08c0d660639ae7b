"""Job scripts hold what the user typed, nothing more: control characters refused, the dry run is the submitted
script byte for byte, ``~`` expanded as the trainer expands it, rendezvous ports apart for concurrent jobs."""
from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from ddp_resnet import distributed, exitcodes
from ddp_resnet.slurm import submit

RECIPE = """\
output_dir: {out}
model:
  name: resnet20
data:
  dataset: synthetic
  batch_size: 256
"""
GPU_ARGS = ("--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu", "--time", "240")


@pytest.fixture()
def recipe(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(out=tmp_path / "run"))
    return path


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch):
    """No SLURM here unless a test installs the stand-in commands."""
    monkeypatch.setattr(submit, "slurm_available", lambda: False)


@pytest.fixture()
def stand_in(tmp_path, monkeypatch):
    """Stand-in sbatch (keeps every script it is given, answers job 4242), srun and sinfo (partition gpu) on PATH."""
    bin_dir, kept = tmp_path / "bin", tmp_path / "sbatch_received"
    bin_dir.mkdir()
    kept.mkdir()
    bodies = {"sbatch": f'n=$(ls {shlex.quote(str(kept))} | wc -l); cp "$1" {shlex.quote(str(kept))}/"$n".sh; '
                        'echo "Submitted batch job 4242"',
              "srun": "exit 0", "sinfo": "echo gpu"}
    for name, body in bodies.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(submit, "slurm_available", lambda: True)
    return kept


def received(kept: Path) -> list[str]:
    return [p.read_text() for p in sorted(kept.iterdir(), key=lambda p: int(p.stem))]


def run_main(capsys, *argv):
    code = submit.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def sbatch_reads(script: str) -> list[str]:
    """The arguments sbatch takes from the script's #SBATCH lines, read as sbatch reads them (src/sbatch/opt.c,
    ``_get_argument``: '' and "" group, a backslash escapes the next character even inside quotes, an unquoted
    '#' starts a comment, and the first line that is not a comment ends the directives)."""
    args: list[str] = []
    for line in script.splitlines():
        if not line.startswith("#SBATCH"):
            if line.strip() and not line.lstrip().startswith("#"):
                break
            continue
        arg, quote, escape, started = "", "", False, False
        for ch in line[len("#SBATCH"):] + " ":
            if escape:
                arg, escape, started = arg + ch, False, True
            elif ch == "\\":
                escape = True
            elif quote:
                quote, arg = ("", arg) if ch == quote else (quote, arg + ch)
            elif ch in "'\"":
                quote, started = ch, True
            elif ch == "#" or ch.isspace():
                if started:
                    args.append(arg)
                arg, started = "", False
                if ch == "#":
                    break
            else:
                arg, started = arg + ch, True
    return args


# ------------------------------------------------------------------------------------------ 1. control characters
INJECTED = "touch PWNED"
PAYLOAD = f"\n{INJECTED}\n#"


def injections(tmp_path, recipe):
    """(arguments with the payload in one value, the name the error must give)."""
    bad = f"{tmp_path}/x{PAYLOAD}"
    return {
        "output_dir": (["--config", recipe, f"output_dir={bad}"], "output_dir"),
        "--log-dir": (["--config", recipe, "--log-dir", bad], "--log-dir"),
        "--sbatch-opt": (["--config", recipe, "--sbatch-opt", f"comment=x{PAYLOAD}"], "--sbatch-opt comment"),
        "--job-name": (["--config", recipe, "--job-name", f"j{PAYLOAD}"], "--job-name"),
        "--partition": (["--config", recipe, "--partition", f"gpu{PAYLOAD}"], "--partition"),
        "--account": (["--config", recipe, "--account", f"a{PAYLOAD}"], "--account"),
        "--qos": (["--config", recipe, "--qos", f"q{PAYLOAD}"], "--qos"),
        "--constraint": (["--config", recipe, "--constraint", f"c{PAYLOAD}"], "--constraint"),
        "override": (["--config", recipe, f"data.root={bad}"], "data.root"),
        "--sweep": (["--config", recipe, "--sweep", f"data.root=a,b{PAYLOAD}"], "--sweep data.root"),
        "--config": (["--config", f"{recipe}{PAYLOAD}"], "--config"),
    }


CASES = ["output_dir", "--log-dir", "--sbatch-opt", "--job-name", "--partition", "--account", "--qos", "--constraint",
         "override", "--sweep", "--config"]


def assert_refused(code, out, err, name, char="\n"):
    assert code == exitcodes.USAGE
    assert err == (f"ddp_resnet.slurm: error: {name}: control character {char!r} not allowed in a value that reaches "
                   f"the job script\n")
    assert INJECTED not in out.splitlines()


@pytest.mark.parametrize("case", CASES)
def test_a_control_character_is_refused_before_anything_is_written(capsys, tmp_path, recipe, stand_in, case):
    argv, name = injections(tmp_path, recipe)[case]
    for extra in (["--dry-run"], []):
        code, out, err = run_main(capsys, *GPU_ARGS, *argv, *extra)  # argv's --partition comes last, so it counts
        assert_refused(code, out, err, name)
    assert received(stand_in) == []  # nothing reached sbatch
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "recipe.yaml", "sbatch_received"]  # nothing written


@pytest.mark.parametrize("char", ["\r", "\t", "\x00", "\x0b", "\x1b", "\x1f", "\x7f"])
def test_every_control_character_is_refused(capsys, tmp_path, recipe, char):
    code, out, err = run_main(capsys, "--config", recipe, *GPU_ARGS, "--dry-run", "--log-dir", f"{tmp_path}/a{char}b")
    assert_refused(code, out, err, "--log-dir", char)
    assert out == ""


def test_a_control_character_in_the_recipes_output_dir_is_refused(capsys, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(out=f'"{tmp_path}/x\\n{INJECTED}\\n#"'))  # YAML "\n": a real newline
    code, out, err = run_main(capsys, "--config", path, *GPU_ARGS, "--dry-run")
    assert_refused(code, out, err, "output_dir")


def test_a_backslash_is_refused_where_sbatch_would_read_it_as_an_escape(capsys, tmp_path, recipe):
    code, out, err = run_main(capsys, "--config", recipe, *GPU_ARGS, "--dry-run", "--log-dir", f"{tmp_path}/a\\b")
    assert code == exitcodes.USAGE and out == ""
    assert err == ("ddp_resnet.slurm: error: --log-dir: '\\\\' not allowed in a value that reaches an #SBATCH line "
                   "(sbatch reads it as an escape)\n")


def test_shell_words_in_values_stay_data(capsys, tmp_path, recipe, stand_in):
    """Spaces, quotes, $(...), `...` and ; in a log directory and an #SBATCH value: sbatch reads each value as typed,
    every directive is read, and running the script runs nothing of them."""
    log_dir = f"{tmp_path}/logs $(touch PWNED1) `touch PWNED2`; touch PWNED3 'q' \"d\" #x"
    code, _, err = run_main(capsys, "--config", recipe, *GPU_ARGS, "--log-dir", log_dir,
                            "--sbatch-opt", "comment=two words; $(touch PWNED4)")
    assert code == 0, err
    (script,) = received(stand_in)
    reads = sbatch_reads(script)
    assert f"--output={log_dir}/%j_0_log.out" in reads and f"--error={log_dir}/%j_0_log.err" in reads
    assert "--comment=two words; $(touch PWNED4)" in reads
    assert "--requeue" in reads and "--wckey=submitit" in reads  # directives after the paths were all read
    srun_log = tmp_path / "srun_argv"
    (tmp_path / "bin" / "srun").write_text(f'#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done > {srun_log}\n')
    res = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                         check=False)
    assert res.returncode == 0, res.stderr
    assert not list(tmp_path.glob("PWNED*"))
    argv = srun_log.read_text().splitlines()
    assert argv[argv.index("--output") + 1] == f"{log_dir}/%j_%t_log.out" and argv[-1] == log_dir


# ------------------------------------------------------------------------------------------ 2. dry run == submitted
@pytest.mark.parametrize("extra", [
    ["--log-dir", "{tmp}/my logs/it's", "--sbatch-opt", "comment=two words", "--job-name", "r50", "--mem", "64G"],
    ["--sweep", "optim.lr=0.05,0.1", "--array-parallelism", "1", "--log-dir", "{tmp}/sweep logs"],
    ["--gpus-per-node", "0", "--tasks-per-node", "2", "--signal", "TERM", "--log-dir", "{tmp}/cpu 'job'"],
])
def test_dry_run_prints_exactly_the_submitted_script(capsys, tmp_path, recipe, stand_in, extra):
    extra = [e.format(tmp=tmp_path) for e in extra]
    if "--gpus-per-node" in extra:
        argv = ["--config", recipe, "--partition", "gpu", "--time", "60", *extra]
    else:
        argv = ["--config", recipe, *GPU_ARGS, *extra]
    before = sorted(tmp_path.rglob("*"))
    code, dry, err = run_main(capsys, *argv, "--dry-run")
    assert code == 0, err
    assert sorted(tmp_path.rglob("*")) == before  # the dry run wrote nothing
    code, _, err = run_main(capsys, *argv)
    assert code == 0, err
    (script,) = received(stand_in)
    assert dry[:len(script)] == script  # byte for byte
    assert all(line in ("", "# ") or line.startswith("# ") for line in dry[len(script):].splitlines())  # the plan,
    # commented: the whole output is still the script


# ------------------------------------------------------------------------------------------ 3. ~ expansion
def trainer_path(text: str) -> str:
    """What the trainer makes of a path it is given: os.path.expanduser, then relative to the working directory."""
    return str(Path(os.path.expanduser(text)).absolute())


def test_tilde_is_expanded_as_the_trainer_expands_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "r.yaml").write_text("model:\n  name: resnet20\n")
    args = submit.parse_args(["--config", "~/r.yaml", "output_dir=~/runs/a", "--log-dir", "~/logs",
                              "--gpus-per-node", "0", "--dry-run"])
    plan = submit.make_plan(args)
    assert plan.points[0].argv[:2] == ("--config", str(tmp_path / "r.yaml"))
    assert plan.output_dir == str(tmp_path / "runs" / "a") == trainer_path("~/runs/a")
    assert plan.points[0].argv[-1] == f"output_dir={plan.output_dir}"
    assert plan.log_dir == str(tmp_path / "logs") == trainer_path("~/logs")


def test_an_unknown_users_tilde_stays_as_the_trainer_leaves_it(capsys, tmp_path, monkeypatch, recipe):
    """``~nosuchuser`` is left as it is by os.path.expanduser (pathlib raises instead): no traceback, same path."""
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(capsys, "--config", recipe, *GPU_ARGS, "--dry-run", "output_dir=~nosuchuser_ddp/run",
                              "--log-dir", "~nosuchuser_ddp/logs")
    assert code == 0, err
    assert f"output_dir={trainer_path('~nosuchuser_ddp/run')}" in out
    assert f"{trainer_path('~nosuchuser_ddp/logs')}/%j_0_log.out" in out
    code, _, err = run_main(capsys, "--config", "~nosuchuser_ddp/r.yaml", *GPU_ARGS, "--dry-run")
    assert code == exitcodes.USAGE and "config file not found" in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------------------------------ 4. rendezvous ports
def test_the_old_collision_pair_now_gets_two_ports():
    assert distributed.slurm_port("1234567") != distributed.slurm_port("1334567")  # same last five digits


@pytest.mark.parametrize("base", [1, 1234567, 66_000_000])
def test_ids_closer_than_the_span_never_share_a_port(base):
    ports = {distributed.slurm_port(str(base + k)) for k in range(distributed.PORT_SPAN)}
    assert len(ports) == distributed.PORT_SPAN
    assert min(ports) == distributed.PORT_BASE and max(ports) == distributed.PORT_BASE + distributed.PORT_SPAN - 1
    assert max(ports) < 32768  # below Linux's default ephemeral range: no outgoing connection holds it


def test_only_ids_a_multiple_of_the_span_apart_share_a_port():
    assert distributed.slurm_port("1234567") == distributed.slurm_port(str(1234567 + 5 * distributed.PORT_SPAN))
    assert distributed.slurm_port("1234567") != distributed.slurm_port(str(1234567 + 5 * distributed.PORT_SPAN + 1))


def test_array_tasks_read_their_own_job_ids():
    """Each array task has its own SLURM_JOB_ID (36, 37 for tasks 1, 2 of array 36): their ports differ."""
    env = {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "n1", "SLURM_ARRAY_JOB_ID": "36"}
    one = distributed.read_env({**env, "SLURM_JOB_ID": "36", "SLURM_ARRAY_TASK_ID": "1"})
    two = distributed.read_env({**env, "SLURM_JOB_ID": "37", "SLURM_ARRAY_TASK_ID": "2"})
    assert one.master_port != two.master_port
    assert two.master_port == distributed.slurm_port("37")


def test_ids_that_are_not_plain_numbers_do_not_merge_their_digits():
    assert distributed.slurm_port("36_2") != distributed.slurm_port("362")  # the old digit-stripping merged them
    assert distributed.PORT_BASE <= distributed.slurm_port("36_2") < distributed.PORT_BASE + distributed.PORT_SPAN
    assert distributed.slurm_port("") == distributed.PORT_BASE
