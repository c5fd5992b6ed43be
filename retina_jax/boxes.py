"""Box geometry on arrays: area, IoU, clipping and format conversions.

Boxes are (x1, y1, x2, y2) float32 absolute pixels (see retina_jax/__init__.py).
Every function works on any leading batch shape and runs under jit; the
conversions also accept numpy arrays and return the same array type.
"""

import jax.numpy as jnp
import numpy as np


def _xp(x):
  return np if isinstance(x, np.ndarray) else jnp


def area(boxes):
  """Area of boxes; degenerate boxes (x2 < x1 or y2 < y1) have area 0.

  Args:
    boxes: [..., 4] (x1, y1, x2, y2).
  Returns:
    [...] float32.
  """
  xp = _xp(boxes)
  w = xp.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
  h = xp.maximum(boxes[..., 3] - boxes[..., 1], 0.0)
  return w * h


def pairwise_iou(a, b):
  """IoU of every box in `a` with every box in `b`, batched over leading dims.

  A pair whose union is empty (two zero-area boxes, e.g. padding) has IoU 0,
  so padded ground truth never matches anything.

  Args:
    a: [..., N, 4] boxes.
    b: [..., M, 4] boxes.
  Returns:
    [..., N, M] float32 IoU in [0, 1].
  """
  xp = _xp(a)
  lt = xp.maximum(a[..., :, None, :2], b[..., None, :, :2])  # [..., N, M, 2]
  rb = xp.minimum(a[..., :, None, 2:], b[..., None, :, 2:])  # [..., N, M, 2]
  wh = xp.maximum(rb - lt, 0.0)
  inter = wh[..., 0] * wh[..., 1]  # [..., N, M]
  union = area(a)[..., :, None] + area(b)[..., None, :] - inter
  return xp.where(union > 0, inter / xp.where(union > 0, union, 1.0), 0.0)


def clip(boxes, height, width):
  """Clips boxes to the image [0, width] x [0, height].

  Args:
    boxes: [..., 4].
    height, width: scalars or arrays broadcastable to [...] (per-image sizes).
  Returns:
    [..., 4] clipped boxes.
  """
  xp = _xp(boxes)
  height = xp.asarray(height, boxes.dtype)[..., None]
  width = xp.asarray(width, boxes.dtype)[..., None]
  x = xp.clip(boxes[..., 0::2], 0.0, width)
  y = xp.clip(boxes[..., 1::2], 0.0, height)
  return xp.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], axis=-1)


def from_tfds(bbox, height, width):
  """tfds normalized (ymin, xmin, ymax, xmax) -> absolute (x1, y1, x2, y2).

  Args:
    bbox: [..., 4] normalized to [0, 1].
    height, width: image size in pixels, broadcastable to [...].
  """
  xp = _xp(bbox)
  h = xp.asarray(height, bbox.dtype)
  w = xp.asarray(width, bbox.dtype)
  return xp.stack([bbox[..., 1] * w, bbox[..., 0] * h, bbox[..., 3] * w, bbox[..., 2] * h], axis=-1)


def to_tfds(boxes, height, width):
  """Absolute (x1, y1, x2, y2) -> tfds normalized (ymin, xmin, ymax, xmax)."""
  xp = _xp(boxes)
  h = xp.asarray(height, boxes.dtype)
  w = xp.asarray(width, boxes.dtype)
  return xp.stack([boxes[..., 1] / h, boxes[..., 0] / w, boxes[..., 3] / h, boxes[..., 2] / w], axis=-1)


def to_coco(boxes):
  """(x1, y1, x2, y2) -> COCO (x, y, width, height)."""
  xp = _xp(boxes)
  return xp.concatenate([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], axis=-1)


def from_coco(boxes):
  """COCO (x, y, width, height) -> (x1, y1, x2, y2)."""
  xp = _xp(boxes)
  return xp.concatenate([boxes[..., :2], boxes[..., :2] + boxes[..., 2:]], axis=-1)
