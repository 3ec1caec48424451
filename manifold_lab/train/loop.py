"""The training loop behind :func:`train` (one seed) and :func:`~manifold_lab.train.train_seeds`
(k seeds vmapped in one program).

Per run directory (:mod:`manifold_lab.train.run_dir`): ``config.json`` (first), ``metrics.jsonl``
(growing), ``checkpoints/`` (Orbax, every ``checkpoint_every`` steps and at the end) and
``summary.json`` (last, atomic). Everything that
decides the numbers is a function of ``(config, seed, step)``: parameters from ``nnx.Rngs(seed)``,
the data order of epoch ``e`` and the augmentation and dropout of step ``s`` from
``jax.random.key(seed)`` folded with ``e`` or ``s``. Hence ``resume`` continues from the newest
checkpoint and ends with exactly the records and weights of an uninterrupted run.

A resumed run may also be given a different length when the learning-rate schedule does not depend
on it (``staircase``: the rate of step ``s`` is a function of ``s`` alone): a partial or finished run
then continues to the new length and ends with the weights and records of an uninterrupted run of
that length (the finished run's closing evaluation stays in its record), ``config.json`` and
``summary.json`` rewritten for it. A cosine schedule's rates depend on the total, so changing its
length is refused; ``--init-from`` starts a new run from the old one's weights instead. Settings that
do not touch the numbers (:data:`RESUME_FREE_FIELDS`) may change on resume; any other difference is
refused by flag name.

Stops: a non-finite training loss (checked whenever the host syncs: every log line) or a non-finite
array anywhere in the state (weights, BatchNorm statistics, optimiser state, averages: checked before
every checkpoint) raises :class:`TrainingDiverged` without saving, so the newest checkpoint stays the
last finite state. Ctrl-C (SIGINT) and SIGTERM are deferred to the end of the current step, a checkpoint
is saved and :class:`~manifold_lab.cli.Interrupted` (a ``KeyboardInterrupt`` naming the signal) is
raised. A run directory is trained by one process at a time: the engine holds its lock
(:mod:`manifold_lab.train.lock`) and refuses one held by another process with
:class:`~manifold_lab.train.lock.RunLocked` (a UsageError).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import statistics
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from manifold_lab.cli import DeferredInterrupt, Interrupted, UsageError, writable_dir
from manifold_lab.data import ArrayDataset, epoch_permutation, load_dataset, pipeline_spec
from manifold_lab.data.pipeline import PipelineSpec
from manifold_lab.options import flag_of
from manifold_lab.train import bn_stats, records, sharding
from manifold_lab.train.checkpoint import (DEFAULT_KEEP, Checkpointer, finite_parts, flatten_state,
                                          newest_intact_step, unflatten_state)
from manifold_lab.train.config import LOCATION_FIELDS, TrainConfig
from manifold_lab.train.lock import lock_runs
from manifold_lab.train.network import abstract_model, model_config_for, model_init_fn
from manifold_lab.train.optim import make_optimizer
from manifold_lab.train.run_dir import INIT_FROM_KEY, TENSORBOARD_DIR, RunDir, config_digest
from manifold_lab.train.step import (init_state, make_memory_eval, make_memory_step, make_stream_eval,
                                     make_stream_step, reset_sums)

#: Exit code of the command line when training diverges (non-finite loss or state).
EXIT_DIVERGED = 3


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; the newest checkpoint is the last finite state."""

    def __init__(self, message: str, step: int, checkpoint_step: int | None) -> None:
        super().__init__(message)
        self.step = step
        self.checkpoint_step = checkpoint_step


@dataclasses.dataclass(frozen=True)
class Plan:
    """The numbers derived from the config and the data."""

    steps_per_epoch: int
    total_steps: int
    eval_every: int
    checkpoint_every: int
    log_every: int
    eval_batch_size: int
    train_size: int
    test_size: int
    num_classes: int
    image_shape: tuple[int, int, int]
    num_devices: int

    def is_log_step(self, step: int) -> bool:
        return step % self.log_every == 0 or self.is_eval_step(step)

    def is_eval_step(self, step: int) -> bool:
        return step % self.eval_every == 0 or step == self.total_steps

    def is_checkpoint_step(self, step: int) -> bool:
        return step % self.checkpoint_every == 0 or step == self.total_steps


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """Choices of a call that leave the run's numbers alone or are recorded beside its config
    (``config.json``'s ``init_from``), so they are not TrainConfig fields and never change its digest.

    ``keep``: checkpoints kept per run directory. ``init_from``: ``(run directory, step or None for
    its newest checkpoint)`` whose weights and BatchNorm statistics start a new run (fresh optimiser
    state, step 0). ``tensorboard``: also write TensorBoard event files (``run_dir/tensorboard``)."""

    keep: int = DEFAULT_KEEP
    init_from: tuple[Path, int | None] | None = None
    tensorboard: bool = False


