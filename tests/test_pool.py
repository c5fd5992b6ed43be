"""The stem's max pool: XLA's forward, select-and-scatter's gradient bit for bit, per platform."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retina_jax.model import pool

_STEM = ((3, 3), (2, 2), ((1, 1), (1, 1)))


def _xla_grad(x, dy, window, strides, padding):
  f = lambda x: nn.max_pool(x, window, strides=strides, padding=padding)
  return jax.vjp(f, x)[1](dy)[0]


@pytest.mark.parametrize('shape,window,strides,padding', [
    ((2, 17, 12, 3), *_STEM),  # odd and even sides
    ((1, 9, 9, 2), (2, 2), (2, 2), ((0, 0), (0, 0))),
    ((1, 8, 10, 2), (3, 2), (1, 2), ((1, 0), (0, 1))),  # overlapping windows, uneven padding
])
@pytest.mark.parametrize('relu', [False, True])  # after a ReLU most windows tie at 0
def test_forward_and_gradient_equal_xlas(shape, window, strides, padding, relu):
  x = jax.random.normal(jax.random.key(0), shape)
  x = jnp.maximum(x, 0.0) if relu else x
  y = pool.max_pool(x, window, strides, padding)
  np.testing.assert_array_equal(y, nn.max_pool(x, window, strides=strides, padding=padding))
  dy = jax.random.normal(jax.random.key(1), y.shape)
  ours = jax.vjp(lambda x: pool.max_pool(x, window, strides, padding), x)[1](dy)[0]
  np.testing.assert_array_equal(ours, _xla_grad(x, dy, window, strides, padding))


def test_ties_go_to_the_first_maximum_in_row_major_order():
  x = jnp.zeros((1, 5, 5, 1))  # every window ties
  dy = jnp.arange(1.0, 10.0).reshape(1, 3, 3, 1)
  grad = jax.grad(lambda x: jnp.sum(pool.max_pool(x, *_STEM) * dy))(x)[0, :, :, 0]
  # Output (oy, ox)'s window starts at input (2 oy - 1, 2 ox - 1); its first real input wins.
  expected = np.zeros((5, 5))
  for oy in range(3):
    for ox in range(3):
      expected[max(2 * oy - 1, 0), max(2 * ox - 1, 0)] += dy[0, oy, ox, 0]
  np.testing.assert_array_equal(grad, expected)
  np.testing.assert_array_equal(grad, _xla_grad(x, dy, *_STEM)[0, :, :, 0])


def _lowered_grad(platform):
  x = jnp.zeros((1, 8, 8, 4))
  return jax.jit(jax.grad(lambda x: jnp.sum(pool.max_pool(x, *_STEM)))).trace(x).lower(
      lowering_platforms=(platform,)).as_text()


def test_tap_gradient_only_on_cpu():
  assert 'select_and_scatter' not in _lowered_grad('cpu')
  for platform in ('cuda', 'rocm', 'tpu'):
    assert 'select_and_scatter' in _lowered_grad(platform), platform
