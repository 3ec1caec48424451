"""Appendix A inside a network: is a block's input recoverable where its expansion's ReLU6 acts,
and how much of it survives the block?

Lemma 2 (the paper's Appendix A): the input x of a layer ``act(W x + b)`` is recovered exactly from
the output at a point where the rows of W that belong to the *active* units (those where the
activation is invertible: strictly between its clamp bounds, 0 < z < 6 for ReLU6, since both clips
lose information) have rank equal to the input width. :func:`rank_test` checks that condition at every
pixel (a batched SVD of the active rows, NumPy's rank tolerance); :func:`audit_model` applies it to
every expansion of a MobileNetV2 (its 1x1 kernel with the BatchNorm folded in), and measures beside it
how well the best linear decoder recovers each block's input from its output
(:func:`linear_decoder_ev`) and how often a non-linear bottleneck clips.

Applied to ``ReLU(T x)`` of the spiral experiment the same rank test counts the points where fewer than
d units are active: Theorem 1's collapsed fraction.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from manifold_lab.models.activations import activation_spec
from manifold_lab.train import bn_stats

#: Pixels per call of the batched SVD (a static shape: the last chunk is padded).
RANK_CHUNK = 8192
#: Percentiles of the smallest singular value reported per layer.
SIGMA_PERCENTILES = (5, 50)


def active_mask(pre: jax.Array | np.ndarray, act: str) -> jax.Array:
    """Units where activation ``act`` is invertible at pre-activation ``pre``: strictly inside its
    clamp bounds (every unit for ``linear``)."""
    spec = activation_spec(act)
    return (jnp.asarray(pre) > spec.lo) & (jnp.asarray(pre) < spec.hi)


#: Points whose smallest singular value, estimated from the Gram matrix of the active rows, is at
#: least this fraction of their largest are full rank beyond doubt; the others get an exact SVD.
CLEAR_MARGIN = 1e-2


@jax.jit
def _singular_values(mask: jax.Array, rows: jax.Array) -> jax.Array:
    return jnp.linalg.svd(jnp.where(mask[..., None], rows, 0.0), compute_uv=False)


@jax.jit
def _gram_eigenvalues(mask: jax.Array, rows: jax.Array) -> jax.Array:
    """Eigenvalues (ascending) of each point's Gram matrix of its active rows, ``[P, D]``."""
    gram = jnp.einsum("pk,kd,ke->pde", mask.astype(rows.dtype), rows, rows)
    return jnp.linalg.eigvalsh(gram)


def _chunked(fn: Any, mask: np.ndarray, rows: jax.Array, width: int) -> np.ndarray:
    """``fn(mask_chunk, rows)`` over fixed-size chunks of points (the last one padded)."""
    points, k = mask.shape
    chunk = min(RANK_CHUNK, max(points, 1))
    values = [np.zeros((0, width), np.float32)]
    for start in range(0, points, chunk):
        part = mask[start:start + chunk]
        padded = np.zeros((chunk, k), bool)
        padded[:len(part)] = part
        values.append(np.asarray(fn(jnp.asarray(padded), rows))[:len(part)])
    return np.concatenate(values)


