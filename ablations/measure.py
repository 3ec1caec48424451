"""Measure, once and next to the runs, everything the report needs JAX for.

``python -m ablations.measure [--preset P] [--results results/] [--only NAME ...] [--data-dir DIR]``

Writes ``RESULTS/<preset>/measurements/<name>.json`` (layout: :mod:`ablations.measurements`):

- ``spiral``: the spiral experiment of Fig. 1 / Theorem 1 at the preset's size (``spiral_points``
  points, ``spiral_trials`` draws of T, seed 0): its metrics, the Theorem 1 sweep and the arrays of
  the Fig. 1 panels;
- ``tables``: Table 2 (layer shapes) and Table 3 (memory) from the cost model;
- one file per study of kind ``width`` (``fig5``): parameters and multiply-adds of each trained
  width (cost model) and the latency of a jitted batch-1 forward of its restored model, plus
  MobileNetV1 (1.0) at the same geometry (untrained, timed with constant weights);
- one file per study of kind ``activations`` (``fig7``): positive channels after each expansion
  ReLU6 of the trained baseline (seed 0) and of its step-0 network (batch and running statistics)
  over the first ``fig7_images`` test images;
- ``appendix_a``: the Appendix A audit (:mod:`manifold_lab.invertibility`) of every seed at which
  both ``fig6a`` variants completed: the trained linear and ReLU6 bottleneck networks and their
  step-0 networks (the trainer's initialisation, with the population BatchNorm statistics of the
  training images), on the first ``fig7_images`` test images, the block-input decoders fitted on
  the first ``audit_train_images`` training images for blocks whose output has at most
  ``audit_decoder_features`` values. ``data``: ``dataset``, ``study``, ``images``,
  ``train_images``, ``batch_size`` and ``networks``, a list of ``{"variant", "state"
  ("trained" or "step0"), "seed", "run", "blocks"}`` whose ``blocks`` are the
  :meth:`manifold_lab.invertibility.BlockAudit.to_dict` objects of the network's 17 blocks
  (read back by :mod:`ablations.audit_records`).

Each file records what was measured, from which runs, on which device and host and when, so that
``python -m ablations.figures`` renders the report from files alone on any machine. Re-running
measures again and replaces the files (atomically). ``python -m ablations.run`` calls this at the
end of a sweep that leaves every run of the preset's plan done. A measurement whose runs are
missing is not written and is listed (exit code 1); a study that cannot be measured at all (Fig. 7
on a streamed dataset) is recorded as unavailable with the reason. Bad flags or folders: one line,
exit code 2.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from manifold_lab.cli import ArgumentParser, UsageError, command_name, run_main, writable_dir
from manifold_lab.cpu_threads import SWEEP_THREADS, fix_intra_op_threads, intra_op_threads
from ablations.cli import add_preset_arguments, check_results, open_results, preset_from_args
from ablations.audit_records import whole_batches
from ablations.measurements import (APPENDIX_A, APPENDIX_A_STUDY, MEASURED, SPIRAL, SPIRAL_SEED, TABLES,
                                    TABLES_RESOLUTION, TABLES_WIDTH, UNAVAILABLE, Measurement, appendix_a_inputs,
                                    appendix_a_seeds, measurement_names, measurements_dir, spiral_inputs,
                                    study_inputs, tables_inputs, write_measurement)
from ablations.plan import preset_dir
from ablations.results import SeedRun, VariantResults, load_study
from ablations.studies import STUDIES, Preset, Study

Log = Callable[[str], None]
PROG = command_name("measure", "ablations.measure")

_VERSIONS = ("jax", "jaxlib", "flax", "numpy", "matplotlib", "manifold-lab")


class NotMeasured(Exception):
    """The results folder lacks what a measurement needs (e.g. a completed run); says what to do."""


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What a measurer produced: a description, its inputs, its numbers; ``reason`` when the
    measurement is impossible for this preset (recorded as unavailable)."""

    what: str
    inputs: dict[str, Any]
    data: dict[str, Any]
    reason: str = ""


