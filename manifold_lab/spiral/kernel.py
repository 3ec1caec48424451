"""The vectorised sweep: per-trial collapse and reconstruction metrics for every n = 1..n_max at once.

Draws. Trial j's matrix for width n is ``T_n = T[j, :n, :]``, the first n rows of one ``[n_max, d]``
draw; row i of trial j is ``normal(fold_in(fold_in(key, j), i), (d,))``. Each ``T_n`` is therefore
exactly an i.i.d. N(0, 1) n x d matrix, independent across trials, and a run's numbers for a given
(seed, trial, n) do not depend on ``--trials`` or on the other ``--dims``. Only the estimates for
*different* n within one trial are correlated (nested rows); every per-n mean and interval is exact.
A law with entries N(mu, 1) (the positive-mean control, :mod:`.theory`) uses the same draws plus mu,
so the two laws are compared on the same noise.

Accumulation. Going through the units in order (``lax.scan``), each (trial, point) keeps running sums
over the units seen so far: the number of active units, ``T^T y``, the active-set Gram matrix
``G = sum_active t_i t_i^T`` and ``b = sum_active t_i y_i``; each trial keeps ``T^T T``. After unit
n the decoders are read off these d x d systems, so n = 1..n_max costs one pass over the units:

* naive (Moore-Penrose): ``x_hat = T^+ y = (T^T T)^+ T^T y``;
* active set (least squares on the active rows, minimum-norm): ``x_hat = G^+ b``;

with the pseudo-inverse of a rank-r PSD d x d matrix applied to a vector in its range in closed form
(Cayley-Hamilton on the range; r = min(n, d) for the naive decoder and min(#active, d) for the active
set, the generic ranks for Gaussian T): r = 1: ``b / tr G``; r = 2: ``(tr G b - G b) / c2`` with c2
the sum of the principal 2 x 2 minors; r = 3 (d = 3): ``adj(G) b / det G``; r = 0: 0. For the naive
decoder that matrix is formed once per trial.

"Active" means the unit's derivative is non-zero: ``Tx > 0`` for relu, ``0 < Tx < 6`` for relu6
(saturated units carry no local information either), every unit for linear. A point x is *collapsed*
when fewer than d units are active: the map's Jacobian at x is T restricted to the active rows, of
rank < d, so the d-dimensional neighbourhood of x is squeezed onto a lower-dimensional set (the
paper's Lemma 2 condition, at least d active units, fails). This is Theorem 1's quantity. It concerns
the full d-dimensional neighbourhood, not the 1-D curve itself: a collapsed point of the spiral may
still keep its tangent direction.

Memory: the trials are processed in chunks (``lax.map``), so the working set is about
``chunk x points x (d(d+1)/2 + 2d + 1)`` floats whatever the sweep size.

:func:`collapsed_per_trial` is the same scan keeping only the active counts (no decoders): the cheap
pass that measures a run's second law of T.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

ACTIVATIONS = ("relu", "relu6", "linear")
CHUNK_ELEMENTS = 80_000 # trials x points per chunk: keeps the running sums in cache


def draw_matrices(seed: int, trials: int, n_max: int, d: int) -> jax.Array:
    """The random matrices of every trial, ``[trials, n_max, d]`` float32 (see module docstring)."""
    return _draw(jax.random.key(seed), trials, n_max, d)


def matrices(seed: int, trials: int, n_max: int, d: int, mean: float = 0.0) -> np.ndarray:
    """float64 ``[trials, n_max, d]``: :func:`draw_matrices` plus ``mean``, i.e. i.i.d. N(mean, 1)
    entries on the same noise for every mean."""
    return np.asarray(draw_matrices(seed, trials, n_max, d), np.float64) + float(mean)


@partial(jax.jit, static_argnums=(1, 2, 3))
def _draw(key: jax.Array, trials: int, n_max: int, d: int) -> jax.Array:
    def one(trial: jax.Array, unit: jax.Array) -> jax.Array:
        return jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, trial), unit), (d,))

    units = jnp.arange(n_max)
    return jax.vmap(lambda j: jax.vmap(lambda i: one(j, i))(units))(jnp.arange(trials))


def activate(z: jax.Array, activation: str) -> tuple[jax.Array, jax.Array]:
    """``(y, active)`` for pre-activations ``z``: the output and the non-zero-derivative mask."""
    if activation == "relu":
        return jnp.maximum(z, 0.0), z > 0.0
    if activation == "relu6":
        return jnp.clip(z, 0.0, 6.0), (z > 0.0) & (z < 6.0)
    if activation == "linear":
        return z, jnp.ones(z.shape, bool)
    raise ValueError(f"unknown activation {activation!r}; choose from {', '.join(ACTIVATIONS)}")


def _range_inverse(g: dict, d: int, rank: jax.Array) -> dict:
    """A d x d matrix ``A`` (entries ``A[(k, l)]``) with ``A b = G^+ b`` for every b in range(G),
    for a PSD ``G`` (entries ``g[(k, l)]``, k <= l) of rank ``rank`` (arrays broadcast together)."""
    at = lambda k, l: g[(min(k, l), max(k, l))]  # noqa: E731
    trace = sum(at(k, k) for k in range(d))
    minors2 = sum(at(k, k) * at(l, l) - at(k, l) ** 2 for k in range(d) for l in range(k + 1, d))
    safe = lambda v: jnp.where(v == 0.0, jnp.ones_like(v), v)  # noqa: E731  (unselected branches)
    eye = lambda k, l: 1.0 if k == l else 0.0  # noqa: E731
    candidates = {
        1: lambda k, l: eye(k, l) / safe(trace),
        2: lambda k, l: (eye(k, l) * trace - at(k, l)) / safe(minors2),
    }
    if d == 3:
        cof = {(k, l): at((k + 1) % 3, (l + 1) % 3) * at((k + 2) % 3, (l + 2) % 3)
               - at((k + 1) % 3, (l + 2) % 3) * at((k + 2) % 3, (l + 1) % 3)
               for k in range(3) for l in range(3)}
        det = sum(at(0, l) * cof[(0, l)] for l in range(3))
        candidates[3] = lambda k, l: cof[(l, k)] / safe(det)
    out = {}
    for k in range(d):
        for l in range(d):
            value = jnp.zeros_like(trace)
            for r, entry in candidates.items():
                value = jnp.where(rank == r, entry(k, l), value)
            out[(k, l)] = value
    return out


def _apply(a: dict, b: list) -> list:
    """Matrix (dict of entries) times vector (list of arrays)."""
    return [sum(a[(k, l)] * b[l] for l in range(len(b))) for k in range(len(b))]


def _pinv_apply_pointwise(g: dict, b: list, rank: jax.Array) -> list:
    """``G^+ b`` per point (same closed forms as :func:`_range_inverse`, written as one numerator and
    one denominator per point so there is a single division)."""
    d = len(b)
    at = lambda k, l: g[(min(k, l), max(k, l))]  # noqa: E731
    trace = sum(at(k, k) for k in range(d))
    minors2 = sum(at(k, k) * at(l, l) - at(k, l) ** 2 for k in range(d) for l in range(k + 1, d))
    gb = _apply({(k, l): at(k, l) for k in range(d) for l in range(d)}, b)
    numer = {1: b, 2: [trace * b[k] - gb[k] for k in range(d)]}
    denom = {1: trace, 2: minors2}
    if d == 3:
        cof = {(k, l): at((k + 1) % 3, (l + 1) % 3) * at((k + 2) % 3, (l + 2) % 3)
               - at((k + 1) % 3, (l + 2) % 3) * at((k + 2) % 3, (l + 1) % 3)
               for k in range(3) for l in range(3)}
        numer[3] = [sum(cof[(l, k)] * b[l] for l in range(3)) for k in range(3)]
        denom[3] = sum(at(0, l) * cof[(0, l)] for l in range(3))
    den = jnp.ones_like(trace)
    num = [jnp.zeros_like(bk) for bk in b]
    for r in numer:
        sel = rank == r
        den = jnp.where(sel, denom[r], den)
        num = [jnp.where(sel, numer[r][k], num[k]) for k in range(d)]
    inv = 1.0 / den
    return [nk * inv for nk in num]


def _chunk_metrics(t: jax.Array, x: jax.Array, activation: str) -> jax.Array:
    """Per-trial metrics for one chunk of trials: ``[n_max, 3, chunk]`` (collapsed fraction,
    mean naive relative error, mean active-set relative error).

    The running sums of every (trial, point) live in one stacked array ``[S, chunk, points]`` (count,
    T^T y, [b for relu6], G) so that each unit's update is one fused loop."""
    chunk, n_max, d = t.shape
    xs = [x[:, k][None, :] for k in range(d)]
    inv_norm = 1.0 / jnp.linalg.norm(x, axis=1)[None, :]
    pairs = [(k, l) for k in range(d) for l in range(k, d)]
    separate_b = activation == "relu6"  # relu and linear outputs vanish off the active set: b == T^T y
    size = 1 + d * (2 if separate_b else 1) + len(pairs)
    state0 = jnp.zeros((size, chunk, x.shape[0]), x.dtype)
    gram0 = jnp.zeros((len(pairs), chunk, 1), x.dtype)

    def unpack(state: jax.Array) -> tuple[jax.Array, list, list, dict]:
        count, ty = state[0], [state[1 + k] for k in range(d)]
        b = [state[1 + d + k] for k in range(d)] if separate_b else ty
        first_g = 1 + d * (2 if separate_b else 1)
        return count, ty, b, {p: state[first_g + i] for i, p in enumerate(pairs)}

    def rel_error(x_hat: list) -> jax.Array:
        return jnp.sqrt(sum((x_hat[k] - xs[k]) ** 2 for k in range(d))) * inv_norm

    def step(carry: tuple, inputs: tuple) -> tuple[tuple, jax.Array]:
        state, gram = carry
        n, row = inputs  # n = number of units so far (this one included), row [chunk, d]
        tk = [row[:, k][:, None] for k in range(d)]
        z = sum(tk[k] * xs[k] for k in range(d))
        y, active = activate(z, activation)
        m = active.astype(x.dtype)
        my = m * y
        parts = [m] + [tk[k] * y for k in range(d)]
        parts += [tk[k] * my for k in range(d)] if separate_b else []
        parts += [m * (tk[k] * tk[l]) for k, l in pairs]
        state = state + jnp.stack(parts)
        gram = gram + jnp.stack([tk[k] * tk[l] for k, l in pairs])
        count, ty, b, g = unpack(state)
        naive = _apply(_range_inverse(dict(zip(pairs, gram)), d, jnp.minimum(n, d)), ty)
        active_set = _pinv_apply_pointwise(g, b, jnp.minimum(count, d))
        per_point = jnp.stack([(count < d).astype(x.dtype), rel_error(naive), rel_error(active_set)])
        return (state, gram), jnp.mean(per_point, axis=2)

    _, out = jax.lax.scan(step, (state0, gram0), (jnp.arange(1, n_max + 1), jnp.swapaxes(t, 0, 1)))
    return out