def train(cfg: TrainConfig, run_dir: str | os.PathLike[str], resume: bool = False, *,
          stop_at_step: int | None = None, verbose: bool = True, keep: int = DEFAULT_KEEP,
          init_from: str | os.PathLike[str] | None = None, tensorboard: bool = False
          ) -> dict[str, Any] | None:
    """Train one model; returns the summary (also written to ``run_dir/summary.json``).

    ``resume``: continue from the newest checkpoint in ``run_dir`` (start afresh when there is none;
    return the existing summary when the run is complete). A resumed run may change the fields of
    :data:`RESUME_FREE_FIELDS` and, with the staircase schedule, its length (``steps``/``epochs``:
    a finished run is extended). Without it, a ``run_dir`` that already holds a run is a UsageError.
    ``stop_at_step``: checkpoint and return None after that step (as if interrupted there).
    ``keep``, ``init_from`` (``RUN_DIR[:STEP]``) and ``tensorboard``: see :class:`RunOptions`.
    Raises :class:`TrainingDiverged`, UsageError (:class:`~manifold_lab.train.lock.RunLocked` when
    another process is training ``run_dir``), or :class:`~manifold_lab.cli.Interrupted` (Ctrl-C or
    SIGTERM, after saving a checkpoint)."""
    options = RunOptions(keep, None if init_from is None else parse_init_from(init_from), tensorboard)
    out = run_engine(cfg, [cfg.seed], [run_dir], resume=resume, batched=False, stop_at_step=stop_at_step,
                     verbose=verbose, options=options)
    return None if out is None else out[0]


def parse_init_from(text: str | os.PathLike[str]) -> tuple[Path, int | None]:
    """``RUN_DIR[:STEP]`` as ``(run directory, step or None)``."""
    text = os.fspath(text)
    head, sep, tail = text.rpartition(":")
    if sep and tail.isdigit() and head:
        return Path(head), int(tail)
    return Path(text), None


@dataclasses.dataclass(frozen=True)
class _Setup:
    """What a run needs besides its state: data, devices, plan, model config and compiled programs."""

    train_data: Any
    test_data: Any
    streaming: bool
    mesh: jax.sharding.Mesh
    plan: Plan
    mcfg: Any
    n_params: int
    programs: _Programs


def _setup(cfg: TrainConfig, batched: bool) -> _Setup:
    train_data, test_data = load_dataset(cfg.dataset, cfg.data_dir, cfg.image_size)
    streaming = not isinstance(train_data, ArrayDataset)
    if streaming and batched:
        raise UsageError("multi-seed training needs an in-memory dataset (not imagefolder)")
    mesh = sharding.make_mesh(cfg.num_devices)
    plan = _plan(cfg, train_data, test_data, mesh)
    mcfg = model_config_for(cfg, train_data.num_classes, train_data.image_shape[-1])
    n_params = sum(x.size for x in jax.tree.leaves(abstract_model(mcfg)[1]))
    spec = pipeline_spec(train_data, cfg.batch_size, dtype=cfg.compute_dtype,
                         **({} if cfg.augment else {"crop_padding": 0, "flip": False})) if not streaming else None
    programs = _programs(_program_key(cfg, mcfg, plan, spec, train_data, mesh, batched, streaming))
    return _Setup(train_data, test_data, streaming, mesh, plan, mcfg, n_params, programs)


def run_engine(cfg: TrainConfig, seeds: Sequence[int], run_dirs: Sequence[str | os.PathLike[str]], *,
               resume: bool, batched: bool, stop_at_step: int | None, verbose: bool,
               options: RunOptions | None = None) -> list[dict[str, Any]] | None:
    """Shared implementation of :func:`train` and ``train_seeds``: with ``batched``, the seeds run as
    one vmapped program (state arrays carry a leading seed axis)."""
    options = options or RunOptions()
    cfg = cfg.resolved()
    cfgs, dirs = _seed_runs(cfg, seeds, run_dirs)
    with lock_runs(dirs, enabled=jax.process_index() == 0):  # one trainer per run directory
        return _run_locked(cfg, cfgs, dirs, resume, batched, stop_at_step, verbose, options)


