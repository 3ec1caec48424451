"""Model measurements that need JAX: step-0 networks, Fig. 7's positive-channel counts and latency.

Fig. 7 (Appendix A): for every expanded block (t = 6) the number of positive channels of the
expansion output (after its ReLU6), per pixel and test image, from one jitted function of
``model(x, capture=True)``; :mod:`ablations.activity` turns the counts into the statistics the
report states. Only the measuring step (:mod:`ablations.measure`) imports this module.
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ablations.activity import LayerActivity

#: Compile the one-off initialisation program fast (its run time is irrelevant), as the trainer does.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@functools.lru_cache(maxsize=8)
def _init_program(model_cfg: Any) -> tuple[Any, Any]:
    from manifold_lab.train.network import abstract_model, model_init_fn

    return abstract_model(model_cfg)[0], jax.jit(model_init_fn(model_cfg), compiler_options=_FAST_COMPILE)


def init_model(model_cfg: Any, seed: int) -> nnx.Module:
    """The model of ``model_cfg`` as the trainer initialises it for ``seed`` (its jitted init function),
    i.e. the step-0 network of a run. The program is compiled once per config."""
    graphdef, init = _init_program(model_cfg)
    params, batch_stats = init(jnp.uint32(seed))
    return nnx.merge(graphdef, params, batch_stats)


def constant_model(model_cfg: Any) -> nnx.Module:
    """The network of ``model_cfg`` with every weight and statistic zero, without running an
    initialiser: enough to time it (XLA's CPU convolutions and matmuls do not depend on values)."""
    from manifold_lab.train.network import abstract_model

    graphdef, params, batch_stats = abstract_model(model_cfg)
    zeros = lambda tree: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), tree)  # noqa: E731
    return nnx.merge(graphdef, zeros(params), zeros(batch_stats))


def expanded_layers(model_cfg: Any) -> list[tuple[int, str, int, int]]:
    """(block index, capture name, expanded width, input width) of every block with an expansion conv."""
    return [(b.index, f"block{b.index:02d}/expansion", b.expanded_channels, b.in_channels)
            for b in model_cfg.blocks() if b.has_expansion]


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _positive_counts(graphdef: Any, names: tuple[str, ...], train: bool, state: Any,
                     x: jax.Array) -> dict[str, jax.Array]:
    """Per pixel and image, the number of positive channels of each named intermediate; with
    ``train`` the network normalises with the batch's statistics (as at a training step)."""
    model = nnx.merge(graphdef, state, copy=True)
    _, acts = model(x, train=train, dropout_key=jax.random.key(0) if train else None, capture=True)
    return {n: jnp.sum(acts[n] > 0, axis=-1, dtype=jnp.int32).reshape(x.shape[0], -1) for n in names}


def positive_counts(model: nnx.Module, model_cfg: Any, images: np.ndarray, batch_size: int = 64,
                    batch_statistics: bool = False) -> dict[str, np.ndarray]:
    """Per expanded layer (by capture name), the positive channels at every pixel of ``images``
    (normalised float NHWC), ``[images, pixels]``. ``batch_statistics``: BatchNorm normalises each
    batch with its own statistics (how the network runs at a training step: the only meaningful
    choice at step 0, where the running averages are still 0 / 1); otherwise with the model's
    running averages (inference).

    Images are processed in equal batches of ``min(batch_size, len(images))`` (a remainder is
    dropped, so shapes stay static); models of one architecture share one compiled function."""
    names = tuple(name for _, name, _, _ in expanded_layers(model_cfg))
    graphdef, state = nnx.split(model)
    batch = max(1, min(batch_size, len(images)))
    usable = len(images) // batch * batch
    if usable == 0:
        raise ValueError("positive_counts needs at least one image")
    per_layer: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for start in range(0, usable, batch):
        out = _positive_counts(graphdef, names, batch_statistics, state, jnp.asarray(images[start:start + batch]))
        for n in names:
            per_layer[n].append(np.asarray(out[n]))
    return {n: np.concatenate(per_layer[n]) for n in names}


def positive_channel_stats(model: nnx.Module, model_cfg: Any, images: np.ndarray, batch_size: int = 64,
                           batch_statistics: bool = False) -> list[LayerActivity]:
    """:func:`positive_counts` of every expanded layer, as :class:`LayerActivity` statistics."""
    counts = positive_counts(model, model_cfg, images, batch_size, batch_statistics)
    return [LayerActivity.from_counts(index, name, channels, threshold, counts[name])
            for index, name, channels, threshold in expanded_layers(model_cfg)]


#: Untimed calls before the timed ones of :func:`latency_ms` (compilation and first-call effects).
LATENCY_WARMUP = 3


def latency_ms(model: nnx.Module, image_shape: tuple[int, int, int], repeats: int = 50,
               warmup: int = LATENCY_WARMUP) -> tuple[float, float, float]:
    """Latency of a jitted batch-1 eval forward on JAX's default device: (median, 25th, 75th
    percentile) in ms over ``repeats`` calls after ``warmup`` untimed ones. The graph is closed over
    rather than passed as a static argument, so that a call's time is the forward pass and its
    dispatch, not the hashing of the model's graph."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x, train=False))
    x = jnp.zeros((1, *image_shape), jnp.float32)
    for _ in range(warmup):
        forward(state, x).block_until_ready()
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        forward(state, x).block_until_ready()
        times.append(1e3 * (time.perf_counter() - start))
    if len(times) < 2:
        return times[0], times[0], times[0]
    q = statistics.quantiles(times, n=4)
    return statistics.median(times), q[0], q[2]
