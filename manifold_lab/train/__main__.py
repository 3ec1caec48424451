"""Train MobileNetV2 (or V1) with the paper's recipe (``manifold-lab train``).

Defaults are the paper's where it has one (RMSProp 0.9/0.9, lr 0.045 x 0.98 per epoch, weight decay
4e-5, batch 96) and Fashion-MNIST otherwise. Examples::

    python -m manifold_lab.train --width 0.35 --steps 200 --out runs/fmnist-0.35
    python -m manifold_lab.train --out runs/fmnist-0.35 --resume        # continue (same config)
    python -m manifold_lab.train --out runs/fmnist-0.35 --resume --steps 400   # extend (staircase)
    python -m manifold_lab.train --init-from runs/fmnist-0.35 --lr 0.01 --out runs/fmnist-0.35-ft
    python -m manifold_lab.train --dataset digits --seeds 3 --out runs/digits   # runs/digits/seed_<s>

Exit codes: 0 done; 2 bad flags, missing or corrupt data, a run directory that does not fit, or one
that another process is training (its lock, ``RUN_DIR/.lock``, names that process's pid and host;
one line on stderr); 3 training diverged (non-finite loss, weights or statistics; the newest
checkpoint is the last finite state); 130 interrupted by Ctrl-C, 143 by SIGTERM (what schedulers and
preemptible machines send): the current step ends, a checkpoint is saved and ``--resume`` continues exactly.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from manifold_lab.allocator import reexec_with_allocator
from manifold_lab.cli import ArgumentParser, command_name, nonnegative_int, number, positive_int, run_main
from manifold_lab.options import add_arguments, argument_groups
from manifold_lab.train import sharding
from manifold_lab.train.checkpoint import DEFAULT_KEEP
from manifold_lab.train.config import SEED_COUNT, TrainConfig
from manifold_lab.train.loop import EXIT_DIVERGED, TrainingDiverged, parse_init_from, train
from manifold_lab.train.multiseed import train_seeds
from manifold_lab.train.run_dir import RunDir, read_json

PROG = command_name("train", "manifold_lab.train")

#: Help sections, in the order ``--help`` shows them; every TrainConfig field names its own.
GROUPS: dict[str, str] = {
    "model": "model", "data": "data", "optimisation": "optimisation", "schedule": "schedule",
    "run": "run", "distributed": "distributed (multi-host: jax.distributed)"}
#: Fields given by one of two exclusive flags.
_LENGTH_FIELDS = ("epochs", "steps")


def build_parser() -> ArgumentParser:
    """The command-line parser, generated from the TrainConfig fields (flags left unset are absent
    from the namespace, so a saved or ``--config`` file fills them)."""
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                            argument_default=argparse.SUPPRESS)
    groups = argument_groups(parser, GROUPS)
    length = groups["schedule"].add_mutually_exclusive_group()
    fields = sorted(dataclasses.fields(TrainConfig), key=lambda f: f.name != "model")  # --model first
    add_arguments(groups, [f for f in fields if f.name not in _LENGTH_FIELDS], number=number,
                  integer=positive_int)
    add_arguments({"schedule": length}, [f for f in fields if f.name in _LENGTH_FIELDS], number=number,
                  integer=positive_int)
    run, dist = groups["run"], groups["distributed"]
    run.add_argument("--config", type=Path, default=None, help="start from this config.json (flags override it)")
    run.add_argument("--seeds", type=SEED_COUNT, default=None, metavar="K",
                     help="train seeds SEED..SEED+K-1 in one vmapped program, in OUT/seed_<s>")
    run.add_argument("--out", type=Path, required=True, metavar="RUN_DIR", help="run directory")
    run.add_argument("--resume", action="store_true", default=False,
                     help="continue from the newest checkpoint; with a larger --steps/--epochs, extend the run "
                          "(staircase schedule only)")
    run.add_argument("--init-from", default=None, metavar="RUN_DIR[:STEP]",
                     help="start a new run from another run's weights and BatchNorm statistics (its newest "
                          "checkpoint or STEP), with a fresh optimiser at step 0")
    run.add_argument("--keep", type=positive_int, default=DEFAULT_KEEP, metavar="N",
                     help=f"checkpoints kept per run (default: {DEFAULT_KEEP})")
    run.add_argument("--tensorboard", action="store_true", default=False,
                     help="also write TensorBoard event files to RUN_DIR/tensorboard (needs tensorboardX)")
    run.add_argument("--quiet", action="store_true", default=False, help="no progress output")
    dist.add_argument("--coordinator-address", default=None, help="the coordinator's host:port")
    dist.add_argument("--num-processes", type=positive_int, default=None, help="number of processes")
    dist.add_argument("--process-id", type=nonnegative_int, default=None, help="this process's index")
    return parser


def resolve_config(args: argparse.Namespace) -> tuple[TrainConfig, list[int] | None, list[Path]]:
    """The config, the seeds of a multi-seed run (None for one run) and the run directories.
    Precedence: flags, then ``--config``, then (with ``--resume``) the run's saved config or (with
    ``--init-from``) the source run's config, then defaults."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    seeds_k = args.seeds
    base: dict[str, Any] = {}
    if args.config is not None:
        base = TrainConfig.from_dict(read_json(args.config, "config file")).to_dict()
    first_seed = given.get("seed", base.get("seed", 0))
    dirs = [args.out] if seeds_k is None else [args.out / f"seed_{first_seed + i}" for i in range(seeds_k)]
    saved = RunDir(dirs[0])
    if args.resume and not base and saved.config_path.exists():
        base = saved.train_config().to_dict()
    elif args.init_from is not None and not base:  # the source run's architecture and recipe
        base = RunDir(parse_init_from(args.init_from)[0]).train_config().to_dict()
    if "steps" in given:
        base.pop("epochs", None)
    elif "epochs" in given:
        base["steps"] = None
    cfg = TrainConfig.from_dict({**base, **given, "seed": first_seed})
    seeds = None if seeds_k is None else [first_seed + i for i in range(seeds_k)]
    return cfg, seeds, dirs


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, train, print the result; returns the exit code."""
    args = build_parser().parse_args(argv)
    cfg, seeds, dirs = resolve_config(args)
    sharding.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    verbose = not args.quiet
    try:
        options = dict(resume=args.resume, verbose=verbose, keep=args.keep, init_from=args.init_from,
                       tensorboard=args.tensorboard)
        if seeds is None:
            summaries = [train(cfg, dirs[0], **options)]
        else:
            summaries = train_seeds(cfg, seeds, dirs, **options)
    except TrainingDiverged as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    for directory, summary in zip(dirs, summaries or []):
        print(f"{directory}: test accuracy {summary['final_test_accuracy']:.4f}, test loss "
              f"{summary['final_test_loss']:.4f}, {summary['steps']} steps, "
              f"{summary['train_images_per_second']:.0f} img/s, {summary['wall_time_s']:.0f} s")
    return 0


if __name__ == "__main__":
    reexec_with_allocator()  # jemalloc or huge pages under XLA's buffers (manifold_lab/allocator.py)
    raise SystemExit(run_main(main, prog=PROG))
