"""``python -m manifold_lab.train``: train MobileNetV2 (or V1) with the paper's recipe.

Defaults are the paper's where it has one (RMSProp 0.9/0.9, lr 0.045 x 0.98 per epoch, weight decay
4e-5, batch 96) and Fashion-MNIST otherwise. Examples::

    python -m manifold_lab.train --width 0.35 --steps 200 --out runs/fmnist-0.35
    python -m manifold_lab.train --out runs/fmnist-0.35 --resume        # continue (same config)
    python -m manifold_lab.train --dataset digits --seeds 3 --out runs/digits   # runs/digits/seed_<s>

Exit codes: 0 done; 2 bad flags, missing or corrupt data, or a run directory that does not fit
(one line on stderr); 3 training diverged (non-finite loss; the newest checkpoint is the last
finite state); 130 interrupted by Ctrl-C (a checkpoint was saved first; ``--resume`` continues).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from manifold_lab.allocator import reexec_with_allocator
from manifold_lab.cli import ArgumentParser, nonnegative_int, number, positive_int, run_main
from manifold_lab.models.config import (BOTTLENECK_ACTIVATIONS, DEPTHWISE_IMPLS, PADDINGS, PRESETS,
                                        RESIDUAL_PLACEMENTS)
from manifold_lab.train import sharding
from manifold_lab.train.config import (COMPUTE_DTYPES, EVAL_BN_CHOICES, LR_SCHEDULES, MODEL_NAMES, OPTIMIZERS,
                                       TrainConfig)
from manifold_lab.train.loop import EXIT_DIVERGED, TrainingDiverged, train
from manifold_lab.train.multiseed import train_seeds
from manifold_lab.train.records import CONFIG_FILE, read_json

PROG = "python -m manifold_lab.train"


#: flag -> (TrainConfig field, argparse keyword arguments). Defaults live in TrainConfig.
_FIELD_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "--model": ("model", dict(choices=MODEL_NAMES, help="network (default mobilenet_v2)")),
    "--width": ("width", dict(type=number, help="width multiplier (default 1.0)")),
    "--preset": ("preset", dict(choices=PRESETS, help="stride layout: imagenet (Table 2, 224 px), small "
                                                      "(28-32 px, stem and first stride-2 stage at 1), "
                                                      "stem1 (stem at 1) or bneck1 (first stride-2 "
                                                      "stage at 1); default by dataset")),
    "--bottleneck-activation": ("bottleneck_activation", dict(choices=BOTTLENECK_ACTIVATIONS,
                                                              help="after the projection (default linear)")),
    "--residual": ("residual", dict(choices=RESIDUAL_PLACEMENTS, help="shortcut placement (default bottleneck)")),
    "--depthwise-impl": ("depthwise_impl", dict(choices=DEPTHWISE_IMPLS, help="default auto")),
    "--padding": ("padding", dict(choices=PADDINGS, help="conv padding convention (default same)")),
    "--dropout": ("dropout_rate", dict(type=number, help="drop probability before the classifier (0.2)")),
    "--bn-decay": ("bn_momentum", dict(type=number, help="BatchNorm running-average decay (0.997; "
                                                        "zero-debiased)")),
    "--compute-dtype": ("compute_dtype", dict(choices=COMPUTE_DTYPES, help="activations (default float32)")),
    "--dataset": ("dataset", dict(help="fashion_mnist (default), digits, cifar10, cifar100, npz, imagefolder")),
    "--data-dir": ("data_dir", dict(help="dataset location (npz: the file)")),
    "--image-size": ("image_size", dict(type=positive_int, help="resize images to this size")),
    "--epochs": ("epochs", dict(type=number, help="training epochs (default 10)")),
    "--steps": ("steps", dict(type=positive_int, help="training steps (instead of --epochs)")),
    "--batch-size": ("batch_size", dict(type=positive_int, help="global batch (default 96)")),
    "--optimizer": ("optimizer", dict(choices=OPTIMIZERS, help="paper (RMSProp, default), sgd, adamw")),
    "--lr": ("lr", dict(type=number, help="initial learning rate (paper 0.045, sgd 0.1, adamw 1e-3)")),
    "--weight-decay": ("weight_decay", dict(type=number, help="paper/sgd 4e-5 (L2), adamw 0.05")),
    "--lr-schedule": ("lr_schedule", dict(choices=LR_SCHEDULES, help="staircase (per-epoch decay; paper's "
                                                                     "default) or cosine (to 0; sgd/adamw)")),
    "--lr-decay": ("lr_decay", dict(type=number, help="staircase: decay per epoch (0.98)")),
    "--momentum": ("momentum", dict(type=number, help="paper/sgd momentum (0.9)")),
    "--rmsprop-decay": ("rmsprop_decay", dict(type=number, help="paper: RMSProp decay (0.9)")),
    "--rmsprop-eps": ("rmsprop_eps", dict(type=number, help="paper: RMSProp epsilon (1.0, TF-Slim)")),
    "--warmup-steps": ("warmup_steps", dict(type=nonnegative_int, help="linear warm-up steps (0)")),
    "--label-smoothing": ("label_smoothing", dict(type=number, help="default 0 (authors' code: 0.1)")),
    "--ema": ("ema_decay", dict(type=number, metavar="DECAY",
                                help="evaluate an EMA of the weights and BatchNorm statistics "
                                     "(authors' code: 0.9999)")),
    "--seed": ("seed", dict(type=nonnegative_int, help="random seed (default 0)")),
    "--eval-every": ("eval_every", dict(type=positive_int, help="steps between evaluations (one epoch)")),
    "--log-every": ("log_every", dict(type=positive_int, help="steps between log lines (50)")),
    "--checkpoint-every": ("checkpoint_every", dict(type=positive_int, help="steps between checkpoints "
                                                                           "(one epoch)")),
    "--eval-batch-size": ("eval_batch_size", dict(type=positive_int, help="default 1000")),
    "--eval-bn": ("eval_bn", dict(choices=EVAL_BN_CHOICES,
                                  help="BatchNorm statistics at evaluation: precise (re-estimated over "
                                       "training batches, default), running (the debiased running "
                                       "averages) or both (precise reported)")),
    "--eval-bn-batches": ("eval_bn_batches", dict(type=positive_int,
                                                  help="training batches for the precise statistics (50)")),
    "--devices": ("num_devices", dict(type=positive_int, help="data-parallel devices (default: all)")),
}


def build_parser() -> ArgumentParser:
    """The command-line parser (flags left unset are absent from the namespace)."""
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                            argument_default=argparse.SUPPRESS)
    for flag, (field, kwargs) in _FIELD_FLAGS.items():
        if flag in ("--epochs", "--steps"):
            continue
        parser.add_argument(flag, dest=field, **kwargs)
    length = parser.add_mutually_exclusive_group()
    for flag in ("--epochs", "--steps"):
        field, kwargs = _FIELD_FLAGS[flag]
        length.add_argument(flag, dest=field, **kwargs)
    parser.add_argument("--no-augment", dest="augment", action="store_false", help="no crop/flip")
    parser.add_argument("--config", type=Path, default=None, help="start from this config.json (flags override it)")
    parser.add_argument("--seeds", type=positive_int, default=None, metavar="K",
                        help="train seeds SEED..SEED+K-1 in one vmapped program, in OUT/seed_<s>")
    parser.add_argument("--out", type=Path, required=True, metavar="RUN_DIR", help="run directory")
    parser.add_argument("--resume", action="store_true", default=False, help="continue from the newest checkpoint")
    parser.add_argument("--quiet", action="store_true", default=False, help="no progress output")
    parser.add_argument("--coordinator-address", default=None, help="multi-host: jax.distributed coordinator host:port")
    parser.add_argument("--num-processes", type=positive_int, default=None, help="multi-host: number of processes")
    parser.add_argument("--process-id", type=nonnegative_int, default=None, help="multi-host: this process's index")
    return parser


def resolve_config(args: argparse.Namespace) -> tuple[TrainConfig, list[int] | None, list[Path]]:
    """The config, the seeds of a multi-seed run (None for one run) and the run directories.
    Precedence: flags, then ``--config``, then (with ``--resume``) the run's saved config, then defaults."""
    given = {field: getattr(args, field) for field, _ in _FIELD_FLAGS.values() if hasattr(args, field)}
    if hasattr(args, "augment"):
        given["augment"] = args.augment
    seeds_k = args.seeds
    base: dict[str, Any] = {}
    if args.config is not None:
        base = TrainConfig.from_dict(read_json(args.config, "config file")).to_dict()
    first_seed = given.get("seed", base.get("seed", 0))
    dirs = [args.out] if seeds_k is None else [args.out / f"seed_{first_seed + i}" for i in range(seeds_k)]
    saved_path = dirs[0] / CONFIG_FILE
    if args.resume and not base and saved_path.exists():
        base = TrainConfig.from_dict(read_json(saved_path, "run config")).to_dict()
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
        if seeds is None:
            summaries = [train(cfg, dirs[0], resume=args.resume, verbose=verbose)]
        else:
            summaries = train_seeds(cfg, seeds, dirs, resume=args.resume, verbose=verbose)
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
