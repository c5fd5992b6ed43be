"""The optimizer: SGD with momentum, weight decay, linear warm-up, step decay.

Every number comes from config.optim / config.train. Two values are derived at
run time rather than stored in the config, so a table row keeps the paper's
meaning on any batch size or schedule length:
  lr = base_lr * train.batch_size / base_batch   (linear scaling rule)
  steps, warm-up and decay steps are multiplied by train.schedule.
"""

import jax
import numpy as np
import optax

from retina_jax import errors


def peak_learning_rate(config):
  """optim.base_lr scaled linearly from optim.base_batch to the global train.batch_size."""
  return config.optim.base_lr * config.train.batch_size / config.optim.base_batch


def scaled_steps(config):
  """(total steps, warm-up steps, decay steps) after train.schedule."""
  s = config.train.schedule
  total = max(int(round(config.train.steps * s)), 1)
  warmup = int(round(config.optim.warmup_steps * s))
  decays = tuple(int(round(d * s)) for d in config.optim.decay_steps)
  return total, warmup, decays


def learning_rate_schedule(config):
  """Step -> learning rate: linear warm-up from lr * warmup_factor, then /decay_factor at each decay step."""
  lr = peak_learning_rate(config)
  _, warmup, decays = scaled_steps(config)
  decayed = optax.piecewise_constant_schedule(
      lr, {d: config.optim.decay_factor for d in decays})
  if warmup <= 0:
    return decayed
  ramp = optax.linear_schedule(lr * config.optim.warmup_factor, lr, warmup)
  # The decay boundaries stay in absolute steps: shift the decayed part back by `warmup`.
  return optax.join_schedules([ramp, lambda step: decayed(step + warmup)], [warmup])


def make_optimizer(config, trainable):
  """SGD + momentum + weight decay (+ optional global-norm clip) on trainable params only.

  Args:
    config: the run config (reads optim.*, train.*).
    trainable: pytree of bool matching the params (model.retinanet.trainable_mask);
      False leaves get a zero update and no optimizer state at all.
  Returns:
    optax.GradientTransformation.
  """
  o = config.optim
  chain = []
  if o.grad_clip > 0:
    chain.append(optax.clip_by_global_norm(o.grad_clip))
  if o.weight_decay > 0:
    chain.append(optax.add_decayed_weights(o.weight_decay))
  chain.append(optax.sgd(learning_rate_schedule(config), momentum=o.momentum or None))
  labels = jax.tree.map(lambda t: 'train' if t else 'frozen', trainable)
  return optax.multi_transform(
      {'train': optax.chain(*chain), 'frozen': optax.set_to_zero()}, labels)


def check(config):
  """Raises errors.BadValue naming the first bad value of config.optim or of the train.* it reads."""
  o, t = config.optim, config.train
  errors.check_positive('optim.base_lr', o.base_lr)
  errors.check_range('optim.base_batch', o.base_batch, lo=1)
  errors.check_range('optim.momentum', o.momentum, 0.0, 1.0)
  if o.momentum >= 1:
    raise errors.bad_config('optim.momentum', o.momentum, 'must be in [0, 1)')
  errors.check_range('optim.weight_decay', o.weight_decay, lo=0.0)
  errors.check_range('optim.warmup_steps', o.warmup_steps, lo=0)
  errors.check_range('optim.warmup_factor', o.warmup_factor, 0.0, 1.0)
  errors.check_range('optim.decay_factor', o.decay_factor, 0.0, 1.0)
  errors.check_range('optim.grad_clip', o.grad_clip, lo=0.0)
  decays = list(o.decay_steps)
  if decays != sorted(decays) or any(d < 0 for d in decays):
    raise errors.bad_config('optim.decay_steps', tuple(decays), 'must be increasing non-negative steps')
  errors.check_range('train.batch_size', t.batch_size, lo=1)
  errors.check_range('train.steps', t.steps, lo=1)
  errors.check_positive('train.schedule', t.schedule)
  lr = peak_learning_rate(config)
  if not np.isfinite(np.float32(lr)):
    raise errors.bad_config('optim.base_lr', o.base_lr, f'gives a learning rate of {lr:g} at train.batch_size '
                            f'{t.batch_size} (times batch_size / optim.base_batch), beyond float32')
