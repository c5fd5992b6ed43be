"""RetinaNet losses: focal loss, box regression, OHEM, and their normalisation.

Every loss is computed in float32 from logits, whatever the model's compute
dtype, with log-sigmoid so that no probability is rounded to 0 or 1 before a
log (paper sec. 3; DESIGN.md). The classification and box losses are sums
over anchors divided by the number of positive anchors of the batch passed in
(the global batch inside jit), at least 1; detectron2's running average of
that number is an option (`update_running_normalizer`).
"""

import math

import jax
import jax.numpy as jnp

from retina_jax import box_coder
from retina_jax import boxes as boxes_lib


def sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0):
  """FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t), elementwise (paper eq. 5).

  gamma = 0 gives alpha-balanced cross-entropy, and alpha None or negative
  drops alpha_t (unlike optax.sigmoid_focal_loss, whose alpha defaults to None,
  the paper's alpha = 0.25 is the default here). The modulating factor is
  exp(gamma * log(1 - p_t)) with log(1 - p_t) from log-sigmoid: (1 - p_t)^gamma
  written as a power has an infinite derivative for gamma < 1 where p_t rounds
  to 1, which turns confident logits into NaN gradients.

  Args:
    logits: [...] any float dtype.
    targets: [...] binary targets in {0, 1}, same shape.
    alpha: weight of the positives (1 - alpha for negatives), or None.
    gamma: focusing parameter >= 0.
  Returns:
    [...] float32 loss.
  """
  z = jnp.asarray(logits).astype(jnp.float32)
  y = jnp.asarray(targets).astype(jnp.float32)
  log_p = jax.nn.log_sigmoid(z)
  # log(1 - p) = log_p - z exactly, one transcendental less over [B, A, K].
  ce = (1.0 - y) * z - log_p  # -(y log p + (1 - y) log(1 - p))
  log_not_pt = log_p - y * z  # log(1 - p_t) for binary y
  loss = ce * jnp.exp(gamma * log_not_pt)
  if alpha is not None and alpha >= 0:
    loss = (y * alpha + (1.0 - y) * (1.0 - alpha)) * loss
  return loss


def smooth_l1(pred, target, beta=0.11):
  """Smooth L1 (Huber divided by beta), elementwise; beta 0 is plain L1.

  Args:
    pred, target: [...] same shape.
    beta: python float, the width of the quadratic zone.
  Returns:
    [...] float32.
  """
  diff = jnp.abs(jnp.asarray(pred, jnp.float32) - jnp.asarray(target, jnp.float32))
  if beta < 1e-5:  # the quadratic zone would divide by ~0
    return diff
  return jnp.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)


def l1(pred, target):
  """|pred - target| elementwise, float32."""
  return jnp.abs(jnp.asarray(pred, jnp.float32) - jnp.asarray(target, jnp.float32))


def giou_loss(pred_boxes, target_boxes, eps=1e-7):
  """1 - generalised IoU of matching boxes (Rezatofighi et al., 2019).

  Args:
    pred_boxes: [..., 4] (x1, y1, x2, y2).
    target_boxes: [..., 4], same shape.
    eps: keeps the ratios finite for degenerate boxes (e.g. zero targets of
      non-positive anchors, which the caller masks out).
  Returns:
    [...] float32 in [0, 2].
  """
  p = jnp.asarray(pred_boxes, jnp.float32)
  t = jnp.asarray(target_boxes, jnp.float32)
  inter_wh = jnp.maximum(jnp.minimum(p[..., 2:], t[..., 2:]) - jnp.maximum(p[..., :2], t[..., :2]), 0.0)
  inter = inter_wh[..., 0] * inter_wh[..., 1]
  union = boxes_lib.area(p) + boxes_lib.area(t) - inter
  hull_wh = jnp.maximum(jnp.maximum(p[..., 2:], t[..., 2:]) - jnp.minimum(p[..., :2], t[..., :2]), 0.0)
  hull = hull_wh[..., 0] * hull_wh[..., 1]
  giou = inter / jnp.maximum(union, eps) - (hull - union) / jnp.maximum(hull, eps)
  return 1.0 - giou