def _run_locked(cfg: TrainConfig, cfgs: list[TrainConfig], dirs: list[Path], resume: bool, batched: bool,
                stop_at_step: int | None, verbose: bool, options: RunOptions) -> list[dict[str, Any]] | None:
    """:func:`run_engine` once it holds the locks of the run directories."""
    done, changed = _existing_runs(cfgs, dirs, resume)
    init_from = _init_source(options.init_from, dirs[0], resume)
    if done is not None:
        return done
    s = _setup(cfg, batched)
    seed_ints = jnp.asarray([c.seed for c in cfgs] if batched else cfgs[0].seed, jnp.uint32)
    state = s.programs.init(seed_ints, jnp.asarray(cfg.lr, jnp.float32))
    keys = [jax.random.key(c.seed) for c in cfgs]
    seed_keys = sharding.put_replicated(jnp.stack(keys) if batched else keys[0], s.mesh)
    main = jax.process_index() == 0
    ckpts = [Checkpointer(d, options.keep) for d in dirs]
    logs: list[records.MetricsLog] = []
    progress: list[records.Progress] = []
    try:
        start = _common_checkpoint(ckpts) if resume else None
        state = _start_state(s, state, start, ckpts, init_from, batched)
        if start is None or changed:
            _write_configs(s, cfgs, dirs, init_from, main)
        logs = [records.MetricsLog(RunDir(d).metrics_path, resume_step=start, enabled=main,
                                   tensorboard=RunDir(d).path / TENSORBOARD_DIR if options.tensorboard else None)
                for d in dirs]
        progress = [records.Progress(s.plan.total_steps, label=f"[seed {c.seed}]" if batched else "",
                                     enabled=main and verbose) for c in cfgs]
        if start is not None:
            progress[0].message(f"resuming from step {start} of {s.plan.total_steps}")
        loop = _Loop(cfgs, dirs, s.plan, s.programs, s.mesh, ckpts, logs, progress, batched, main)
        run = loop.run_stream if s.streaming else loop.run_memory
        state = run(state, seed_keys, s.train_data, s.test_data, start or 0, stop_at_step)
        if state is None:
            return None
        summaries = [_summary(c, s.plan, log.records, s.n_params) for c, log in zip(cfgs, logs)]
        if main:
            for d, summary in zip(dirs, summaries):
                RunDir(d).write_summary(summary)
        return summaries
    finally:
        for bar in progress:
            bar.close()
        for log in logs:
            log.close()
        for c in ckpts:
            c.close()


def _start_state(s: _Setup, state: Any, start: int | None, ckpts: list[Checkpointer],
                 init_from: tuple[Path, int] | None, batched: bool) -> Any:
    """The state to continue from: checkpoint ``start``, else the initial state (with another run's
    weights for ``init_from``). A checkpoint beyond the planned length is a UsageError."""
    if start is not None:
        if start > s.plan.total_steps:
            raise UsageError(f"cannot resume {Path(ckpts[0].directory).parent}: it is at step {start}, "
                             f"past the {s.plan.total_steps} steps given")
        restored = [c.restore(start, _unstack(state, i) if batched else state) for i, c in enumerate(ckpts)]
        return _stack(restored) if batched else restored[0]
    if init_from is not None:
        return _with_weights(state, init_from, batched, s.mesh)
    return state


def _write_configs(s: _Setup, cfgs: list[TrainConfig], dirs: list[Path], init_from: tuple[Path, int] | None,
                   main: bool) -> None:
    """``config.json`` of each run (new, or rewritten for a resumed run whose config changed: its
    ``summary.json`` goes too, until the run reaches its new end)."""
    if not main:
        return
    extra = {} if init_from is None else {INIT_FROM_KEY: {"run": str(init_from[0]), "step": init_from[1]}}
    for c, d in zip(cfgs, dirs):
        run = RunDir(d)
        run.summary_path.unlink(missing_ok=True)
        run.write_config(c.to_dict(), _resolved_info(s.plan, s.mcfg, s.n_params, len(cfgs), s.train_data),
                         dataclasses.asdict(s.mcfg), records.environment_info(list(s.mesh.devices.flat)),
                         extra=extra)


def _seed_runs(cfg: TrainConfig, seeds: Sequence[int], run_dirs: Sequence[str | os.PathLike[str]]
               ) -> tuple[list[TrainConfig], list[Path]]:
    """One config and one writable, distinct run directory per distinct seed."""
    if len(seeds) != len(run_dirs) or not seeds:
        raise UsageError("give one run directory per seed")
    if len(set(seeds)) != len(seeds):
        raise UsageError("seeds must be distinct")
    dirs = [writable_dir(d) for d in run_dirs]
    if len({d.resolve() for d in dirs}) != len(dirs):
        raise UsageError("run directories must be distinct")
    return [cfg.replace(seed=int(s)) for s in seeds], dirs


#: TrainConfig fields a resumed run may change, because they decide what is recorded, when and
#: where, never the weights: evaluation only reads the state (its batch size and BatchNorm protocol
#: change the reported test numbers, nothing else), log lines and checkpoints only read it or zero
#: the logged sums, and the data location holds the same data. The device count changes the
#: order of the gradient reductions, so a run moved to other devices agrees to float rounding. The
#: corrupt-image limit only decides whether a run stops: one that goes on meets the same replacements.
#: The block form (``block_impl``) changes the arithmetic within float rounding, like the device count:
#: evaluations, and training where blocks are wide enough to fuse (224 px inputs on the CPU).
RESUME_FREE_FIELDS: tuple[str, ...] = ("log_every", "eval_every", "checkpoint_every", "eval_batch_size",
                                       "eval_bn", "eval_bn_batches", "num_devices", "max_bad_images",
                                       "block_impl", *LOCATION_FIELDS)
