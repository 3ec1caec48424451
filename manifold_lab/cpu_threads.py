"""The size of XLA:CPU's intra-op thread pool, which decides a CPU run's numbers, not only its speed.

XLA's CPU client runs a dot or a convolution on its pool of intra-op threads and splits the
contraction between them, so the order of the float additions depends on the pool's size: the
weight gradient of a 1x1 convolution (a sum over batch x pixels) comes out a few ulps apart with one
thread and with two, and a run drifts apart from there like any chaotic system (30 steps of a
width-0.35 network on digits: training loss 5.57 with one thread, 5.11 with two). Which cores a
process may use matters only through the pool's size: two threads pinned to one core give the bits
of two threads on two cores.

JAX sizes the pool once, when it starts its CPU client: ``$PJRT_NPROC`` threads when set (else
``$NPROC``), otherwise one per core the process may use. :func:`intra_op_threads` tells the size a
process has (``config.json`` records it under ``environment``); :func:`fix_intra_op_threads` sets it
for this process, before JAX starts its CPU client, and for the processes it starts. Importing this
module does not import JAX.
"""

from __future__ import annotations

import os
import sys

#: XLA:CPU's intra-op threads in every process of a sweep (``ablations.run``: parent and workers
#: alike; ``ablations.measure``), so that a run trains to the same numbers whatever ``--workers``, and
#: latencies are measured on one core as the paper's Table 4 is. One: what a worker pinned to one
#: core has anyway, and the faster setting for the CPU presets' small networks on 2 cores
#: (``benchmarks/README.md``).
SWEEP_THREADS = 1
#: The environment variables XLA reads for the pool size, in its order of precedence.
ENV_VARS: tuple[str, ...] = ("PJRT_NPROC", "NPROC")


def intra_op_threads() -> int:
    """The size of XLA:CPU's intra-op pool in this process (as JAX sizes it when it starts)."""
    for name in ENV_VARS:
        try:
            return max(0, int(os.environ[name]))
        except (KeyError, ValueError):
            continue
    return len(os.sched_getaffinity(0))


def cpu_client_started() -> bool:
    """Whether JAX has started its backends in this process (the pool's size is then settled)."""
    bridge = sys.modules.get("jax._src.xla_bridge")
    return bool(getattr(bridge, "_backends", None))


def fix_intra_op_threads(count: int) -> bool:
    """Give XLA:CPU's intra-op pool ``count`` threads in this process and in every process started
    from it afterwards (they inherit the environment); returns whether it did. A process whose JAX
    has started already (a notebook, a test) is left alone, its environment included."""
    if count < 1:
        raise ValueError(f"the intra-op pool needs at least one thread, got {count}")
    if cpu_client_started():
        return False
    os.environ[ENV_VARS[0]] = str(count)
    return True