def rank_test(mask: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per point (row of ``mask`` ``[P, K]``): the rank of the rows of ``rows`` ``[K, D]`` that the mask
    selects, with NumPy's ``matrix_rank`` tolerance on that submatrix (largest singular value x
    max(rows selected, D) x machine epsilon), and its D-th largest singular value (0 where the rank
    is below D).

    Batched and jitted: the eigenvalues of each point's Gram matrix of active rows decide the points
    that are full rank beyond doubt (:data:`CLEAR_MARGIN`); the rest get an SVD of the masked rows
    (zeroed rows leave the other singular values unchanged)."""
    mask = np.asarray(mask, dtype=bool)
    rows = jnp.asarray(rows, jnp.float32)
    points, (k, d) = mask.shape[0], rows.shape
    selected = mask.sum(axis=1)
    eig = np.maximum(_chunked(_gram_eigenvalues, mask, rows, d), 0.0)
    clear = (selected >= d) & (eig[:, 0] >= CLEAR_MARGIN ** 2 * eig[:, -1]) & (eig[:, -1] > 0)
    rank = np.where(clear, d, 0)
    smallest = np.where(clear, np.sqrt(eig[:, 0]), 0.0).astype(np.float32)
    doubtful = np.flatnonzero(~clear)
    if len(doubtful):
        s = _chunked(_singular_values, mask[doubtful], rows, min(k, d))
        tol = s[:, 0] * np.maximum(selected[doubtful], d) * np.finfo(np.float32).eps
        rank[doubtful] = (s > tol[:, None]).sum(axis=1)
        exact = s[:, d - 1] if k >= d else np.zeros(len(doubtful), np.float32)
        smallest[doubtful] = np.where(rank[doubtful] >= d, exact, 0.0)
    return rank, smallest


class RidgeDecoder:
    """The least-squares linear decoder (with intercept) of targets from features, fitted from
    batches: sums of the features, targets, their products (float64), then solved once with a ridge
    of ``ridge`` x the mean feature variance."""

    def __init__(self, ridge: float = 1e-6) -> None:
        self.ridge = ridge
        self.count = 0
        self.sums: list[np.ndarray] = []  # sum f, sum t, f^T f, f^T t
        self.coef: np.ndarray | None = None

    def add(self, features: np.ndarray, targets: np.ndarray) -> None:
        """Add training rows (``[n, D_f]``, ``[n, D_t]``)."""
        f, t = np.asarray(features, np.float32), np.asarray(targets, np.float32)
        parts = [f.sum(0), t.sum(0), f.T @ f, f.T @ t]
        self.sums = [p.astype(np.float64) for p in parts] if not self.sums else \
            [acc + p for acc, p in zip(self.sums, parts)]
        self.count += len(f)

    def fit(self) -> RidgeDecoder:
        """Solve the normal equations of the centred rows; no decoder (``coef`` None) with fewer rows
        than features, where least squares interpolates the training rows instead of decoding."""
        sum_f, sum_t, ff, ft = self.sums
        if self.count <= len(ff):
            return self
        self.f_mean, self.t_mean = sum_f / self.count, sum_t / self.count
        gram = ff - self.count * np.outer(self.f_mean, self.f_mean)
        gram[np.diag_indices_from(gram)] += self.ridge * max(np.trace(gram), 1e-30) / len(gram)
        self.coef = np.linalg.solve(gram, ft - self.count * np.outer(self.f_mean, self.t_mean))
        return self

    def errors(self, features: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
        """(squared error of the decoded targets, squared deviation from the training mean) over rows."""
        t = np.asarray(targets, np.float64)
        decoded = (np.asarray(features, np.float64) - self.f_mean) @ self.coef + self.t_mean
        return float(np.square(t - decoded).sum()), float(np.square(t - self.t_mean).sum())


def explained_variance(errors: Sequence[tuple[float, float]]) -> float:
    """1 - residual / total over the (residual, total) sums of :meth:`RidgeDecoder.errors`."""
    residual, total = (sum(e[i] for e in errors) for i in (0, 1))
    return 1.0 - residual / total if total > 0 else 1.0


def linear_decoder_ev(train_features: np.ndarray, train_targets: np.ndarray, test_features: np.ndarray,
                      test_targets: np.ndarray, ridge: float = 1e-6) -> float:
    """Explained variance, on the test rows, of the linear decoder fitted on the training rows
    (:class:`RidgeDecoder`): 1 when the targets are a linear function of the features."""
    decoder = RidgeDecoder(ridge)
    decoder.add(train_features, train_targets)
    return explained_variance([decoder.fit().errors(test_features, test_targets)])


def folded_rows(layer: Any) -> np.ndarray:
    """The rows ``[C_out, C_in]`` of a 1x1 ConvBN's map in inference mode: its kernel with the
    BatchNorm's scale folded in (``W' = diag(gamma / sqrt(var + eps)) W``)."""
    kernel = np.asarray(layer.kernel[...], np.float32)
    if kernel.shape[:2] != (1, 1):
        raise ValueError(f"expected a 1x1 convolution, got a {kernel.shape[0]}x{kernel.shape[1]} kernel")
    bn = layer.bn
    scale = np.asarray(bn.scale[...]) / np.sqrt(np.asarray(bn.var[...]) + bn.epsilon)
    return (kernel[0, 0] * scale[None, :]).T.astype(np.float32)


# ----------------------------------------------------------------------------- a network's blocks

@dataclasses.dataclass(frozen=True)
class BlockAudit:
    """One bottleneck block's audit (fields without an expansion conv are None; see
    :func:`audit_model`)."""

    index: int
    stride: int
    in_channels: int
    out_channels: int
    expanded_channels: int | None
    pixels: int
    invertible_share: float | None
    below_threshold_share: float | None
    active_histogram: list[int] | None
    sigma_min_p05: float | None
    sigma_min_median: float | None
    decoder_ev: float | None
    clipped_share: float | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BlockAudit:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})


@functools.lru_cache(maxsize=8)
def _taps(graphdef: nnx.GraphDef) -> Any:
    """Jitted ``(state, x) -> {block: taps}``: each block's input and output, its expansion's and its
    projection's pre-activations (inference mode, the network's own forward pass)."""
    def taps(state: Any, x: jax.Array) -> dict[int, dict[str, jax.Array]]:
        model = nnx.merge(graphdef, state)
        _, acts = model(x, train=False, capture=True)
        out = {}
        for i, block in enumerate(model.blocks):
            x_in = acts["stem"] if i == 0 else acts[f"block{i - 1:02d}/projection"]
            entry = {"input": x_in, "output": acts[f"block{i:02d}/projection"],
                     "bottleneck": block.projection.preactivation(acts[f"block{i:02d}/depthwise"], False)}
            if block.expansion is not None:
                entry["expansion"] = block.expansion.preactivation(x_in, False)
            out[i] = entry
        return out
    return jax.jit(taps)


def _batches(images: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """``images`` in equal batches (the remainder dropped: static shapes, one compilation)."""
    batch = max(1, min(batch_size, len(images)))
    return [images[i:i + batch] for i in range(0, len(images) // batch * batch, batch)]


class _BlockAccumulator:
    """What one block's audit gathers over batches of test (and training) images."""

    def __init__(self, block: Any, max_decoder_features: int, with_decoder: bool) -> None:
        self.block = block
        self.expansion_act = block.expansion.act if block.expansion is not None else None
        self.bottleneck_act = block.projection.act
        self.masks: list[np.ndarray] = []
        self.clipped, self.outputs = 0, 0
        self.decoder = RidgeDecoder() if with_decoder else None
        self.max_features = max_decoder_features
        self.errors: list[tuple[float, float]] = []

    def decodes(self, taps: dict[str, jax.Array]) -> bool:
        return self.decoder is not None and int(np.prod(taps["output"].shape[1:])) <= self.max_features

    def add_train(self, taps: dict[str, jax.Array]) -> None:
        if self.decodes(taps):
            n = taps["output"].shape[0]
            self.decoder.add(np.asarray(taps["output"]).reshape(n, -1), np.asarray(taps["input"]).reshape(n, -1))

    def add_test(self, taps: dict[str, jax.Array]) -> None:
        if self.expansion_act is not None:
            pre = taps["expansion"]
            self.masks.append(np.asarray(active_mask(pre, self.expansion_act)).reshape(-1, pre.shape[-1]))
        if self.bottleneck_act != "linear":
            self.clipped += int(jnp.sum(~active_mask(taps["bottleneck"], self.bottleneck_act)))
            self.outputs += int(taps["bottleneck"].size)
        if self.decodes(taps) and self.decoder.coef is not None:
            n = taps["output"].shape[0]
            self.errors.append(self.decoder.errors(np.asarray(taps["output"]).reshape(n, -1),
                                                   np.asarray(taps["input"]).reshape(n, -1)))

    def result(self, spec: Any) -> BlockAudit:
        """The block's :class:`BlockAudit` from what was gathered."""
        lemma: dict[str, Any] = dict.fromkeys(("invertible_share", "below_threshold_share", "active_histogram",
                                               "sigma_min_p05", "sigma_min_median"))
        pixels = 0
        if self.masks:
            mask = np.concatenate(self.masks)
            pixels = len(mask)
            lemma = _lemma2_summary(mask, folded_rows(self.block.expansion), spec.in_channels)
        fitted = self.decoder is not None and self.decoder.coef is not None and self.errors
        return BlockAudit(
            index=spec.index, stride=spec.stride, in_channels=spec.in_channels, out_channels=spec.out_channels,
            expanded_channels=spec.expanded_channels if spec.has_expansion else None, pixels=pixels, **lemma,
            decoder_ev=explained_variance(self.errors) if fitted else None,
            clipped_share=self.clipped / self.outputs if self.outputs else None)


