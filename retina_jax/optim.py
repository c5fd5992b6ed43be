"""The optimizer: SGD with momentum, weight decay, linear warm-up, step decay.

Every number comes from config.optim / config.train. Two values are derived at
run time rather than stored in the config, so a table row keeps the paper's
meaning on any batch size or schedule length:
  lr = base_lr * train.batch_size / base_batch   (linear scaling rule)
  steps, warm-up and decay steps are multiplied by train.schedule.
"""

import jax
import optax


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
