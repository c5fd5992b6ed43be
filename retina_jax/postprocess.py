"""Detections from head outputs: per-level top-k, decoding, class-wise NMS.

Inference as in the paper (sec. 4): per pyramid level keep the `topk_per_level`
best (anchor, class) pairs whose score exceeds `score_thresh`, decode their
boxes, merge the levels, apply class-wise NMS and keep the best
`max_detections` per image. Everything has fixed shapes and runs inside jit on
any device; below-threshold pairs are masked, not removed.
"""

import math

import jax
import jax.numpy as jnp

from retina_jax import box_coder
from retina_jax import boxes as boxes_lib
from retina_jax import errors


def _level_candidates(logits, best, deltas, anchors, start, count, topk, score_thresh, weights, clamp):
  """Top-k (anchor, class) pairs of one level, decoded.

  Args:
    logits: [B, A, K] float32.
    best: [B, A] float32, the best logit of each anchor over classes.
    deltas: [B, A, 4] float32.
    anchors: [A, 4] float32.
    start, count: python ints, the level's slice of A.
  Returns:
    boxes [B, k, 4], scores [B, k] (-inf below threshold), classes [B, k] int32,
    with k = min(topk, count * K).
  """
  b, _, k = logits.shape
  topk = min(topk, count * k)
  # The best `topk` pairs lie within the `topk` anchors of highest best-class
  # logit (any other anchor is beaten by `topk` pairs, one per such anchor), so
  # two small top-ks give the same result as one over count * K pairs.
  _, anchor_index = jax.lax.top_k(best[:, start:start + count], min(topk, count))  # [B, k']
  anchor_index = start + anchor_index
  pairs = jnp.take_along_axis(logits, anchor_index[..., None], axis=1).reshape(b, -1)  # [B, k' * K]
  # Top-k on logits: sigmoid is monotonic, so only the winners need it.
  top, index = jax.lax.top_k(pairs, topk)  # [B, k]
  anchor_index = jnp.take_along_axis(anchor_index, index // k, axis=1)
  scores = jax.nn.sigmoid(top)
  scores = jnp.where(scores > score_thresh, scores, -jnp.inf)
  level_deltas = jnp.take_along_axis(deltas, anchor_index[..., None], axis=1)  # [B, k, 4]
  decoded = box_coder.decode(level_deltas, anchors[anchor_index], weights, clamp)
  return decoded, scores, (index % k).astype(jnp.int32)


def postprocess(logits, deltas, anchors, level_counts, image_hw, *, score_thresh=0.05,
                topk_per_level=1000, nms_iou=0.5, max_detections=100,
                weights=(1.0, 1.0, 1.0, 1.0), clamp=math.log(1000.0 / 16)):
  """Detections per image from the flattened head outputs.

  Boxes are clipped to each image's valid area before NMS; a box left with zero
  area by clipping (an anchor over the padding predicting outside the image)
  is dropped, as it can only be a false positive.

  Args:
    logits: [B, A, K] class logits (any float dtype; computed in float32).
    deltas: [B, A, 4] box offsets.
    anchors: [A, 4] anchors in the order of anchors.py.
    level_counts: python ints, anchors per level in order (anchors.level_counts).
    image_hw: [B, 2] valid (height, width) of each image on the canvas.
    score_thresh, topk_per_level, nms_iou, max_detections: config.postprocess.
    weights, clamp: config.box_coder.
  Returns:
    dict with boxes [B, D, 4] float32 canvas pixels, scores [B, D] float32,
    classes [B, D] int32, valid [B, D] bool (D = max_detections), best first.
    Invalid rows have box 0, score 0 and class -1.
  """
  logits = jnp.asarray(logits, jnp.float32)
  deltas = jnp.asarray(deltas, jnp.float32)
  anchors = jnp.asarray(anchors, jnp.float32)
  level_counts = tuple(int(n) for n in level_counts)
  if sum(level_counts) != logits.shape[1] or anchors.shape[0] != logits.shape[1]:
    raise ValueError(f'postprocess: level_counts {level_counts} (sum {sum(level_counts)}), anchors '
                     f'{anchors.shape} and logits {logits.shape} disagree on the number of anchors')
  # One reduction over [B, A, K]; XLA on CPU reduces slices of it ~10x slower.
  best = jnp.max(logits, axis=-1)  # [B, A]
  parts, start = [], 0
  for count in level_counts:
    parts.append(_level_candidates(logits, best, deltas, anchors, start, count, topk_per_level,
                                   score_thresh, weights, clamp))
    start += count
  boxes, scores, classes = (jnp.concatenate(p, axis=1) for p in zip(*parts))  # [B, N, ...]
  image_hw = jnp.asarray(image_hw, jnp.float32)
  boxes = boxes_lib.clip(boxes, image_hw[:, :1], image_hw[:, 1:])
  scores = jnp.where(boxes_lib.area(boxes) > 0, scores, -jnp.inf)

  def one_image(b, s, c):
    return boxes_lib.nms(b, s, nms_iou, max_detections, classes=c)

  keep, valid = jax.vmap(one_image)(boxes, scores, classes)  # [B, D]
  take = lambda x: jnp.take_along_axis(x, keep, axis=1)
  return dict(
      boxes=jnp.where(valid[..., None], jnp.take_along_axis(boxes, keep[..., None], axis=1), 0.0),
      scores=jnp.where(valid, take(scores), 0.0),
      classes=jnp.where(valid, take(classes), -1),
      valid=valid,
  )


def check(config):
  """Raises errors.BadValue naming the first bad value of config.postprocess."""
  p = config.postprocess
  errors.check_range('postprocess.score_thresh', p.score_thresh, 0.0, 1.0)
  errors.check_range('postprocess.topk_per_level', p.topk_per_level, lo=1)
  errors.check_range('postprocess.nms_iou', p.nms_iou, 0.0, 1.0)
  errors.check_range('postprocess.max_detections', p.max_detections, lo=1)
