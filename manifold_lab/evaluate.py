"""``manifold-lab evaluate RUN_DIR``: a run directory's test accuracy, loss and top-5 accuracy at
any kept checkpoint, under either BatchNorm protocol and with raw or averaged weights.

The numbers come from the engine's own programs: the test set through
:func:`manifold_lab.train.step.make_memory_eval`, precise BatchNorm statistics through
:func:`manifold_lab.train.bn_stats.make_memory_precise` over the same training batches (the seed's
precise-statistics data order, the run's augmentation), on the same device mesh. Hence, at the
final checkpoint with the run's own protocol (``weights`` and ``eval_bn`` left unset), the accuracy
and loss equal ``summary.json``'s ``final_test_accuracy`` / ``final_test_loss`` exactly, for a run
trained alone (the seeds of a vmapped multi-seed program agree to float rounding) on the same number
of devices. A streamed dataset (``imagefolder``) is evaluated batch by batch, its images
normalised with the training statistics as in training. Example::

    from manifold_lab.evaluate import evaluate
    result = evaluate("runs/digits", eval_bn="running")   # {"test_accuracy": ..., "test_loss": ...}
"""

from __future__ import annotations

import json
import os
import sys
import types
from collections.abc import Sequence
from typing import Any

from manifold_lab.cli import ArgumentParser, UsageError, command_name, positive_int, run_main

PROG = command_name("evaluate", "manifold_lab.evaluate")
WEIGHTS = ("raw", "ema")
EVAL_BN = ("precise", "running")
TOP_K = 5


def run_protocol(cfg: Any) -> tuple[str, str]:
    """``(weights, eval_bn)`` of a run's own reported evaluations: the weight EMA where the run kept
    one, and the BatchNorm statistics its ``eval_bn`` reports (``both`` reports precise)."""
    return ("ema" if cfg.ema_decay is not None else "raw",
            "running" if cfg.eval_bn == "running" else "precise")


def _checkpoint_step(run: Any, step: int | None) -> int:
    """``step`` if the run kept that checkpoint, else (``None``) the newest one; UsageError otherwise."""
    from manifold_lab.train.checkpoint import Checkpointer
    checkpointer = Checkpointer(run.path)
    try:
        kept = checkpointer.steps()
    finally:
        checkpointer.close()
    if not kept:
        raise UsageError(f"no checkpoint in {run.path}")
    if step is None:
        return max(kept)
    if step not in kept:
        raise UsageError(f"no checkpoint of step {step} in {run.path} (kept: {', '.join(map(str, kept))})")
    return step