#: The fields of the run's length: a resumed run may change them when the schedule does not
#: depend on the length (staircase).
LENGTH_FIELDS: tuple[str, ...] = ("steps", "epochs")


def check_resume(saved: TrainConfig, cfg: TrainConfig, path: Path) -> bool:
    """Whether ``cfg`` (resolved) may continue the run saved with ``saved`` (resolved): UsageError
    naming the first differing flag otherwise. True when the config differs (allowed fields)."""
    fields = [f for f in dataclasses.fields(cfg) if getattr(saved, f.name) != getattr(cfg, f.name)]
    fixed = [f for f in fields if f.name not in RESUME_FREE_FIELDS + LENGTH_FIELDS]
    if fixed:
        first = fixed[0]
        raise UsageError(f"cannot resume {path}: the config differs in {', '.join(f.name for f in fixed)} "
                         f"({flag_of(first)} is {_shown(first, getattr(saved, first.name))} in the saved run, "
                         f"{_shown(first, getattr(cfg, first.name))} given)")
    if any(f.name in LENGTH_FIELDS for f in fields) and cfg.schedule_name != "staircase":
        raise UsageError(f"cannot change the length of {path}: its {cfg.schedule_name} learning-rate "
                         f"schedule depends on the total steps; start a new run with --init-from {path}")
    return bool(fields)


def _shown(field: dataclasses.Field, value: Any) -> str:
    """A field's value as its flag states it (a switch such as ``--no-augment``: on or off)."""
    if isinstance(field.default, bool):
        return "on" if value != field.default else "off"
    return str(value)


def _existing_runs(cfgs: list[TrainConfig], dirs: list[Path], resume: bool
                   ) -> tuple[list[dict[str, Any]] | None, bool]:
    """Check run directories against the configs: ``(the summaries when every run is complete and
    its length unchanged, whether any saved config differs from the given one)``."""
    runs = [RunDir(d) for d in dirs]
    changed = length_changed = False
    for c, run in zip(cfgs, runs):
        if run.holds_run() and not resume:
            raise UsageError(f"{run.path} already holds a run: pass --resume or choose another --out")
        if run.config_path.exists():
            saved = run.train_config().resolved()
            changed |= check_resume(saved, c, run.path)
            length_changed |= any(getattr(saved, n) != getattr(c, n) for n in LENGTH_FIELDS)
    if resume and not length_changed and all(run.is_complete() for run in runs):
        return [run.summary() for run in runs], False
    return None, changed


def _init_source(given: tuple[Path, int | None] | None, run_dir: Path, resume: bool
                 ) -> tuple[Path, int] | None:
    """``(run directory, step)`` whose weights start the run: the given ``--init-from`` (its newest
    checkpoint when no step is given) or, when resuming a run that was started that way, the saved one."""
    saved, resumed = None, resume and RunDir(run_dir).config_path.exists()
    if resumed:
        record = RunDir(run_dir).config_json().get(INIT_FROM_KEY)
        saved = None if record is None else (Path(record["run"]), int(record["step"]))
    if given is None:
        return saved
    source = RunDir(given[0])
    if not source.checkpoint_dir.is_dir():
        raise UsageError(f"--init-from {given[0]}: no run directory with checkpoints")
    checkpointer = Checkpointer(source.path)
    try:
        steps = checkpointer.steps()
    finally:
        checkpointer.close()
    step = steps[-1] if given[1] is None and steps else given[1]
    if step is None or step not in steps:
        raise UsageError(f"--init-from {given[0]}: no checkpoint {'' if step is None else step} "
                         f"(kept: {', '.join(map(str, steps)) or 'none'})")
    chosen = (source.path.resolve(), step)
    if resumed and saved != chosen:
        shown = "unset" if saved is None else f"{saved[0]}:{saved[1]}"
        raise UsageError(f"cannot resume {run_dir}: --init-from is {shown} in the saved run, "
                         f"{chosen[0]}:{chosen[1]} given")
    return chosen


