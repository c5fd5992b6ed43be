"""Data parallelism: one ('data',) mesh over every device of every process.

The train and eval steps are written as single-device code on the global batch;
`jax.jit` with these shardings splits the batch over 'data' and replicates the
state, and XLA inserts the cross-device reductions (the gradient all-reduce, the
global count of positive anchors). Multi-host runs start JAX's own runtime with
`jax.distributed.initialize` and every process feeds its own slice of the batch.
"""

import os
import sys
import threading

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from retina_jax import errors


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None, timeout_s=300):
  """Starts JAX's multi-process runtime.

  With no arguments JAX detects the cluster itself (Cloud TPU pods, SLURM,
  Open MPI); on a plain cluster give all three. When some process does not join
  within timeout_s, this process prints which coordinator it waited for and exits
  with status 1 (JAX itself would abort later with a C++ stack trace).

  Args:
    coordinator_address: 'host:port' of process 0, or None to auto-detect.
    num_processes: total number of processes, or None to auto-detect.
    process_id: index of this process in [0, num_processes), or None.
    timeout_s: seconds to wait for every process to join.
  """
  given = [v is not None for v in (coordinator_address, num_processes, process_id)]
  if any(given) and not all(given):
    raise errors.BadValue(
        'distributed: give coordinator_address, num_processes and process_id together, or none of '
        f'them to auto-detect; got {coordinator_address!r}, {num_processes!r}, {process_id!r}')
  who = (f'process {process_id} of {num_processes}' if all(given) else 'this process')
  where = coordinator_address or 'the coordinator JAX detects (TPU metadata, SLURM, Open MPI)'
  print(f'distributed: {who} joining {where} (waiting up to {timeout_s} s)', file=sys.stderr, flush=True)

  def give_up():
    # The main thread is inside JAX's C++ client, which no Python exception can interrupt.
    print(f'error: distributed: {who}: not every process joined {where} within {timeout_s} s '
          '(--distributed_timeout); check that all of them started, with the same --coordinator_address '
          'and --num_processes, and that its port is reachable', file=sys.stderr, flush=True)
    os._exit(1)  # pylint: disable=protected-access

  watchdog = threading.Timer(timeout_s, give_up)
  watchdog.daemon = True
  watchdog.start()
  try:
    # JAX's own limit is later, so that the message above is what the user sees.
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=timeout_s + 60)
  finally:
    watchdog.cancel()


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
