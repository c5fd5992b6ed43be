"""Anchor assignment: IoU matching against padded ground truth, and training targets.

Rules (paper sec. 4, with Detectron2's matcher conventions), per image:
  * Ground truth with class -1 is padding and never matches, whatever its box.
  * Each anchor takes the valid, non-crowd GT of highest IoU (the first one on
    ties). IoU >= fg_iou: positive (1); IoU < bg_iou: negative (0); in between:
    ignored (-1).
  * low_quality: for each GT j whose best IoU over all anchors q_j is > 0, every
    anchor with IoU exactly q_j (ties included) becomes positive, so no box goes
    unmatched. Like Detectron2 and torchvision, such an anchor keeps its own
    best GT as its match (one it overlaps at least as much as GT j).
  * Crowd boxes are never targets: they take part neither in the match nor in
    low-quality matching. An anchor that would be negative but overlaps a crowd
    box at IoU >= bg_iou is ignored, because it may well cover an object of the
    crowd. An anchor that matches a non-crowd box is labelled by that box even
    when it overlaps a crowd box more, the order in which COCO evaluation
    matches detections (non-crowd boxes first, crowd regions only for the rest).
  * An image without valid boxes is all negatives.

Images go through `jax.lax.map` in chunks whose [A, M] IoU matrices together stay
under _IOU_BYTES, so the peak memory is bounded, not [B, A, M]: COCO's 100 boxes x
200k anchors (80 MB) go one image at a time, while a small canvas's batch goes in
one vectorised chunk (the CPU demo's train step went from 0.24 to 0.21 s when its 16
images stopped going through a loop: `python -m experiments.bench_train --cases shapes`).
"""

import jax
import jax.numpy as jnp

from retina_jax import box_coder
from retina_jax import boxes as boxes_lib
from retina_jax import errors

_IOU_BYTES = 64 * 2**20


def _check(anchors, gt_boxes, gt_classes, gt_crowd, fg_iou, bg_iou):
  if anchors.ndim != 2 or anchors.shape[-1] != 4:
    raise ValueError(f'matching: anchors must be [A, 4], got shape {anchors.shape}')
  if gt_boxes.ndim != 3 or gt_boxes.shape[-1] != 4:
    raise ValueError(f'matching: gt_boxes must be [B, M, 4], got shape {gt_boxes.shape}')
  if gt_boxes.shape[1] == 0:
    raise ValueError('matching: gt_boxes has M = 0 boxes per image; config data.max_boxes must be >= 1')
  if gt_classes.shape != gt_boxes.shape[:2]:
    raise ValueError(f'matching: gt_classes must be [B, M] = {gt_boxes.shape[:2]}, got shape {gt_classes.shape}')
  if gt_crowd is not None and gt_crowd.shape != gt_boxes.shape[:2]:
    raise ValueError(f'matching: gt_crowd must be [B, M] = {gt_boxes.shape[:2]}, got shape {gt_crowd.shape}')
  if isinstance(fg_iou, (int, float)) and isinstance(bg_iou, (int, float)):  # not traced
    _check_thresholds(fg_iou, bg_iou)


def _check_thresholds(fg_iou, bg_iou):
  if bg_iou > fg_iou:
    raise errors.bad_config('matching.bg_iou', bg_iou, f'must be <= matching.fg_iou ({fg_iou})')


def check(config):
  """Raises errors.BadValue naming the first bad value of config.matching."""
  m = config.matching
  errors.check_range('matching.fg_iou', m.fg_iou, 0.0, 1.0)
  errors.check_range('matching.bg_iou', m.bg_iou, 0.0, 1.0)
  _check_thresholds(m.fg_iou, m.bg_iou)


def _match_image(anchors, gt_boxes, gt_classes, gt_crowd, fg_iou, bg_iou, low_quality):
  """One image: anchors [A, 4], gt_boxes [M, 4], gt_classes [M], gt_crowd [M] or None -> ([A], [A])."""
  # Materialised once so that the maxima below and the equality test for ties see
  # bit-identical values (separate fusions could otherwise round differently).
  iou = jax.lax.optimization_barrier(boxes_lib.pairwise_iou(anchors, gt_boxes))  # [A, M]
  valid = gt_classes >= 0  # [M]
  # -1 is below every real IoU, so padding and crowd columns never win a max.
  target = valid if gt_crowd is None else valid & ~gt_crowd  # [M]
  iou_target = jnp.where(target[None, :], iou, -1.0)  # [A, M]
  best = jnp.max(iou_target, axis=1)  # [A]
  # The first column holding the maximum, as jnp.argmax gives, but as a plain min-reduction:
  # XLA's CPU argmax (a reduction over value-index pairs) took longer than the IoU itself.
  column = jnp.arange(iou_target.shape[1], dtype=jnp.int32)  # [M]
  matched = jnp.min(jnp.where(iou_target == best[:, None], column, iou_target.shape[1]), axis=1)  # [A]
  labels = jnp.where(best >= fg_iou, 1, jnp.where(best < bg_iou, 0, -1))  # [A]
  if low_quality:
    best_per_gt = jnp.max(iou_target, axis=0)  # [M]
    is_best = (iou_target == best_per_gt[None, :]) & (best_per_gt[None, :] > 0)  # [A, M]
    labels = jnp.where(jnp.any(is_best, axis=1), 1, labels)
  if gt_crowd is not None:
    crowd_best = jnp.max(jnp.where((valid & gt_crowd)[None, :], iou, -1.0), axis=1)  # [A]
    labels = jnp.where((labels == 0) & (crowd_best >= bg_iou), -1, labels)
  return matched, labels.astype(jnp.int32)


