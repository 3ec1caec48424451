"""Data parallelism with ``jax.sharding``: a 1-D ``Mesh`` over the devices (axis ``"data"``), the batch
sharded along it, parameters, optimiser state and in-memory datasets replicated. BatchNorm batch
statistics are computed over the global batch (XLA inserts the cross-device reductions), so the
result does not depend on the number of devices beyond float rounding.

Multi-host: :func:`initialize_distributed` calls ``jax.distributed.initialize`` when a coordinator
is given (flags) or ``MANIFOLD_LAB_DISTRIBUTED=1`` is set (auto-detection on Cloud TPU, SLURM, ...);
every process then runs the same program on the global mesh and only process 0 writes files. On the
CPU the processes reduce through Gloo over TCP (JAX's default ``jax_cpu_collectives_implementation``:
nothing to set). Input is per process: each loads only the rows of the global batch its own devices
hold (:func:`process_rows`) and the global array is assembled from those shares
(:func:`put_process_batch`); the global batch of a step is the same images in the same order
whatever the number of processes. Host-side decisions that must agree across processes (corrupt
input files) read :func:`gather_processes`.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from manifold_lab.cli import UsageError

DATA_AXIS = "data"
DISTRIBUTED_ENV = "MANIFOLD_LAB_DISTRIBUTED"


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Start multi-host JAX if configured (flags, or ``$MANIFOLD_LAB_DISTRIBUTED=1`` for JAX's
    auto-detection). Returns whether it was initialised. Must run before any other JAX call."""
    if coordinator_address is None and os.environ.get(DISTRIBUTED_ENV, "") not in ("1", "true"):
        return False
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    return True


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D data-parallel mesh over the first ``num_devices`` devices (all global devices when None)."""
    devices = jax.devices()
    if num_devices is not None:
        if num_devices > len(devices):
            raise UsageError(f"asked for {num_devices} devices but only {len(devices)} are available")
        if jax.process_count() > 1 and num_devices != len(devices):
            raise UsageError("multi-host training uses every device; leave --devices unset")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh, leading_axes: int = 0) -> NamedSharding:
    """The batch axis (after ``leading_axes`` unsharded axes, e.g. a seed axis) split over the mesh."""
    return NamedSharding(mesh, PartitionSpec(*([None] * leading_axes), DATA_AXIS))


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """Place every array of ``tree`` (host or device, typed PRNG keys included) on all devices of
    ``mesh``; works across processes when every process holds the same values."""
    sharding = replicated(mesh)

    def put(x: Any) -> Any:
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
    return jax.tree.map(put, tree)


def check_batch_divisible(batch_size: int, mesh: Mesh) -> None:
    """The global batch must split evenly over the devices."""
    n = mesh.devices.size
    if batch_size % n:
        raise UsageError(f"batch size {batch_size} is not divisible by the {n} devices")


def process_rows(batch_size: int, mesh: Mesh) -> tuple[int, int]:
    """The rows ``[start, stop)`` of a global batch of ``batch_size`` that this process's devices hold
    under :func:`batch_sharded`: the share this process loads (all rows on one process). UsageError
    when they are not one contiguous range (a mesh whose devices interleave the processes)."""
    spans = sorted({(index[0].start or 0, batch_size if index[0].stop is None else index[0].stop)
                    for index in batch_sharded(mesh).addressable_devices_indices_map((batch_size,)).values()})
    if any(stop != start for (_, stop), (start, _) in zip(spans, spans[1:])):
        raise UsageError(f"this process's devices hold rows {spans} of the batch, not one range")
    return spans[0][0], spans[-1][1]


def put_process_batch(local: np.ndarray, batch_sh: NamedSharding, batch_size: int) -> jax.Array:
    """The global ``[batch_size, ...]`` array sharded by ``batch_sh`` from this process's rows
    (:func:`process_rows`) of it."""
    return jax.make_array_from_process_local_data(batch_sh, local, (batch_size, *local.shape[1:]))


def gather_processes(local: np.ndarray) -> np.ndarray:
    """Every process's ``local`` (same shape everywhere) concatenated along axis 0 in process order;
    ``local`` itself on one process. A collective: every process must call it alike."""
    if jax.process_count() == 1:
        return np.asarray(local)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(local, tiled=True))
