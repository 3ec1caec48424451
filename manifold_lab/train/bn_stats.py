"""BatchNorm statistics for evaluation: zero-debiased running averages and precise population
statistics.

A network evaluated with BatchNorm statistics that do not describe the population its weights see
gives wrong numbers, and the error is largest early in a run and in networks without shortcuts.
Two remedies, both on by default in the engine:

* **Zero-debiased running averages.** Every BatchNorm's running mean and variance start at 0 / 1
  and move towards each batch's statistics by ``1 - decay``; after ``t`` steps the initial values
  still weigh ``decay ** t`` (half of them after 230 steps at the paper's 0.997). The engine
  rescales each update by ``1 / (1 - decay ** t)`` (Adam's bias correction, TF's
  ``zero_debias_moving_mean``), so that the average at step ``t`` is the decay-weighted mean of the
  batches seen so far with weights that sum to one: the initial values never count.
* **Precise statistics** ("precise BN": pycls/detectron2's PreciseBN; Wu & Johnson, "Rethinking
  'Batch' in BatchNorm", 2021). Before an evaluation, the weights are frozen and the population
  mean and variance of every BatchNorm's input are re-estimated over a fixed set of training batches
  (the first ``eval_bn_batches`` batches of a dedicated data order of the seed), each layer seeing
  its input as the network computes it in training mode. With equal batches, the population
  variance is the mean of the batch variances plus the variance of the batch means, exactly.

``eval_bn`` chooses the statistics of the reported test accuracy: ``precise`` (default),
``running`` or ``both`` (precise reported, running recorded beside it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from manifold_lab.data.pipeline import PipelineSpec, epoch_permutation, normalize, train_batch

#: Random stream of the seed's key that orders the batches of the precise statistics.
PRECISE_STREAM = 3


def protocols(eval_bn: str) -> tuple[str, ...]:
    """The evaluation protocols measured under ``eval_bn``, the reported one first."""
    return ("precise", "running") if eval_bn == "both" else (eval_bn,)


def debias(previous: Any, updated: Any, decay: float, step: jax.Array) -> Any:
    """Zero-debiased running statistics after ``step`` (1-based) updates: ``updated`` is the
    model's biased update ``decay * previous + (1 - decay) * batch``; the result moves from
    ``previous`` towards the batch by ``(1 - decay) / (1 - decay ** step)`` instead (all the way
    at step 1)."""
    if decay == 0.0:
        return updated
    gain = 1.0 / (1.0 - jnp.power(jnp.float32(decay), step.astype(jnp.float32)))
    return jax.tree.map(lambda old, new: old + (new - old) * gain, previous, updated)


def batch_statistics_fn(graphdef: nnx.GraphDef) -> Callable:
    """``(params, batch_stats, x) -> stats``: every BatchNorm's mean and variance over the batch
    ``x`` (training-mode forward with frozen weights, no dropout), in the layout of
    ``batch_stats``. The running averages of a merged copy are overwritten with the batch's own
    statistics (decay 0), so nothing is mixed in from ``batch_stats``."""
    def statistics(params: Any, batch_stats: Any, x: jax.Array) -> Any:
        model = nnx.merge(graphdef, params, batch_stats, copy=True)
        for _, module in nnx.iter_graph(model):
            if isinstance(module, nnx.BatchNorm):
                module.momentum = 0.0
        model(x, train=True, dropout_key=jax.random.key(0))
        return nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    return statistics


def population(per_batch: Any) -> Any:
    """Population statistics from per-batch ones stacked on a leading axis (equal batch sizes):
    mean of the means; mean of the variances plus the variance of the means."""
    def combine(mean_b: jax.Array, var_b: jax.Array) -> tuple[jax.Array, jax.Array]:
        mean = mean_b.mean(axis=0)
        return mean, var_b.mean(axis=0) + jnp.mean(jnp.square(mean_b - mean), axis=0)
    return _map_layers(per_batch, combine)


def _map_layers(tree: Any, fn: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]) -> Any:
    """Apply ``fn(mean, var) -> (mean, var)`` to every BatchNorm entry (a dict with ``mean`` and
    ``var``) of a nested dict."""
    if isinstance(tree, dict) and set(tree) == {"mean", "var"}:
        mean, var = fn(tree["mean"], tree["var"])
        return {"mean": mean, "var": var}
    if isinstance(tree, dict):
        return {k: _map_layers(v, fn) for k, v in tree.items()}
    raise TypeError(f"unexpected BatchNorm statistics node {type(tree).__name__}")


def make_memory_precise(graphdef: nnx.GraphDef, spec: PipelineSpec, num_batches: int,
                        batch_sharding: jax.sharding.Sharding | None = None) -> Callable:
    """``(params, batch_stats, seed_key, images, labels) -> population stats`` for an in-memory
    dataset: the first ``num_batches`` training batches (shuffled by the seed's
    :data:`PRECISE_STREAM`, augmented as in training) in one program."""
    statistics = batch_statistics_fn(graphdef)
    num_batches = min(num_batches, spec.steps_per_epoch)

    def precise(params, batch_stats, seed_key, images, labels):
        key = jax.random.fold_in(seed_key, PRECISE_STREAM)
        perm = epoch_permutation(key, 0, spec.num_examples)

        def one(_, i):
            x, _ = train_batch(key, i, images, labels, spec, perm)
            if batch_sharding is not None:
                x = jax.lax.with_sharding_constraint(x, batch_sharding)
            return None, statistics(params, batch_stats, x)
        _, per_batch = jax.lax.scan(one, None, jnp.arange(num_batches))
        return population(per_batch)
    return precise


def make_stream_batch_statistics(graphdef: nnx.GraphDef, *, mean: tuple[float, ...],
                                 std: tuple[float, ...], dtype: str) -> Callable:
    """``(params, batch_stats, images_uint8) -> stats`` of one streamed training batch (normalised
    on the device as in training); :func:`population` of the stacked results gives the precise
    statistics."""
    statistics = batch_statistics_fn(graphdef)

    def one(params, batch_stats, images):
        return statistics(params, batch_stats, normalize(images, mean, std, dtype))
    return one


def stack(trees: list[Any]) -> Any:
    """Trees of equal structure stacked on a new leading axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
