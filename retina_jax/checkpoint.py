"""Checkpoints with orbax: save every N steps, keep the last few, resume the latest usable one.

A checkpoint holds the whole train state (step, params, batch_stats, optimizer
state, running normalizer). The step also tells the input pipeline how many
batches were consumed, so a resumed run sees the same data as one that never
stopped (see train.py). The directory may be on shared storage (gs://...): in a
multi-host run every process calls these functions and orbax coordinates the
writes.

Integrity: orbax stores no checksum of the data (flipped bytes in a compressed chunk
can decode into other, finite numbers), so each save records a fingerprint of every
array in the step's metadata, computed on device. A restore checks the fingerprints,
that every value is finite and that the saved step is the step asked for. When the
latest step fails to read or to check, resuming or evaluating reports it in one line and
uses the previous step; training moves the failed step aside (checkpoints_unusable/),
never deletes it, so that the run can save that step again.

Training resumes the whole state with `restore`; everything else (evaluation,
prediction, the experiments) reads the model variables alone with `restore_variables`,
whatever optimizer wrote them.
"""

import contextlib
import gc
import os
import sys
import threading

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from retina_jax import errors


def check_keep(keep):
  """Raises errors.BadValue unless `keep` (config.train.keep_checkpoints) is at least 1."""
  errors.check_range('train.keep_checkpoints', keep, lo=1)


def make_manager(workdir, keep):
  """A CheckpointManager writing to <workdir>/checkpoints, keeping the last `keep` steps."""
  check_keep(keep)
  # Synchronous: a save is on disk when save() returns, so SIGTERM and error paths need no waiting.
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
  if '://' not in workdir:
    workdir = os.path.abspath(workdir)  # orbax refuses relative paths
  return ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'), options=options)


def _checksum(x):
  """[] uint32: sum_i bits_i * (2 i + 1) mod 2**32 over the flattened array.

  Integer arithmetic, so the result does not depend on how XLA orders the sum; the odd
  weights make any single flipped bit, and any swap of two values, change it.
  """
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  else:
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  bits = bits.ravel()
  return jnp.sum(bits * (2 * jnp.arange(bits.size, dtype=jnp.uint32) + 1), dtype=jnp.uint32)


def fingerprint(tree):
  """{'params/backbone/conv1/kernel': checksum, ...} of a pytree of arrays (computed on device).

  Paths use '/' for dict keys and dataclass fields alike, so a train state and the same
  state read back as nested dicts (or a part of it, e.g. the model variables) compare.
  """
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  sums = jax.device_get(jax.jit(lambda xs: [_checksum(x) for x in xs])([jnp.asarray(x) for _, x in leaves]))
  return {jax.tree_util.keystr(p, simple=True, separator='/'): int(c) for (p, _), c in zip(leaves, sums)}


def save(manager, step, state):
  """Writes `state` as step `step` with its fingerprint; it is on disk when this returns."""
  manager.save(int(step), args=ocp.args.StandardSave(state), force=True,
               custom_metadata={'fingerprint': fingerprint(state)})


def latest_step(manager):
  """The newest saved step, or None when the directory has no checkpoint."""
  return manager.latest_step()


def restore(manager, target, step=None, set_aside=False):
  """Reads a checkpoint into the structure, dtypes and shardings of `target`, and checks it.

  Args:
    manager: from make_manager.
    target: a train state (arrays or jax.ShapeDtypeStruct with shardings) to restore into.
    step: the step to read; None or -1 for the newest usable one: each newer step that
      fails to read or to check is reported in one line (a warning) and skipped.
    set_aside: move the skipped steps to <workdir>/checkpoints_unusable/<step> (training
      does, so that it can save those steps again; evaluation only reads).
  Returns:
    The restored state, or None when there is no checkpoint and step is None / -1.
  Raises:
    errors.NotFound: `step` was not saved.
    errors.BadValue: `step` (or, for the newest, every saved step) cannot be used.
  """
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)

  def read(s):
    return manager.restore(s, args=ocp.args.StandardRestore(abstract))

  found = _restore_checked(manager, step, read, set_aside)
  return None if found is None else found[1]


