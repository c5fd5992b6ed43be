"""Golden tests of the losses: paper values, references, normalisation, OHEM, the whole objective."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import base
from retina_jax import anchors as anchors_lib
from retina_jax import losses
from retina_jax import matching


def _logit(p):
  return math.log(p / (1.0 - p))


def _options(low_quality=True, **loss):
  """detection_loss's keywords: base's config with config.loss (and matching.low_quality) changed."""
  config = base.get_config()
  config.loss.update(loss)
  config.matching.low_quality = low_quality
  return losses.kwargs_from_config(config)


def _loss(outputs, case, **options):
  """detection_loss's (loss, metrics, running normalizer) of head outputs on a case's anchors and GT."""
  return losses.detection_loss(outputs['logits'], outputs['deltas'], case['anchors'], case['gt_boxes'],
                               case['gt_classes'], **options)


def _labels(case, options):
  """[B, A] the labels detection_loss's matching gives."""
  return np.asarray(matching.assign(case['anchors'], case['gt_boxes'], case['gt_classes'],
                                    fg_iou=options['fg_iou'], bg_iou=options['bg_iou'],
                                    low_quality=options['low_quality'])['labels'])


@pytest.mark.parametrize('p, y, expected', [
    (0.95, 1, 3.2058e-5),
    (0.05, 0, 9.6175e-5),
    (0.05, 1, 0.675912),
    (0.95, 0, 2.027736),
    (0.99, 1, 2.5126e-7),
])
def test_focal_loss_paper_values(p, y, expected):
  got = losses.sigmoid_focal_loss(jnp.float32(_logit(p)), jnp.float32(y), alpha=0.25, gamma=2.0)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_gamma_zero_is_alpha_balanced_cross_entropy():
  z = np.linspace(-8, 8, 33).astype(np.float32)
  for y in (0.0, 1.0):
    p = 1 / (1 + np.exp(-z.astype(np.float64)))
    ce = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    for alpha in (0.25, 0.75):
      alpha_t = y * alpha + (1 - y) * (1 - alpha)
      got = losses.sigmoid_focal_loss(z, np.full_like(z, y), alpha=alpha, gamma=0.0)
      np.testing.assert_allclose(got, alpha_t * ce, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(losses.sigmoid_focal_loss(z, np.full_like(z, y), None, 0.0), ce,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('alpha, gamma', [(0.25, 2.0), (0.75, 0.5), (None, 1.0)])
def test_agrees_with_optax(alpha, gamma):
  rng = np.random.default_rng(0)
  z = rng.normal(scale=4.0, size=(4, 7, 5)).astype(np.float32)
  y = (rng.uniform(size=z.shape) < 0.3).astype(np.float32)
  expected = optax.sigmoid_focal_loss(z, y, alpha=alpha, gamma=gamma)
  np.testing.assert_allclose(losses.sigmoid_focal_loss(z, y, alpha, gamma), expected, rtol=2e-5, atol=1e-7)
  # A negative alpha is the config's spelling of "no alpha weighting".
  if alpha is None:
    np.testing.assert_allclose(losses.sigmoid_focal_loss(z, y, -1.0, gamma), expected, rtol=2e-5, atol=1e-7)


def test_bfloat16_logits_give_float32_loss():
  z = jnp.linspace(-12, 12, 101)
  y = (jnp.arange(101) % 3 == 0).astype(jnp.float32)
  z16 = z.astype(jnp.bfloat16)
  got = losses.sigmoid_focal_loss(z16, y)
  assert got.dtype == jnp.float32
  # Same bf16-rounded inputs evaluated in float32: identical; raw float32 logits: close.
  np.testing.assert_allclose(got, losses.sigmoid_focal_loss(z16.astype(jnp.float32), y), rtol=1e-6)
  np.testing.assert_allclose(got, losses.sigmoid_focal_loss(z, y), rtol=0.1, atol=1e-3)


@pytest.mark.parametrize('gamma', [0.0, 0.5, 2.0])
def test_finite_gradients_for_extreme_logits(gamma):
  z = jnp.array([-100.0, -30.0, 30.0, 100.0, -100.0, 100.0])
  y = jnp.array([1.0, 1.0, 0.0, 0.0, 0.0, 1.0])
  value, grad = jax.value_and_grad(lambda z: losses.sigmoid_focal_loss(z, y, 0.25, gamma).sum())(z)
  assert np.isfinite(value) and np.all(np.isfinite(grad))
  # A confident mistake costs ~|logit|: the log-sigmoid path, not log(0) = inf.
  np.testing.assert_allclose(losses.sigmoid_focal_loss(-100.0, 1.0, None, 0.0), 100.0, rtol=1e-6)


def test_smooth_l1_l1_and_giou_values():
  d = jnp.array([0.0, 0.05, 0.11, 1.0])
  np.testing.assert_allclose(losses.smooth_l1(d, 0.0, beta=0.11),
                             [0.0, 0.5 * 0.05**2 / 0.11, 0.11 - 0.055, 1.0 - 0.055], rtol=1e-6)
  np.testing.assert_allclose(losses.smooth_l1(d, 0.0, beta=0.0), losses.l1(-d, 0.0))
  pred = jnp.array([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
  target = jnp.array([[0.0, 0.0, 2.0, 2.0], [1.0, 0.0, 2.0, 1.0], [0.0, 0.0, 2.0, 2.0]])
  # identical: 0; touching unit boxes: IoU 0, hull 2, union 2 -> 1; nested: 1 - 1/4.
  np.testing.assert_allclose(losses.giou_loss(pred, target), [0.0, 1.0, 0.75], atol=1e-6)


def test_detection_loss_hand_computed():
  # One image, 3 anchors, 2 classes: positive (class 1), negative, ignored.
  logits = jnp.array([[[0.0, 2.0], [-1.0, 1.0], [5.0, 5.0]]])
  deltas = jnp.array([[[0.1, -0.2, 0.0, 1.0], [9.0, 9.0, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0]]])
  # The GT is anchor 0 (box target exactly 0); anchor 1 is far; anchor 2 overlaps it at
  # IoU 6 / 14, between bg_iou 0.4 and fg_iou 0.5.
  case = dict(anchors=jnp.array([[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 110.0, 110.0], [4.0, 0.0, 14.0, 10.0]]),
              gt_boxes=jnp.array([[[0.0, 0.0, 10.0, 10.0]]]), gt_classes=jnp.array([[1]], jnp.int32))
  options = _options(alpha=0.25, gamma=2.0, beta=0.11, box_weight=1.0)
  assert _labels(case, options).tolist() == [[1, 0, -1]]
  loss, out, _ = _loss(dict(logits=logits, deltas=deltas), case, **options)
  assert float(loss) == float(out['loss'])
  fl = lambda z, y: losses.sigmoid_focal_loss(jnp.float32(z), jnp.float32(y))
  cls = fl(0.0, 0) + fl(2.0, 1) + fl(-1.0, 0) + fl(1.0, 0)
  box = (0.5 * 0.1**2 / 0.11) + (0.2 - 0.055) + 0.0 + (1.0 - 0.055)
  np.testing.assert_allclose(out['num_pos'], 1.0)
  np.testing.assert_allclose(out['cls_loss'], cls, rtol=1e-6)
  np.testing.assert_allclose(out['box_loss'], box, rtol=1e-6)
  np.testing.assert_allclose(out['loss'], cls + box, rtol=1e-6)
  _, l1_out, _ = _loss(dict(logits=logits, deltas=deltas), case, **_options(box='l1', box_weight=2.0))
  np.testing.assert_allclose(l1_out['box_loss'], 2.0 * 1.3, rtol=1e-6)


def _random_case(rng, b=2, a=12, k=3, m=4):
  """Random head outputs; anchors with ground truth that gives positive, negative and ignored anchors.

  Per image, m - 2 GT boxes are jittered copies of random anchors, one is anchor a - 2 (which
  anchor a - 1 overlaps at IoU 6 / 14: ignored), and one is padding.

  Returns:
    (outputs {logits [B, A, K], deltas [B, A, 4]}, case {anchors [A, 4], gt_boxes [B, M, 4],
    gt_classes [B, M]}).
  """
  logits = jnp.asarray(rng.normal(scale=3.0, size=(b, a, k)), jnp.float32)
  deltas = jnp.asarray(rng.normal(scale=0.5, size=(b, a, 4)), jnp.float32)
  xy = rng.uniform(0, 50, size=(a - 2, 2))
  anchors = np.concatenate([np.concatenate([xy, xy + rng.uniform(5, 30, size=(a - 2, 2))], -1),
                            [[200, 200, 210, 210], [204, 200, 214, 210]]]).astype(np.float32)
  pick = np.stack([rng.choice(a - 2, size=m - 2, replace=False) for _ in range(b)])  # [B, M - 2]
  jittered = anchors[pick] + rng.normal(scale=2.0, size=(b, m - 2, 4))
  gt_boxes = np.concatenate([jittered, np.broadcast_to(anchors[-2], (b, 1, 4)), np.zeros((b, 1, 4))], 1)
  gt_classes = rng.integers(0, k, size=(b, m)).astype(np.int32)
  gt_classes[:, -1] = -1
  case = dict(anchors=jnp.asarray(anchors), gt_boxes=jnp.asarray(gt_boxes, jnp.float32),
              gt_classes=jnp.asarray(gt_classes))
  return dict(logits=logits, deltas=deltas), case


def test_image_without_boxes_has_zero_box_loss():
  rng = np.random.default_rng(1)
  outputs, case = _random_case(rng, b=1)
  case['gt_classes'] = jnp.full_like(case['gt_classes'], -1)  # padding only
  outputs['deltas'] = outputs['deltas'].at[0, 0].set(jnp.inf)  # must not leak through the mask
  for box in ('smooth_l1', 'l1', 'giou'):
    _, out, _ = _loss(outputs, case, **_options(box=box))
    assert float(out['box_loss']) == 0.0 and float(out['num_pos']) == 0.0
    # No positives: the classification sum is divided by 1, not 0.
    expected = losses.sigmoid_focal_loss(outputs['logits'], jnp.zeros_like(outputs['logits'])).sum()
    np.testing.assert_allclose(out['cls_loss'], expected, rtol=1e-6)


def test_with_assign_targets():
  anchors = anchors_lib.generate((128, 128), (3, 4), (32.0, 64.0), 2, (0.5, 1.0, 2.0), 0.5)
  gt_boxes = jnp.array([[[20.0, 30.0, 70.0, 66.0], [0.0, 0.0, 0.0, 0.0]], [[0.0] * 4] * 2])
  gt_classes = jnp.array([[2, -1], [-1, -1]], jnp.int32)  # image 1 has no boxes
  targets = matching.assign(anchors, gt_boxes, gt_classes)
  positive = np.asarray(targets['labels']) == 1
  assert positive[0].any() and not positive[1].any()
  rng = np.random.default_rng(6)
  logits = jnp.asarray(rng.normal(size=(2, anchors.shape[0], 4)), jnp.float32)
  # Perfect regression on the positives, noise elsewhere.
  deltas = jnp.where(positive[..., None], targets['box_targets'], rng.normal(size=(2, anchors.shape[0], 4)))
  run = jax.jit(lambda logits, deltas, gt_boxes, gt_classes, box: losses.detection_loss(
      logits, deltas, anchors, gt_boxes, gt_classes, **_options(box=box))[1], static_argnums=4)
  for box in ('smooth_l1', 'giou'):
    out = run(logits, deltas, gt_boxes, gt_classes, box)
    np.testing.assert_allclose(out['box_loss'], 0.0, atol=1e-5)
    assert float(out['num_pos']) == positive.sum()
    out = run(logits[1:], deltas[1:] + 3.0, gt_boxes[1:], gt_classes[1:], box)
    assert float(out['box_loss']) == 0.0 and float(out['num_pos']) == 0.0


def test_normalizer():
  rng = np.random.default_rng(2)
  outputs, case = _random_case(rng)
  options = _options()
  _, plain, unchanged = _loss(outputs, case, running_normalizer=jnp.float32(7.0), **options)
  assert float(unchanged) == 7.0  # 'global' leaves the running normalizer alone
  num_pos = float(np.sum(_labels(case, options) == 1))
  assert float(plain['num_pos']) == num_pos > 1
  # Momentum 1 keeps the running normalizer where it was: the losses are divided by it.
  running = _options(normalizer='running', normalizer_momentum=1.0)
  _, out, kept = _loss(outputs, case, running_normalizer=jnp.float32(40.0), **running)
  assert float(kept) == 40.0
  for key in ('loss', 'cls_loss', 'box_loss'):
    np.testing.assert_allclose(out[key] * 40.0, plain[key] * num_pos, rtol=1e-5)
  _, tiny, _ = _loss(outputs, case, running_normalizer=0.25, **running)
  np.testing.assert_allclose(tiny['loss'], plain['loss'] * num_pos, rtol=1e-5)  # clamped at 1
  _, _, updated = _loss(outputs, case, running_normalizer=jnp.float32(100.0),
                        **_options(normalizer='running', normalizer_momentum=0.9))
  np.testing.assert_allclose(updated, 0.9 * 100.0 + 0.1 * num_pos, rtol=1e-6)
  np.testing.assert_allclose(losses.update_running_normalizer(100.0, 20.0, 0.9), 92.0)
  np.testing.assert_allclose(losses.update_running_normalizer(jnp.float32(92.0), 0.0, 0.9), 82.8, rtol=1e-6)


def test_ignored_anchors_contribute_nothing():
  rng = np.random.default_rng(3)
  outputs, case = _random_case(rng)
  options = _options(box='giou')
  labels = _labels(case, options)
  ignored = labels == -1
  assert ignored.any()
  loss_fn = jax.jit(lambda o: _loss(o, case, **options)[0])
  value, grads = jax.jit(jax.value_and_grad(loss_fn))(outputs)
  moved = dict(outputs, logits=jnp.where(ignored[..., None], 50.0, outputs['logits']))
  np.testing.assert_allclose(loss_fn(moved), value, rtol=1e-6)
  assert np.all(np.asarray(grads['logits'])[ignored] == 0.0)
  assert np.all(np.asarray(grads['deltas'])[labels != 1] == 0.0)


def test_bfloat16_outputs_match_float32():
  rng = np.random.default_rng(4)
  outputs, case = _random_case(rng)
  half = {k: v.astype(jnp.bfloat16) for k, v in outputs.items()}
  rounded = {k: v.astype(jnp.float32) for k, v in half.items()}
  options = _options()
  got, _, _ = _loss(half, case, **options)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, _loss(rounded, case, **options)[0], rtol=1e-6)
  np.testing.assert_allclose(got, _loss(outputs, case, **options)[0], rtol=0.02)


def _ohem_case():
  """One image, one class, zero deltas (predicted box = anchor), hand-picked losses.

  The GT boxes are anchors 2 and 6, and a box at IoU 6 / 14 with anchor 4 (ignored:
  between bg_iou 0.4 and fg_iou 0.5, with low_quality off so that it stays so).
  """
  anchors = jnp.array([
      [0, 0, 10, 10],  # 0 negative, CE softplus(5) = 5.007
      [1, 0, 11, 10],  # 1 negative, CE 4.018, IoU 0.82 with anchor 0: suppressed at 0.7
      [20, 0, 30, 10],  # 2 positive, CE 3.049
      [40, 0, 50, 10],  # 3 negative, CE 2.127
      [60, 0, 70, 10],  # 4 ignored, the highest loss but never picked
      [80, 0, 90, 10],  # 5 negative, CE 1.313
      [100, 0, 110, 10],  # 6 positive, CE 0.693
  ], jnp.float32)
  logits = jnp.array([[[5.0], [4.0], [-3.0], [2.0], [10.0], [1.0], [0.0]]])
  outputs = dict(logits=logits, deltas=jnp.zeros((1, 7, 4)))
  case = dict(anchors=anchors, gt_boxes=jnp.array([[[20, 0, 30, 10], [100, 0, 110, 10], [64, 0, 74, 10]]], jnp.float32),
              gt_classes=jnp.zeros((1, 3), jnp.int32))
  labels = _labels(case, _options(low_quality=False))
  assert labels.tolist() == [[0, 0, 1, 0, -1, 0, 1]]
  return outputs, case, labels


@pytest.mark.parametrize('neg_pos, expected', [
    (0.0, [0, 2, 3]),  # the 3 highest-loss survivors
    (3.0, [0, 2, 3]),  # 2 negatives for 1 positive: within 3:1
    (1.0, [0, 2, 6]),  # 1:1 -> 2 positives (ceil(3 / 2)) and 1 negative
])
def test_ohem_selects_hardest_survivors(neg_pos, expected):
  outputs, case, labels = _ohem_case()
  onehot = (labels == 1)[..., None]
  ce = losses.sigmoid_focal_loss(outputs['logits'], onehot, None, 0.0)[..., 0]  # [1, 7]
  chosen = losses.ohem_select(ce, labels, jnp.broadcast_to(case['anchors'], (1, 7, 4)), batch=3,
                              nms_iou=0.7, neg_pos=neg_pos)
  assert np.flatnonzero(np.asarray(chosen[0])).tolist() == expected
  # Loss averaged over the chosen anchors; gradient only through them.
  options = _options(low_quality=False, cls='ohem', ohem_batch=3, ohem_nms=0.7, ohem_neg_pos=neg_pos)
  loss_fn = lambda o: _loss(o, case, **options)[1]['cls_loss']
  value, grads = jax.jit(jax.value_and_grad(loss_fn))(outputs)
  np.testing.assert_allclose(value, np.mean(np.asarray(ce[0])[expected]), rtol=1e-6)
  assert np.flatnonzero(np.asarray(grads['logits'][0, :, 0])).tolist() == expected


def test_ohem_without_nms_suppression_takes_next_anchor():
  outputs, case, _ = _ohem_case()
  options = _options(low_quality=False, cls='ohem', ohem_batch=3, ohem_nms=0.9, ohem_neg_pos=0.0)
  grads = jax.jit(jax.grad(lambda o: _loss(o, case, **options)[1]['cls_loss']))(outputs)
  assert np.flatnonzero(np.asarray(grads['logits'][0, :, 0])).tolist() == [0, 1, 2]


def test_jit_does_not_recompile_for_new_values():
  traces = []
  options = _options()

  def loss_fn(outputs, case):
    traces.append(1)
    return _loss(outputs, case, **options)[0]

  jitted = jax.jit(loss_fn)
  for seed in range(3):
    jitted(*_random_case(np.random.default_rng(seed)))
  assert len(traces) == 1


def test_bad_config_values_are_named():
  # Checked where detection_loss's keywords are read from the config, before anything is traced.
  with pytest.raises(ValueError, match=r"config\.loss\.cls='softmax': must be one of \('focal', 'ohem'\)"):
    _options(cls='softmax')
  with pytest.raises(ValueError, match=r"config\.loss\.box='iou'"):
    _options(box='iou')
