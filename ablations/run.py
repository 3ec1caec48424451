"""Train the runs of an ablation study, resumably and by shards (``manifold-lab sweep STUDY|all``).

Runs only what is missing: finished runs are skipped, partial ones resumed from their checkpoint
(clean restart if that fails), corrupt ones moved to ``RESULTS/<preset>/_quarantine/`` and re-run.
Missing seeds of one configuration are trained together with ``train_seeds`` (one vmapped program)
where that pays: ``--multi-seed auto`` (the default) does so on accelerators and trains the seeds one
after another on a CPU, where the vmapped program was measured slower (0.85x the images/s of
sequential runs on 2 cores, ``benchmarks/README.md``); ``on``/``off`` force either.
``--workers`` trains runs side by side in child processes, each pinned to its own CPU cores
(:mod:`ablations.workers`; by default one per core on a CPU). Every process of a sweep gives XLA:CPU
:data:`~manifold_lab.cpu_threads.SWEEP_THREADS` intra-op thread, whatever ``--workers``: the thread count changes a run's
numbers (:mod:`manifold_lab.cpu_threads`). ``--shard i/N`` runs the i-th of N
contiguous slices of the id-sorted run list (1-based), so a job array covers a sweep exactly once; ``--dry-run`` prints one line per run:
``run_id<TAB>study:variant,...<TAB>overrides<TAB>status``.

``--set KEY=VALUE`` (repeatable) changes the preset: a Preset field (``seeds=3``,
``widths=[0.35,1.0]``) or a training field of every run (``epochs=3``, ``lr=0.05``), the value read
as JSON, else as text; the run ids follow (they hash the configs), so a ``--set`` that changes no
config keeps them. ``--preset-file FILE.py`` takes a user's preset instead of ``--preset``
(:func:`ablations.studies.load_preset_file`). From Python, :func:`run_sweep` does what the command
does (``from ablations import run_sweep``).

Two sweeps may share one results folder (job arrays without ``--shard``, a sweep started twice):
a run's folder is locked by the process training it (:mod:`manifold_lab.train.lock`), and a sweep
passes over, in one line, a run that another live process holds, so every run is trained once.
Ctrl-C and SIGTERM (schedulers, preemption) end the current training step, save a checkpoint and
exit with 130 or 143 (workers included, which also stop when the sweep's process dies); running
the sweep again resumes. Other exit codes: 0 every run done, 1 a run failed, 2 bad arguments.

When the sweep leaves every run of the preset's plan (``all`` at the preset's seed counts) done, it
ends with the measuring step (:mod:`ablations.measure`: the spiral experiment, Fig. 7's statistics,
costs and latency, written to ``RESULTS/<preset>/measurements/``), so that
``python -m ablations.figures`` can render the report; ``--no-measure`` leaves that to a separate
``python -m ablations.measure`` (for example on the machine whose latency should be reported).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from manifold_lab.allocator import reexec_with_allocator
from manifold_lab.atomic import atomic_write_text
from manifold_lab.cli import ArgumentParser, UsageError, command_name, positive_int, run_main, writable_dir
from manifold_lab.cpu_threads import SWEEP_THREADS, fix_intra_op_threads
from manifold_lab.train.lock import RunLock, RunLocked
from ablations import measure
from ablations.cli import add_preset_arguments, check_readable_dir, preset_from_args, sweep_preset
from ablations.plan import (CORRUPT, DONE, MISSING, PARTIAL, Run, adopt_earlier_ids, build_plan,
                            describe_summary, parse_shard, preset_dir, run_status, shard)
from ablations.studies import PRESETS, STUDIES, Preset, get_preset, preset_to_dict
from ablations.workers import WorkerPool, cpu_groups, parse_cpus, pin_to_cpus, stop_with_parent, usable_cpus

Log = Callable[[str], None]
PROG = command_name("sweep", "ablations.run")


def _log(msg: str) -> None:
    print(msg, flush=True)


def quarantine(run_dir: Path, root: Path, log: Log) -> Path:
    """Move a corrupt run directory to ``root/_quarantine/<id>.<n>`` (kept for inspection, never read)."""
    qdir = root / "_quarantine"
    qdir.mkdir(parents=True, exist_ok=True)
    n = 0
    while (target := qdir / f"{run_dir.name}.{n}").exists():
        n += 1
    shutil.move(str(run_dir), str(target))
    log(f"  moved {run_dir.name} aside to {target}")
    return target


class Sweep:
    """Executes a list of runs under ``root`` (``RESULTS/<preset>``), reporting progress through ``log``.

    A run's folder is locked (:mod:`manifold_lab.train.lock`) from the moment its status is read
    until it is trained, so a second sweep on the same results never trains, resumes or quarantines
    a run this one holds: it passes it over in one line (``skipped``), and the run is not failed."""

    def __init__(self, runs: Sequence[Run], root: Path, log: Log = _log, multi_seed: bool = True) -> None:
        self.runs = list(runs)
        self.root = root
        self.log = log
        self.multi_seed = multi_seed
        self.failed: list[tuple[str, str]] = []
        self.skipped: list[str] = []
        self.trained = 0
        self._done = 0

    def _progress(self, run: Run) -> str:
        self._done += 1
        return f"[{self._done}/{len(self.runs)}] {run.run_id} ({run.describe_members()})"

    def _verify(self, run: Run) -> bool:
        status, reason = run_status(self.root / run.run_id, run.expected_config())
        if status != DONE:
            self.failed.append((run.run_id, f"trainer returned but run is {status}: {reason}"))
            self.log(f"  FAILED {run.run_id}: run is {status} after training ({reason})")
            return False
        return True

    def _train_one(self, run: Run, resume: bool) -> None:
        import manifold_lab.train as trainer
        start = time.perf_counter()
        summary = trainer.train(run.train_config(), self.root / run.run_id, resume=resume)
        self.trained += 1
        if self._verify(run):
            self.log(f"  done {run.run_id} in {time.perf_counter() - start:.1f}s: {describe_summary(summary)}")

    def _attempt(self, run: Run, resume: bool) -> None:
        """Train one run; a non-usage failure is recorded and the sweep goes on."""
        try:
            self._train_one(run, resume)
        except (UsageError, KeyboardInterrupt):
            raise
        except Exception as exc:  # one diverged/crashed run must not stop a sweep of many
            self.failed.append((run.run_id, f"{exc.__class__.__name__}: {exc}"))
            self.log(f"  FAILED {run.run_id}: {exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")

    def _train_group(self, group: list[Run], held: contextlib.ExitStack) -> None:
        """Train several missing seeds of one configuration in one multi-seed program."""
        import manifold_lab.train as trainer
        start = time.perf_counter()
        seeds = [r.seed for r in group]
        try:
            summaries = trainer.train_seeds(group[0].train_config(), seeds=seeds,
                                            run_dirs=[self.root / r.run_id for r in group])
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # e.g. a streamed dataset; a real usage error recurs one by one
            self.log(f"  multi-seed training not possible ({exc.__class__.__name__}: {exc}); "
                     "running the seeds one by one")
            for r in group:
                if (run_status(self.root / r.run_id, r.expected_config())[0] == MISSING
                        or self._set_aside(r, held)):
                    self._attempt(r, resume=False)
            return
        self.trained += len(group)
        elapsed = time.perf_counter() - start
        for r, summary in zip(group, summaries):
            if self._verify(r):
                self.log(f"  done {r.run_id} (seed {r.seed}, {len(group)} seeds in {elapsed:.1f}s): "
                         f"{describe_summary(summary)}")

    def _lock(self, run: Run, held: contextlib.ExitStack) -> str | None:
        """Take the lock of ``run``'s folder until ``held`` closes: None, or who else holds it."""
        try:
            held.enter_context(RunLock(self.root / run.run_id, self.log))
        except RunLocked as exc:
            self.skipped.append(run.run_id)
            return str(exc.holder or "another process")
        return None

    def _set_aside(self, run: Run, held: contextlib.ExitStack) -> bool:
        """Quarantine ``run``'s folder (locked) and lock the fresh one in its place; False, said in
        one line, when another process took that first."""
        quarantine(self.root / run.run_id, self.root, self.log)
        holder = self._lock(run, held)
        if holder is not None:
            self.log(f"  {run.run_id}: locked by {holder}, skipped")
        return holder is None

    def _claim(self, run: Run, held: contextlib.ExitStack) -> bool:
        """Lock ``run``'s folder (unless it is done) and do what its status asks: True when it is to
        be trained from scratch; False when it is done, was resumed here, or another process holds it."""
        run_dir = self.root / run.run_id
        status, reason = run_status(run_dir, run.expected_config())
        if status != DONE:
            holder = self._lock(run, held)
            if holder is not None:
                self.log(f"{self._progress(run)}: locked by {holder}, skipped")
                return False
            status, reason = run_status(run_dir, run.expected_config())  # as its last holder left it
        if status == DONE:
            self.log(f"{self._progress(run)}: done, skipped")
            return False
        if status == PARTIAL:
            self.log(f"{self._progress(run)}: partial ({reason}), resuming")
            try:
                self._train_one(run, resume=True)
                return False
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # incl. UsageError (bad checkpoint); a real usage error recurs below
                self.log(f"  resume failed ({exc.__class__.__name__}: {exc}); restarting from scratch")
                status = CORRUPT
        if status == CORRUPT and run_dir.exists():
            self.log(f"  {run.run_id}: corrupt ({reason}), re-running from scratch")
            return self._set_aside(run, held)
        return True

    def execute(self) -> int:
        """Run everything that is not done, one configuration (its seeds) at a time, holding the
        locks of its runs meanwhile; returns the number of failed runs."""
        groups: dict[str, list[Run]] = {}
        for run in self.runs:
            groups.setdefault(run.group_id, []).append(run)
        for group in groups.values():
            with contextlib.ExitStack() as held:
                pending = [run for run in group if self._claim(run, held)]
                if len(pending) >= 2 and self.multi_seed:
                    for r in pending:
                        self.log(f"{self._progress(r)}: training (multi-seed group of {len(pending)})")
                    self._train_group(pending, held)
                    continue
                for r in pending:
                    self.log(f"{self._progress(r)}: training")
                    self._attempt(r, resume=False)
        return len(self.failed)


