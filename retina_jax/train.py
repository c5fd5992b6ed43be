"""Training: the train state, one jitted data-parallel step, and the loop.

Reads top to bottom: build the pieces from the config, create (or restore) the
state, compile the step with explicit shardings, run the loop with metrics,
checkpoints and periodic evaluation.

Data parallelism: the step is single-device code on the *global* batch. jit
splits the batch over the ('data',) mesh and replicates the state, so the
number of positive anchors that normalizes the loss, trainable BatchNorm
statistics and the gradient mean are all over the global batch.

Host and device: the step also reports whether the state it produced is finite
(parameters, BatchNorm statistics, optimizer state: a finite loss can still give a
non-finite update). The loop reads a step's metrics while the next step runs, and
before every save or evaluation, so a non-finite state is never written. SIGTERM is
checked at logged steps (a collective over processes); every process saves, then the
loop raises Preempted so that the job ends with a non-zero status a scheduler can requeue.

Resuming: the data iterator is deterministic given config.seed and the process
index; a resumed run rebuilds it and skips the `step` batches the checkpoint
already consumed, so it sees exactly the batches of a run that never stopped.

Size buckets (config.data.use_buckets): the step compiles once per bucket, with the
bucket's anchors. Which bucket a step uses follows from the step number and the split's
image sizes, which the processes exchange once at the start (one allgather), never per step.
"""

import signal
import sys
import threading
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from jax.experimental import multihost_utils

