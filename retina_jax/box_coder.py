"""R-CNN box coding: boxes <-> offsets (dx, dy, dw, dh) relative to anchors.

With anchor centre (ax, ay), size (aw, ah), box centre (x, y), size (w, h) and
weights (wx, wy, ww, wh):
  dx = wx * (x - ax) / aw    dy = wy * (y - ay) / ah
  dw = ww * log(w / aw)      dh = wh * log(h / ah)
Boxes are continuous (x1, y1, x2, y2) pixels (no +1), so w = x2 - x1.
Both directions work on any leading shape and run under jit; the result is
float32 when the anchors are float32, even for bfloat16 deltas.
"""

import math

import jax.numpy as jnp

from retina_jax import errors


def _centre_size(boxes):
  """[..., 4] (x1, y1, x2, y2) -> centre x, centre y, width, height, each [...]."""
  w = boxes[..., 2] - boxes[..., 0]
  h = boxes[..., 3] - boxes[..., 1]
  return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h


def encode(boxes, anchors, weights=(1.0, 1.0, 1.0, 1.0)):
  """Offsets of `boxes` relative to `anchors`.

  Boxes must have positive width and height (log of the size ratio); callers
  encode only matched ground truth.

  Args:
    boxes: [..., 4] target boxes.
    anchors: [..., 4] anchors, broadcastable against boxes.
    weights: (wx, wy, ww, wh) multipliers of the offsets.
  Returns:
    [..., 4] (dx, dy, dw, dh).
  """
  wx, wy, ww, wh = weights
  bx, by, bw, bh = _centre_size(jnp.asarray(boxes))
  ax, ay, aw, ah = _centre_size(jnp.asarray(anchors))
  return jnp.stack([
      wx * (bx - ax) / aw,
      wy * (by - ay) / ah,
      ww * jnp.log(bw / aw),
      wh * jnp.log(bh / ah),
  ], axis=-1)


def decode(deltas, anchors, weights=(1.0, 1.0, 1.0, 1.0), clamp=math.log(1000.0 / 16)):
  """Boxes from offsets; inverse of `encode`.

  Args:
    deltas: [..., 4] (dx, dy, dw, dh) as the box head predicts them.
    anchors: [..., 4] anchors, broadcastable against deltas.
    weights: (wx, wy, ww, wh), the same as for `encode`.
    clamp: upper bound on dw / ww and dh / wh before exp, so that a wild
      prediction cannot overflow to an infinite box.
  Returns:
    [..., 4] (x1, y1, x2, y2).
  """
  wx, wy, ww, wh = weights
  deltas = jnp.asarray(deltas)
  ax, ay, aw, ah = _centre_size(jnp.asarray(anchors))
  x = deltas[..., 0] / wx * aw + ax
  y = deltas[..., 1] / wy * ah + ay
  w = jnp.exp(jnp.minimum(deltas[..., 2] / ww, clamp)) * aw
  h = jnp.exp(jnp.minimum(deltas[..., 3] / wh, clamp)) * ah
  return jnp.stack([x - 0.5 * w, y - 0.5 * h, x + 0.5 * w, y + 0.5 * h], axis=-1)


def check(config):
  """Raises errors.BadValue naming the first bad value of config.box_coder."""
  c = config.box_coder
  errors.check_range('box_coder.clamp', c.clamp, lo=0.0)
  if len(c.weights) != 4 or min(c.weights) <= 0:
    raise errors.bad_config('box_coder.weights', c.weights, 'must be 4 positive weights')