class Context:
    """The preset and its results folder, with the studies read once."""

    def __init__(self, results: Path, preset: Preset, data_dir: str | None) -> None:
        self.results, self.preset, self.data_dir = results, preset, data_dir
        self.root = preset_dir(results, preset)
        self._studies: dict[str, list[VariantResults]] = {}

    def study(self, name: str) -> list[VariantResults]:
        """The completed runs of study ``name`` (read once)."""
        if name not in self._studies:
            self._studies[name] = load_study(self.root, STUDIES[name], self.preset, self.data_dir)
        return self._studies[name]

    def train_hint(self, study: Study) -> str:
        """How to train the runs a measurement of ``study`` needs."""
        return f"train it with python -m ablations.run {study.name} --preset {self.preset.name}"


# ----------------------------------------------------------------------------------- provenance


def _cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def provenance(command: str, seconds: float) -> dict[str, Any]:
    """Where, when and with what a measurement was made: host, JAX device, versions, commit."""
    import jax

    from manifold_lab.train.records import git_commit

    devices = jax.devices()
    return {
        "command": command,
        "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 1),
        "host": {"name": platform.node(), "platform": platform.platform(), "cpu": _cpu_model(),
                 "cpu_count": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0))
                 if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                 "xla_cpu_threads": intra_op_threads(), "python": sys.version.split()[0]},
        "device": {"backend": jax.default_backend(),
                   "devices": [f"{d.platform}:{d.id} {getattr(d, 'device_kind', '')}".strip() for d in devices]},
        "versions": {name: _version(name) for name in _VERSIONS},
        "git_commit": git_commit(),
    }


# ----------------------------------------------------------------------------------- measurers


def _array(array: np.ndarray) -> dict[str, Any]:
    """An array as its dtype and nested lists of values: JSON keeps float32 and float64 values
    exactly, so the figure drawn from the file is the figure of the experiment
    (:func:`ablations.measurements.array_from_json` reads it back)."""
    return {"dtype": str(array.dtype), "values": array.tolist()}


def measure_spiral(ctx: Context) -> Outcome:
    """Fig. 1 and Theorem 1: the spiral experiment at the preset's size."""
    from manifold_lab.spiral import run_experiment

    p = ctx.preset
    try:
        result = run_experiment(points=p.spiral_points, trials=p.spiral_trials, seed=SPIRAL_SEED)
    except ValueError as exc:
        raise UsageError(f"preset {p.name}: spiral experiment: {exc}") from None
    figure = {"x": _array(result.x), "position": _array(result.position),
              "back_projections": {str(n): _array(a) for n, a in sorted(result.back_projections.items())}}
    return Outcome(f"Fig. 1 / Theorem 1: spiral experiment, {p.spiral_points} points x {p.spiral_trials} "
                   f"draws of T, seed {SPIRAL_SEED}", spiral_inputs(p),
                   {"metrics": result.metrics, "theorem": result.theorem, "figure": figure})


def measure_tables(ctx: Context) -> Outcome:
    """Tables 2 and 3 from the cost model (the paper's 224 px, width 1.0)."""
    from manifold_lab.costs import memory_table, table2_rows
    from manifold_lab.models import MobileNetV2Config

    data = {"table2": table2_rows(MobileNetV2Config(width=TABLES_WIDTH), TABLES_RESOLUTION),
            "table3": memory_table(TABLES_RESOLUTION, TABLES_WIDTH)}
    return Outcome(f"Tables 2 and 3 from the cost model ({TABLES_RESOLUTION} px, width {TABLES_WIDTH:g})",
                   tables_inputs(), data)