def _with_weights(state: Any, source: tuple[Path, int], batched: bool, mesh: jax.sharding.Mesh) -> Any:
    """``state`` with the weights and BatchNorm statistics (and their averages, where kept) replaced
    by those of checkpoint ``source`` of another run; the optimiser state stays fresh (it does not
    depend on the weights' values). A different architecture is a UsageError naming the array."""
    checkpointer = Checkpointer(source[0])
    try:
        flat = checkpointer.restore_flat(source[1])
    finally:
        checkpointer.close()
    one = _unstack(state, 0) if batched else state
    loaded = {}
    for part in ("params", "batch_stats"):
        wanted = flatten_state(one[part])
        for name, leaf in wanted.items():
            have = flat.get(f"{part}.{name}")
            if have is None or tuple(have.shape) != tuple(leaf.shape):
                found = "is missing" if have is None else f"has shape {tuple(have.shape)}"
                raise UsageError(f"--init-from {source[0]}:{source[1]}: {part}.{name} {found} there, "
                                 f"shape {tuple(leaf.shape)} here (a different model)")
        arrays = {n: jnp.asarray(flat[f"{part}.{n}"], leaf.dtype) for n, leaf in wanted.items()}
        loaded[part] = unflatten_state(arrays, one[part])
    if batched:
        k = jax.tree.leaves(state["params"])[0].shape[0]
        loaded = jax.tree.map(lambda x: jnp.broadcast_to(x, (k, *x.shape)), loaded)
    loaded = sharding.put_replicated(loaded, mesh)
    ema = None if state["ema"] is None else jax.tree.map(jnp.copy, loaded)
    return {**state, **loaded, "ema": ema}


