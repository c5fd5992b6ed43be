"""NMS (boxes.nms) against a plain numpy reference; post-processing on a hand-made case."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retina_jax import anchors as anchors_lib
from retina_jax import box_coder
from retina_jax import boxes as boxes_lib
from retina_jax import postprocess


def numpy_nms(boxes, scores, iou_thresh, classes=None):
  """Textbook greedy NMS: the kept indices, best first."""
  classes = np.zeros(len(scores), int) if classes is None else classes
  areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  suppressed = np.zeros(len(scores), bool)
  keep = []
  for i in np.argsort(-scores, kind='stable'):
    if suppressed[i]:
      continue
    keep.append(int(i))
    w = np.clip(np.minimum(boxes[i, 2], boxes[:, 2]) - np.maximum(boxes[i, 0], boxes[:, 0]), 0, None)
    h = np.clip(np.minimum(boxes[i, 3], boxes[:, 3]) - np.maximum(boxes[i, 1], boxes[:, 1]), 0, None)
    iou = w * h / (areas[i] + areas - w * h)
    suppressed |= (iou > iou_thresh) & (classes == classes[i])
  return keep


def _random_boxes(rng, n):
  xy = rng.uniform(0, 100, size=(n, 2))
  return np.concatenate([xy, xy + rng.uniform(4, 40, size=(n, 2))], -1).astype(np.float32)


@pytest.mark.parametrize('seed, iou_thresh', [(0, 0.5), (1, 0.3), (2, 0.7)])
def test_nms_matches_numpy_reference(seed, iou_thresh):
  rng = np.random.default_rng(seed)
  boxes = _random_boxes(rng, 300)
  scores = rng.uniform(size=300).astype(np.float32)
  classes = rng.integers(0, 3, size=300)
  run = jax.jit(boxes_lib.nms, static_argnums=(2, 3))
  expected = numpy_nms(boxes, scores, iou_thresh)
  index, valid = run(boxes, scores, iou_thresh, 300)
  assert np.asarray(index)[np.asarray(valid)].tolist() == expected
  assert np.asarray(valid).sum() == len(expected) and not np.asarray(valid)[len(expected):].any()
  # A small max_out is exactly the prefix of the full result.
  index, valid = run(boxes, scores, iou_thresh, 10)
  assert np.asarray(valid).all() and np.asarray(index).tolist() == expected[:10]
  index, valid = jax.jit(boxes_lib.nms, static_argnums=(2, 3))(boxes, scores, iou_thresh, 300, classes)
  assert np.asarray(index)[np.asarray(valid)].tolist() == numpy_nms(boxes, scores, iou_thresh, classes)


def test_nms_skips_non_candidates():
  boxes = jnp.array([[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], jnp.float32)
  scores = jnp.array([0.9, 0.8, -jnp.inf, jnp.nan])
  index, valid = boxes_lib.nms(boxes, scores, 0.5, 4)
  assert np.asarray(valid).tolist() == [True, False, False, False]
  assert int(index[0]) == 0
  with pytest.raises(ValueError, match=r'boxes must be \[N, 4\]'):
    boxes_lib.nms(boxes[:, :3], scores, 0.5, 4)


# A two-level toy pyramid: level one has 4 anchors, level two 2; K = 3 classes.
_ANCHORS = np.array([
    [10, 10, 30, 30], [11, 10, 31, 30], [50, 50, 60, 60], [90, 90, 110, 110],
    [0, 0, 40, 40], [40, 0, 80, 40],
], np.float32)
_COUNTS = (4, 2)
_NEVER = -10.0  # sigmoid ~ 4.5e-5, below any threshold used here


def _hand_made_case():
  logits = np.full((2, 6, 3), _NEVER, np.float32)
  logits[0, 0, 1] = 3.0  # kept
  logits[0, 1, 1] = 2.0  # IoU 0.905 with anchor 0, same class: suppressed
  logits[0, 1, 2] = 1.0  # same box, other class: kept
  logits[0, 2, 0] = -3.5  # score 0.029 < 0.05: dropped
  logits[0, 3, 0] = 4.0  # entirely outside the 80 x 80 image: zero area after clipping, dropped
  logits[0, 4, 0] = 0.0  # second level, kept, moved right by its delta
  deltas = np.zeros((2, 6, 4), np.float32)
  deltas[0, 4, 0] = 0.25  # dx: 0.25 * 40 px
  deltas[0, 5, 2] = 100.0  # a wild dw, clamped at decode (its score is negligible anyway)
  image_hw = np.array([[80, 80], [100, 100]], np.float32)  # image 1 has no confident anchor
  return logits, deltas, image_hw


def _run(logits, deltas, image_hw, **kwargs):
  fn = functools.partial(postprocess.postprocess, anchors=_ANCHORS, level_counts=_COUNTS, **kwargs)
  return jax.jit(fn)(logits, deltas, image_hw=image_hw)


def test_postprocess_hand_made():
  out = _run(*_hand_made_case(), max_detections=5)
  assert out['boxes'].shape == (2, 5, 4) and out['scores'].shape == (2, 5)
  assert out['classes'].dtype == jnp.int32 and out['valid'].dtype == jnp.bool_
  sig = lambda z: 1 / (1 + math.exp(-z))
  assert np.asarray(out['valid']).tolist() == [[True, True, True, False, False], [False] * 5]
  np.testing.assert_allclose(out['scores'][0], [sig(3.0), sig(1.0), sig(0.0), 0, 0], rtol=1e-6)
  assert np.asarray(out['classes']).tolist() == [[1, 2, 0, -1, -1], [-1] * 5]
  np.testing.assert_allclose(out['boxes'][0], [
      [10, 10, 30, 30],
      [11, 10, 31, 30],
      [10, 0, 50, 40],  # anchor 4 shifted by 10 px
      [0, 0, 0, 0], [0, 0, 0, 0]], atol=1e-5)
  assert not np.asarray(out['scores'][1]).any() and not np.asarray(out['boxes'][1]).any()


def test_postprocess_top_k_threshold_and_clipping():
  logits, deltas, image_hw = _hand_made_case()
  # One pair per level: level one's best (anchor 3, outside the image) is dropped, not replaced.
  out = _run(logits, deltas, image_hw, topk_per_level=1, max_detections=5)
  assert np.asarray(out['classes'][0]).tolist() == [0, -1, -1, -1, -1]
  out = _run(logits, deltas, image_hw, score_thresh=0.6, max_detections=5)
  assert np.asarray(out['classes'][0]).tolist() == [1, 2, -1, -1, -1]
  # A larger image keeps anchor 3 (clipped to it) and its score ranks it first.
  out = _run(logits, deltas, np.array([[100, 105], [100, 100]], np.float32), max_detections=5)
  np.testing.assert_allclose(out['boxes'][0, 0], [90, 90, 105, 100], atol=1e-5)
  # max_detections truncates to the best.
  out = _run(logits, deltas, image_hw, max_detections=2)
  assert np.asarray(out['classes'][0]).tolist() == [1, 2]


def numpy_postprocess(logits, deltas, anchors, counts, image_hw, score_thresh, topk, nms_iou, max_det):
  """The paper's inference written plainly, one image and one level at a time."""
  results = []
  for i in range(logits.shape[0]):
    boxes, scores, classes, start = [], [], [], 0
    for n in counts:
      flat = logits[i, start:start + n].reshape(-1)
      order = np.argsort(-flat, kind='stable')[:topk]
      order = order[1 / (1 + np.exp(-flat[order].astype(np.float64))) > score_thresh]
      level_boxes = np.array(box_coder.decode(deltas[i, start + order // logits.shape[2]],
                                              anchors[start + order // logits.shape[2]]))
      level_boxes[:, 0::2] = np.clip(level_boxes[:, 0::2], 0, image_hw[i, 1])
      level_boxes[:, 1::2] = np.clip(level_boxes[:, 1::2], 0, image_hw[i, 0])
      nonempty = (level_boxes[:, 2] > level_boxes[:, 0]) & (level_boxes[:, 3] > level_boxes[:, 1])
      boxes.append(level_boxes[nonempty])
      scores.append(1 / (1 + np.exp(-flat[order][nonempty].astype(np.float64))))
      classes.append(order[nonempty] % logits.shape[2])
      start += n
    boxes, scores, classes = (np.concatenate(x) for x in (boxes, scores, classes))
    keep = numpy_nms(boxes, scores, nms_iou, classes)[:max_det]
    results.append((boxes[keep], scores[keep], classes[keep]))
  return results


def test_postprocess_matches_numpy_reference():
  anchors = anchors_lib.generate((128, 128), (3, 4), (32.0, 64.0), 1, (0.5, 1.0), 0.5)
  counts = anchors_lib.level_counts((128, 128), (3, 4), 2)
  rng = np.random.default_rng(7)
  logits = rng.normal(scale=2.0, size=(2, anchors.shape[0], 4)).astype(np.float32)
  deltas = rng.normal(scale=0.3, size=(2, anchors.shape[0], 4)).astype(np.float32)
  image_hw = np.array([[100, 128], [128, 90]], np.float32)
  settings = dict(score_thresh=0.3, topk_per_level=40, nms_iou=0.5, max_detections=25)
  out = jax.jit(functools.partial(postprocess.postprocess, anchors=anchors, level_counts=counts,
                                  **settings))(logits, deltas, image_hw=image_hw)
  expected = numpy_postprocess(logits, deltas, anchors, counts, image_hw, *settings.values())
  for i, (boxes, scores, classes) in enumerate(expected):
    n = len(scores)
    assert 0 < n and np.asarray(out['valid'][i]).sum() == n
    assert np.asarray(out['classes'][i, :n]).tolist() == classes.tolist()
    np.testing.assert_allclose(out['scores'][i, :n], scores, rtol=1e-5)
    np.testing.assert_allclose(out['boxes'][i, :n], boxes, atol=1e-3)


def test_postprocess_does_not_recompile_for_new_values():
  traces = []

  def fn(logits, deltas, image_hw):
    traces.append(1)
    return postprocess.postprocess(logits, deltas, _ANCHORS, _COUNTS, image_hw, max_detections=4)

  jitted = jax.jit(fn)
  rng = np.random.default_rng(0)
  for _ in range(3):
    logits = rng.normal(scale=3.0, size=(2, 6, 3)).astype(np.float32)
    deltas = rng.normal(scale=0.2, size=(2, 6, 4)).astype(np.float32)
    out = jitted(logits, deltas, rng.uniform(60, 120, size=(2, 2)).astype(np.float32))
    assert out['boxes'].shape == (2, 4, 4)
  assert len(traces) == 1


def test_postprocess_rejects_mismatched_level_counts():
  logits, deltas, image_hw = _hand_made_case()
  with pytest.raises(ValueError, match=r'level_counts \(4, 1\)'):
    postprocess.postprocess(logits, deltas, _ANCHORS, (4, 1), image_hw)