def image_shape(run: SeedRun) -> tuple[int, int, int]:
    """The (height, width, channels) a run trained on, as its ``config.json`` records it."""
    from manifold_lab.train import load_run

    config, _ = load_run(run.run_dir)
    try:
        return tuple(int(d) for d in config["resolved"]["image_shape"])  # type: ignore[return-value]
    except (KeyError, TypeError, ValueError):
        raise UsageError(f"corrupt run config in {run.run_dir}: no resolved image_shape") from None


def _cost_row(variant: str | None, label: str, model: Any, shape: tuple[int, int, int],
              repeats: int) -> dict[str, Any]:
    """One width row: the model's costs at ``shape`` and its batch-1 latency."""
    from ablations.analysis import latency_ms
    from manifold_lab.costs import model_costs

    costs = model_costs(model.config, shape[0])
    median, q25, q75 = latency_ms(model, shape, repeats)
    return {"variant": variant, "label": label, "width": float(model.config.width), "params": int(costs.params),
            "madds": int(costs.madds), "latency_ms": {"median": median, "q25": q25, "q75": q75}}


def measure_width(ctx: Context, study: Study) -> Outcome:
    """Costs and latency of the first seed of each trained width, and of MobileNetV1 (1.0)."""
    import manifold_lab.train as trainer
    from ablations.analysis import LATENCY_WARMUP, constant_model
    from manifold_lab.models import model_config

    results, repeats = ctx.study(study.name), ctx.preset.latency_repeats
    inputs = study_inputs(study, ctx.preset, results)
    if inputs is None:
        raise NotMeasured(f"no completed {study.name} run under {ctx.root}; {ctx.train_hint(study)}")
    rows, first = [], None
    for vr in (vr for vr in results if vr.runs):
        model, shape = trainer.restore_model(vr.runs[0].run_dir), image_shape(vr.runs[0])
        rows.append(_cost_row(vr.variant.name, vr.variant.label, model, shape, repeats))
        first = first or (model.config, shape, vr.runs[0].config["dataset"])
    v2, shape, dataset = first
    v1 = constant_model(model_config("mobilenet_v1", width=1.0, layout=v2.layout, num_classes=v2.num_classes,
                                     in_channels=v2.in_channels))
    rows.append(_cost_row(None, "MobileNetV1 (1.0), untrained", v1, shape, repeats))
    latency = {"what": "jitted batch-1 eval forward", "repeats": repeats, "warmup": LATENCY_WARMUP,
               "statistics": "median and quartiles, ms"}
    return Outcome(f"{study.name}: parameters and multiply-adds (cost model) and latency of each trained width",
                   inputs, {"dataset": dataset, "image_shape": list(shape), "latency": latency, "rows": rows})


@functools.lru_cache(maxsize=4)
def _splits(dataset: str, data_dir: str | None, image_size: int | None) -> Any:
    from manifold_lab.data import load_dataset
    return load_dataset(dataset, data_dir=data_dir, image_size=image_size)


def _first_images(config: dict[str, Any], count: int, split: int) -> np.ndarray | None:
    from manifold_lab.data import normalize
    images = _splits(config["dataset"], config.get("data_dir"), config.get("image_size"))[split]
    if not hasattr(images, "images"):
        return None
    return np.asarray(normalize(images.images[:count], images.mean, images.std))


def test_images(config: dict[str, Any], count: int) -> np.ndarray | None:
    """The first ``count`` test images of a run's dataset, normalised as in training (float32
    NHWC); None when the dataset is streamed (no in-memory test split)."""
    return _first_images(config, count, 1)


def train_images(config: dict[str, Any], count: int) -> np.ndarray | None:
    """The first ``count`` training images of a run's dataset, normalised as in training (in file
    order, without augmentation); None when the dataset is streamed."""
    return _first_images(config, count, 0)


def initial_model(run_dir: Path) -> Any:
    """The step-0 model of a run: the trainer's own initialisation for the run's config and seed."""
    from ablations.analysis import init_model
    from manifold_lab.train import TrainConfig, load_run
    from manifold_lab.train.network import model_config_for

    config, _ = load_run(run_dir)
    cfg = TrainConfig.from_dict(config).resolved()
    resolved = config["resolved"]
    mcfg = model_config_for(cfg, int(resolved["num_classes"]), int(resolved["image_shape"][-1]))
    return init_model(mcfg, cfg.seed)


