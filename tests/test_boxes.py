"""Box geometry: hand-computed areas and IoUs (padding included), clipping, format round trips."""

import jax
import jax.numpy as jnp
import numpy as np

from retina_jax import boxes


def test_area_golden_and_degenerate():
  b = np.array([[0, 0, 10, 20], [5, 5, 5, 9], [10, 0, 0, 10]], np.float32)
  np.testing.assert_array_equal(boxes.area(b), [200, 0, 0])
  np.testing.assert_array_equal(boxes.area(jnp.asarray(b)), [200, 0, 0])


def test_pairwise_iou_golden():
  a = np.array([[0, 0, 10, 10], [0, 0, 0, 0]], np.float32)
  b = np.array([
      [0, 0, 10, 10],  # identical: 1
      [5, 0, 15, 10],  # overlap 50, union 150: 1/3
      [0, 0, 10, 5],  # contained, half the area: 0.5
      [10, 0, 20, 10],  # touching edges: 0
      [0, 0, 0, 0],  # padding: 0, also against the zero box in `a`
  ], np.float32)
  want = [[1, 1 / 3, 0.5, 0, 0], [0, 0, 0, 0, 0]]
  for xp in (np, jnp):
    got = boxes.pairwise_iou(xp.asarray(a), xp.asarray(b))
    assert got.shape == (2, 5)
    np.testing.assert_allclose(got, want, rtol=1e-6)
  assert isinstance(boxes.pairwise_iou(a, b), np.ndarray)


def test_pairwise_iou_batched_under_jit():
  rng = np.random.default_rng(0)
  xy = rng.uniform(0, 50, (3, 7, 2))
  a = np.concatenate([xy, xy + rng.uniform(1, 30, (3, 7, 2))], -1).astype(np.float32)
  got = jax.jit(boxes.pairwise_iou)(a, a[:, :4])  # [3, 7, 4]
  assert got.shape == (3, 7, 4)
  np.testing.assert_allclose(got[:, :4].diagonal(axis1=1, axis2=2), np.ones((3, 4)), rtol=1e-6)
  assert np.all((np.asarray(got) >= 0) & (np.asarray(got) <= 1))
  np.testing.assert_allclose(got[1], boxes.pairwise_iou(a[1], a[1, :4]), rtol=1e-6)


def test_clip_scalar_and_per_image():
  b = np.array([[[-5, -5, 50, 50]], [[10, 20, 300, 400]]], np.float32)  # [2, 1, 4]
  np.testing.assert_array_equal(boxes.clip(b, 40, 30), [[[0, 0, 30, 40]], [[10, 20, 30, 40]]])
  heights = np.array([[100.0], [200.0]], np.float32)  # [2, 1], broadcastable to [2, 1]
  widths = np.array([[40.0], [250.0]], np.float32)
  got = jax.jit(boxes.clip)(b, heights, widths)
  np.testing.assert_array_equal(got, [[[0, 0, 40, 50]], [[10, 20, 250, 200]]])


def test_tfds_round_trip_golden():
  tfds_box = np.array([[0.1, 0.2, 0.5, 1.0]], np.float32)  # (ymin, xmin, ymax, xmax)
  xyxy = boxes.from_tfds(tfds_box, 200, 300)
  np.testing.assert_allclose(xyxy, [[60, 20, 300, 100]], rtol=1e-6)
  np.testing.assert_allclose(boxes.to_tfds(xyxy, 200, 300), tfds_box, rtol=1e-6)
  assert isinstance(xyxy, np.ndarray)


def test_coco_round_trip_golden():
  xyxy = jnp.array([[10.0, 20.0, 40.0, 25.0]])
  np.testing.assert_array_equal(boxes.to_coco(xyxy), [[10, 20, 30, 5]])
  np.testing.assert_array_equal(boxes.from_coco(boxes.to_coco(xyxy)), xyxy)