from retina_jax import checkpoint
from retina_jax import errors
from retina_jax import evaluate
from retina_jax import losses
from retina_jax import metric_writer
from retina_jax import optim
from retina_jax import sharding
from retina_jax.data import pipeline
from retina_jax.data import source
from retina_jax.model import retinanet


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs; replicated on every device.

  Attributes:
    step: [] int32, completed steps (= batches consumed).
    params: trainable and frozen parameters.
    batch_stats: BatchNorm statistics (and frozen BatchNorm's affine).
    opt_state: optax state.
    normalizer: [] float32, detectron2's running #positives (loss.normalizer 'running').
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  normalizer: jax.Array


def create_train_state(config, model, mesh):
  """A fresh state (step 0) replicated over the mesh, and the optimizer.

  Returns:
    (TrainState, optax.GradientTransformation).
  """
  variables = retinanet.init_variables(config, model, jax.random.key(config.seed))
  tx = optim.make_optimizer(config, retinanet.trainable_mask(variables['params'], config))
  state = TrainState(
      step=jnp.zeros((), jnp.int32),
      params=variables['params'],
      batch_stats=variables['batch_stats'],
      opt_state=tx.init(variables['params']),
      normalizer=jnp.asarray(config.loss.normalizer_init, jnp.float32))
  return jax.device_put(state, sharding.replicated(mesh)), tx


def check(config):
  """Raises errors.BadValue naming the first bad loop setting of config.train (optim checks the schedule's)."""
  t = config.train
  errors.check_range('train.log_every', t.log_every, lo=1)
  errors.check_range('train.checkpoint_every', t.checkpoint_every, lo=1)
  errors.check_range('train.eval_every', t.eval_every, lo=0)
  checkpoint.check_keep(t.keep_checkpoints)


def compute_gradients(state, batch, anchors, *, model, config):
  """Loss, metrics and gradients of one global batch.

  Args:
    state: TrainState.
    batch: image [B, H, W, 3] float32, image_hw [B, 2] float32 (each image's extent on the
      canvas), boxes [B, M, 4] float32, classes [B, M] int32.
    anchors: [A, 4] float32.
    model: the RetinaNet module.
    config: the run config.
  Returns:
    (grads like state.params, metrics dict of scalars, new batch_stats, new normalizer).
  """
  loss_options = losses.kwargs_from_config(config)
  train_bn = not config.model.freeze_bn

  def loss_fn(params):
    variables = {'params': params, 'batch_stats': state.batch_stats}
    if train_bn:
      outputs, updates = model.apply(variables, batch['image'], batch['image_hw'], train=True,
                                     mutable=['batch_stats'])
      batch_stats = updates['batch_stats']
    else:
      outputs = model.apply(variables, batch['image'], batch['image_hw'], train=True)
      batch_stats = state.batch_stats
    loss, metrics, normalizer = losses.detection_loss(
        outputs['logits'], outputs['deltas'], anchors, batch['boxes'], batch['classes'],
        running_normalizer=state.normalizer, **loss_options)
    return loss, (metrics, batch_stats, normalizer)

  grads, (metrics, batch_stats, normalizer) = jax.grad(loss_fn, has_aux=True)(state.params)
  metrics['grad_norm'] = optax.tree.norm(grads)
  return grads, metrics, batch_stats, normalizer


def all_finite(tree):
  """[] bool: every floating-point value of the pytree is finite (True for no float leaf)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def train_step(state, batch, anchors, *, model, tx, config):
  """One SGD step on the global batch.

  Returns:
    (new state, metrics): metrics are scalars; 'all_finite' says whether the new state is
    finite, which the loop checks before saving or evaluating it.
  """
  grads, metrics, batch_stats, normalizer = compute_gradients(
      state, batch, anchors, model=model, config=config)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics['lr'] = optim.learning_rate_schedule(config)(state.step)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, normalizer=normalizer)
  metrics['all_finite'] = all_finite((params, batch_stats, opt_state, normalizer))
  return new_state, metrics


def make_train_step(config, model, tx, mesh):
  """jit(train_step): state replicated and donated, batch split over 'data'."""
  rep, split = sharding.replicated(mesh), sharding.batch_sharding(mesh)

  def step(state, batch, anchors):
    return train_step(state, batch, anchors, model=model, tx=tx, config=config)

  return jax.jit(step, in_shardings=(rep, split, rep), out_shardings=(rep, rep), donate_argnums=0)


def read_metrics(metrics):
  """One step's metrics on the host (waits for that step only).

  Args:
    metrics: train_step's dict of device scalars.
  Returns:
    (dict of floats without 'all_finite', whether the loss and the state after the step are finite).
  """
  values = {k: float(v) for k, v in jax.device_get(metrics).items()}
  finite_state = bool(values.pop('all_finite', True))
  return values, finite_state and bool(np.isfinite(values['loss']))


def diverged_message(step, metrics, manager):
  """What errors.Diverged says: the step, what is not finite, and the last good checkpoint.

  Args:
    step: the step whose loss or state is not finite.
    metrics: its read_metrics values.
    manager: the run's checkpoint manager (every state it saved is finite).
  """
  if not np.isfinite(metrics['loss']):
    what = f'non-finite loss {metrics["loss"]}'
  else:
    what = (f'non-finite parameters or optimizer state (loss {metrics["loss"]:.3g}, '
            f'gradient norm {metrics.get("grad_norm", float("nan")):.3g})')
  last = checkpoint.latest_step(manager)
  kept = f'none saved yet in {manager.directory}' if last is None else f'step {last} in {manager.directory}'
  return f'{what} at step {step}; the last good checkpoint: {kept} (a non-finite state is never saved)'


class Progress:
  """Shows each step's metrics and has them written (only process 0 shows or writes).

  To the progress bar and, through metric_writer, to TensorBoard and <workdir>/metrics.jsonl,
  with the throughput since the previous step and, at logged steps, the input statistics.
  """

  def __init__(self, config, workdir, start, data_stats, lead):
    self.config, self.data_stats = config, data_stats
    total, _, _ = optim.scaled_steps(config)
    # In a job log (no terminal) a redraw per step would flood the file: redraw every 30 s there.
    self.bar = tqdm.tqdm(total=total, initial=start, disable=not lead, desc='train', dynamic_ncols=True,
                         mininterval=0.1 if sys.stderr.isatty() else 30.0)
    self.tick = time.perf_counter()
    self.writer = metric_writer.MetricWriter(workdir, start, lead)

  def write(self, step, metrics):
    """Shows and writes one step's metrics (read_metrics' floats)."""
    now = time.perf_counter()
    metrics['images_per_s'] = self.config.train.batch_size / (now - self.tick)
    self.tick = now
    log = step % self.config.train.log_every == 0 or step == self.bar.total
    if log:
      metrics.update({f'data/{k}': v for k, v in self.data_stats.as_dict().items()})
      self.bar.set_postfix(loss=f'{metrics["loss"]:.4f}', pos=int(metrics['num_pos']),
                           lr=f'{metrics["lr"]:.2g}')
    self.bar.update(1)
    self.writer.write(step, metrics, flush_tensorboard=log)

  def close(self):
    self.bar.close()
    self.writer.close()


class Preempted(Exception):
  """SIGTERM arrived; the state was saved. main exits with status 128 + SIGTERM."""


class _StopSignal:
  """Turns SIGTERM into a flag the loop checks, so the run saves before exiting."""

  def __init__(self):
    self.received = False
    self._old = None
    if threading.current_thread() is threading.main_thread():
      self._old = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.received = True

  def any_process(self):
    if jax.process_count() == 1:
      return self.received
    return bool(np.any(multihost_utils.process_allgather(np.asarray(self.received))))

  def restore(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _local_train_batches(config, start_step, stats):
  """This process's batches from step `start_step` on (the consumed ones skipped)."""
  index, count = jax.process_index(), jax.process_count()
  histograms = None
  if config.data.use_buckets:
    # Each process counts the image sizes of its own slice; every process needs all of them.
    own = pipeline.train_size_histogram(config, index, count)
    histograms = multihost_utils.process_allgather(own.astype(np.int32)) if count > 1 else own[None]
  it = pipeline.train_iterator(config, process_index=index, process_count=count, stats=stats,
                               histograms=histograms)
  for _ in range(start_step):
    next(it)
  return it