def use_multi_seed(choice: str) -> bool:
    """``--multi-seed``: ``on``, ``off``, or ``auto`` (vmapped seeds on accelerators only)."""
    if choice == "auto":
        import jax
        return jax.default_backend() != "cpu"
    return choice == "on"


def workers_arg(text: str) -> str | int:
    """argparse type of ``--workers``: ``auto`` or a positive integer."""
    return text if text == "auto" else positive_int(text)


def resolve_workers(choice: str | int, pending: int, multi_seed: str) -> int:
    """``--workers``: ``auto`` (one per usable CPU core on a CPU backend, at most one per pending
    run; 1 on accelerators and with ``--multi-seed on``) or a count, at most the usable cores."""
    cores = len(usable_cpus())
    if choice == "auto":
        import jax
        if multi_seed == "on" or jax.default_backend() != "cpu":
            return 1
        return max(1, min(cores, pending))
    workers = int(choice)
    if multi_seed == "on" and workers > 1:
        raise UsageError("--multi-seed on trains seeds in one process: use it with --workers 1")
    if workers > cores:
        raise UsageError(f"--workers {workers} exceeds the {cores} usable CPU cores")
    return workers


def preset_args(preset: Preset, root: Path) -> list[str]:
    """The flags that give a worker child ``preset``: ``--preset NAME`` for a preset as defined, else
    ``--preset-file`` of the preset written to ``root/_presets/<digest>.json`` (overridden or user
    presets)."""
    data = preset_to_dict(preset)
    if preset.name in PRESETS and preset_to_dict(get_preset(preset.name)) == data:
        return ["--preset", preset.name]
    text = json.dumps(data, sort_keys=True, indent=1)
    path = root / "_presets" / f"{hashlib.sha256(text.encode()).hexdigest()[:12]}.json"
    if not path.exists():
        atomic_write_text(path, text + "\n")
    return ["--preset-file", str(path)]