@partial(jax.jit, static_argnames=("activation", "chunk"))
def sweep_metrics(t: jax.Array, x: jax.Array, activation: str, chunk: int) -> jax.Array:
    """Per-trial metrics for every n = 1..n_max: ``[n_max, 3, trials]`` in ``x``'s dtype.

    ``t`` ``[trials, n_max, d]`` (trials a multiple of ``chunk``), ``x`` ``[points, d]``, same dtype.
    Rows: 0 collapsed fraction, 1 mean ||T^+ act(Tx) - x|| / ||x||, 2 the same for the active-set
    least-squares decoder (means over points)."""
    trials, n_max, d = t.shape
    chunks = t.reshape(trials // chunk, chunk, n_max, d)
    out = jax.lax.map(lambda c: _chunk_metrics(c, x, activation), chunks)  # [chunks, n_max, 3, chunk]
    return jnp.moveaxis(out, 0, 2).reshape(n_max, 3, trials)


def _check(x: np.ndarray, activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose from {', '.join(ACTIVATIONS)}")
    if x.shape[1] not in (2, 3):
        raise ValueError(f"input dimension must be 2 or 3, got {x.shape[1]}")


def _run_grouped(program: Callable[[jax.Array, jax.Array], jax.Array], t: np.ndarray, x: np.ndarray, chunk: int) -> np.ndarray:
    """``program(t_part, x)`` (a jitted function of float64 ``[k * chunk, n_max, d]`` matrices, with
    the trials on its output's last axis) on one contiguous group of chunks per CPU core, each from its
    own thread (XLA runs one such program on one core); the trials are padded to whole chunks and the
    padding cut off again. Every trial's numbers are independent of the grouping."""
    trials, n_max, d = t.shape
    n_chunks = -(-trials // chunk)
    groups = max(1, min(os.cpu_count() or 1, n_chunks))
    per_group = -(-n_chunks // groups) * chunk
    t = np.concatenate([t, np.ones((per_group * groups - trials, n_max, d))])
    x64 = np.asarray(x, np.float64)

    def run(group: int) -> np.ndarray:
        with jax.enable_x64(True):  # thread-local: entered in the thread that traces and runs
            part = jnp.asarray(t[group * per_group:(group + 1) * per_group])
            return np.asarray(program(part, jnp.asarray(x64)))

    with ThreadPoolExecutor(groups) as pool:
        parts = list(pool.map(run, range(groups)))
    return np.concatenate(parts, axis=-1)[..., :trials]


def per_trial_metrics(x: np.ndarray, seed: int, trials: int, n_max: int, activation: str,
                      mean: float = 0.0) -> np.ndarray:
    """Draw the matrices (entries N(``mean``, 1), :func:`matrices`) and run :func:`sweep_metrics` in
    float64, one thread per core; ``[n_max, 3, trials]`` NumPy array.

    float64 because the active-set normal equations square the condition number of the active rows,
    which is heavy-tailed at small n (in float32 a few near-singular points reached errors of 1e8)."""
    _check(x, activation)
    chunk = int(max(1, min(trials, CHUNK_ELEMENTS // x.shape[0])))
    program = partial(sweep_metrics, activation=activation, chunk=chunk)
    return _run_grouped(program, matrices(seed, trials, n_max, x.shape[1], mean), x, chunk)


@partial(jax.jit, static_argnames=("activation", "chunk"))
def sweep_collapsed(t: jax.Array, x: jax.Array, activation: str, chunk: int) -> jax.Array:
    """Row 0 of :func:`sweep_metrics` alone, ``[n_max, trials]``: the same scan over the units keeping
    only each (trial, point)'s running count of active units, so no decoder is formed."""
    trials, n_max, d = t.shape
    xs = [x[:, k][None, :] for k in range(d)]

    def one(c: jax.Array) -> jax.Array:  # [chunk, n_max, d] -> [n_max, chunk]
        def step(count: jax.Array, row: jax.Array) -> tuple[jax.Array, jax.Array]:
            z = sum(row[:, k][:, None] * xs[k] for k in range(d))
            count = count + activate(z, activation)[1].astype(x.dtype)
            return count, jnp.mean((count < d).astype(x.dtype), axis=1)

        count0 = jnp.zeros((c.shape[0], x.shape[0]), x.dtype)
        return jax.lax.scan(step, count0, jnp.swapaxes(c, 0, 1))[1]

    out = jax.lax.map(one, t.reshape(trials // chunk, chunk, n_max, d))  # [chunks, n_max, chunk]
    return jnp.moveaxis(out, 0, 1).reshape(n_max, trials)


def collapsed_per_trial(x: np.ndarray, seed: int, trials: int, n_max: int, activation: str,
                        mean: float = 0.0) -> np.ndarray:
    """The collapsed fraction alone (row 0 of :func:`per_trial_metrics`, the same numbers) for T with
    i.i.d. N(``mean``, 1) entries: ``[n_max, trials]``. Much cheaper than the full sweep, so a run's
    second law of T (the control, or the Gaussian reference) adds little time."""
    _check(x, activation)
    chunk = int(max(1, min(trials, CHUNK_ELEMENTS // x.shape[0])))
    program = partial(sweep_collapsed, activation=activation, chunk=chunk)
    return _run_grouped(program, matrices(seed, trials, n_max, x.shape[1], mean), x, chunk)
