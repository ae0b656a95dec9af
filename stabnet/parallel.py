"""Data parallelism: a 1-D ``('data',)`` mesh over every device of every host.

The train state is replicated, the batch is sharded along its first axis, and ``jax.jit`` does the
rest (SPMD): BatchNorm statistics and the loss are means over the *global* batch, so one device
and eight compute the same step. Across hosts (TPU VM slices, or several CPU processes in tests)
:func:`initialize` starts ``jax.distributed`` and every process feeds its own slice of each
global array with :func:`jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Start multi-host JAX. With no arguments JAX detects the cluster (TPU VM, SLURM, …).

    Must run before anything touches a device. A no-op when already initialised.
    """
    if jax.distributed.is_initialized():
        return
    # CPU processes (tests, CPU clusters) need a collectives implementation; others ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named ``'data'`` over ``devices`` (default: every device of every process)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """The leading axis split over ``'data'``."""
    return NamedSharding(mesh, P(AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, field: str = "batch_size") -> None:
    """Refuse a global batch that does not split evenly over the devices and processes."""
    devices = mesh.devices.size
    if batch_size % devices:
        raise ValueError(
            f"{field}={batch_size} does not divide over {devices} devices; use a multiple of "
            f"{devices} (e.g. --config.{field}={max(devices, batch_size // devices * devices)})"
        )


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """Place host values (identical on every process) on every device of the mesh."""
    sharding = replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree
    )


def process_rows(global_rows: int, mesh: Mesh) -> np.ndarray:
    """The rows of a global batch that this process feeds, in the order
    :func:`jax.make_array_from_process_local_data` places them: its devices' slices of
    :func:`batch_sharded`, sorted (contiguous where the mesh lists each process's devices
    together, as on GPUs and CPUs; not necessarily on TPU pods)."""
    slices = batch_sharded(mesh).addressable_devices_indices_map((global_rows,)).values()
    bounds = sorted({(s[0].start or 0, global_rows if s[0].stop is None else s[0].stop)
                     for s in slices})  # fmt: skip
    return np.concatenate([np.arange(a, b) for a, b in bounds])


def put_global_batch(local: Any, mesh: Mesh) -> Any:
    """Assemble a global batch from every process's local rows (``process_rows``)."""
    sharding = batch_sharded(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local
    )


def to_host(tree: Any) -> Any:
    """Fetch fully replicated arrays to numpy on every process (no cross-host transfer)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)