def child_command(study: str, preset: Preset, out: Path, seeds: int | None, data_dir: str | None
                  ) -> Callable[[Run, Sequence[int]], list[str]]:
    """The command line of a worker child that trains one run pinned to ``cpus`` and stops when
    this process ends (``--worker-of``)."""
    given = preset_args(preset, preset_dir(out, preset))

    def command(run: Run, cpus: Sequence[int]) -> list[str]:
        argv = [sys.executable, "-m", "ablations.run", study, *given,
                "--out", str(out), "--only", run.run_id, "--cpus", ",".join(map(str, cpus)),
                "--workers", "1", "--multi-seed", "off", "--worker-of", str(os.getpid())]
        if seeds is not None:
            argv += ["--seeds", str(seeds)]
        if data_dir is not None:
            argv += ["--data-dir", str(data_dir)]
        return argv
    return command


def build_parser() -> ArgumentParser:
    """The command line of ``python -m ablations.run`` (``manifold-lab sweep``)."""
    parser = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("study", help=f"all, {', '.join(STUDIES)}")
    add_preset_arguments(parser, "quick")
    runs = parser.add_argument_group("which runs")
    runs.add_argument("--seeds", type=positive_int, default=None,
                      help="seeds per variant (default: the preset's; fig7 always uses seed 0)")
    runs.add_argument("--shard", default=None, help="run only shard i of N (1-based), e.g. 2/8")
    runs.add_argument("--only", action="append", default=None, metavar="RUN_ID",
                      help="train only this run (repeatable; ids from --dry-run)")
    runs.add_argument("--dry-run", action="store_true", help="list the runs and their status, train nothing")
    where = parser.add_argument_group("data and results")
    where.add_argument("--out", default="results", help="results folder")
    where.add_argument("--data-dir", default=None, help="dataset folder (imagefolder/cifar presets)")
    where.add_argument("--no-measure", action="store_true",
                       help="do not run the measuring step when the preset's plan is complete")
    layout = parser.add_argument_group("processes")
    layout.add_argument("--workers", type=workers_arg, default="auto",
                        help="runs trained side by side, each in a child process pinned to its own CPU "
                             "cores: auto (one per core on a CPU, 1 on accelerators) or N")
    layout.add_argument("--multi-seed", choices=("auto", "on", "off"), default="auto",
                        help="train a configuration's missing seeds as one vmapped program: auto "
                             "(on accelerators, not on CPU), on, off")
    layout.add_argument("--cpus", default=None, metavar="LIST",
                        help="pin this process to these CPU cores, e.g. 0 or 0-3 (what --workers gives "
                             "its children)")
    layout.add_argument("--worker-of", type=positive_int, default=None, metavar="PID",
                        help="stop (saving a checkpoint, exit code 143) when process PID ends (what "
                             "--workers gives its children)")
    return parser


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """What :func:`run_sweep` did: ``root`` (``OUT/<preset>``), the status of each run of the plan
    afterwards (run id -> done, partial, missing or corrupt), the runs ``trained``, the ``failed``
    ones (run id, reason), the command's ``exit_code`` (0 all done, 1 something failed) and the
    runs ``skipped`` because another process was training them (not failures)."""

    root: Path
    status: dict[str, str]
    trained: int
    failed: list[tuple[str, str]]
    exit_code: int
    skipped: list[str] = dataclasses.field(default_factory=list)


