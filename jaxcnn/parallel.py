"""Data parallelism with JAX's own sharding: one mesh axis over the devices of one or several processes.

Every batch is split along the mesh axis ``batch``; params and optimizer state are replicated. The training step
is a ``jax.shard_map``: each device runs the network (and its hand-written VJPs, unchanged) on its shard, then the
objective and gradients are averaged over devices (one ``lax.psum``, see ``combine``); the mean of equal shards'
means is the whole batch's mean. Every device then applies the same update, so params stay replicated.

``check_vma`` is off: under JAX's varying-axes typing a custom VJP whose cotangent for a replicated weight is
computed from sharded activations must itself mark it varying, which these rules (written for one device, as the
notes derive them) do not; averaging the per-device gradients explicitly keeps them unchanged.

Each process feeds only its own part of every batch (``global_batch``); with several processes
(``initialize``, JAX's distributed runtime) each one holds the dataset and reads its slice of each batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "batch"


def initialize(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Join a multi-process run through ``jax.distributed.initialize`` (no-op without a coordinator)."""
    if coordinator is None:
        if num_processes not in (None, 1) or process_id not in (None, 0):
            raise ValueError("--num-processes and --process-id need --coordinator HOST:PORT")
        return
    if num_processes is None or process_id is None:
        raise ValueError("--coordinator needs --num-processes and --process-id")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id must be in [0, {num_processes}), got {process_id}")
    # Collectives between CPU processes (GPUs use their own); nothing may touch a device before initialize.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id)


def combine(mesh: Mesh, value: jax.Array, grads, aux: dict):
    """Inside the training step: the objective, gradients and loss averaged over the devices, the correct counts
    summed and the finite flags and-ed, by ONE all-reduce of one packed vector (one rendezvous per step instead of
    four; see ``pace`` for why CPU devices need as few as possible)."""
    flat, unravel = ravel_pytree(grads)
    dtype = flat.dtype
    scalars = jnp.stack([value.astype(dtype), aux["loss"].astype(dtype), aux["correct"].astype(dtype)])
    bad = jnp.logical_not(aux["finite"]).astype(dtype)  # 1 where a device saw a non-finite layer output
    total = lax.psum(jnp.concatenate([scalars, bad, flat]), AXIS)
    n, layers = mesh.size, bad.shape[0]
    aux = {"loss": (total[1] / n).astype(aux["loss"].dtype), "correct": total[2].astype(aux["correct"].dtype),
           "finite": total[3:3 + layers] == 0}
    return (total[0] / n).astype(value.dtype), unravel(total[3 + layers:] / n), aux


def paced(mesh: Mesh) -> bool:
    """Whether ``pace`` waits: the mesh spans several CPU devices."""
    return mesh.size > 1 and mesh.devices.flat[0].platform == "cpu"


def pace(mesh: Mesh, results: list) -> None:
    """Call after dispatching each program of a loop over ``mesh`` (``results``: their outputs so far, newest
    last): on several CPU devices, wait for the one before the newest, so that at most two programs are in flight.

    XLA's CPU client deadlocks when the host runs far ahead of multi-device programs with collectives: measured
    with 2 CPU devices on 2 cores, im2col rule, `jaxcnn train --batch-size 6` at XLA optimisation level 0, every
    run hung (3 of 3; 2 of 2 with batch 2). Its stacks: one device's share of a step waiting in the all-reduce
    rendezvous, the other device's share of the same step not started, its launch waiting for that device's
    in-flight-computations semaphore, every other thread idle. Waiting for the step before the last: 6 of 6 runs
    finished, 4 of 4 with batch 2. GPUs and single devices do not wait (there the run-ahead is what keeps the
    device busy)."""
    if len(results) > 1 and paced(mesh):
        jax.block_until_ready(results[-2])


def make_mesh(devices: int | None = None) -> Mesh:
    """A 1-D mesh over ``devices`` local devices of every process (default: all of them)."""
    local = jax.local_device_count()
    if devices is None:
        devices = local
    if isinstance(devices, bool) or not isinstance(devices, int) or not 1 <= devices <= local:
        raise ValueError(f"devices must be between 1 and the {local} local device(s), got {devices!r}")
    chosen = [d for p in range(jax.process_count())
              for d in sorted((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id)[:devices]]
    return Mesh(np.array(chosen), (AXIS,))


def check_batch(batch: int, mesh: Mesh, what: str = "batch size") -> None:
    if batch % mesh.size:
        raise ValueError(f"{what} {batch} is not divisible by the {mesh.size} devices it is split across; use a "
                         f"multiple of {mesh.size} (or fewer devices with --devices)")


def global_batch(mesh: Mesh, idx: np.ndarray, *arrays: np.ndarray) -> tuple[jax.Array, ...]:
    """The rows ``idx`` of each host array as one global array split along ``batch``; this process supplies
    only its own consecutive share of ``idx``."""
    share = np.asarray(idx).reshape(jax.process_count(), -1)[jax.process_index()]
    sharding = NamedSharding(mesh, P(AXIS))
    return tuple(jax.make_array_from_process_local_data(sharding, a[share]) for a in arrays)


def replicate(mesh: Mesh, tree):
    """Put every leaf of ``tree`` (the same values on every process) on every device of the mesh."""
    sharding = NamedSharding(mesh, P())

    def put(leaf):
        leaf = np.asarray(to_host(leaf))
        return jax.make_array_from_callback(leaf.shape, sharding, lambda index: leaf[index])

    return jax.tree_util.tree_map(put, tree)


def to_host(tree):
    """NumPy copies of replicated arrays (read from this process's first device: works with several processes)."""
    def get(leaf):
        if isinstance(leaf, jax.Array):
            return np.array(leaf.addressable_data(0), copy=True)
        return np.array(leaf, copy=True)

    return jax.tree_util.tree_map(get, tree)


def is_main() -> bool:
    """Whether this process writes files and prints (process 0)."""
    return jax.process_index() == 0