def _restore_checked(manager, step, read, set_aside=False):
  """`restore`'s choice of step, for any way of reading one: read(step) -> pytree.

  Returns:
    (the step used, what read returned), or None when there is no checkpoint and step is None / -1.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if step is not None and step >= 0:
    if step not in steps:
      raise errors.NotFound(
          f'checkpoint step {step} not found in {manager.directory}; saved steps: {steps[::-1]}')
    state, reason = _read_checked(manager, step, read)
    if reason:
      raise errors.BadValue(f'checkpoint step {step} in {manager.directory} cannot be used: {reason}')
    return step, state
  failed = []
  for s in steps:
    state, reason = _read_checked(manager, s, read)
    if reason is None:
      break
    failed.append((s, reason))
  else:
    if failed:
      raise errors.BadValue(f'no usable checkpoint in {manager.directory}: ' +
                            '; '.join(f'step {s}: {r}' for s, r in failed))
    return None
  moved = _set_aside(manager, [s for s, _ in failed]) if set_aside and failed else {}
  used = steps[len(failed)]
  for s, reason in failed:
    where = f'moved to {moved[s]}; ' if s in moved else ''
    logging.warning('checkpoint step %d in %s cannot be used (%s); %susing step %d',
                    s, manager.directory, reason, where, used)
  return used, state


@contextlib.contextmanager
def _quiet_failures():
  """Silences what a failed read leaves behind: orbax's pending reads die with its event loop
  and print 'Exception ignored ... Event loop is closed' tracebacks, hundreds of lines."""
  hooks = sys.unraisablehook, threading.excepthook
  sys.unraisablehook = lambda unraisable: None
  threading.excepthook = lambda args: None
  try:
    yield
  finally:
    gc.collect()  # finalizes the abandoned reads while their output is still muted
    sys.unraisablehook, threading.excepthook = hooks


def _reason(error):
  """One line: the innermost cause (e.g. tensorstore's 'OUT_OF_RANGE: ... byte range ...')."""
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__
  text = str(error).strip()
  line = text.splitlines()[0] if text else ''
  return f'{type(error).__name__}: {line[:240]}'


def _read_checked(manager, step, read):
  """(read(step), None), or (None, why this step cannot be used)."""
  with _quiet_failures():
    try:
      state = read(step)
      saved = (manager.metadata(step).custom_metadata or {}).get('fingerprint')
    except errors.UserError:
      raise  # the caller's own check failed (e.g. another config's model): no step would do
    except Exception as e:  # pylint: disable=broad-except  # whatever failed, this step is unreadable
      return None, _reason(e)
  reason = verify(state, saved, step)
  return (None, reason) if reason else (state, None)


def verify(state, saved_fingerprint, step=None):
  """Why a restored state cannot be used, or None.

  Args:
    state: the restored pytree.
    saved_fingerprint: what `save` recorded (None for checkpoints written before it did).
    step: the step the state was read as; checked against its 'step' entry when it has one.
  """
  if saved_fingerprint is not None:
    now = fingerprint(state)
    changed = sorted(k for k in now if k in saved_fingerprint and now[k] != saved_fingerprint[k])
    if changed:
      return f'{len(changed)} array(s) differ from what was saved, e.g. {changed[0]} (corrupted on disk)'
  finite = jax.device_get(jax.jit(lambda t: [jnp.all(jnp.isfinite(x)) for x in t])(
      [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.inexact)]))
  if not all(finite):
    return 'it holds non-finite values'
  saved_step = getattr(state, 'step', None) if not isinstance(state, dict) else state.get('step')
  if step is not None and saved_step is not None and int(saved_step) != int(step):
    return f'it holds the state of step {int(saved_step)}'
  return None


def _set_aside(manager, steps):
  """Moves step directories to <workdir>/checkpoints_unusable/; returns {step: new path}."""
  directory = manager.directory
  target = directory.parent / 'checkpoints_unusable'
  moved = {}
  multihost_utils.sync_global_devices('checkpoint: before setting aside')
  for step in steps:
    dest = target / str(step)
    n = 1
    while dest.exists():  # an earlier run set aside the same step
      n += 1
      dest = target / f'{step}.{n}'
    moved[step] = dest
    if jax.process_index() == 0:
      target.mkdir(parents=True, exist_ok=True)
      (directory / str(step)).rename(dest)
  multihost_utils.sync_global_devices('checkpoint: set aside')
  manager.reload()
  return moved


