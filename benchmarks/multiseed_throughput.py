"""Benchmark: k seeds of one configuration in one vmapped program (``train_seeds``), one after another
(``train``), and side by side in one process per core share, each pinned to its cores (what
``python -m ablations.run --workers`` does), through the real training engine on Fashion-MNIST.

Each mode runs in a fresh subprocess (so each pays its own compilation, as a separate job would),
``--repeats`` times. Reported per mode: wall time of the whole job (process start to summary, compile
included) and the steady-state throughput over all seeds, read from the runs' ``metrics.jsonl``
(images between the first and the second-to-last log line divided by the time between them, so
compilation, the first interval and the final evaluation are excluded; for side-by-side processes,
the sum of their rates). Ratios are against sequential (above 1: faster). Medians of the repeats, with
the spread. The script re-executes itself under the project's allocator first
(:mod:`manifold_lab.allocator`), so every mode runs with it.

    .venv/bin/python benchmarks/multiseed_throughput.py [--seeds 3] [--steps 300] [--width 0.35]
        [--layout imagenet] [--batch-size 96] [--repeats 2] [--json PATH]
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from ablations.workers import cpu_groups, usable_cpus
from manifold_lab.allocator import reexec_with_allocator
from manifold_lab.atomic import atomic_write_json
from manifold_lab.cli import ArgumentParser, positive_int, run_main
from manifold_lab.models.config import LAYOUTS

REPO = Path(__file__).resolve().parents[1]


def _train_flags(args) -> list[str]:
    return ["--dataset", "fashion_mnist", "--width", str(args.width), "--layout", args.layout,
            "--bn-decay", "0.99", "--no-augment", "--batch-size", str(args.batch_size),
            "--steps", str(args.steps), "--log-every", str(args.log_every),
            "--eval-every", str(10 * args.steps), "--checkpoint-every", str(10 * args.steps), "--quiet"]


def _steady_images_per_second(run_dirs: list[Path], batch: int) -> float:
    """Images/s over all seeds between the first and the second-to-last log line of each run (summed rates of
    runs that overlap in time, i.e. one vmapped program; for sequential runs use the mean)."""
    rates = []
    for d in run_dirs:
        recs = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        first, last = recs[0], recs[-2]  # the last line's interval includes the final evaluation
        rates.append((last["step"] - first["step"]) * batch / (last["elapsed_s"] - first["elapsed_s"]))
    return sum(rates)


def _run(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - start


def _sequential_code(seeds: list[int], out: Path, cpus: list[int] | None) -> str:
    """A process training ``seeds`` one after another (pinned to ``cpus`` first, when given)."""
    pin = f"import os; os.sched_setaffinity(0, {set(cpus)!r})\n" if cpus else ""
    return (pin + "import sys; from manifold_lab.train.__main__ import main\n"
            "flags = sys.argv[1:]\n"
            f"for s in {seeds!r}:\n"
            f"    main(flags + ['--seed', str(s), '--out', r'{out}/seed_' + str(s)])\n")


def measure(args, mode: str, workdir: Path) -> tuple[float, float]:
    """``(wall seconds, steady images/s over all seeds)`` of one job in ``mode``."""
    flags = _train_flags(args)
    seeds = list(range(args.seeds))
    if mode == "multi":
        out = workdir / "multi"
        wall = _run([sys.executable, "-m", "manifold_lab.train", *flags, "--seeds", str(args.seeds),
                     "--out", str(out)])
        return wall, _steady_images_per_second([out / f"seed_{s}" for s in seeds], args.batch_size)
    if mode == "workers":  # one process per core share, the seeds dealt out among them
        groups = cpu_groups(min(args.seeds, len(usable_cpus())), usable_cpus())
        start = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-c", _sequential_code(seeds[i::len(groups)], workdir / "w", g),
                                   *flags], cwd=REPO, stdout=subprocess.DEVNULL)
                 for i, g in enumerate(groups)]
        if any(p.wait() for p in procs):
            raise RuntimeError("a worker process failed")
        wall = time.perf_counter() - start
        rate = sum(_steady_images_per_second([workdir / "w" / f"seed_{s}" for s in seeds[i::len(groups)]],
                                             args.batch_size) / len(seeds[i::len(groups)])
                   for i in range(len(groups)))
        return wall, rate
    # sequential: one process trains the seeds one after another (one compilation, like a sweep)
    wall = _run([sys.executable, "-c", _sequential_code(seeds, workdir / "seq", None), *flags])
    rate = _steady_images_per_second([workdir / "seq" / f"seed_{s}" for s in seeds], args.batch_size)
    return wall, rate / args.seeds  # one run at a time: the mean rate of the runs


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="benchmarks/multiseed_throughput.py", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=positive_int, default=3)
    parser.add_argument("--steps", type=positive_int, default=300, help="per run (at least 3 log lines)")
    parser.add_argument("--log-every", type=positive_int, default=50)
    parser.add_argument("--width", type=float, default=0.35)
    parser.add_argument("--layout", choices=LAYOUTS, default="imagenet", help="stride layout (default imagenet)")
    parser.add_argument("--batch-size", type=positive_int, default=96)
    parser.add_argument("--repeats", type=positive_int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = parser.parse_args(argv)

    modes = ("sequential", "multi", "workers")
    results: dict[str, dict[str, list[float]]] = {m: {"wall": [], "ips": []} for m in modes}
    for r in range(args.repeats):
        for mode in modes:
            with tempfile.TemporaryDirectory() as tmp:
                wall, ips = measure(args, mode, Path(tmp))
            results[mode]["wall"].append(wall)
            results[mode]["ips"].append(ips)
            load = os.getloadavg()[0]
            print(f"repeat {r + 1}/{args.repeats} {mode}: {wall:.1f}s, {ips:.0f} img/s (load {load:.1f})",
                  flush=True)

    med = {m: {k: statistics.median(v) for k, v in d.items()} for m, d in results.items()}
    print(f"\n{args.seeds} seeds x {args.steps} steps, width {args.width}, layout {args.layout}, "
          f"batch {args.batch_size} per seed, "
          f"{platform.machine()} {os.cpu_count()} cores; median (min-max) of {args.repeats}")
    print("| mode | job wall s (compile incl.) | steady img/s, all seeds | ratio vs sequential |")
    print("|---|---|---|---|")
    workers = min(args.seeds, len(usable_cpus()))
    for mode, label in (("sequential", f"{args.seeds} runs one after another"),
                        ("multi", f"{args.seeds} seeds, one vmapped program"),
                        ("workers", f"{workers} pinned processes side by side")):
        w, i = results[mode]["wall"], results[mode]["ips"]
        ratio = med["sequential"]["wall"] / med[mode]["wall"]
        print(f"| {label} | {med[mode]['wall']:.1f} ({min(w):.1f}-{max(w):.1f}) | "
              f"{med[mode]['ips']:.0f} ({min(i):.0f}-{max(i):.0f}) | "
              f"{ratio:.2f}x wall, {med[mode]['ips'] / med['sequential']['ips']:.2f}x img/s |")
    if args.json:
        atomic_write_json(args.json, {"args": vars(args) | {"json": str(args.json)}, "results": results,
                                      "median": med})
    return 0


if __name__ == "__main__":
    reexec_with_allocator()  # both modes' subprocesses inherit the allocator setting
    raise SystemExit(run_main(main, prog="benchmarks/multiseed_throughput.py"))
