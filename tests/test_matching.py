"""Matcher and targets: hand-computed cases, a plain numpy reference, memory and recompilation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retina_jax import box_coder
from retina_jax import matching

GT = [0.0, 0.0, 10.0, 10.0]  # area 100; an anchor (0, 0, 10, t) inside it has IoU t / 10
PAD = [0.0, 0.0, 0.0, 0.0]


def _labels(anchors, gt_boxes, gt_classes, **kwargs):
  _, labels = matching.match(np.array(anchors, np.float32), np.array([gt_boxes], np.float32),
                             np.array([gt_classes], np.int32), **kwargs)
  return np.asarray(labels[0])


def test_thresholds_and_ignore_band():
  anchors = [[0, 0, 10, 10], [0, 0, 10, 5], [0, 0, 10, 4.5], [0, 0, 10, 4], [0, 0, 10, 3], [20, 20, 30, 30]]
  # IoU 1, 0.5, 0.45, 0.4, 0.3, 0: >= 0.5 positive, [0.4, 0.5) ignored, < 0.4 negative.
  got = _labels(anchors, [GT, PAD], [3, -1], low_quality=False)
  np.testing.assert_array_equal(got, [1, 1, -1, -1, 0, 0])


def test_low_quality_forces_best_anchors_with_ties():
  # GT (100, 100, 110, 130), area 300: the two 10 x 9 anchors inside it both have the
  # best IoU 90 / 300 = 0.3; the 10 x 6 one has 0.2 and stays negative.
  gt = [100.0, 100.0, 110.0, 130.0]
  anchors = [[100, 100, 110, 109], [100, 121, 110, 130], [100, 110, 110, 116], [0, 0, 10, 10]]
  np.testing.assert_array_equal(_labels(anchors, [gt, GT], [0, 1], low_quality=False), [0, 0, 0, 1])
  np.testing.assert_array_equal(_labels(anchors, [gt, GT], [0, 1], low_quality=True), [1, 1, 0, 1])


def test_low_quality_needs_positive_iou_and_keeps_argmax_match():
  # The GT far from every anchor (best IoU 0) claims nothing.
  anchors = [[0, 0, 10, 10], [0, 0, 10, 3]]
  np.testing.assert_array_equal(_labels(anchors, [[500, 500, 510, 510]], [0]), [0, 0])
  # Anchor 0 is the best anchor of GT 1 (IoU 0.3) but overlaps GT 0 more (0.35): forced
  # positive, matched to GT 0 as in Detectron2.
  anchors = np.array([[0, 0, 10, 10]], np.float32)
  gt = np.array([[[0, 0, 10, 3.5], [0, 0, 10, 3]]], np.float32)
  matched, labels = matching.match(anchors, gt, np.array([[0, 1]], np.int32))
  assert int(labels[0, 0]) == 1 and int(matched[0, 0]) == 0


def test_matched_index_is_best_gt_and_padding_never_matches():
  anchors = np.array([[0, 0, 10, 10], [40, 40, 60, 60]], np.float32)
  # Slot 0 is padding with a box equal to anchor 0: class -1 decides, not the box.
  gt = np.array([[[0, 0, 10, 10], [0, 0, 10, 6], [0, 0, 10, 8], [40, 40, 60, 60]]], np.float32)
  matched, labels = matching.match(anchors, gt, np.array([[-1, 5, 6, 7]], np.int32))
  np.testing.assert_array_equal(labels[0], [1, 1])
  np.testing.assert_array_equal(matched[0], [2, 3])


def test_crowd_is_never_a_target():
  crowd = [200.0, 200.0, 220.0, 220.0]
  anchors = [
      [200, 200, 220, 220],  # IoU 1 with the crowd box only: ignored, not positive
      [200, 200, 220, 206],  # IoU 0.3 with it: negative
      [0, 0, 10, 10],  # IoU 1 with the non-crowd box: positive
      [0, 0, 10, 4],  # 0.4 with the crowd box below it, 0 with others: ignored
  ]
  gt = np.array([[crowd, GT, [0, 0, 10, 4]]], np.float32)
  classes = np.array([[2, 1, 4]], np.int32)
  is_crowd = np.array([[True, False, True]])
  matched, labels = matching.match(np.array(anchors, np.float32), gt, classes, gt_crowd=is_crowd)
  np.testing.assert_array_equal(labels[0], [-1, 0, 1, -1])
  assert int(matched[0, 2]) == 1
  # The crowd box claims no low-quality match either; without the flag it is an ordinary box.
  _, labels = matching.match(np.array(anchors, np.float32), gt, classes)
  np.testing.assert_array_equal(labels[0], [1, 0, 1, 1])


def test_non_crowd_match_wins_over_a_larger_crowd_overlap():
  anchors = np.array([[0, 0, 10, 10]], np.float32)
  gt = np.array([[[0, 0, 10, 6], [0, 0, 10, 9]]], np.float32)  # IoU 0.6 (object), 0.9 (crowd)
  out = matching.assign(anchors, gt, np.array([[7, 8]], np.int32), gt_crowd=np.array([[False, True]]))
  assert int(out['labels'][0, 0]) == 1 and int(out['classes'][0, 0]) == 7


def test_empty_image_is_all_negatives():
  anchors = np.array([[0, 0, 10, 10], [5, 5, 50, 50]], np.float32)
  gt = np.zeros((2, 3, 4), np.float32)
  gt[1, 0] = [0, 0, 10, 10]
  out = matching.assign(anchors, gt, np.array([[-1, -1, -1], [4, -1, -1]], np.int32))
  np.testing.assert_array_equal(out['labels'], [[0, 0], [1, 0]])
  np.testing.assert_array_equal(out['classes'], [[-1, -1], [4, -1]])
  np.testing.assert_array_equal(out['box_targets'], np.zeros((2, 2, 4)))
  np.testing.assert_array_equal(out['matched_boxes'], [[[0] * 4, [0] * 4], [[0, 0, 10, 10], [0] * 4]])


def test_assign_targets_golden():
  # Anchor (0, 0, 10, 20) matched to (1, 2, 11, 22) (IoU 162 / 238 > 0.5): dx = 0.1, dy = 0.1.
  anchors = np.array([[0, 0, 10, 20], [100, 100, 110, 110]], np.float32)
  gt = np.array([[[1, 2, 11, 22], PAD]], np.float32)
  out = matching.assign(anchors, gt, np.array([[9, -1]], np.int32), weights=(10.0, 10.0, 5.0, 5.0))
  np.testing.assert_array_equal(out['labels'], [[1, 0]])
  np.testing.assert_array_equal(out['classes'], [[9, -1]])
  np.testing.assert_allclose(out['box_targets'], [[[1.0, 1.0, 0.0, 0.0], [0, 0, 0, 0]]], atol=1e-6)
  np.testing.assert_array_equal(out['matched_boxes'], [[[1, 2, 11, 22], [0, 0, 0, 0]]])
  assert out['box_targets'].dtype == jnp.float32 and out['labels'].dtype == jnp.int32


def _reference(anchors, gt_boxes, gt_classes, gt_crowd, fg, bg):
  """Loops over images and GT boxes in float64 numpy, as the module docstring states the rules."""
  b_count, a_count = gt_boxes.shape[0], anchors.shape[0]
  labels = np.zeros((b_count, a_count), np.int32)
  matched = np.zeros((b_count, a_count), np.int32)
  for b in range(b_count):
    x1 = np.maximum(anchors[:, None, 0], gt_boxes[b, None, :, 0])
    y1 = np.maximum(anchors[:, None, 1], gt_boxes[b, None, :, 1])
    x2 = np.minimum(anchors[:, None, 2], gt_boxes[b, None, :, 2])
    y2 = np.minimum(anchors[:, None, 3], gt_boxes[b, None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])
    iou = inter / (area(anchors)[:, None] + area(gt_boxes[b])[None, :] - inter)
    target = (gt_classes[b] >= 0) & ~gt_crowd[b]
    t = np.where(target[None], iou, -1.0)
    best = t.max(1)
    matched[b] = t.argmax(1)
    labels[b] = np.where(best >= fg, 1, np.where(best < bg, 0, -1))
    for j in np.flatnonzero(target):
      if t[:, j].max() > 0:
        labels[b, np.isclose(t[:, j], t[:, j].max(), rtol=1e-6, atol=0)] = 1
    crowd_best = np.where(((gt_classes[b] >= 0) & gt_crowd[b])[None], iou, -1.0).max(1)
    labels[b][(labels[b] == 0) & (crowd_best >= bg)] = -1
  return matched, labels


def test_matches_numpy_reference_on_random_boxes():
  rng = np.random.default_rng(0)
  def random_boxes(shape, low, high):
    xy = rng.uniform(0, 120, shape + (2,))
    return np.concatenate([xy, xy + rng.uniform(low, high, shape + (2,))], -1).astype(np.float32)
  anchors, gt = random_boxes((400,), 4, 40), random_boxes((4, 12), 4, 40)
  classes = np.where(rng.uniform(size=(4, 12)) < 0.3, -1, rng.integers(0, 5, (4, 12))).astype(np.int32)
  classes[3] = -1  # an image without boxes
  crowd = rng.uniform(size=(4, 12)) < 0.2
  matched, labels = jax.jit(lambda *a: matching.match(*a, gt_crowd=crowd))(anchors, gt, classes)
  want_matched, want_labels = _reference(anchors.astype(np.float64), gt.astype(np.float64), classes, crowd, 0.5, 0.4)
  assert (want_labels == 1).sum() > 20 and (want_labels == -1).sum() > 20
  np.testing.assert_array_equal(labels, want_labels)
  positive = want_labels == 1
  np.testing.assert_array_equal(np.asarray(matched)[positive], want_matched[positive])


def test_no_recompile_for_new_values():
  anchors = np.array([[0, 0, 10, 10], [0, 0, 20, 20], [5, 5, 25, 25]], np.float32)
  traces = []

  @jax.jit
  def targets(gt_boxes, gt_classes):
    traces.append(1)  # runs only while tracing
    return matching.assign(anchors, gt_boxes, gt_classes)

  for seed in range(3):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 20, (2, 5, 2))
    gt = np.concatenate([xy, xy + rng.uniform(2, 20, (2, 5, 2))], -1).astype(np.float32)
    jax.block_until_ready(targets(gt, rng.integers(-1, 3, (2, 5)).astype(np.int32)))
  assert len(traces) == 1
  assert targets._cache_size() == 1


def _assign_lowered(a_count, b_count, m_count):
  return jax.jit(matching.assign).lower(
      jax.ShapeDtypeStruct((a_count, 4), jnp.float32), jax.ShapeDtypeStruct((b_count, m_count, 4), jnp.float32),
      jax.ShapeDtypeStruct((b_count, m_count), jnp.int32))


def test_peak_memory_is_one_chunk(monkeypatch):
  # 16 images x 100 boxes x 49,104 anchors (512 x 512 canvas): [B, A, M] float32 would be
  # 314 MB; one image's [A, M] IoU is 19.6 MB. With a budget below two images' IoU the
  # images go one at a time, as COCO's 200k anchors do under the default. Compiled only, not run.
  a_count, b_count, m_count = 49104, 16, 100
  one_image = a_count * m_count * 4
  monkeypatch.setattr(matching, '_IOU_BYTES', one_image + 1)
  temp = _assign_lowered(a_count, b_count, m_count).compile().memory_analysis().temp_size_in_bytes
  assert temp < 4 * one_image, temp
  monkeypatch.undo()
  temp = _assign_lowered(a_count, b_count, m_count).compile().memory_analysis().temp_size_in_bytes
  assert temp < 4 * matching._IOU_BYTES < b_count * one_image, temp


def test_a_small_batch_is_one_vectorised_chunk():
  # The demo's batch (16 images x 32 boxes x 3,069 anchors) has no loop over images.
  text = _assign_lowered(3069, 16, 32).as_text()
  assert 'stablehlo.while' not in text
  assert 'stablehlo.while' in _assign_lowered(200_000, 16, 100).as_text()


def test_box_targets_decode_to_matched_boxes():
  anchors = np.array([[0, 0, 16, 16], [8, 0, 24, 16], [0, 8, 16, 24]], np.float32)
  gt = np.array([[[1, 1, 17, 15], [9, 9, 23, 25]]], np.float32)
  out = matching.assign(anchors, gt, np.array([[0, 1]], np.int32))
  positive = np.asarray(out['labels'][0]) == 1
  decoded = box_coder.decode(out['box_targets'][0], anchors)
  np.testing.assert_allclose(np.asarray(decoded)[positive], np.asarray(out['matched_boxes'][0])[positive], atol=1e-4)
  assert positive.sum() >= 2


@pytest.mark.parametrize('shapes, match', [
    (((5, 3), (1, 2, 4), (1, 2)), 'anchors must be'),
    (((5, 4), (2, 4), (1, 2)), 'gt_boxes must be'),
    (((5, 4), (1, 2, 4), (1, 3)), 'gt_classes must be'),
    (((5, 4), (1, 0, 4), (1, 0)), 'max_boxes'),
])
def test_bad_shapes_are_named(shapes, match):
  anchor_shape, box_shape, class_shape = shapes
  with pytest.raises(ValueError, match=match):
    matching.match(np.zeros(anchor_shape, np.float32), np.zeros(box_shape, np.float32), np.zeros(class_shape, np.int32))
  with pytest.raises(ValueError, match='bg_iou'):
    matching.match(np.zeros((5, 4), np.float32), np.zeros((1, 2, 4), np.float32), np.zeros((1, 2), np.int32),
                   fg_iou=0.3, bg_iou=0.4)