def match(anchors, gt_boxes, gt_classes, *, fg_iou=0.5, bg_iou=0.4, low_quality=True, gt_crowd=None):
  """Matches every anchor to the ground truth of its image (rules in the module docstring).

  Args:
    anchors: [A, 4] float32 (x1, y1, x2, y2).
    gt_boxes: [B, M, 4] float32, padded.
    gt_classes: [B, M] int32, -1 for padding.
    fg_iou: IoU at or above which an anchor is positive.
    bg_iou: IoU below which an anchor is negative.
    low_quality: force each GT's best anchors (ties included) positive.
    gt_crowd: [B, M] bool, True for crowd boxes; None means no crowd.
  Returns:
    matched: [B, A] int32 index into M of the best non-crowd GT; meaningful
      only where labels == 1 (0 for an image without boxes).
    labels: [B, A] int32, 1 positive, 0 negative, -1 ignored.
  """
  anchors = jnp.asarray(anchors, jnp.float32)
  gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
  gt_classes = jnp.asarray(gt_classes)
  gt_crowd = None if gt_crowd is None else jnp.asarray(gt_crowd, bool)
  _check(anchors, gt_boxes, gt_classes, gt_crowd, fg_iou, bg_iou)

  def one_image(args):
    boxes, classes, crowd = args
    return _match_image(anchors, boxes, classes, crowd, fg_iou, bg_iou, low_quality)

  # Without crowd flags the crowd step is left out rather than run on a constant.
  images = (gt_boxes, gt_classes, gt_crowd)
  chunk = _IOU_BYTES // (anchors.shape[0] * gt_boxes.shape[1] * 4)
  if chunk >= gt_boxes.shape[0]:
    return jax.vmap(one_image)(images)  # ([B, A], [B, A])
  return jax.lax.map(one_image, images, batch_size=max(1, chunk))


def assign(anchors, gt_boxes, gt_classes, *, fg_iou=0.5, bg_iou=0.4, low_quality=True,
           weights=(1.0, 1.0, 1.0, 1.0), gt_crowd=None):
  """Training targets of every anchor: label, class and encoded box.

  Args:
    anchors: [A, 4] float32.
    gt_boxes: [B, M, 4] float32, padded.
    gt_classes: [B, M] int32, -1 for padding.
    fg_iou, bg_iou, low_quality, gt_crowd: as in `match`.
    weights: box coder weights (wx, wy, ww, wh).
  Returns:
    dict with
      labels: [B, A] int32, 1 positive, 0 negative, -1 ignored.
      classes: [B, A] int32, class of the matched GT where positive, else -1.
      box_targets: [B, A, 4] float32, encoded offsets, zero where not positive.
      matched_boxes: [B, A, 4] float32, the matched GT box, zero where not positive.
  """
  anchors = jnp.asarray(anchors, jnp.float32)
  gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
  gt_classes = jnp.asarray(gt_classes, jnp.int32)
  matched, labels = match(anchors, gt_boxes, gt_classes, fg_iou=fg_iou, bg_iou=bg_iou,
                          low_quality=low_quality, gt_crowd=gt_crowd)
  positive = labels == 1  # [B, A]
  boxes = jax.vmap(lambda b, m: b[m])(gt_boxes, matched)  # [B, A, 4]
  classes = jax.vmap(lambda c, m: c[m])(gt_classes, matched)  # [B, A]
  # Encoding each anchor against itself where not positive gives exact zeros and
  # keeps log(0) of degenerate or padded boxes out of the graph.
  safe = jnp.where(positive[..., None], boxes, anchors[None])  # [B, A, 4]
  return dict(
      labels=labels,
      classes=jnp.where(positive, classes, -1),
      box_targets=box_coder.encode(safe, anchors[None], weights),
      matched_boxes=jnp.where(positive[..., None], boxes, 0.0),
  )
