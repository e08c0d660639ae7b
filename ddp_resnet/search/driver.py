"""The search's loop: ask the study for trials, run at most ``--parallel`` at once, tell it how each ended.

Trial number n (Optuna's, from 0) trains in ``DIR/trials/NNNN`` and nowhere else, so a trial is found again from
the study alone. Its parameters live in the study (set when it was asked for), its directory and launch record
in its user attributes. Starting the same command again continues the study:

* finished trials (COMPLETE, PRUNED, FAIL) are kept and never run again;
* a trial still RUNNING in the study (its driver was stopped or killed) is the same trial object again: its
  parameters are read back (any the killed driver had not drawn yet are drawn now), and it is started again in
  its own directory, where ``ckpt.resume=auto`` continues it exactly from its newest checkpoint. A trial that
  its pruner had already stopped (user attribute ``pruned_epoch``) is recorded PRUNED without running; a SLURM
  job still queued or running is re-attached;
* new trials are asked for only while the study holds fewer than ``--trials``, so the count stays exact.

SIGTERM or Ctrl-C: each running trial gets SIGTERM (SLURM: ``scancel``), checkpoints at its next step and stops;
the search waits for them, writes its tables and exits 75. A second signal kills them at once (exit 130; they
resume from their newest checkpoint). A search killed outright takes its local trials with it (the kernel sends
each SIGTERM: they checkpoint as above); the next start waits until each has let go of its directory.
"""
from __future__ import annotations

import signal
import time

from ddp_resnet import exitcodes, rundir
from ddp_resnet.rundir import format_duration
from ddp_resnet.search import results
from ddp_resnet.search import study as study_mod
from ddp_resnet.search.launch import Launch, LocalRunner, SlurmRunner
from ddp_resnet.search.trial import TRIAL_FILE, trial_dir, write_json

SEARCH_FILE = "search.json"  # the search's definition (a later start must match it)
MAX_RESTARTS = 3  # a trial that stops by itself (or whose SLURM job vanishes) is started again at most this often


def say(message: str) -> None:
    """A line on stdout, at once (a log file or pipe shows each trial as it ends)."""
    print(message, flush=True)


def suggest(trial, param, grid: bool):
    """The trial's value of ``param``: drawn by the sampler, or the one it already has (a resumed trial)."""
    if grid or param.kind == "choice":
        return trial.suggest_categorical(param.key, param.grid())
    if param.integer:
        return trial.suggest_int(param.key, int(param.low), int(param.high), step=int(param.step or 1),
                                 log=param.kind == "log")
    return trial.suggest_float(param.key, param.low, param.high, step=param.step, log=param.kind == "log")


