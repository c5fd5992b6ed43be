"""Data parallelism: one ('data',) mesh over every device of every process.

The train and eval steps are written as single-device code on the global batch;
`jax.jit` with these shardings splits the batch over 'data' and replicates the
state, and XLA inserts the cross-device reductions (the gradient all-reduce, the
global count of positive anchors). Multi-host runs start JAX's own runtime with
`jax.distributed.initialize` and every process feeds its own slice of the batch.
"""

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None):
  """Starts JAX's multi-process runtime.

  With no arguments JAX detects the cluster itself (Cloud TPU pods, SLURM,
  Open MPI); on a plain cluster give all three.

  Args:
    coordinator_address: 'host:port' of process 0, or None to auto-detect.
    num_processes: total number of processes, or None to auto-detect.
    process_id: index of this process in [0, num_processes), or None.
  """
  given = [v is not None for v in (coordinator_address, num_processes, process_id)]
  if any(given) and not all(given):
    raise ValueError(
        'distributed: give coordinator_address, num_processes and process_id together, or none of '
        f'them to auto-detect; got {coordinator_address!r}, {num_processes!r}, {process_id!r}')
  jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)


def make_mesh(devices=None):
  """A 1-D mesh named 'data' over `devices` (default: all devices of all processes).

  Devices keep jax.devices()' order (process by process), so the rows of a
  global batch follow process order.
  """
  devices = jax.devices() if devices is None else list(devices)
  return jax.sharding.Mesh(
      np.asarray(devices), ('data',), axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh):
  """Leading (batch) axis split over 'data', the rest replicated."""
  return NamedSharding(mesh, P('data'))


def replicated(mesh):
  """The same full value on every device (train state, anchors)."""
  return NamedSharding(mesh, P())


def global_batch(local, mesh):
  """Process-local numpy arrays -> global jax.Arrays sharded over 'data'.

  Args:
    local: dict of arrays, each [b, ...] with b = global batch / process_count.
    mesh: the ('data',) mesh.
  Returns:
    dict of jax.Array, each [b * process_count, ...], split over 'data'.
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}