def train_and_evaluate(config, workdir):
  """Trains per config (resuming from the latest checkpoint in workdir) and evaluates.

  Returns:
    The last evaluation's metrics (mode 'train_eval') or None (mode 'train').
  Raises:
    Preempted: after saving on SIGTERM.
    errors.Diverged: a non-finite loss or state (nothing non-finite is saved).
  """
  # Inputs first: a wrong split or annotation file fails in seconds, not after training.
  source.check_splits(config, train=True, evaluation=False)
  coco_gt = evaluate.ground_truth(config) if config.mode == 'train_eval' else None
  mesh = sharding.make_mesh()
  model = retinanet.build(config)
  anchors = evaluate.device_anchors(config, mesh)  # one per canvas
  state, tx = create_train_state(config, model, mesh)
  manager = checkpoint.make_manager(workdir, config.train.keep_checkpoints)
  restored = checkpoint.restore(manager, state, set_aside=True)
  state = state if restored is None else restored
  start = int(state.step)
  total, _, _ = optim.scaled_steps(config)
  step_fn = make_train_step(config, model, tx, mesh)
  predict = evaluate.make_predict_fn(config, model, mesh)
  data_stats = pipeline.DataStats()
  batches = _local_train_batches(config, start, data_stats)
  progress = Progress(config, workdir, start, data_stats, jax.process_index() == 0)
  stop = _StopSignal()
  result = None
  pending = None  # (step, its metrics still on the device)
  try:
    for step in range(start + 1, total + 1):
      local = next(batches)
      batch = sharding.global_batch(local, mesh)  # the train keys of pipeline.train_iterator
      state, metrics = step_fn(state, batch, anchors[local['image'].shape[1:3]])
      # One collective among processes: checked at logged steps only.
      stopping = step % config.train.log_every == 0 and stop.any_process()
      every = config.train.eval_every
      evaluating = config.mode == 'train_eval' and ((every and step % every == 0) or step == total)
      saving = step % config.train.checkpoint_every == 0 or step == total or stopping
      # The previous step's metrics are read only now, with this step already queued
      # behind it, so the device does not wait for the host between steps; this step's
      # are read at once when its state is to be saved or evaluated, which needs them finite.
      ready = [pending] if pending is not None else []
      pending = (step, metrics)
      if saving or evaluating:
        ready.append(pending)
        pending = None
      for done, device_metrics in ready:
        values, finite = read_metrics(device_metrics)
        if not finite:
          raise errors.Diverged(diverged_message(done, values, manager))
        progress.write(done, values)
      if saving:
        checkpoint.save(manager, step, state)
      if stopping:
        progress.bar.write(f'SIGTERM: saved step {step} in {workdir}; the same command resumes')
        raise Preempted(f'SIGTERM at step {step}; saved in {workdir}')
      if evaluating:
        result = evaluate.evaluate(config, model, _variables(state), mesh, step, workdir, predict, coco_gt)
  finally:
    progress.close()
    stop.restore()
    manager.close()
  if config.mode == 'train_eval' and result is None and start == total:
    result = evaluate.evaluate(config, model, _variables(state), mesh, total, workdir, predict, coco_gt)
  return result


def _variables(state):
  return {'params': state.params, 'batch_stats': state.batch_stats}
