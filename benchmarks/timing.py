"""Timing shared by the benchmark scripts: repeated calls of a jitted function after a warm-up."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax

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
