"""Runs of a sweep side by side: one child process per run, each pinned to its own CPU cores.

On a CPU, XLA's intra-op threads barely speed up the small networks of the CPU presets: the
Fashion-MNIST baseline's training step took 50 ms on 2 threads and 48 ms on one core, so two runs
side by side, one per core, train about twice the images per second of one run on both cores
(``benchmarks/README.md``, "Sweep workers"). :class:`WorkerPool` starts the costliest runs first
(multiply-adds x training length, from the cost model) and hands each freed core the next run. A
child is ``python -m ablations.run ... --only RUN_ID --cpus LIST``: the same resume, quarantine
and verification logic as a sequential sweep, its output in ``RESULTS/<preset>/_logs/<run id>.log``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from manifold_lab.cli import UsageError
from manifold_lab.train.run_dir import RunDir
from ablations.plan import DONE, Run, describe_summary, run_status

Log = Callable[[str], None]
Command = Callable[[Run, Sequence[int]], list[str]]


def usable_cpus() -> list[int]:
    """The CPU cores this process may run on, sorted."""
    return sorted(os.sched_getaffinity(0))


def parse_cpus(text: str) -> list[int]:
    """``"0,2-3"`` -> ``[0, 2, 3]`` (ValueError on anything else, or an empty list)."""
    cpus: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        first, last = int(lo), int(hi or lo)
        if first < 0 or last < first:
            raise ValueError(f"bad CPU range {part!r}")
        cpus.update(range(first, last + 1))
    if not cpus:
        raise ValueError("no CPUs given")
    return sorted(cpus)


def pin_to_cpus(cpus: Sequence[int]) -> None:
    """Restrict this process to ``cpus``. Call it before JAX creates its CPU client: threads
    started afterwards (XLA's pool is sized from the affinity) inherit the mask."""
    os.sched_setaffinity(0, set(cpus))


def cpu_groups(workers: int, cpus: Sequence[int]) -> list[list[int]]:
    """``cpus`` cut into ``workers`` contiguous groups whose sizes differ by at most one."""
    if not 1 <= workers <= len(cpus):
        raise ValueError(f"cannot split {len(cpus)} CPUs among {workers} workers")
    size, extra = divmod(len(cpus), workers)
    groups, start = [], 0
    for i in range(workers):
        end = start + size + (1 if i < extra else 0)
        groups.append(list(cpus[start:end]))
        start = end
    return groups


def run_cost(run: Run) -> float:
    """Relative training cost of ``run``: multiply-adds per image x epochs (or steps). Only
    comparable between runs of one preset, which is what ordering them needs."""
    from manifold_lab.costs.analytic import model_costs
    from manifold_lab.train.network import model_config_for
    cfg = run.train_config().resolved()
    macs = model_costs(model_config_for(cfg, num_classes=10, in_channels=1), cfg.image_size or 32).madds
    return float(macs) * float(cfg.steps or cfg.epochs)


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


class WorkerPool:
    """Trains ``runs`` through child processes built by ``command(run, cpus)``, one per CPU group.

    ``root`` is the preset's results folder: a run counts as done when its folder verifies
    there afterwards (:func:`ablations.plan.run_status`), whatever the child's exit code said."""

    def __init__(self, root: Path, groups: Sequence[Sequence[int]], command: Command,
                 log: Log, cost: Callable[[Run], float] = run_cost, poll_s: float = 0.5,
                 grace_s: float = 30.0) -> None:
        self.root = root
        self.groups = [list(g) for g in groups]
        self.command = command
        self.log = log
        self.cost = cost
        self.poll_s = poll_s
        self.grace_s = grace_s
        self.failed: list[tuple[str, str]] = []
        self.trained = 0

    def log_path(self, run: Run) -> Path:
        return self.root / "_logs" / f"{run.run_id}.log"

    def execute(self, runs: Sequence[Run]) -> int:
        """Train every run of ``runs`` that is not done; returns the number of failed runs."""
        total, done = len(runs), 0
        pending: list[Run] = []
        for run in runs:
            if run_status(self.root / run.run_id, run.expected_config())[0] == DONE:
                done += 1
                self.log(f"[{done}/{total}] {run.run_id} ({run.describe_members()}): done, skipped")
            else:
                pending.append(run)
        queue = sorted(pending, key=self.cost, reverse=True)  # longest first: the last to end is short
        free = list(self.groups)
        active: dict[subprocess.Popen, tuple[Run, list[int], float]] = {}
        (self.root / "_logs").mkdir(parents=True, exist_ok=True)
        try:
            while queue or active:
                while queue and free:
                    run, cpus = queue.pop(0), free.pop(0)
                    done += 1
                    self.log(f"[{done}/{total}] {run.run_id} ({run.describe_members()}): training on "
                             f"CPU {','.join(map(str, cpus))} (log {self.log_path(run)})")
                    with open(self.log_path(run), "ab") as out:
                        child = subprocess.Popen(self.command(run, cpus), stdout=out,
                                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                    active[child] = (run, cpus, time.perf_counter())
                time.sleep(self.poll_s)
                for child in [c for c in active if c.poll() is not None]:
                    run, cpus, start = active.pop(child)
                    free.append(cpus)
                    self._finish(run, child.returncode, time.perf_counter() - start)
        except KeyboardInterrupt:
            self._interrupt(active)
            raise
        return len(self.failed)

    def _finish(self, run: Run, code: int, elapsed: float) -> None:
        self.trained += 1
        status, reason = run_status(self.root / run.run_id, run.expected_config())
        if status == DONE:
            try:
                summary = RunDir(self.root / run.run_id).summary()
            except UsageError:
                summary = None
            self.log(f"  done {run.run_id} in {elapsed:.1f}s: {describe_summary(summary)}")
            return
        why = _last_line(self.log_path(run)) or f"run is {status}: {reason}"
        self.failed.append((run.run_id, f"exit code {code}: {why}"))
        self.log(f"  FAILED {run.run_id} (exit code {code}): {why}")

    def _interrupt(self, active: dict[subprocess.Popen, tuple[Run, list[int], float]]) -> None:
        """Ctrl-C: the children (same process group) got it too and save a checkpoint; wait for
        them, and pass it on to any still running after ``grace_s`` (the parent alone was
        signalled), never twice to one that is saving."""
        deadline = time.monotonic() + self.grace_s
        for child in active:
            try:
                child.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.send_signal(signal.SIGINT)
        for child in active:
            child.wait()