def _top_k_hits(graphdef: Any, k: int) -> Any:
    """``(params, batch_stats, x, y, mask) -> count`` of masked examples whose label is among the
    ``k`` highest logits (inference mode)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    def hits(params: Any, batch_stats: Any, x: jax.Array, y: jax.Array, mask: jax.Array) -> jax.Array:
        logits = nnx.merge(graphdef, params, batch_stats)(x, train=False)
        hit = jnp.any(jax.lax.top_k(logits, k)[1] == y[:, None], axis=-1) & mask
        return jnp.sum(hit.astype(jnp.float32))
    return hits


def _top_k_fn(graphdef: Any, k: int, *, batch_size: int, num_batches: int, mean: tuple[float, ...],
              std: tuple[float, ...], dtype: str) -> Any:
    """``(params, batch_stats, images, labels) -> top-k accuracy`` over an in-memory test set, with
    the batches of :func:`~manifold_lab.train.step.make_memory_eval`."""
    import jax
    import jax.numpy as jnp

    from manifold_lab.data.pipeline import eval_batch
    hits = _top_k_hits(graphdef, k)

    def top_k(params: Any, batch_stats: Any, images: jax.Array, labels: jax.Array) -> jax.Array:
        def body(i: jax.Array, total: jax.Array) -> jax.Array:
            x, y, mask = eval_batch(i, images, labels, batch_size=batch_size, mean=mean, std=std, dtype=dtype)
            return total + hits(params, batch_stats, x, y, mask)
        return jax.lax.fori_loop(0, num_batches, body, jnp.zeros((), jnp.float32)) / images.shape[0]
    return top_k


def _restore(run: Any, cfg: Any, weights: str, step: int, num_classes: int, channels: int) -> tuple[Any, ...]:
    """``(graphdef, params, batch_stats)`` of checkpoint ``step`` (pure dicts, the engine's form)."""
    from manifold_lab.train.network import abstract_model, model_config_for
    from manifold_lab.train.step import split_state
    model = run.restore_model(use_ema=weights == "ema", require_complete=False, step=step)
    _, params, batch_stats = split_state(model)
    return abstract_model(model_config_for(cfg, num_classes, channels))[0], params, batch_stats


def _measure(cfg: Any, graphdef: Any, params: Any, batch_stats: Any, eval_bn: str, data: tuple[Any, Any]
             ) -> dict[str, float | None]:
    """Test loss, accuracy and top-5 accuracy with the engine's programs (see the module docstring)."""
    import jax

    from manifold_lab.data import pipeline_spec
    from manifold_lab.train import bn_stats, sharding
    from manifold_lab.train.step import make_memory_eval

    train_data, test_data = data
    mesh = sharding.make_mesh(cfg.num_devices)
    rep, batch_sh = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    n_dev = mesh.devices.size
    batch_size = -(-min(cfg.eval_batch_size, len(test_data)) // n_dev) * n_dev
    sizes = dict(batch_size=batch_size, num_batches=-(-len(test_data) // batch_size),
                 mean=tuple(train_data.mean), std=tuple(train_data.std), dtype=cfg.compute_dtype)
    params, batch_stats = sharding.put_replicated((params, batch_stats), mesh)
    if eval_bn == "precise":
        spec = pipeline_spec(train_data, cfg.batch_size, dtype=cfg.compute_dtype,
                             **({} if cfg.augment else {"crop_padding": 0, "flip": False}))
        precise = jax.jit(bn_stats.make_memory_precise(graphdef, spec, cfg.eval_bn_batches, batch_sh),
                          out_shardings=rep)
        images, labels = sharding.put_replicated((train_data.images, train_data.labels), mesh)
        key = sharding.put_replicated(jax.random.key(cfg.seed), mesh)
        batch_stats = precise(params, batch_stats, key, images, labels)
    t_images, t_labels = sharding.put_replicated((test_data.images, test_data.labels), mesh)
    evaluate_fn = jax.jit(make_memory_eval(graphdef, **sizes, batch_sharding=batch_sh), out_shardings=rep)
    loss, accuracy = jax.device_get(evaluate_fn(params, batch_stats, t_images, t_labels))
    top5 = None
    if train_data.num_classes > TOP_K:
        top5 = float(jax.jit(_top_k_fn(graphdef, TOP_K, **sizes))(params, batch_stats, t_images, t_labels))
    return {"test_accuracy": float(accuracy), "test_loss": float(loss), "top5_accuracy": top5}


def _measure_stream(cfg: Any, graphdef: Any, params: Any, batch_stats: Any, eval_bn: str,
                    data: tuple[Any, Any]) -> dict[str, float | None]:
    """:func:`_measure` for a streamed dataset (``imagefolder``): the test batches one by one,
    normalised on the device as training normalises; precise statistics over the run's first
    ``eval_bn_batches`` training batches, as the engine's streamed path estimates them."""
    import jax

    from manifold_lab.data.pipeline import normalize
    from manifold_lab.train import bn_stats, sharding
    from manifold_lab.train.step import make_eval_batch_fn

    train_data, test_data = data
    mesh = sharding.make_mesh(cfg.num_devices)
    rep, batch_sh = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    put = lambda a: jax.device_put(a, batch_sh)
    n_dev = mesh.devices.size
    batch_size = -(-min(cfg.eval_batch_size, len(test_data)) // n_dev) * n_dev
    params, batch_stats = sharding.put_replicated((params, batch_stats), mesh)
    if eval_bn == "precise":
        one = jax.jit(bn_stats.make_stream_batch_statistics(
            graphdef, mean=tuple(train_data.mean), std=tuple(train_data.std), dtype=cfg.compute_dtype),
            out_shardings=rep)
        count = min(cfg.eval_bn_batches, len(train_data) // cfg.batch_size)
        loader = train_data.batches(cfg.batch_size, seed=cfg.seed, num_steps=count, num_workers=0)
        batch_stats = bn_stats.population(bn_stats.stack([one(params, batch_stats, put(x)) for x, _ in loader]))
    evaluate_fn = jax.jit(make_eval_batch_fn(graphdef), out_shardings=rep)
    top_k = jax.jit(_top_k_hits(graphdef, TOP_K), out_shardings=rep)
    loss, correct, hits = 0.0, 0.0, 0.0
    for x, y, mask in test_data.batches(batch_size, num_workers=0):
        xn = normalize(put(x), tuple(train_data.mean), tuple(train_data.std), cfg.compute_dtype)
        batch_loss, batch_correct = evaluate_fn(params, batch_stats, xn, put(y), put(mask))
        loss, correct = loss + batch_loss, correct + batch_correct
        if train_data.num_classes > TOP_K:
            hits = hits + top_k(params, batch_stats, xn, put(y), put(mask))
    n = len(test_data)
    loss, accuracy = jax.device_get((loss / n, correct / n))
    top5 = float(hits / n) if train_data.num_classes > TOP_K else None
    return {"test_accuracy": float(accuracy), "test_loss": float(loss), "top5_accuracy": top5}


def evaluate(run_dir: str | os.PathLike[str], *, step: int | None = None, weights: str | None = None,
             eval_bn: str | None = None, data_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Evaluate checkpoint ``step`` (default: the newest) of ``run_dir`` on its test set.

    ``weights``: ``raw`` or ``ema`` (default: as the run evaluated); ``eval_bn``: ``precise`` or
    ``running`` (default: the run's reported protocol); ``data_dir``: where the dataset lives if not
    where the run found it. Returns ``test_accuracy``, ``test_loss``, ``top5_accuracy`` (None with
    5 classes or fewer), ``step``, ``weights``, ``eval_bn``, ``test_examples`` and ``run_dir``.
    UsageError for a missing run, checkpoint or dataset."""
    from manifold_lab.data import ArrayDataset, load_dataset
    from manifold_lab.train.run_dir import RunDir

    run = RunDir(run_dir)
    cfg = run.train_config().resolved()
    own_weights, own_bn = run_protocol(cfg)
    weights, eval_bn = weights or own_weights, eval_bn or own_bn
    if weights not in WEIGHTS or eval_bn not in EVAL_BN:
        raise UsageError(f"weights must be one of {', '.join(WEIGHTS)} and eval_bn one of {', '.join(EVAL_BN)}")
    step = _checkpoint_step(run, step)
    data = load_dataset(cfg.dataset, data_dir if data_dir is not None else cfg.data_dir, cfg.image_size)
    graphdef, params, batch_stats = _restore(run, cfg, weights, step, data[0].num_classes,
                                             data[0].image_shape[-1])
    measure = _measure if isinstance(data[0], ArrayDataset) else _measure_stream
    numbers = measure(cfg, graphdef, params, batch_stats, eval_bn, data)
    return {**numbers, "step": step, "weights": weights, "eval_bn": eval_bn,
            "test_examples": len(data[1]), "run_dir": str(run.path)}


def build_parser() -> ArgumentParser:
    """The command line of ``manifold-lab evaluate``."""
    parser = ArgumentParser(prog=PROG, description="Test accuracy, loss and top-5 accuracy of a training run "
                            "directory at any kept checkpoint.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a training run directory (config.json, checkpoints/)")
    what = parser.add_argument_group("what to evaluate")
    what.add_argument("--step", type=positive_int, default=None,
                      help="evaluate this kept checkpoint (default: the newest)")
    what.add_argument("--weights", choices=WEIGHTS, default=None,
                      help="raw weights or their moving average (default: ema where the run kept one)")
    what.add_argument("--eval-bn", choices=EVAL_BN, default=None,
                      help="BatchNorm statistics: re-estimated over training batches or the running "
                           "averages (default: the run's reported protocol)")
    io = parser.add_argument_group("data and output")
    io.add_argument("--data-dir", default=None, help="dataset location (default: the run's)")
    io.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return parser


def format_result(result: dict[str, Any]) -> str:
    """One line of text for a result of :func:`evaluate`."""
    top5 = "" if result["top5_accuracy"] is None else f", top-5 {result['top5_accuracy']:.4f}"
    return (f"{result['run_dir']}: step {result['step']}, {result['weights']} weights, "
            f"{result['eval_bn']} BatchNorm: test accuracy {result['test_accuracy']:.4f}, test loss "
            f"{result['test_loss']:.4f}{top5} ({result['test_examples']} images)")


def main(argv: Sequence[str] | None = None) -> int:
    """``manifold-lab evaluate``: print the evaluation of a run directory; returns the exit code."""
    args = build_parser().parse_args(argv)
    result = evaluate(args.run_dir, step=args.step, weights=args.weights, eval_bn=args.eval_bn,
                      data_dir=args.data_dir)
    print(json.dumps(result) if args.json else format_result(result))
    return 0


class _CallableModule(types.ModuleType):
    """This module, callable as :func:`evaluate`: ``manifold_lab.evaluate`` names the module (a submodule
    import binds it there) and the function at once."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return evaluate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule


if __name__ == "__main__":
    raise SystemExit(run_main(main, prog=PROG))