def _lemma2_summary(mask: np.ndarray, rows: np.ndarray, in_channels: int) -> dict[str, Any]:
    """Lemma 2 at every pixel of ``mask`` (``[pixels, expanded]``) for the folded rows."""
    rank, sigma = rank_test(mask, rows)
    largest = float(np.linalg.norm(rows.astype(np.float64), 2))
    relative = sigma / largest if largest > 0 else sigma
    p05, p50 = (float(v) for v in np.percentile(relative, SIGMA_PERCENTILES))
    active = mask.sum(axis=1)
    return {"invertible_share": float(np.mean(rank >= in_channels)),
            "below_threshold_share": float(np.mean(active < in_channels)),
            "active_histogram": np.bincount(active, minlength=mask.shape[1] + 1).tolist(),
            "sigma_min_p05": p05, "sigma_min_median": p50}


def audit_model(model: Any, test_images: np.ndarray, train_images: np.ndarray | None = None, *,
                batch_size: int = 128, max_decoder_features: int = 4096) -> list[BlockAudit]:
    """Audit every bottleneck block of a MobileNetV2 ``model`` (inference mode) on NHWC images
    normalised as the network expects: Lemma 2 at every pixel of the test images' expansions (the
    active units of the BatchNorm-folded 1x1 map, their rank against the input width, the smallest
    singular value of the active rows relative to the map's largest), the share of a non-linear
    bottleneck's outputs at a clip, and, with ``train_images``, the explained variance on the test
    images of the linear decoder of each block's input from its output, both over the whole feature
    map (blocks whose output has more than ``max_decoder_features`` values are not decoded)."""
    graphdef, state = nnx.split(model)
    taps = _taps(graphdef)
    accumulators = [_BlockAccumulator(block, max_decoder_features, train_images is not None)
                    for block in model.blocks]
    if train_images is not None:
        for x in _batches(np.asarray(train_images, np.float32), batch_size):
            out = taps(state, jnp.asarray(x))
            for i, acc in enumerate(accumulators):
                acc.add_train(out[i])
        for acc in accumulators:
            if acc.decoder is not None and acc.decoder.count:
                acc.decoder.fit()
    for x in _batches(np.asarray(test_images, np.float32), batch_size):
        out = taps(state, jnp.asarray(x))
        for i, acc in enumerate(accumulators):
            acc.add_test(out[i])
    return [acc.result(spec) for acc, spec in zip(accumulators, model.config.blocks())]


@functools.lru_cache(maxsize=8)
def _batch_statistics(graphdef: nnx.GraphDef) -> Any:
    return jax.jit(bn_stats.batch_statistics_fn(graphdef))


def with_population_statistics(model: Any, images: np.ndarray, batch_size: int = 128) -> Any:
    """A copy of ``model`` whose BatchNorm running statistics are the population statistics of
    ``images`` (equal batches, frozen weights): how a step-0 network, whose running averages are
    still 0 and 1, is evaluated."""
    from manifold_lab.train.step import split_state

    graphdef, params, stats = split_state(model)
    statistics = _batch_statistics(graphdef)
    per_batch = [statistics(params, stats, jnp.asarray(x))
                 for x in _batches(np.asarray(images, np.float32), batch_size)]
    return nnx.merge(graphdef, params, bn_stats.population(bn_stats.stack(per_batch)))
