"""The schedule's shape, the linear lr scaling, and frozen params staying untouched."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import base
from retina_jax import optim


def _config(**train):
  c = base.get_config()
  c.optim.warmup_steps = 10
  c.optim.decay_steps = (60, 80)
  c.train.steps = 90
  for k, v in train.items():
    setattr(c.train, k, v)
  return c


def test_lr_scales_linearly_with_global_batch():
  assert optim.peak_learning_rate(_config(batch_size=16)) == 0.01
  assert np.isclose(optim.peak_learning_rate(_config(batch_size=64)), 0.04)
  assert np.isclose(optim.peak_learning_rate(_config(batch_size=2)), 0.00125)


def test_schedule_warmup_and_decays():
  lr = optim.learning_rate_schedule(_config())
  np.testing.assert_allclose(lr(0), 0.01 / 3, rtol=1e-6)
  np.testing.assert_allclose(lr(5), 0.01 / 3 + 0.5 * (0.01 - 0.01 / 3), rtol=1e-6)
  np.testing.assert_allclose(lr(10), 0.01, rtol=1e-6)
  np.testing.assert_allclose(lr(59), 0.01, rtol=1e-6)
  np.testing.assert_allclose(lr(60), 0.001, rtol=1e-5)
  np.testing.assert_allclose(lr(80), 0.0001, rtol=1e-4)


def test_schedule_multiplier_stretches_every_boundary():
  c = _config(schedule=0.5)
  assert optim.scaled_steps(c) == (45, 5, (30, 40))
  lr = optim.learning_rate_schedule(c)
  np.testing.assert_allclose(lr(29), 0.01, rtol=1e-6)
  np.testing.assert_allclose(lr(30), 0.001, rtol=1e-5)


def test_frozen_params_get_no_update_and_no_state():
  c = _config()
  c.optim.warmup_steps = 0
  params = {'frozen': jnp.ones(3), 'train': jnp.ones(3)}
  tx = optim.make_optimizer(c, {'frozen': False, 'train': True})
  state = tx.init(params)
  grads = {'frozen': jnp.full(3, 5.0), 'train': jnp.full(3, 2.0)}
  updates, state = tx.update(grads, state, params)
  np.testing.assert_array_equal(updates['frozen'], 0.0)
  # SGD step on grad + weight decay * param.
  np.testing.assert_allclose(updates['train'], -0.01 * (2.0 + 1e-4), rtol=1e-6)
  sizes = [x.size for x in jax.tree.leaves(state) if hasattr(x, 'size') and x.ndim > 0]
  assert sum(sizes) == 3  # momentum for the trainable leaf only


def test_momentum_and_grad_clip():
  c = _config()
  c.optim.warmup_steps = 0
  c.optim.weight_decay = 0.0
  c.optim.grad_clip = 1.0
  params = {'w': jnp.zeros(2)}
  tx = optim.make_optimizer(c, {'w': True})
  state = tx.init(params)
  g = {'w': jnp.array([30.0, 40.0])}  # norm 50 -> clipped to norm 1
  u1, state = tx.update(g, state, params)
  np.testing.assert_allclose(u1['w'], [-0.006, -0.008], rtol=1e-5)
  u2, state = tx.update(g, state, params)
  np.testing.assert_allclose(u2['w'], np.array([-0.006, -0.008]) * 1.9, rtol=1e-5)
  assert isinstance(tx, optax.GradientTransformation)
