"""RetinaNet's training objective: anchor matching, focal loss or OHEM, box regression, normaliser.

`detection_loss` is the whole objective of a batch, from head outputs and padded ground
truth; its choices are the dicts CLS_LOSSES, BOX_LOSSES and NORMALIZERS, from the names
config.loss accepts to what they do (a new loss is a new entry), and `check` reads the
same dicts. Every loss is computed in float32 from logits, whatever the model's compute
dtype, with log-sigmoid so that no probability is rounded to 0 or 1 before a log (paper
sec. 3; DESIGN.md). The classification and box losses are sums over anchors divided by
the number of positive anchors of the batch passed in (the global batch inside jit), at
least 1; detectron2's running average of that number is an option.
"""

import math

import jax
import jax.numpy as jnp

from retina_jax import box_coder
from retina_jax import boxes as boxes_lib
from retina_jax import errors
from retina_jax import matching


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


def _focal(logits, onehot, labels, *, norm, alpha, gamma, **_):
  """Focal loss summed over every (anchor, class) of the anchors not ignored, over `norm`."""
  per_class = sigmoid_focal_loss(logits, onehot, alpha, gamma)  # [B, A, K]
  return jnp.sum(jnp.where((labels >= 0)[..., None], per_class, 0.0)) / norm


def _ohem(logits, onehot, labels, *, pred_boxes, ohem_batch, ohem_nms, ohem_neg_pos, **_):
  """Sigmoid CE summed over classes, averaged over the anchors `ohem_select` picks.

  The OHEM minibatch of the whole batch is the unit, as in Fast R-CNN's OHEM: the
  normalizer, alpha and gamma play no part.
  """
  anchor_ce = sigmoid_focal_loss(logits, onehot, alpha=None, gamma=0.0).sum(-1)  # [B, A]
  chosen = ohem_select(anchor_ce, labels, pred_boxes, batch=int(ohem_batch), nms_iou=float(ohem_nms),
                       neg_pos=float(ohem_neg_pos))
  return jnp.sum(jnp.where(chosen, anchor_ce, 0.0)) / jnp.maximum(jnp.sum(chosen), 1)


# config.loss.cls -> (logits [B, A, K] f32, onehot [B, A, K] bool, labels [B, A], *, norm,
# pred_boxes [B, A, 4], and the options of detection_loss) -> [] classification loss.
# Each takes the keywords it needs and ignores the others.
CLS_LOSSES = {'focal': _focal, 'ohem': _ohem}

# config.loss.box -> (deltas [B, A, 4] f32, matching.assign's targets, *, pred_boxes [B, A, 4],
# beta) -> [B, A] box loss per anchor; the caller keeps the positive anchors only.
BOX_LOSSES = {
    'smooth_l1': lambda deltas, targets, *, beta, **_: smooth_l1(deltas, targets['box_targets'], beta).sum(-1),
    'l1': lambda deltas, targets, **_: l1(deltas, targets['box_targets']).sum(-1),
    'giou': lambda deltas, targets, *, pred_boxes, **_: giou_loss(pred_boxes, targets['matched_boxes']),
}


def _running(num_pos, running, momentum):
  # detectron2 feeds the average max(num_pos, 1): a batch without objects still counts once.
  new = update_running_normalizer(running, jnp.maximum(num_pos, 1.0), momentum)
  return new, new


# config.loss.normalizer -> (num_pos [], running [] or None, momentum) -> (what the losses are
# divided by, before the clamp at 1; the running normalizer after this batch).
NORMALIZERS = {
    'global': lambda num_pos, running, momentum: (num_pos, running),
    'running': _running,
}


