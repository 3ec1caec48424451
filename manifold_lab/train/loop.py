"""The training loop behind :func:`train` (one seed) and :func:`~manifold_lab.train.train_seeds`
(k seeds vmapped in one program).

Per run directory (:mod:`manifold_lab.train.run_dir`): ``config.json`` (first), ``metrics.jsonl``
(growing), ``checkpoints/`` (Orbax, every ``checkpoint_every`` steps and at the end) and
``summary.json`` (last, atomic). Everything that
decides the numbers is a function of ``(config, seed, step)``: parameters from ``nnx.Rngs(seed)``,
the data order of epoch ``e`` and the augmentation and dropout of step ``s`` from
``jax.random.key(seed)`` folded with ``e`` or ``s``. Hence ``resume`` continues from the newest
checkpoint and ends with exactly the records and weights of an uninterrupted run.

Stops: a non-finite training loss (checked whenever the host syncs: every log line and before every
checkpoint) raises :class:`TrainingDiverged` without saving, so the newest checkpoint stays the last
finite state. Ctrl-C (SIGINT) is deferred to the end of the current step, a checkpoint is saved and
``KeyboardInterrupt`` is re-raised.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import statistics
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from manifold_lab.cli import UsageError, writable_dir
from manifold_lab.data import ArrayDataset, epoch_permutation, load_dataset, pipeline_spec
from manifold_lab.data.pipeline import PipelineSpec
from manifold_lab.train import bn_stats, records, sharding
from manifold_lab.train.checkpoint import Checkpointer
from manifold_lab.train.config import TrainConfig
from manifold_lab.train.network import abstract_model, model_config_for, model_init_fn
from manifold_lab.train.optim import make_optimizer
from manifold_lab.train.run_dir import RunDir, config_digest
from manifold_lab.train.step import (init_state, make_eval_batch_fn, make_memory_eval, make_memory_step,
                                     make_stream_step, reset_sums)

#: Exit code of the command line when training diverges (non-finite loss).
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


def train(cfg: TrainConfig, run_dir: str | os.PathLike[str], resume: bool = False, *,
          stop_at_step: int | None = None, verbose: bool = True) -> dict[str, Any] | None:
    """Train one model; returns the summary (also written to ``run_dir/summary.json``).

    ``resume``: continue from the newest checkpoint in ``run_dir`` (start afresh when there is none;
    return the existing summary when the run is complete). Without it, a ``run_dir`` that already
    holds a run is a UsageError. ``stop_at_step``: checkpoint and return None after that step (as if
    interrupted there). Raises :class:`TrainingDiverged`, UsageError, or KeyboardInterrupt (after
    saving a checkpoint)."""
    out = run_engine(cfg, [cfg.seed], [run_dir], resume=resume, batched=False, stop_at_step=stop_at_step,
                     verbose=verbose)
    return None if out is None else out[0]


def run_engine(cfg: TrainConfig, seeds: Sequence[int], run_dirs: Sequence[str | os.PathLike[str]], *,
               resume: bool, batched: bool, stop_at_step: int | None, verbose: bool
               ) -> list[dict[str, Any]] | None:
    """Shared implementation of :func:`train` and ``train_seeds``: with ``batched``, the seeds run as
    one vmapped program (state arrays carry a leading seed axis)."""
    cfg = cfg.resolved()
    cfgs, dirs = _seed_runs(cfg, seeds, run_dirs)
    done = _existing_runs(cfgs, dirs, resume)
    if done is not None:
        return done

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
    seed_ints = jnp.asarray([c.seed for c in cfgs] if batched else cfgs[0].seed, jnp.uint32)
    state = programs.init(seed_ints, jnp.asarray(cfg.lr, jnp.float32))
    keys = [jax.random.key(c.seed) for c in cfgs]
    seed_keys = sharding.put_replicated(jnp.stack(keys) if batched else keys[0], mesh)

    main = jax.process_index() == 0
    ckpts = [Checkpointer(d) for d in dirs]
    try:
        start = _common_checkpoint(ckpts) if resume else None
        if start is not None:
            restored = [c.restore(start, _unstack(state, i) if batched else state) for i, c in enumerate(ckpts)]
            state = _stack(restored) if batched else restored[0]
        else:
            for c, d in zip(cfgs, dirs):
                if main:
                    RunDir(d).write_config(c.to_dict(), _resolved_info(plan, mcfg, n_params, len(cfgs)),
                                           dataclasses.asdict(mcfg), records.environment_info(list(mesh.devices.flat)))
        logs = [records.MetricsLog(RunDir(d).metrics_path, resume_step=start, enabled=main) for d in dirs]
        progress = [records.Progress(plan.total_steps, label=f"[seed {c.seed}]" if batched else "",
                                     enabled=main and verbose) for c in cfgs]
        if start is not None:
            progress[0].message(f"resuming from step {start}")
        loop = _Loop(cfgs, dirs, plan, programs, mesh, ckpts, logs, progress, batched, main)
        if streaming:
            state = loop.run_stream(state, seed_keys, train_data, test_data, start or 0, stop_at_step)
        else:
            state = loop.run_memory(state, seed_keys, train_data, test_data, start or 0, stop_at_step)
        if state is None:
            return None
        summaries = [_summary(c, plan, log.records, n_params) for c, log in zip(cfgs, logs)]
        if main:
            for d, summary in zip(dirs, summaries):
                RunDir(d).write_summary(summary)
        return summaries
    finally:
        for c in ckpts:
            c.close()


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


def _existing_runs(cfgs: list[TrainConfig], dirs: list[Path], resume: bool) -> list[dict[str, Any]] | None:
    """Check run directories against the configs; the summaries when every run is already complete."""
    runs = [RunDir(d) for d in dirs]
    for c, run in zip(cfgs, runs):
        if run.holds_run() and not resume:
            raise UsageError(f"{run.path} already holds a run: pass --resume or choose another --out")
        if run.config_path.exists():
            saved = run.train_config().resolved()
            diff = [f.name for f in dataclasses.fields(c) if getattr(saved, f.name) != getattr(c, f.name)]
            if diff:
                raise UsageError(f"cannot resume {run.path}: the config differs in {', '.join(diff)}")
    if resume and all(run.is_complete() for run in runs):
        return [run.summary() for run in runs]
    return None


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


def _resolved_info(plan: Plan, mcfg: Any, n_params: int, seeds_in_program: int) -> dict[str, Any]:
    info = dataclasses.asdict(plan)
    info["image_shape"] = list(plan.image_shape)
    info.update(params=n_params, epochs=plan.total_steps / plan.steps_per_epoch,
                seeds_in_program=seeds_in_program, model_class=type(mcfg).__name__)
    return info


def _stack(trees: list[Any]) -> Any:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _unstack(tree: Any, i: int) -> Any:
    return jax.tree.map(lambda x: x[i], tree)


def _common_checkpoint(ckpts: list[Checkpointer]) -> int | None:
    """The newest step saved in every run directory."""
    common = set(ckpts[0].steps())
    for c in ckpts[1:]:
        common &= set(c.steps())
    return max(common) if common else None


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
                             data_dir=None, epochs=1.0, steps=None)
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
        evaluate = jax.jit(make_eval_batch_fn(graphdef), out_shardings=rep)
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
        batch_sh = sharding.batch_sharded(self.mesh)
        end = self.plan.total_steps if stop_at is None else min(stop_at, self.plan.total_steps)
        batches: Iterator[tuple[np.ndarray, ...]] = train_data.batches(
            self.batch, seed=self.cfgs[0].seed, start_step=start, num_steps=max(end - start, 1))

        def advance(state: Any, step: int) -> Any:
            x, y = next(batches)
            return self.p.step(state, key, _put_batch(x, batch_sh), _put_batch(y, batch_sh))

        def evaluate(params: Any, stats: Any) -> tuple[jax.Array, jax.Array]:
            loss, correct = 0.0, 0.0
            for x, y, mask in test_data.batches(self.plan.eval_batch_size, num_workers=0):
                l, c = self.p.evaluate(params, stats, *(_put_batch(a, batch_sh) for a in (x, y, mask)))
                loss, correct = loss + l, correct + c
            return loss / len(test_data), correct / len(test_data)

        def precise(params: Any, stats: Any) -> Any:
            count = min(self.cfgs[0].eval_bn_batches, self.plan.steps_per_epoch)
            loader = train_data.batches(self.batch, seed=self.cfgs[0].seed, num_steps=count, num_workers=0)
            per_batch = [self.p.precise(params, stats, _put_batch(x, batch_sh)) for x, _ in loader]
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
        with _DeferredInterrupt() as interrupt:
            while step < end:
                state = advance(state, step)
                step += 1
                if self.plan.is_log_step(step):
                    state = self._log(state, step, evaluate)
                if interrupt.requested:
                    self._checkpoint(state, step)
                    self.progress[0].message(f"interrupted at step {step}; checkpoint saved, "
                                             f"continue with --resume")
                    raise KeyboardInterrupt
                if self.plan.is_checkpoint_step(step):
                    self._checkpoint(state, step)
        if step < self.plan.total_steps:
            self._checkpoint(state, step)
            return None
        return state

    def _check_finite(self, step: int, sums: dict[str, Any]) -> None:
        finite = np.asarray(sums["finite"]).reshape(-1) > 0
        if finite.all():
            return
        bad = [self.cfgs[i].seed for i in np.flatnonzero(~finite)]
        last = _common_checkpoint(self.ckpts)
        where = (f"the last good checkpoint is step {last} in {self.ckpts[0].directory}" if last is not None
                 else "no checkpoint was saved")
        seeds = f" (seed {', '.join(map(str, bad))})" if self.batched else ""
        raise TrainingDiverged(f"training diverged: non-finite loss by step {step}{seeds}; {where}",
                               step, last)

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
        self._check_finite(step, jax.device_get(state["sums"]))
        for i, c in enumerate(self.ckpts):
            c.save(step, _unstack(state, i) if self.batched else state)
        self.mark_time, self.mark_step = time.perf_counter(), step


def _put_batch(x: np.ndarray, batch_sh: jax.sharding.NamedSharding) -> jax.Array:
    if jax.process_count() == 1:
        return jax.device_put(x, batch_sh)
    return jax.make_array_from_callback(x.shape, batch_sh, lambda index: x[index])


class _DeferredInterrupt:
    """Turn SIGINT into a flag checked between steps (main thread only), so a step's donated
    buffers are never lost mid-update."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _DeferredInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


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