def plan_runs(study: str, preset: Preset, *, seeds: int | None = None, data_dir: str | None = None,
              shard_spec: str | None = None, only: Sequence[str] | None = None) -> list[Run]:
    """The runs of ``study`` at ``preset``, restricted to a shard (``"i/N"``) and to ``only``."""
    runs = build_plan(study, preset, seeds=seeds, data_dir=data_dir)
    if shard_spec is not None:
        runs = shard(runs, *parse_shard(shard_spec))
    if only:
        unknown = sorted(set(only) - {r.run_id for r in runs})
        if unknown:
            raise UsageError(f"--only: no run {unknown[0]!r} in this plan (see --dry-run)")
        runs = [r for r in runs if r.run_id in only]
    return runs


def run_sweep(study: str, preset: str | Preset, out: str | os.PathLike[str] = "results", *,
              workers: int | str = "auto", overrides: Mapping[str, Any] | Sequence[str] | None = None,
              seeds: int | None = None, data_dir: str | None = None, multi_seed: str = "auto",
              shard_spec: str | None = None, only: Sequence[str] | None = None, measure_after: bool = True
              ) -> SweepResult:
    """Train what is missing of ``study`` (``"all"`` or a study name) at ``preset`` (a name or a
    :class:`Preset`, e.g. from :func:`ablations.studies.load_preset_file`) under ``out/<preset>``,
    as ``python -m ablations.run`` does: finished runs skipped, partial ones resumed, corrupt ones
    quarantined; ``workers`` side by side (``"auto"``: one per CPU core on a CPU; children are
    ``python -m ablations.run`` processes), then the measuring step once the preset's whole plan
    is done (``measure_after``). ``overrides``: ``{"epochs": 3, "seeds": 2}`` or ``["epochs=3"]``,
    as ``--set`` (they change the run ids of the runs they change). Usable from a notebook::

        from ablations import run_sweep
        result = run_sweep("fig6a", "quick", "results", overrides={"steps": 100}, workers=2)
        result.status   # {run id: "done", ...}
    """
    preset = sweep_preset(preset, overrides)
    runs = plan_runs(study, preset, seeds=seeds, data_dir=data_dir, shard_spec=shard_spec, only=only)
    out = Path(out)
    check_readable_dir(out, "results folder")
    root = preset_dir(out, preset)
    check_readable_dir(root, "results folder")
    writable_dir(root)
    adopt_earlier_ids(root, runs, _log)
    where = f" (shard {shard_spec})" if shard_spec else ""
    pending = sum(run_status(root / r.run_id, r.expected_config())[0] != DONE for r in runs)
    count = resolve_workers(workers, pending, multi_seed)
    _log(f"{study} --preset {preset.name}{where}: {len(runs)} runs in {root}")
    start = time.perf_counter()
    if count > 1:
        _log(f"{count} workers, one run each at a time")
        sweep: Sweep | WorkerPool = WorkerPool(root, cpu_groups(count, usable_cpus()),
                                               child_command(study, preset, out, seeds, data_dir), _log)
        failed = sweep.execute(runs)
    else:
        sweep = Sweep(runs, root, multi_seed=use_multi_seed(multi_seed))
        failed = sweep.execute()
    status = {r.run_id: run_status(root / r.run_id, r.expected_config())[0] for r in runs}
    skipped = f"; {len(sweep.skipped)} skipped, locked by another process" if sweep.skipped else ""
    _log(f"trained {sweep.trained} runs in {time.perf_counter() - start:.1f}s; "
         f"{sum(s == DONE for s in status.values())} of {len(runs)} complete{skipped}")
    for rid, why in sweep.failed:
        print(f"failed: {rid}: {why}", file=sys.stderr)
    code = 1 if failed else (0 if only or not measure_after else measure_if_complete(out, preset, data_dir))
    return SweepResult(root, status, sweep.trained, list(sweep.failed), code, list(sweep.skipped))