def update_running_normalizer(old, num_pos, momentum):
  """detectron2's normalizer: new = momentum * old + (1 - momentum) * num_pos."""
  return momentum * old + (1.0 - momentum) * num_pos


def ohem_select(anchor_loss, labels, pred_boxes, *, batch, nms_iou, neg_pos=0.0, pool_factor=8):
  """Online hard example mining of anchors (paper sec. 5.1, Table 1d).

  Per image: the anchors that are not ignored are scored by their loss, NMS at
  `nms_iou` runs over their predicted boxes with the loss as score, and the
  `batch` highest-loss survivors form the minibatch. NMS over all ~100k
  anchors would be too slow, so it only sees the pool_factor * batch
  highest-loss anchors (capped at A); when many of them suppress each other
  the minibatch can come out smaller than `batch`.

  With neg_pos = r > 0 a minibatch holds at most r negatives per positive: if
  the `batch` best survivors break the ratio, it takes the a = min(P, ceil(batch
  / (1 + r))) highest-loss surviving positives and the min(N, floor(r * a),
  batch - a) highest-loss surviving negatives (P, N the surviving counts).
  An image without positives then contributes no anchor. This mode needs all
  survivors of the pool, so its NMS loop runs up to pool_factor * batch steps
  instead of `batch`.

  Args:
    anchor_loss: [B, A] float32 per-anchor loss (CE summed over classes).
    labels: [B, A] int32 in {1, 0, -1}.
    pred_boxes: [B, A, 4] decoded predicted boxes.
    batch, nms_iou, neg_pos: config.loss.ohem_batch, ohem_nms, ohem_neg_pos.
    pool_factor: python int, candidates before NMS per kept anchor.
  Returns:
    [B, A] bool, the selected anchors (no gradient flows through it).
  """
  anchor_loss, pred_boxes = jax.lax.stop_gradient((anchor_loss, pred_boxes))
  num_anchors = labels.shape[1]
  pool = min(num_anchors, pool_factor * batch)
  max_out = pool if neg_pos > 0 else min(batch, pool)

  def one_image(loss, label, boxes):
    top, cand = jax.lax.top_k(jnp.where(label >= 0, loss, -jnp.inf), pool)  # [pool]
    keep, valid = boxes_lib.nms(boxes[cand], top, nms_iou, max_out)  # [max_out]
    kept = cand[keep]
    take = valid
    if neg_pos > 0:
      is_pos = valid & (label[kept] == 1)
      is_neg = valid & (label[kept] == 0)
      in_top = jnp.arange(max_out) < batch  # survivors come best first
      a0, b0 = jnp.sum(is_pos & in_top), jnp.sum(is_neg & in_top)
      a = jnp.minimum(jnp.sum(is_pos), math.ceil(batch / (1.0 + neg_pos)))
      b = jnp.minimum(jnp.minimum(jnp.sum(is_neg), batch - a),
                      jnp.floor(neg_pos * a).astype(jnp.int32))
      ratio_ok = b0 <= neg_pos * a0
      a, b = jnp.where(ratio_ok, a0, a), jnp.where(ratio_ok, b0, b)
      take = ((is_pos & (jnp.cumsum(is_pos) <= a)) | (is_neg & (jnp.cumsum(is_neg) <= b)))
    return jnp.zeros((num_anchors,), bool).at[kept].max(take)

  return jax.vmap(one_image)(anchor_loss, labels, pred_boxes)


def _box_loss(deltas, targets, anchors, loss_config, weights):
  """Per-anchor box loss [B, A] of the configured kind (zero targets off positives)."""
  kind = loss_config.box
  if kind == 'smooth_l1':
    return smooth_l1(deltas, targets['box_targets'], loss_config.beta).sum(-1)
  elif kind == 'l1':
    return l1(deltas, targets['box_targets']).sum(-1)
  elif kind == 'giou':
    return giou_loss(box_coder.decode(deltas, anchors, weights), targets['matched_boxes'])
  raise ValueError(f"config loss.box = {kind!r}: expected 'smooth_l1', 'l1' or 'giou'")


