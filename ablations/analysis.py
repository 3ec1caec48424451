"""Model measurements for the figures: Fig. 7's positive-channel statistics and CPU latency.

Fig. 7 (Appendix A): for every expanded block (t = 6) the number of positive channels of the
expansion output (after its ReLU6), per pixel and test image; over all of them its minimum, mean and
maximum, in channels and as a fraction of the expanded width. The invertibility threshold is the
block's input width (Lemma 2: at least as many active units as input dimensions), 1/6 of the
expanded width. Counts come from one jitted function of ``model(x, capture=True)``.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


#: Compile the one-off initialisation program fast (its run time is irrelevant), as the trainer does.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@functools.lru_cache(maxsize=8)
def _init_program(model_cfg: Any) -> tuple[Any, Any]:
    from manifold_lab.train.loop import abstract_model, model_init_fn

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
    from manifold_lab.train.loop import abstract_model

    graphdef, params, batch_stats = abstract_model(model_cfg)
    zeros = lambda tree: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), tree)  # noqa: E731
    return nnx.merge(graphdef, zeros(params), zeros(batch_stats))


#: Bootstrap resamples of the images behind every Fig. 7 interval, and their generator's seed.
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


@dataclasses.dataclass(frozen=True)
class LayerActivity:
    """Positive channels of one expansion output at every pixel of every image: ``counts`` is
    ``[images, pixels]``. Statistics are over all pixels of all images, as fractions of the
    expanded width; intervals come from resampling images (pixels of one image are not
    independent)."""

    block: int
    name: str
    channels: int  # expanded width
    threshold: int  # block input width (invertibility threshold)
    counts: np.ndarray

    @property
    def fraction(self) -> np.ndarray:
        """Fraction of positive channels per pixel, ``[images, pixels]``."""
        return self.counts / self.channels

    @property
    def min(self) -> int:
        return int(self.counts.min())

    @property
    def max(self) -> int:
        return int(self.counts.max())

    @property
    def mean(self) -> float:
        return float(self.fraction.mean())

    @property
    def std(self) -> float:
        """Standard deviation across pixels (and images) of the positive fraction."""
        return float(self.fraction.std())

    @property
    def quartiles(self) -> tuple[float, float]:
        q25, q75 = np.percentile(self.fraction, [25, 75])
        return float(q25), float(q75)

    @property
    def threshold_fraction(self) -> float:
        return self.threshold / self.channels

    @property
    def below_threshold(self) -> float:
        """Share of pixels with fewer positive channels than the block's input width."""
        return float(np.mean(self.counts < self.threshold))

    def bootstrap_moments(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) of the positive fraction for each row of image ``weights`` ``[B, images]``
        (how often each image is drawn in a resample)."""
        f = self.fraction
        pixels = f.shape[1]
        s1, s2 = f.sum(axis=1), np.square(f).sum(axis=1)
        n = weights.sum(axis=1) * pixels
        mean = weights @ s1 / n
        return mean, np.sqrt(np.maximum(weights @ s2 / n - mean * mean, 0.0))


def bootstrap_weights(images: int, resamples: int = BOOTSTRAP_RESAMPLES,
                      seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """``[resamples, images]`` multiplicities of a fixed-seed bootstrap of the images (the same
    resamples serve every layer and every network, so ratios are paired)."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, images, (resamples, images))
    return np.stack([np.bincount(d, minlength=images) for d in draws]).astype(np.float64)


def interval(samples: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap ``samples``."""
    lo, hi = np.percentile(samples, [50 * (1 - confidence), 50 * (1 + confidence)])
    return float(lo), float(hi)


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


def positive_channel_stats(model: nnx.Module, model_cfg: Any, images: np.ndarray, batch_size: int = 64,
                           batch_statistics: bool = False) -> list[LayerActivity]:
    """Positive channels at every pixel of ``images`` (normalised float NHWC) for every expanded
    layer. ``batch_statistics``: BatchNorm normalises each batch with its own statistics (how the
    network runs at a training step: the only meaningful choice at step 0, where the running
    averages are still 0 / 1); otherwise with the model's running averages (inference).

    Images are processed in equal batches of ``min(batch_size, len(images))`` (a remainder is
    dropped, so shapes stay static); models of one architecture share one compiled function."""
    layers = expanded_layers(model_cfg)
    names = tuple(name for _, name, _, _ in layers)
    graphdef, state = nnx.split(model)
    batch = max(1, min(batch_size, len(images)))
    usable = len(images) // batch * batch
    if usable == 0:
        raise ValueError("positive_channel_stats needs at least one image")
    per_layer: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for start in range(0, usable, batch):
        out = _positive_counts(graphdef, names, batch_statistics, state, jnp.asarray(images[start:start + batch]))
        for n in names:
            per_layer[n].append(np.asarray(out[n]))
    return [LayerActivity(index, name, channels, threshold, np.concatenate(per_layer[name]))
            for index, name, channels, threshold in layers]


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef: Any, state: Any, x: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state)(x, train=False)


def latency_ms(model: nnx.Module, image_shape: tuple[int, int, int], repeats: int = 50,
               warmup: int = 3) -> tuple[float, float, float]:
    """CPU latency of a jitted batch-1 eval forward: (median, 25th, 75th percentile) in ms."""
    graphdef, state = nnx.split(model)
    x = jnp.zeros((1, *image_shape), jnp.float32)
    for _ in range(warmup):
        _forward(graphdef, state, x).block_until_ready()
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        _forward(graphdef, state, x).block_until_ready()
        times.append(1e3 * (time.perf_counter() - start))
    if len(times) < 2:
        return times[0], times[0], times[0]
    q = statistics.quantiles(times, n=4)
    return statistics.median(times), q[0], q[2]