def dry_run(runs: Sequence[Run], preset: Preset, root: Path) -> int:
    """``--dry-run``: one line per run (id, members, overrides, status) and a tally on stderr."""
    counts: dict[str, int] = {}
    for run in runs:
        status, _ = run_status(root / run.run_id, run.expected_config())
        counts[status] = counts.get(status, 0) + 1
        overrides = " ".join(f"{k}={v}" for k, v in sorted(run.overrides(preset).items()))
        print(f"{run.run_id}\t{run.describe_members()}\t{overrides}\t{status}")
    tally = ", ".join(f"{counts[s]} {s}" for s in (DONE, MISSING, PARTIAL, CORRUPT) if s in counts)
    print(f"{len(runs)} runs: {tally or 'none'}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ablations.run``: train what is missing, then measure once the preset's plan is done."""
    args = build_parser().parse_args(argv)
    fix_intra_op_threads(SWEEP_THREADS)  # before JAX starts its CPU client
    if args.worker_of is not None:
        stop_with_parent(args.worker_of)
    if args.cpus is not None:  # before JAX starts its threads
        try:
            pin_to_cpus(parse_cpus(args.cpus))
        except (ValueError, OSError) as exc:
            raise UsageError(f"--cpus {args.cpus!r}: {exc}") from None
    preset = preset_from_args(args)
    if args.dry_run:
        runs = plan_runs(args.study, preset, seeds=args.seeds, data_dir=args.data_dir,
                         shard_spec=args.shard, only=args.only)
        out = Path(args.out)
        check_readable_dir(out, "results folder")
        check_readable_dir(preset_dir(out, preset), "results folder")
        return dry_run(runs, preset, preset_dir(out, preset))
    result = run_sweep(args.study, preset, args.out, workers=args.workers, seeds=args.seeds,
                       data_dir=args.data_dir, multi_seed=args.multi_seed, shard_spec=args.shard,
                       only=args.only, measure_after=not args.no_measure)
    return result.exit_code


def measure_if_complete(out: Path, preset: Preset, data_dir: str | None) -> int:
    """The measuring step, once every run of the preset's plan is done (the last shard or sweep to
    finish runs it); returns the exit code: 0, or 1 when something could not be measured."""
    root = preset_dir(out, preset)
    plan = build_plan("all", preset, data_dir=data_dir)
    pending = sum(run_status(root / r.run_id, r.expected_config())[0] != DONE for r in plan)
    if pending:
        _log(f"{pending} of {len(plan)} runs of preset {preset.name} not done yet: not measuring "
             f"(python -m ablations.measure --preset {preset.name} --results {out} measures what is there)")
        return 0
    _log(f"every run of preset {preset.name} is done: measuring")
    try:
        problems = measure.measure_preset(out, preset, data_dir=data_dir, log=_log)
    except UsageError as exc:
        problems = [f"measuring failed: {str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__}"]
    for line in problems:
        print(line, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    reexec_with_allocator()  # jemalloc or huge pages under XLA's buffers (manifold_lab/allocator.py)
    raise SystemExit(run_main(main, prog=PROG))