def restore_on_one_device(workdir, step=None):
  """Reads a checkpoint as a plain pytree on the first local device, whatever mesh wrote it.

  For analysis and tests (e.g. reading a pod's checkpoint on a laptop); training
  restores with `restore`, evaluation with `restore_variables`.

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
    raise errors.NotFound(f'no checkpoint in {workdir}/checkpoints')
  step = max(steps) if step is None or step < 0 else step
  if step not in steps:
    raise errors.NotFound(f'checkpoint step {step} not found in {workdir}; saved steps: {sorted(steps)}')
  path = os.path.join(manager.directory, str(step), 'default')
  checkpointer = ocp.StandardCheckpointer()
  meta = checkpointer.metadata(path)
  meta = getattr(meta, 'item_metadata', meta)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
  return step, checkpointer.restore(path, target)


def restore_variables(workdir, target, step=None, missing_ok=False):
  """Reads only the model variables (params, batch_stats) of a train-state checkpoint, checked.

  What evaluation, prediction and the experiments read: the optimizer state stays on
  disk, so they need neither an optimizer nor the optim.* settings that trained the
  model. The steps are chosen and checked as `restore` does (fingerprints of the
  variables read, finite values; the newest unusable steps reported and skipped), and
  nothing in `workdir` is created or changed.

  Args:
    workdir: the run directory (its checkpoints/ subdirectory is read).
    target: {'params', 'batch_stats'} of jax.Array or jax.ShapeDtypeStruct (with
      shardings), e.g. retinanet.abstract_variables: the structure, shapes, dtypes
      and placement to read into.
    step: the step to read; None or -1 for the newest usable one.
    missing_ok: return None, rather than raise, when workdir has no checkpoint and step
      is None / -1 (evaluation then falls back to the pretrained weights).
  Returns:
    (step, variables with the structure of `target`), or None (see missing_ok).
  Raises:
    errors.NotFound: no checkpoint in workdir (unless missing_ok), or `step` was not saved.
    errors.BadValue: `step` (or, for the newest, every saved step) cannot be used; or the
      saved variables differ from target's (a key or a shape), e.g. a config other than
      the one that trained the workdir.
  """
  if '://' not in workdir:
    workdir = os.path.abspath(workdir)  # orbax refuses relative paths
  directory = os.path.join(workdir, 'checkpoints')
  # Not read_only=True, which logs a warning on every use: without create, max_to_keep or a
  # save, the manager writes nothing.
  options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
  manager = ocp.CheckpointManager(directory, item_handlers=ocp.PyTreeCheckpointHandler(), options=options)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  # partial_restore: read params and batch_stats, leave opt_state, step, normalizer on disk.
  args = ocp.args.PyTreeRestore(item=abstract, partial_restore=True,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))

  def read(s):
    saved = manager.item_metadata(s)
    saved = getattr(saved, 'tree', saved)  # the metadata tree, whatever orbax wraps it in
    if not saved:
      raise ValueError('its metadata is missing')  # a damaged step, not another model
    _check_same_variables(saved, target, f'{directory} step {s}')
    return manager.restore(s, args=args)

  try:
    found = _restore_checked(manager, step, read)
  finally:
    manager.close()
  if found is None and not missing_ok:
    raise errors.NotFound(f'no checkpoint in {directory}')
  return found


def _check_same_variables(saved, target, where):
  """Raises errors.BadValue naming the first variable whose key or shape differs."""
  def flat(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {'/'.join(str(getattr(k, 'key', k)) for k in path): tuple(leaf.shape) for path, leaf in leaves}
  want = flat(target)
  have = flat({k: saved[k] for k in target if k in saved})
  for key, shape in want.items():
    if key not in have:
      raise errors.BadValue(f'{where}: no variable {key} (the config\'s model has it with shape {shape}); '
                            'is --config the one that trained this workdir?')
    if have[key] != shape:
      raise errors.BadValue(f'{where}: {key} has shape {have[key]}, the config\'s model {shape}; '
                            'is --config the one that trained this workdir?')
  extra = sorted(set(have) - set(want))
  if extra:
    raise errors.BadValue(f'{where}: {len(extra)} saved variables the config\'s model lacks, '
                          f'e.g. {extra[0]}; is --config the one that trained this workdir?')