class Search:
    """One run of the search command over ``spec`` (a ``cli.SearchSpec``)."""

    def __init__(self, spec, say=say):
        self.spec, self.say = spec, say
        self.runner = SlurmRunner(spec, say) if spec.slurm_args is not None else LocalRunner(spec, say)
        self.poll_s = 3.0 if spec.slurm_args is not None else 0.5
        self.running: list[Launch] = []
        self.pending: list[int] = []  # RUNNING trials of an earlier search, to start again
        self.signals, self.stopping, self.refused, self.finished_here = 0, False, False, 0
        self.start = time.time()
        self.study = self.store = None
        self.plot_note_shown = False

    def run(self) -> int:
        """Lock DIR, open the study, run the loop; returns the exit code."""
        with rundir.RunLock(self.spec.out):
            previous = {sig: signal.signal(sig, self._signal) for sig in (signal.SIGTERM, signal.SIGINT)}
            try:
                self._open()
                code = self._loop()
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
            rows = self._write()
            self._final_line(rows, code)
            return code

    def _signal(self, signum, frame) -> None:
        self.signals += 1
        if self.signals == 1:
            self.say(f"search: {signal.Signals(signum).name}: stopping the running trials (each writes a "
                     f"checkpoint); run the same command again to continue")
        else:
            self.say("search: a second signal: ending the running trials at once (they resume from their newest "
                     "checkpoint)")
            self.runner.stop(self.running, now=True)

    def _open(self) -> None:
        spec = self.spec
        if not (spec.out / SEARCH_FILE).is_file():
            write_json(spec.out / SEARCH_FILE, spec.fingerprint())
        self.store = study_mod.storage(spec.out / study_mod.JOURNAL)
        self.study = study_mod.open_study(self.store, spec.direction,
                                          study_mod.make_sampler(spec.sampler, spec.params, spec.seed),
                                          study_mod.make_pruner(spec.pruner_info), create=True)
        trials = self.study.get_trials(deepcopy=False)
        if not trials:
            for point in spec.enqueue:
                self.study.enqueue_trial(point)
        self.pending = [t.number for t in trials if t.state.name == "RUNNING"]
        done = sum(t.state.is_finished() for t in trials)
        again = f"; {len(self.pending)} trial(s) that were running continue from their checkpoints" if self.pending \
            else ""
        self.say(f"search: {spec.out}: {done}/{spec.trials} trials finished{again}")

    def _created(self) -> int:
        return sum(t.state.name != "WAITING" for t in self.study.get_trials(deepcopy=False))

    def _frozen(self, number: int):
        return self.store.get_trial(study_mod.trial_id(self.store, number))

    def _loop(self) -> int:
        while True:
            if self.signals and not self.stopping:
                self.stopping = True
                self.runner.stop(self.running)
            if not self.stopping:
                self._fill()
            for launch, result in self.runner.poll(self.running):
                self.running.remove(launch)
                self._ended(launch, result)
            if not self.running and (self.stopping or (not self.pending and self._created() >= self.spec.trials)):
                break
            time.sleep(self.poll_s)
        if self.refused:
            return exitcodes.USAGE
        if self.stopping:
            return exitcodes.INTERRUPTED if self.signals > 1 else exitcodes.STOPPED
        complete = any(t.state.name == "COMPLETE" for t in self.study.get_trials(deepcopy=False))
        return exitcodes.OK if complete else exitcodes.FAILED

    def _fill(self) -> None:
        free, batch = self.spec.parallel - len(self.running), []
        while free > len(batch) and self.pending:
            launch = self._reattach(self.pending.pop(0))
            batch += [launch] if launch is not None else []
        while free > len(batch) and self._created() < self.spec.trials:
            batch.append(self._launch(self.study.ask()))
        if batch:
            self.runner.start(batch)
            self.running += batch

    def _reattach(self, number: int) -> Launch | None:
        frozen = self._frozen(number)
        if frozen.state.name != "RUNNING":
            return None
        trial = study_mod.trial_handle(self.study, self.store, number)
        if frozen.user_attrs.get("pruned_epoch") is not None:  # pruned, killed before it was recorded
            self._tell(trial, number, "pruned", "")
            return None
        launch = self._launch(trial)
        job = frozen.user_attrs.get("slurm_job", "")
        launch.job_id = job if job and job != frozen.user_attrs.get("cancelled_job") else ""
        return launch

    def _launch(self, trial) -> Launch:
        """The trial's parameters, directory, trial file and trainer overrides (nothing started yet)."""
        spec, number = self.spec, trial.number
        params = {p.key: suggest(trial, p, spec.sampler == "grid") for p in spec.params}
        folder = trial_dir(spec.out, number)
        overrides = spec.train_overrides(folder, [p.override(params[p.key]) for p in spec.params])
        write_json(folder / TRIAL_FILE, {
            "journal": str(spec.out / study_mod.JOURNAL), "study": study_mod.STUDY_NAME, "number": number,
            "metric": spec.metric, "direction": spec.direction, "pruner": spec.pruner_info, "params": params,
            "dir": str(folder)})
        if "dir" not in trial.user_attrs:
            trial.set_user_attr("dir", str(folder))
        trial.set_user_attr("launched_at", time.time())
        return Launch(number, trial, folder, overrides)

    def _ended(self, launch: Launch, result) -> None:
        kind, reason = self.runner.classify(launch, result, self.stopping)
        frozen = self._frozen(launch.number)
        launch.trial.set_user_attr("wall_s", round(float(frozen.user_attrs.get("wall_s", 0.0)) + time.time()
                                                   - launch.started, 1))
        launch.trial.set_user_attr("launched_at", None)
        if frozen.user_attrs.get("pruned_epoch") is not None:
            kind = "pruned"
        if kind == "refused":
            kind = self._refused(launch.number, reason)
        if kind == "again":
            restarts = int(frozen.user_attrs.get("restarts", 0)) + 1
            if self.stopping:
                kind = "stopped"
            elif restarts <= MAX_RESTARTS:
                launch.trial.set_user_attr("restarts", restarts)
                self.say(f"trial {launch.number}: {reason}; starting it again (it resumes from its checkpoint)")
                self.pending.append(launch.number)
                return
            else:
                kind, reason = "failed", f"{reason}; given up after {MAX_RESTARTS} restarts"
        if kind != "stopped":
            self._tell(launch.trial, launch.number, kind, reason)

    def _refused(self, number: int, reason: str) -> str:
        """A trainer that refused to start (exit 2) before any trial completed: the recipe, data or environment is
        wrong for every trial, so the search stops (exit 2) and the trial stays RUNNING for the next start; after
        a completed trial it is this trial's own failure."""
        if any(t.state.name == "COMPLETE" for t in self.study.get_trials(deepcopy=False)):
            return "failed"
        self.say(f"search: trial {number} refused to start: {reason}; stopping the search (fix it and run the same "
                 f"command again: the trial starts again)")
        self.refused, self.stopping = True, True
        self.runner.stop(self.running)
        return "stopped"

    def _tell(self, trial, number: int, kind: str, reason: str) -> None:
        """Record how the trial ended (exactly once), rewrite the results, print the progress line."""
        spec, state = self.spec, study_mod.require_optuna().trial.TrialState
        value = None
        if kind == "finished":
            best = results.best_of(results.read_history(spec.out, number, spec.metric)[0],
                                   spec.direction == "maximize")
            value = best[1] if best else None
            if value is None:
                kind, reason = "failed", f"no {spec.metric} in its {rundir.METRICS}"
        if reason:
            trial.set_user_attr("note", reason)
        if kind == "finished":
            self.study.tell(number, value, skip_if_finished=True)
        else:
            self.study.tell(number, state=state.PRUNED if kind == "pruned" else state.FAIL, skip_if_finished=True)
        self.finished_here += 1
        rows = self._write()
        done = sum(r.state in ("COMPLETE", "PRUNED", "FAIL") for r in rows)
        complete = [r for r in rows if r.state == "COMPLETE" and r.best is not None]
        pick = max if spec.direction == "maximize" else min
        best_row = pick(complete, key=lambda r: r.best) if complete else None
        self.say(results.progress_line(rows[number], done, spec.trials, best_row, spec.metric,
                                       time.time() - self.start, self.finished_here))

    def _write(self) -> list:
        rows, note = results.write_all(self.study, self.spec, time.time())
        if note and not self.plot_note_shown:
            self.say(note)
            self.plot_note_shown = True
        return rows

    def _final_line(self, rows: list, code: int) -> None:
        spec = self.spec
        counts = ", ".join(f"{sum(r.state == s for r in rows)} {s.lower()}" for s in ("COMPLETE", "PRUNED", "FAIL"))
        elapsed = format_duration(time.time() - self.start)
        if self.refused:
            self.say(f"search stopped after {elapsed}: {counts}; a trial refused to start (above): fix it and run the "
                     f"same command again (exit {code})")
            return
        if code in (exitcodes.STOPPED, exitcodes.INTERRUPTED):
            left = sum(r.state == "RUNNING" for r in rows)
            self.say(f"search stopped after {elapsed}: {counts}; {left} trial(s) stopped with their checkpoints; run "
                     f"the same command again to continue (exit {code})")
            return
        best = results.best_trial(self.study)
        where = (f"; best trial {best.number}: {spec.metric} {best.value:.4g}; train it: python -m ddp_resnet.train "
                 f"--config {spec.out / 'best.yaml'}") if best is not None else "; no trial completed"
        self.say(f"search done in {elapsed}: {len(rows)} trials ({counts}){where}; table: {spec.out / 'search.md'}")