def measure_activations(ctx: Context, study: Study) -> Outcome:
    """Fig. 7: positive channels after each expansion of the trained baseline and at step 0."""
    import manifold_lab.train as trainer
    from ablations.analysis import positive_channel_stats

    results = ctx.study(study.name)
    inputs = study_inputs(study, ctx.preset, results)
    if inputs is None:
        raise NotMeasured(f"no completed baseline run (seed 0) under {ctx.root}; {ctx.train_hint(study)}")
    run = next(vr.runs[0] for vr in results if vr.runs)
    what = (f"{study.name}: positive channels after each expansion, trained baseline and step 0, "
            f"over {ctx.preset.fig7_images} test images")
    images = test_images(run.config, ctx.preset.fig7_images)
    if images is None:
        return Outcome(what, inputs, {}, f"dataset {run.config['dataset']!r} is streamed; Fig. 7 needs an "
                                         "in-memory test split")
    trained, init = trainer.restore_model(run.run_dir), initial_model(run.run_dir)
    networks = {"trained": positive_channel_stats(trained, trained.config, images),
                "step0_batch": positive_channel_stats(init, init.config, images, batch_statistics=True),
                "step0_running": positive_channel_stats(init, init.config, images)}
    return Outcome(what, inputs, {"dataset": run.config["dataset"], "images": networks["trained"][0].images,
                                  "networks": {k: [a.to_json() for a in v] for k, v in networks.items()}})


#: Images per batch of the audit's forward passes.
AUDIT_BATCH = 128


def _audit_pair(run: SeedRun, test: np.ndarray, train: np.ndarray, batch_size: int,
                max_features: int) -> dict[str, Any]:
    """The audits (JSON) of one run's trained network and of its step-0 network."""
    import manifold_lab.train as trainer
    from manifold_lab.invertibility import audit_model, with_population_statistics

    trained = trainer.restore_model(run.run_dir)
    step0 = with_population_statistics(initial_model(run.run_dir), train, batch_size=batch_size)
    return {state: [b.to_dict() for b in audit_model(model, test, train, batch_size=batch_size,
                                                        max_decoder_features=max_features)]
            for state, model in (("trained", trained), ("step0", step0))}


def measure_appendix_a(ctx: Context) -> Outcome:
    """Appendix A in trained networks: every paired seed of ``fig6a``, trained and at step 0."""
    study = STUDIES[APPENDIX_A_STUDY]
    results = ctx.study(study.name)
    inputs = appendix_a_inputs(ctx.preset, results)
    if inputs is None:
        raise NotMeasured(f"no seed with every {study.name} variant completed under {ctx.root}; "
                          f"{ctx.train_hint(study)}")
    p, paired = ctx.preset, appendix_a_seeds(results)
    config = next(iter(paired.values()))[study.baseline].config
    what = (f"Appendix A audit: {study.name} networks ({', '.join(v.name for v in study.variants)}; trained and "
            f"step 0) at {len(paired)} seeds, {p.fig7_images} test images, decoders fitted on "
            f"{p.audit_train_images} training images")
    test, train = test_images(config, p.fig7_images), train_images(config, p.audit_train_images)
    if test is None or train is None:
        return Outcome(what, inputs, {}, f"dataset {config['dataset']!r} is streamed; the audit needs "
                                         "in-memory splits")
    test, train = whole_batches(test, AUDIT_BATCH), whole_batches(train, AUDIT_BATCH)
    networks = []
    for seed, runs in paired.items():
        for variant, run in runs.items():
            audits = _audit_pair(run, test, train, AUDIT_BATCH, p.audit_decoder_features)
            networks += [{"variant": variant, "state": state, "seed": seed, "run": run.run_dir.name,
                          "blocks": blocks} for state, blocks in audits.items()]
    return Outcome(what, inputs, {"dataset": config["dataset"], "study": study.name, "images": int(len(test)),
                                  "train_images": int(len(train)), "batch_size": AUDIT_BATCH,
                                  "networks": networks})


