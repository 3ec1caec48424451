"""Timing shared by the benchmark scripts: repeated calls of a jitted function after a warm-up."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

#: (median, min, max) seconds of a timed call.
Timing = tuple[float, float, float]


def time_calls(fn: Callable[[], object], repeats: int) -> Timing:
    """(median, min, max) seconds of ``repeats`` calls of ``fn`` after one warm-up call (which
    compiles), each waited for with ``jax.block_until_ready``."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times), max(times)


def matmul_ceiling(repeats: int) -> float:
    """GFLOP/s of XLA's float32 matmul of two 2048 x 2048 matrices, its fastest call: the
    machine's practical arithmetic peak, against which the benchmarks place their figures."""
    a, b = (jax.random.normal(jax.random.key(i), (2048, 2048), jnp.float32) for i in range(2))
    dot = jax.jit(jnp.dot)
    return 2 * 2048**3 / time_calls(lambda: dot(a, b), repeats)[1] / 1e9