def detection_loss(logits, deltas, anchors, gt_boxes, gt_classes, *, cls, alpha, gamma, box, beta,
                   box_weight, coder_weights, fg_iou, bg_iou, low_quality, normalizer, momentum,
                   ohem_batch, ohem_nms, ohem_neg_pos, running_normalizer=None):
  """RetinaNet's training objective: match the anchors to the ground truth, then classify and regress.

  Classification (`cls`, CLS_LOSSES): 'focal' sums the focal loss over every (anchor, class)
  of the anchors that are not ignored, over the normalizer; 'ohem' averages sigmoid CE over
  the anchors `ohem_select` picks (alpha and gamma unused). The box loss (`box`, BOX_LOSSES)
  is the same for both: summed over positive anchors only (an image without boxes gives
  exactly 0), over the normalizer, times box_weight, so Table 1d compares the
  classification losses alone.

  The normalizer (`normalizer`, NORMALIZERS) is the number of positive anchors of the batch
  passed in (the global batch inside jit), or detectron2's running average of it; either is
  clamped to at least 1. Use `kwargs_from_config(config)` for every keyword but
  running_normalizer, which the train state carries.

  Args:
    logits: [B, A, K] class logits, any float dtype (the loss is float32).
    deltas: [B, A, 4] box offsets, any float dtype.
    anchors: [A, 4] float32.
    gt_boxes: [B, M, 4] float32, padded.
    gt_classes: [B, M] int32, -1 for padding.
    cls, box, normalizer: keys of CLS_LOSSES, BOX_LOSSES, NORMALIZERS.
    alpha, gamma: the focal loss's (sigmoid_focal_loss).
    beta: smooth L1's quadratic zone.
    box_weight: multiplies the box loss.
    coder_weights: box coder weights (wx, wy, ww, wh), for the targets and for decoding.
    fg_iou, bg_iou, low_quality: matching.assign's.
    momentum: the running normalizer's.
    ohem_batch, ohem_nms, ohem_neg_pos: ohem_select's batch, nms_iou, neg_pos.
    running_normalizer: [] float32, the running normalizer before this batch; needed for
      'running', returned unchanged (may be None) for 'global'.
  Returns:
    (loss [] float32, metrics: dict of [] float32 loss (= cls_loss + box_loss), cls_loss,
    box_loss (box_weight included), num_pos; the running normalizer after this batch).
  """
  logits = jnp.asarray(logits).astype(jnp.float32)
  deltas = jnp.asarray(deltas).astype(jnp.float32)
  anchors = jnp.asarray(anchors, jnp.float32)
  targets = matching.assign(anchors, gt_boxes, gt_classes, fg_iou=fg_iou, bg_iou=bg_iou,
                            low_quality=low_quality, weights=coder_weights)
  labels = targets['labels']  # [B, A]
  positive = labels == 1
  num_pos = jnp.sum(positive).astype(jnp.float32)
  count, running_normalizer = NORMALIZERS[normalizer](num_pos, running_normalizer, momentum)
  norm = jnp.maximum(jnp.asarray(count, jnp.float32), 1.0)
  onehot = positive[..., None] & (targets['classes'][..., None] == jnp.arange(logits.shape[-1]))  # [B, A, K]
  pred_boxes = box_coder.decode(deltas, anchors, coder_weights)  # [B, A, 4]; jit drops it when unused
  cls_loss = CLS_LOSSES[cls](
      logits, onehot, labels, norm=norm, pred_boxes=pred_boxes, alpha=alpha, gamma=gamma,
      ohem_batch=ohem_batch, ohem_nms=ohem_nms, ohem_neg_pos=ohem_neg_pos)
  per_anchor = BOX_LOSSES[box](deltas, targets, pred_boxes=pred_boxes, beta=beta)  # [B, A]
  # where, not multiply: a non-positive anchor's loss must not leak inf/NaN.
  box_loss = box_weight * jnp.sum(jnp.where(positive, per_anchor, 0.0)) / norm
  loss = cls_loss + box_loss
  return loss, dict(loss=loss, cls_loss=cls_loss, box_loss=box_loss, num_pos=num_pos), running_normalizer


def check(config):
  """Raises errors.BadValue naming the first bad value of config.loss."""
  l = config.loss
  errors.check_choice('loss.cls', l.cls, CLS_LOSSES)
  errors.check_choice('loss.box', l.box, BOX_LOSSES)
  errors.check_choice('loss.normalizer', l.normalizer, NORMALIZERS)
  errors.check_range('loss.alpha', l.alpha, hi=1.0)  # negative: no alpha weighting
  errors.check_range('loss.gamma', l.gamma, lo=0.0)
  errors.check_range('loss.beta', l.beta, lo=0.0)
  errors.check_range('loss.box_weight', l.box_weight, lo=0.0)
  errors.check_range('loss.normalizer_momentum', l.normalizer_momentum, 0.0, 1.0)
  errors.check_positive('loss.normalizer_init', l.normalizer_init)
  errors.check_range('loss.ohem_batch', l.ohem_batch, lo=1)
  errors.check_range('loss.ohem_nms', l.ohem_nms, 0.0, 1.0)
  errors.check_range('loss.ohem_neg_pos', l.ohem_neg_pos, lo=0.0)


def kwargs_from_config(config):
  """detection_loss's keywords from config.loss, config.matching and config.box_coder.

  config.loss is checked first, so a bad value is named before anything is traced.
  """
  check(config)
  l, m = config.loss, config.matching
  return dict(cls=l.cls, alpha=l.alpha, gamma=l.gamma, box=l.box, beta=l.beta, box_weight=l.box_weight,
              coder_weights=tuple(config.box_coder.weights), fg_iou=m.fg_iou, bg_iou=m.bg_iou,
              low_quality=m.low_quality, normalizer=l.normalizer, momentum=l.normalizer_momentum,
              ohem_batch=l.ohem_batch, ohem_nms=l.ohem_nms, ohem_neg_pos=l.ohem_neg_pos)
