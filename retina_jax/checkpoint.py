"""Checkpoints with orbax: save every N steps, keep the last few, resume the latest.

A checkpoint holds the whole train state (step, params, batch_stats, optimizer
state, running normalizer). The step also tells the input pipeline how many
batches were consumed, so a resumed run sees the same data as one that never
stopped (see train.py). The directory may be on shared storage (gs://...): in a
multi-host run every process calls these functions and orbax coordinates the
writes.
"""

import os

import jax
import orbax.checkpoint as ocp


def make_manager(workdir, keep):
  """A CheckpointManager writing to <workdir>/checkpoints, keeping the last `keep` steps."""
  if keep < 1:
    raise ValueError(f'train.keep_checkpoints must be >= 1, got {keep}')
  # Synchronous: a save is on disk when save() returns, so SIGTERM and error paths need no waiting.
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
  if '://' not in workdir:
    workdir = os.path.abspath(workdir)  # orbax refuses relative paths
  return ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'), options=options)


def save(manager, step, state):
  """Writes `state` as step `step`; it is on disk when this returns."""
  manager.save(int(step), args=ocp.args.StandardSave(state), force=True)


def latest_step(manager):
  """The newest saved step, or None when the directory has no checkpoint."""
  return manager.latest_step()


def restore(manager, target, step=None):
  """Reads a checkpoint into the structure, dtypes and shardings of `target`.

  Args:
    manager: from make_manager.
    target: a train state (arrays or jax.ShapeDtypeStruct with shardings) to restore into.
    step: the step to read; None or -1 for the latest.
  Returns:
    The restored state, or None when there is no checkpoint and step is None / -1.
  """
  if step is None or step < 0:
    step = manager.latest_step()
    if step is None:
      return None
  elif step not in manager.all_steps():
    raise FileNotFoundError(
        f'checkpoint step {step} not found in {manager.directory}; saved steps: {sorted(manager.all_steps())}')
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def restore_on_one_device(workdir, step=None):
  """Reads a checkpoint as a plain pytree on the first local device, whatever mesh wrote it.

  For analysis and tests (e.g. reading a pod's checkpoint on a laptop); training
  and evaluation restore into their own state with `restore`.

  Args:
    workdir: the run directory (its checkpoints/ subdirectory is read).
    step: the step to read; None or -1 for the latest.
  Returns:
    (step, pytree of jax.Array) with the saved structure (dicts for dataclasses).
  """
  manager = make_manager(workdir, 1)
  steps = manager.all_steps()
  manager.close()
  if not steps:
    raise FileNotFoundError(f'no checkpoint in {workdir}/checkpoints')
  step = max(steps) if step is None or step < 0 else step
  if step not in steps:
    raise FileNotFoundError(f'checkpoint step {step} not found in {workdir}; saved steps: {sorted(steps)}')
  path = os.path.join(manager.directory, str(step), 'default')
  checkpointer = ocp.StandardCheckpointer()
  meta = checkpointer.metadata(path)
  meta = getattr(meta, 'item_metadata', meta)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
  return step, checkpointer.restore(path, target)


def restore_variables(workdir, target, step=None):
  """Reads only the model variables (params, batch_stats) of a train-state checkpoint.

  The optimizer state stays on disk, so evaluation and prediction need neither an
  optimizer nor the optim.* settings that trained the model. Reads without
  creating or changing anything in `workdir`.

  Args:
    workdir: the run directory (its checkpoints/ subdirectory is read).
    target: {'params', 'batch_stats'} of jax.Array or jax.ShapeDtypeStruct (with
      shardings), e.g. jax.eval_shape of the model's init: the structure, shapes,
      dtypes and placement to read into.
    step: the step to read; None or -1 for the latest.
  Returns:
    (step, variables with the structure of `target`).
  Raises:
    FileNotFoundError: no checkpoint in workdir, or not the step asked for.
    ValueError: the saved variables differ from target's (a key or a shape),
      e.g. a config other than the one that trained the workdir.
  """
  if '://' not in workdir:
    workdir = os.path.abspath(workdir)  # orbax refuses relative paths
  directory = os.path.join(workdir, 'checkpoints')
  # Not read_only=True, which logs a warning on every use: without create, max_to_keep or a
  # save, the manager writes nothing.
  options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
  manager = ocp.CheckpointManager(directory, item_handlers=ocp.PyTreeCheckpointHandler(), options=options)
  try:
    steps = sorted(manager.all_steps())
    if not steps:
      raise FileNotFoundError(f'no checkpoint in {directory}')
    step = steps[-1] if step is None or step < 0 else int(step)
    if step not in steps:
      raise FileNotFoundError(f'checkpoint step {step} not found in {directory}; saved steps: {steps}')
    saved = manager.item_metadata(step)
    saved = getattr(saved, 'tree', saved)  # the metadata tree, whatever orbax wraps it in
    _check_same_variables(saved, target, f'{directory} step {step}')
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    # partial_restore: read params and batch_stats, leave opt_state, step, normalizer on disk.
    args = ocp.args.PyTreeRestore(item=abstract, partial_restore=True,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))
    return step, manager.restore(step, args=args)
  finally:
    manager.close()


def _check_same_variables(saved, target, where):
  """Raises ValueError naming the first variable whose key or shape differs."""
  def flat(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {'/'.join(str(getattr(k, 'key', k)) for k in path): tuple(leaf.shape) for path, leaf in leaves}
  want = flat(target)
  have = flat({k: saved[k] for k in target if k in saved})
  for key, shape in want.items():
    if key not in have:
      raise ValueError(f'{where}: no variable {key} (the config\'s model has it with shape {shape}); '
                       'is --config the one that trained this workdir?')
    if have[key] != shape:
      raise ValueError(f'{where}: {key} has shape {have[key]}, the config\'s model {shape}; '
                       'is --config the one that trained this workdir?')
  extra = sorted(set(have) - set(want))
  if extra:
    raise ValueError(f'{where}: {len(extra)} saved variables the config\'s model lacks, e.g. {extra[0]}; '
                     'is --config the one that trained this workdir?')
