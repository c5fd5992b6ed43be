"""Box geometry on arrays: area, IoU, clipping, greedy NMS and format conversions.

Boxes are (x1, y1, x2, y2) float32 absolute pixels (see retina_jax/__init__.py).
Every function runs under jit and, but for `nms` (one image; vmap it), works on
any leading batch shape; the conversions also accept numpy arrays and return the
same array type. NMS lives here, not in postprocess.py, because the losses use it
too (OHEM) and must not depend on inference code.
"""

import jax
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


def nms(boxes, scores, iou_thresh, max_out, classes=None):
  """Greedy non-maximum suppression for one image, with fixed output shapes.

  Repeatedly takes the highest-scoring live box and suppresses the live boxes
  overlapping it by IoU > iou_thresh. Each step costs one row of IoUs, O(N),
  and the loop stops after `max_out` boxes or when no box is left, so the work
  is O(max_out * N) with O(N) memory: no [N, N] IoU matrix, which for N ~ 5000
  boxes and a batch of images would not fit comfortably. The kept boxes come
  out in decreasing score order, exactly the first `max_out` boxes that plain
  greedy NMS keeps. vmap it for a batch.

  Args:
    boxes: [N, 4] (x1, y1, x2, y2), N >= 1.
    scores: [N] float; -inf (or NaN) marks a box that is not a candidate.
    iou_thresh: python float; a box is suppressed when its IoU is above it.
    max_out: python int, the number of output slots.
    classes: optional [N] int; when given, only boxes of the same class
      suppress each other (class-wise NMS without offsetting coordinates,
      which would cost float32 precision on large offsets).
  Returns:
    indices: [max_out] int32 into N, in decreasing score order (0 where invalid).
    valid: [max_out] bool, True for the kept boxes (a prefix of the slots).
  """
  boxes = jnp.asarray(boxes, jnp.float32)
  scores = jnp.asarray(scores, jnp.float32)
  if boxes.ndim != 2 or boxes.shape[-1] != 4 or scores.shape != boxes.shape[:1]:
    raise ValueError(f'nms: boxes must be [N, 4] and scores [N], got {boxes.shape} and {scores.shape}')
  if boxes.shape[0] == 0:
    raise ValueError('nms: needs at least one box (N >= 1); mask unwanted boxes with score -inf')
  live = jnp.where(jnp.isnan(scores), -jnp.inf, scores)

  def alive(state):
    i, live, _, _ = state
    return (i < max_out) & (jnp.max(live) > -jnp.inf)

  def keep_best(state):
    i, live, indices, valid = state
    j = jnp.argmax(live)
    overlap = pairwise_iou(boxes[j][None], boxes)[0] > iou_thresh  # [N]
    if classes is not None:
      overlap &= classes == classes[j]
    live = jnp.where(overlap, -jnp.inf, live).at[j].set(-jnp.inf)
    return i + 1, live, indices.at[i].set(j.astype(jnp.int32)), valid.at[i].set(True)

  init = (jnp.int32(0), live, jnp.zeros((max_out,), jnp.int32), jnp.zeros((max_out,), bool))
  _, _, indices, valid = jax.lax.while_loop(alive, keep_best, init)
  return indices, valid


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