def _plan(cfg: TrainConfig, train_data: Any, test_data: Any, mesh: jax.sharding.Mesh) -> Plan:
    n_dev = mesh.devices.size
    sharding.check_batch_divisible(cfg.batch_size, mesh)
    spe = len(train_data) // cfg.batch_size
    if spe == 0:
        raise UsageError(f"batch size {cfg.batch_size} exceeds the {len(train_data)} training examples")
    if len(test_data) == 0:
        raise UsageError(f"{cfg.dataset}: the test split is empty")
    total = cfg.steps if cfg.steps is not None else max(1, round(cfg.epochs * spe))
    eval_bs = min(cfg.eval_batch_size, len(test_data))
    eval_bs = -(-eval_bs // n_dev) * n_dev
    return Plan(steps_per_epoch=spe, total_steps=total, eval_every=cfg.eval_every or spe,
                checkpoint_every=cfg.checkpoint_every or spe, log_every=cfg.log_every,
                eval_batch_size=eval_bs, train_size=len(train_data), test_size=len(test_data),
                num_classes=train_data.num_classes, image_shape=tuple(train_data.image_shape),
                num_devices=n_dev)


def _resolved_info(plan: Plan, mcfg: Any, n_params: int, seeds_in_program: int, data: Any) -> dict[str, Any]:
    """config.json's ``resolved``: the plan's numbers, and what inference needs beside the image shape
    (the training data's normalisation ``mean``/``std`` and its ``class_names``; manifold_lab.predict)."""
    info = dataclasses.asdict(plan)
    info["image_shape"] = list(plan.image_shape)
    info.update(params=n_params, epochs=plan.total_steps / plan.steps_per_epoch,
                seeds_in_program=seeds_in_program, model_class=type(mcfg).__name__,
                mean=list(data.mean), std=list(data.std), class_names=list(getattr(data, "class_names", ())))
    return info


def _stack(trees: list[Any]) -> Any:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _unstack(tree: Any, i: int) -> Any:
    return jax.tree.map(lambda x: x[i], tree)


def _common_checkpoint(ckpts: list[Checkpointer]) -> int | None:
    """The newest step saved intact in every run directory (damaged newer ones are set aside:
    :func:`~manifold_lab.train.checkpoint.newest_intact_step`)."""
    return newest_intact_step(ckpts)


# ----------------------------------------------------------------------------- compiled programs

@dataclasses.dataclass(frozen=True)
class _Programs:
    step: Any  # jitted, state donated
    evaluate: Any  # jitted (in-memory) or per-batch (streaming)
    precise: Any  # jitted precise BatchNorm statistics (in-memory) or per-batch statistics (streaming)
    permutation: Any  # jitted epoch permutation(s) (in-memory only)
    reset: Any  # jitted: zero the logging sums (state donated)
    init: Any  # jitted: (seed(s), initial learning rate) -> train state, replicated
    unit_schedule: Any  # jitted learning-rate schedule for an initial rate of 1


@dataclasses.dataclass(frozen=True)
class _ProgramKey:
    """Everything the compiled programs depend on (and nothing else, so that runs differing in
    seed, learning rate, logging or length share them; the length matters for cosine schedules)."""

    cfg: TrainConfig
    mcfg: Any
    steps_per_epoch: int
    schedule_steps: int | None
    eval_batch_size: int
    train_size: int
    test_size: int
    spec: PipelineSpec | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    mesh: jax.sharding.Mesh
    batched: bool
    streaming: bool


def _program_key(cfg: TrainConfig, mcfg: Any, plan: Plan, spec: PipelineSpec | None, data: Any,
                 mesh: jax.sharding.Mesh, batched: bool, streaming: bool) -> _ProgramKey:
    normalised = cfg.replace(seed=0, lr=None, eval_every=None, log_every=1, checkpoint_every=None,
                             data_dir=None, epochs=1.0, steps=None, max_bad_images=0)
    return _ProgramKey(normalised, mcfg, plan.steps_per_epoch,
                       plan.total_steps if cfg.schedule_name == "cosine" else None, plan.eval_batch_size,
                       plan.train_size, plan.test_size, spec, tuple(data.mean), tuple(data.std), mesh,
                       batched, streaming)


#: XLA options for the one-off initialisation program: its speed is irrelevant, its compile time
#: (random initialisers) is not.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@functools.lru_cache(maxsize=8)
def _programs(key: _ProgramKey) -> _Programs:
    """Build and jit the initialisation, step, evaluation and permutation functions (cached, so
    repeated runs in one process, e.g. seeds, learning rates or a resume, compile once)."""
    cfg, mesh = key.cfg, key.mesh
    total = key.schedule_steps or key.steps_per_epoch
    tx, schedule = make_optimizer(cfg, key.steps_per_epoch, total, base_lr=0.0)
    graphdef = abstract_model(key.mcfg)[0]
    model_init = model_init_fn(key.mcfg)

    def init(seed: jax.Array, lr: jax.Array) -> Any:
        tx_lr, _ = make_optimizer(cfg, key.steps_per_epoch, total, base_lr=lr)
        return init_state(*model_init(seed), tx_lr, cfg.ema_decay is not None)
    rep = sharding.replicated(mesh)
    batch_sh = sharding.batch_sharded(mesh)
    if key.streaming:
        step = make_stream_step(graphdef, tx, mean=key.mean, std=key.std, dtype=cfg.compute_dtype,
                                bn_decay=cfg.bn_decay, label_smoothing=cfg.label_smoothing,
                                ema_decay=cfg.ema_decay)
        step_jit = jax.jit(step, donate_argnums=0, out_shardings=rep)
        evaluate = jax.jit(make_stream_eval(graphdef, mean=key.mean, std=key.std, dtype=cfg.compute_dtype),
                           out_shardings=rep)
        precise = jax.jit(bn_stats.make_stream_batch_statistics(
            graphdef, mean=key.mean, std=key.std, dtype=cfg.compute_dtype), out_shardings=rep)
        permutation = None
    else:
        step = make_memory_step(graphdef, tx, key.spec, bn_decay=cfg.bn_decay,
                                label_smoothing=cfg.label_smoothing, ema_decay=cfg.ema_decay,
                                batch_sharding=batch_sh)
        evaluate = make_memory_eval(graphdef, batch_size=key.eval_batch_size,
                                    num_batches=-(-key.test_size // key.eval_batch_size),
                                    mean=key.mean, std=key.std, dtype=cfg.compute_dtype, batch_sharding=batch_sh)
        precise = bn_stats.make_memory_precise(graphdef, key.spec, cfg.eval_bn_batches, batch_sh)
        permutation = functools.partial(epoch_permutation, num_examples=key.train_size)
        if key.batched:
            step = jax.vmap(step, in_axes=(0, 0, 0, None, None))
            evaluate = jax.vmap(evaluate, in_axes=(0, 0, None, None))
            precise = jax.vmap(precise, in_axes=(0, 0, 0, None, None))
            permutation = jax.vmap(permutation, in_axes=(0, None))
        step_jit = jax.jit(step, donate_argnums=0, out_shardings=rep)
        evaluate = jax.jit(evaluate, out_shardings=rep)
        precise = jax.jit(precise, out_shardings=rep)
        permutation = jax.jit(permutation, out_shardings=rep)
    reset = jax.jit(reset_sums, donate_argnums=0, out_shardings=rep)
    init_jit = jax.jit(jax.vmap(init, in_axes=(0, None)) if key.batched else init, out_shardings=rep,
                       compiler_options=_FAST_COMPILE)
    return _Programs(step_jit, evaluate, precise, permutation, reset, init_jit, jax.jit(schedule))


# ----------------------------------------------------------------------------- the loop

class _Loop:
    """State of one call of the training loop (host side): counters, timers, logs."""

    def __init__(self, cfgs: list[TrainConfig], dirs: list[Path], plan: Plan, programs: _Programs,
                 mesh: jax.sharding.Mesh, ckpts: list[Checkpointer], logs: list[records.MetricsLog],
                 progress: list[records.Progress], batched: bool, main: bool) -> None:
        self.cfgs, self.dirs, self.plan, self.p = cfgs, dirs, plan, programs
        self.mesh, self.ckpts, self.logs, self.progress = mesh, ckpts, logs, progress
        self.batched, self.main = batched, main
        self.k = len(cfgs)
        self.batch = cfgs[0].batch_size
        last = logs[0].records[-1] if logs[0].records else None
        self.elapsed_before = float(last["elapsed_s"]) if last else 0.0
        self.call_start = time.perf_counter()
        self.mark_time = self.call_start
        self.mark_step = 0
        self.interrupted = False

    # -- the two data paths

    def run_memory(self, state: Any, keys: Any, train_data: ArrayDataset, test_data: ArrayDataset,
                   start: int, stop_at: int | None) -> Any:
        images, labels = sharding.put_replicated((train_data.images, train_data.labels), self.mesh)
        t_images, t_labels = sharding.put_replicated((test_data.images, test_data.labels), self.mesh)
        evaluate = lambda params, stats: self.p.evaluate(params, stats, t_images, t_labels)
        precise = lambda params, stats: self.p.precise(params, stats, keys, images, labels)
        spe = self.plan.steps_per_epoch
        perm_epoch, perm = None, None

        def advance(state: Any, step: int) -> Any:
            nonlocal perm_epoch, perm
            if step // spe != perm_epoch:
                perm_epoch = step // spe
                perm = self.p.permutation(keys, perm_epoch)
            return self.p.step(state, keys, perm, images, labels)
        return self._run(state, start, stop_at, advance, functools.partial(self._evaluate, evaluate, precise))

    def run_stream(self, state: Any, key: Any, train_data: Any, test_data: Any, start: int,
                   stop_at: int | None) -> Any:
        """The streamed path: each process decodes only its rows of every global batch (training,
        evaluation and precise-statistics batches alike); corrupt files are counted over all processes
        against ``max_bad_images`` (:class:`~manifold_lab.data.imagefolder.BadImages`)."""
        from manifold_lab.data.imagefolder import BadImages

        cfg, eval_bs, batch_sh = self.cfgs[0], self.plan.eval_batch_size, sharding.batch_sharded(self.mesh)
        rows, eval_rows = (sharding.process_rows(n, self.mesh) for n in (self.batch, eval_bs))
        bad = BadImages(cfg.max_bad_images, announce=self.main, gather=sharding.gather_processes,
                        hint=f"; {flag_of(TrainConfig.__dataclass_fields__['max_bad_images'])} sets how "
                             f"many are tolerated")
        put = lambda x, size: sharding.put_process_batch(x, batch_sh, size)  # noqa: E731
        end = self.plan.total_steps if stop_at is None else min(stop_at, self.plan.total_steps)
        batches: Iterator[tuple[np.ndarray, ...]] = train_data.batches(
            self.batch, seed=cfg.seed, start_step=start, num_steps=max(end - start, 1), rows=rows, bad=bad)

        def advance(state: Any, step: int) -> Any:
            x, y = next(batches)
            return self.p.step(state, key, put(x, self.batch), put(y, self.batch))

        def evaluate(params: Any, stats: Any) -> tuple[jax.Array, jax.Array]:
            loss, correct, left_out = 0.0, 0.0, bad.left_out
            for batch in test_data.batches(eval_bs, num_workers=0, rows=eval_rows, bad=bad):
                l, c = self.p.evaluate(params, stats, *(put(a, eval_bs) for a in batch))
                loss, correct = loss + l, correct + c
            count = max(len(test_data) - (bad.left_out - left_out), 1)  # corrupt files are left out
            return loss / count, correct / count

        def precise(params: Any, stats: Any) -> Any:
            count = min(cfg.eval_bn_batches, self.plan.steps_per_epoch)
            loader = train_data.batches(self.batch, seed=cfg.seed, num_steps=count, num_workers=0, rows=rows,
                                        bad=bad)
            per_batch = [self.p.precise(params, stats, put(x, self.batch)) for x, _ in loader]
            return bn_stats.population(bn_stats.stack(per_batch))
        return self._run(state, start, stop_at, advance, functools.partial(self._evaluate, evaluate, precise))

    def _evaluate(self, evaluate: Any, precise: Any, state: Any) -> dict[str, list[np.ndarray]]:
        """Test (loss, accuracy) per seed under each BatchNorm protocol of ``eval_bn`` (the reported
        one first), of the weight averages where the run keeps them."""
        evaluated = state["ema"] or state
        params, stats = evaluated["params"], evaluated["batch_stats"]
        out = {}
        for protocol in bn_stats.protocols(self.cfgs[0].eval_bn):
            used = precise(params, stats) if protocol == "precise" else stats
            out[protocol] = [np.asarray(a).reshape(-1) for a in jax.device_get(evaluate(params, used))]
        return out

    # -- shared loop

    def _run(self, state: Any, start: int, stop_at: int | None, advance: Any, evaluate: Any) -> Any:
        """Steps ``start+1 .. total`` (or up to ``stop_at``: then checkpoint and return None)."""
        end = self.plan.total_steps if stop_at is None else min(stop_at, self.plan.total_steps)
        step = start
        self.mark_step = start
        with DeferredInterrupt() as interrupt:
            while step < end:
                state = advance(state, step)
                step += 1
                if self.plan.is_log_step(step):
                    state = self._log(state, step, evaluate)
                if interrupt.signum is not None:
                    self._checkpoint(state, step)
                    raise Interrupted(interrupt.signum, f"at step {step} of {self.plan.total_steps}; "
                                                        f"checkpoint saved, resuming continues from it")
                if self.plan.is_checkpoint_step(step):
                    self._checkpoint(state, step)
        if step < self.plan.total_steps:
            self._checkpoint(state, step)
            return None
        return state

    def _check_finite(self, step: int, sums: dict[str, Any], state: Any = None) -> None:
        """Raise :class:`TrainingDiverged` when a loss so far (``sums``) or, given ``state``, any
        array a checkpoint would hold (weights, BatchNorm statistics, optimiser state, averages) is
        not finite; it names the last good checkpoint."""
        finite = np.asarray(sums["finite"]).reshape(-1) > 0
        what = "non-finite loss"
        if finite.all() and state is not None:
            parts, flags = finite_parts(state, self.batched)
            flags = flags.reshape(self.k, len(parts))
            finite = flags.all(axis=1)
            what = "non-finite " + ", ".join(p for p, ok in zip(parts, flags.all(axis=0)) if not ok)
        if finite.all():
            return
        bad = [self.cfgs[i].seed for i in np.flatnonzero(~finite)]
        last = _common_checkpoint(self.ckpts)
        where = (f"the last good checkpoint is step {last} in {self.ckpts[0].directory}" if last is not None
                 else "no checkpoint was saved")
        seeds = f" (seed {', '.join(map(str, bad))})" if self.batched else ""
        raise TrainingDiverged(f"training diverged: {what} by step {step}{seeds}; {where}", step, last)

    def _log(self, state: Any, step: int, evaluate: Any) -> Any:
        sums = jax.device_get(state["sums"])
        now = time.perf_counter()
        count = np.asarray(sums["count"]).reshape(-1)
        self._check_finite(step, sums)
        loss = np.asarray(sums["loss"]).reshape(-1) / np.maximum(count, 1)
        acc = np.asarray(sums["correct"]).reshape(-1) / np.maximum(count * self.batch, 1)
        ips = (step - self.mark_step) * self.batch / max(now - self.mark_time, 1e-9)
        lr = self.cfgs[0].lr * float(self.p.unit_schedule(step - 1))
        test = evaluate(state) if self.plan.is_eval_step(step) else None
        elapsed = self.elapsed_before + time.perf_counter() - self.call_start
        for i in range(self.k):
            record = {"step": step, "epoch": round(step / self.plan.steps_per_epoch, 6),
                      "loss": float(loss[i]), "train_accuracy": float(acc[i]), "learning_rate": lr,
                      "images_per_second": round(ips, 2), "elapsed_s": round(elapsed, 3)}
            if test is not None:
                record.update(_test_fields(test, i))
            self.logs[i].append(record)
            self.progress[i].update(record)
        state = self.p.reset(state)
        self.mark_time, self.mark_step = time.perf_counter(), step
        return state

    def _checkpoint(self, state: Any, step: int) -> None:
        if step in self.ckpts[0].steps():
            return
        self._check_finite(step, jax.device_get(state["sums"]), state)
        for i, c in enumerate(self.ckpts):
            c.save(step, _unstack(state, i) if self.batched else state)
        self.mark_time, self.mark_step = time.perf_counter(), step


def _test_fields(test: dict[str, list[np.ndarray]], seed_index: int) -> dict[str, Any]:
    """A metrics line's evaluation fields: ``test_loss``/``test_accuracy`` under the reported
    protocol (``eval_bn``), and both suffixed by each measured protocol's name."""
    protocol = next(iter(test))
    fields: dict[str, Any] = {"test_loss": float(test[protocol][0][seed_index]),
                              "test_accuracy": float(test[protocol][1][seed_index]), "eval_bn": protocol}
    for name, (loss, accuracy) in test.items():
        fields[f"test_loss_{name}"] = float(loss[seed_index])
        fields[f"test_accuracy_{name}"] = float(accuracy[seed_index])
    return fields


def _summary(cfg: TrainConfig, plan: Plan, recs: list[dict[str, Any]], n_params: int) -> dict[str, Any]:
    final = recs[-1]
    speeds = [r["images_per_second"] for r in recs[1:]] or [recs[0]["images_per_second"]]
    by_protocol = {f"final_{key}": final[key] for key in final
                   if key.startswith(("test_loss_", "test_accuracy_"))}
    return {
        "final_test_accuracy": final["test_accuracy"],
        "final_test_loss": final["test_loss"],
        "eval_bn": final.get("eval_bn", "running"),
        **by_protocol,
        "steps": plan.total_steps,
        "epochs": plan.total_steps / plan.steps_per_epoch,
        "wall_time_s": final["elapsed_s"],
        "train_images_per_second": statistics.median(speeds),
        "params": n_params,
        "seed": cfg.seed,
        "config_sha256": config_digest(cfg.to_dict()),
    }
