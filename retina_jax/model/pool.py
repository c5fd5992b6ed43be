"""The stem's max pool: XLA's forward, and on CPU a faster gradient with the same numbers.

XLA's CPU backend computes a max pool's gradient (select-and-scatter) as a reduction over
(value, index) tuples that took 2-3x as long as this module's version and, in the demo's
train step, longer than most of its convolutions' gradients. Here the gradient is written
per window tap: each output's gradient goes to the first input of its window, in row-major
tap order, that equals the maximum (select-and-scatter's choice, and torch's), and the taps'
contributions are added in the order select-and-scatter adds them, so the result is XLA's
bit for bit. Other backends keep XLA's own (`lax.platform_dependent`, chosen when the step
is compiled). experiments/bench_backward.py times both.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from retina_jax.model import conv


def max_pool(x, window, strides, padding):
  """nn.max_pool over H and W with this module's CPU gradient.

  Args:
    x: [B, H, W, C].
    window: (k_h, k_w).
    strides: (s_h, s_w).
    padding: ((lo_h, hi_h), (lo_w, hi_w)), padded with -inf.
  Returns:
    [B, H_out, W_out, C], what nn.max_pool(x, window, strides, padding) gives.
  """
  return _max_pool(x, tuple(window), tuple(strides), tuple(tuple(p) for p in padding))


def _xla_max_pool(x, window, strides, padding):
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, *window, 1), (1, *strides, 1),
                           ((0, 0), *padding, (0, 0)))


def max_pool_grad_taps(x, y, dy, window, strides, padding):
  """Gradient of the max pool wrt x, tap by tap.

  Args:
    x: [B, H, W, C] the pool's input; y: [B, H_out, W_out, C] its output; dy: y's gradient.
    window, strides, padding: as for max_pool.
  Returns:
    [B, H, W, C], select-and-scatter's gradient bit for bit.
  """
  (kh, kw), (sh, sw) = window, strides
  _, ho, wo, _ = y.shape
  xp = lax.pad(x, jnp.array(-jnp.inf, x.dtype), ((0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0)))
  taken = jnp.zeros(y.shape, bool)  # [B, H_out, W_out, C]: the window's maximum found at an earlier tap
  parts = []
  for i in range(kh):
    for j in range(kw):
      first = (conv.window_tap(xp, i, j, (ho, wo), strides) == y) & ~taken
      taken = taken | first
      # Back to the padded input's grid: tap (i, j) of output (oy, ox) is input (oy * s_h + i, ox * s_w + j).
      high_h, high_w = xp.shape[1] - i - (ho - 1) * sh - 1, xp.shape[2] - j - (wo - 1) * sw - 1
      parts.append(lax.pad(jnp.where(first, dy, 0), jnp.zeros((), dy.dtype),
                           ((0, 0, 0), (i, high_h, sh - 1), (j, high_w, sw - 1), (0, 0, 0))))
  # Select-and-scatter adds into an input in row-major order of the outputs whose window
  # chose it; a later tap of the window belongs to an earlier output, so: last tap first.
  dxp = functools.reduce(jnp.add, parts[::-1])
  (lo_h, _), (lo_w, _) = padding
  return dxp[:, lo_h:lo_h + x.shape[1], lo_w:lo_w + x.shape[2]]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, strides, padding):
  return _xla_max_pool(x, window, strides, padding)


def _max_pool_fwd(x, window, strides, padding):
  y = _xla_max_pool(x, window, strides, padding)
  return y, (x, y)


def _max_pool_bwd(window, strides, padding, residuals, dy):
  x, y = residuals
  xla = lambda x, y, dy: jax.vjp(lambda x: _xla_max_pool(x, window, strides, padding), x)[1](dy)[0]
  taps = lambda x, y, dy: max_pool_grad_taps(x, y, dy, window, strides, padding)
  return (lax.platform_dependent(x, y, dy, cpu=taps, default=xla),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