#: Measurer of each study kind that needs one (:data:`ablations.measurements.MEASURED_KINDS`).
KIND_MEASURERS: dict[str, Callable[[Context, Study], Outcome]] = {
    "width": measure_width, "activations": measure_activations}


def measurers() -> dict[str, Callable[[Context], Outcome]]:
    """Every measurement by name, in the order they are made."""
    fixed: dict[str, Callable[[Context], Outcome]] = {SPIRAL: measure_spiral, TABLES: measure_tables,
                                                      APPENDIX_A: measure_appendix_a}
    return {name: fixed.get(name) or functools.partial(KIND_MEASURERS[STUDIES[name].kind], study=STUDIES[name])
            for name in measurement_names()}


# ----------------------------------------------------------------------------------- driver


def _log(msg: str) -> None:
    print(msg, flush=True)


def measure_preset(results: Path, preset: Preset, *, only: Sequence[str] | None = None,
                   data_dir: str | None = None, log: Log = _log,
                   command: str = "python -m ablations.run (end of a complete sweep)") -> list[str]:
    """Make the measurements ``only`` (default: all) of ``preset`` and write them; returns one line
    per measurement that could not be made (and why). Usage problems raise :class:`UsageError`."""
    ctx = Context(Path(results), preset, data_dir)
    writable_dir(measurements_dir(ctx.root))
    table = measurers()
    problems = []
    for name in only or list(table):
        start = time.perf_counter()
        try:
            outcome = table[name](ctx)
        except NotMeasured as exc:
            problems.append(f"not measured: {name}: {exc}")
            continue
        status = UNAVAILABLE if outcome.reason else MEASURED
        seconds = time.perf_counter() - start
        path = write_measurement(ctx.root, Measurement(name, outcome.what, preset.name, status, outcome.inputs,
                                                       provenance(command, seconds), outcome.data, outcome.reason))
        log(f"measured {name} in {seconds:.1f}s: {path}" if status == MEASURED
            else f"recorded {name} as unavailable ({outcome.reason}): {path}")
    return problems


def build_parser() -> ArgumentParser:
    """The command line of ``python -m ablations.measure`` (``manifold-lab measure``)."""
    parser = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    add_preset_arguments(parser, None)
    what = parser.add_argument_group("what to measure")
    what.add_argument("--only", action="append", default=None, metavar="NAME",
                      help=f"make only this measurement (repeatable): {', '.join(measurers())}")
    where = parser.add_argument_group("data and results")
    where.add_argument("--results", default="results", help="results folder")
    where.add_argument("--data-dir", default=None, help="dataset folder, if the runs used one (Fig. 7 and "
                                                        "the Appendix A audit read images)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ablations.measure``: make the preset's measurements; exit 1 if one could not be made."""
    args = build_parser().parse_args(argv)
    fix_intra_op_threads(SWEEP_THREADS)  # as the sweep that ends by measuring; before JAX starts
    names = list(measurers())
    unknown = [n for n in args.only or () if n not in names]
    if unknown:
        raise UsageError(f"--only: unknown measurement {unknown[0]!r}; choose from {', '.join(names)}")
    check_results(Path(args.results))
    preset, _ = open_results(Path(args.results), preset_from_args(args, Path(args.results)))
    given = list(sys.argv[1:] if argv is None else argv)
    command = shlex.join(["python", "-m", "ablations.measure", *given])
    problems = measure_preset(Path(args.results), preset, only=args.only, data_dir=args.data_dir,
                              command=command)
    for line in problems:
        print(line, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(run_main(main, prog=PROG))