def retinanet_loss(outputs, targets, anchors, loss_config, *, weights=(1.0, 1.0, 1.0, 1.0),
                   normalizer=None):
  """Classification + box loss of a batch.

  Focal loss (loss.cls = 'focal'): sum over every (anchor, class) of anchors
  that are not ignored, divided by the normalizer. OHEM (loss.cls = 'ohem'):
  sigmoid CE summed over classes for the anchors `ohem_select` picks, averaged
  over the picked anchors of the whole batch (the OHEM minibatch is the unit,
  as in Fast R-CNN's OHEM); alpha and gamma are unused. The box loss is the
  same in both modes: summed over positive anchors only (an image without
  boxes gives exactly 0), divided by the normalizer, times loss.box_weight, so
  Table 1d compares the classification losses alone.

  The normalizer is the number of positive anchors of the batch passed in, at
  least 1, or `normalizer` when given (detectron2's running average, kept by
  the caller with `update_running_normalizer`; also clamped to at least 1).

  Args:
    outputs: {'logits': [B, A, K], 'deltas': [B, A, 4]} from the model.
    targets: matching.assign's dict: labels [B, A] int32, classes [B, A]
      int32, box_targets [B, A, 4], matched_boxes [B, A, 4].
    anchors: [A, 4] anchors.
    loss_config: config.loss.
    weights: config.box_coder.weights (GIoU and OHEM decode the deltas).
    normalizer: optional float scalar replacing the positive count.
  Returns:
    dict of float32 scalars: loss (= cls_loss + box_loss), cls_loss, box_loss
    (box_weight included), num_pos.
  """
  logits = jnp.asarray(outputs['logits']).astype(jnp.float32)
  deltas = jnp.asarray(outputs['deltas']).astype(jnp.float32)
  anchors = jnp.asarray(anchors, jnp.float32)
  labels = targets['labels']
  positive = labels == 1
  num_pos = jnp.sum(positive).astype(jnp.float32)
  norm = jnp.maximum(num_pos if normalizer is None else jnp.asarray(normalizer, jnp.float32), 1.0)
  onehot = positive[..., None] & (targets['classes'][..., None] == jnp.arange(logits.shape[-1]))  # [B, A, K]

  if loss_config.cls == 'focal':
    per_class = sigmoid_focal_loss(logits, onehot, loss_config.alpha, loss_config.gamma)
    cls_loss = jnp.sum(jnp.where((labels >= 0)[..., None], per_class, 0.0)) / norm
  elif loss_config.cls == 'ohem':
    anchor_ce = sigmoid_focal_loss(logits, onehot, alpha=None, gamma=0.0).sum(-1)  # [B, A]
    pred_boxes = box_coder.decode(deltas, anchors, weights)
    chosen = ohem_select(anchor_ce, labels, pred_boxes, batch=int(loss_config.ohem_batch),
                         nms_iou=float(loss_config.ohem_nms), neg_pos=float(loss_config.ohem_neg_pos))
    cls_loss = jnp.sum(jnp.where(chosen, anchor_ce, 0.0)) / jnp.maximum(jnp.sum(chosen), 1)
  else:
    raise ValueError(f"config loss.cls = {loss_config.cls!r}: expected 'focal' or 'ohem'")

  per_anchor = _box_loss(deltas, targets, anchors, loss_config, weights)
  # where, not multiply: a non-positive anchor's loss must not leak inf/NaN.
  box_loss = loss_config.box_weight * jnp.sum(jnp.where(positive, per_anchor, 0.0)) / norm
  return dict(loss=cls_loss + box_loss, cls_loss=cls_loss, box_loss=box_loss, num_pos=num_pos)
