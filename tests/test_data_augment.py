"""Augmentation functions: hand-computed boxes, boxes follow pixels, eager == tf.data."""

import numpy as np
import pytest
import tensorflow as tf

from retina_jax.data import augment


def _image_with_box(h, w, box):
  """uint8 [h, w, 3] black image with box (x1, y1, x2, y2) painted white."""
  image = np.zeros((h, w, 3), np.uint8)
  x1, y1, x2, y2 = box
  image[y1:y2, x1:x2] = 255
  return image


def _bright_box(image, thresh=127):
  """Tight (x1, y1, x2, y2) of pixels brighter than thresh."""
  ys, xs = np.nonzero(np.asarray(image)[..., 0] > thresh)
  return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def test_flip_moves_boxes_with_pixels():
  image = _image_with_box(4, 6, (1, 0, 3, 2))
  boxes = tf.constant([[1.0, 0.0, 3.0, 2.0], [0.0, 1.0, 6.0, 4.0]])
  flipped, fboxes = augment.flip_left_right(tf.constant(image), boxes)
  np.testing.assert_array_equal(fboxes.numpy(), [[3, 0, 5, 2], [0, 1, 6, 4]])
  np.testing.assert_array_equal(_bright_box(flipped), fboxes.numpy()[0])
  twice, tboxes = augment.flip_left_right(flipped, fboxes)
  np.testing.assert_array_equal(twice.numpy(), image)
  np.testing.assert_array_equal(tboxes.numpy(), boxes.numpy())


@pytest.mark.parametrize('hw, min_size, max_size, canvas, want', [
    ((100, 200), 50, 1000, (512, 512), 0.5),  # shorter side to min_size
    ((100, 300), 200, 400, (512, 512), 4 / 3),  # longer side capped at max_size
    ((100, 300), 100, 1000, (128, 128), 128 / 300),  # shrunk to fit the canvas width
    ((300, 100), 100, 1000, (128, 256), 128 / 300),  # portrait on a landscape canvas
])
def test_resize_scale(hw, min_size, max_size, canvas, want):
  got = augment.resize_scale(hw[0], hw[1], min_size, max_size, canvas)
  np.testing.assert_allclose(float(got), want, rtol=1e-6)


def test_resize_moves_boxes_with_pixels_and_fits_canvas():
  box = (20, 10, 60, 30)
  image = _image_with_box(50, 100, box)
  canvas = (128, 128)
  scale = augment.resize_scale(50, 100, 200, 1000, canvas)  # wants 4x, fits only 1.28x
  resized, boxes, hw = augment.resize(tf.constant(image), tf.constant([box], tf.float32), scale, canvas)
  np.testing.assert_array_equal(hw.numpy(), [64, 128])
  assert resized.shape == (64, 128, 3) and resized.dtype == tf.float32
  np.testing.assert_allclose(boxes.numpy()[0], np.array(box) * 1.28, atol=1e-4)
  # The bright region lands on the moved box to within the bilinear edge pixel.
  np.testing.assert_allclose(_bright_box(resized), boxes.numpy()[0], atol=1.0)


def test_clean_boxes_drops_and_counts():
  boxes = tf.constant([
      [10.0, 10.0, 20.0, 20.0],  # fine
      [5.0, 5.0, 5.0, 9.0],  # zero width
      [8.0, 8.0, 4.0, 12.0],  # negative width
      [150.0, 10.0, 170.0, 20.0],  # entirely right of the image
      [-10.0, 90.0, 30.0, 130.0],  # sticks out: clipped, kept
      [30.0, 30.0, 60.0, 60.0],  # crowd
  ])
  crowd = tf.constant([False, False, False, False, False, True])
  clipped, keep, counts = augment.clean_boxes(boxes, crowd, 100, 120)
  np.testing.assert_array_equal(keep.numpy(), [True, False, False, False, True, False])
  np.testing.assert_array_equal(clipped.numpy()[4], [0, 90, 30, 100])
  assert int(counts['degenerate']) == 3 and int(counts['crowd']) == 1
  _, keep, counts = augment.clean_boxes(boxes, crowd, 100, 120, keep_crowd=True)
  np.testing.assert_array_equal(keep.numpy(), [True, False, False, False, True, True])
  assert int(counts['crowd']) == 0


def test_pad_boxes_pads_truncates_and_handles_empty():
  boxes = tf.reshape(tf.range(20, dtype=tf.float32), (5, 4))
  classes = tf.constant([3, 1, 4, 1, 5])
  b, c, cut = augment.pad_boxes(boxes, classes, 3)
  np.testing.assert_array_equal(b.numpy(), boxes.numpy()[:3])
  np.testing.assert_array_equal(c.numpy(), [3, 1, 4])
  assert int(cut) == 2
  b, c, cut = augment.pad_boxes(boxes, classes, 7)
  np.testing.assert_array_equal(c.numpy(), [3, 1, 4, 1, 5, -1, -1])
  np.testing.assert_array_equal(b.numpy()[5:], 0)
  assert int(cut) == 0
  b, c, cut = augment.pad_boxes(tf.zeros((0, 4)), tf.zeros((0,), tf.int32), 4)
  np.testing.assert_array_equal(c.numpy(), [-1] * 4)
  assert b.shape == (4, 4) and int(cut) == 0


def test_normalize_then_pad():
  image = tf.fill((2, 3, 3), 100.0)
  out = augment.pad_image(augment.normalize(image, (100.0, 50.0, 0.0), (1.0, 2.0, 4.0)), (4, 5))
  assert out.shape == (4, 5, 3)
  np.testing.assert_allclose(out.numpy()[:2, :3], np.broadcast_to([0.0, 25.0, 25.0], (2, 3, 3)))
  np.testing.assert_array_equal(out.numpy()[2:], 0)
  np.testing.assert_array_equal(out.numpy()[:, 3:], 0)


def _chain(image, boxes, crowd):
  """Every transform in pipeline order, on dynamic shapes."""
  hw = tf.shape(image)[:2]
  boxes, keep, _ = augment.clean_boxes(boxes, crowd, hw[0], hw[1])
  boxes = tf.boolean_mask(boxes, keep)
  image, boxes = augment.flip_left_right(image, boxes)
  scale = augment.resize_scale(hw[0], hw[1], 80, 120, (128, 128))
  image, boxes, _ = augment.resize(image, boxes, scale, (128, 128))
  image = augment.pad_image(augment.normalize(image, (120.0, 110.0, 100.0), (60.0, 60.0, 60.0)), (128, 128))
  boxes, classes, _ = augment.pad_boxes(boxes, tf.zeros(tf.shape(boxes)[:1], tf.int32), 6)
  return image, boxes, classes


def test_eager_equals_tf_data():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (45, 70, 3), dtype=np.uint8)
  boxes = np.array([[3, 4, 30, 20], [60, 1, 80, 9], [5, 5, 5, 5], [10, 10, 40, 44]], np.float32)
  crowd = np.array([False, False, False, True])
  eager = _chain(tf.constant(image), tf.constant(boxes), tf.constant(crowd))
  ds = tf.data.Dataset.from_tensors((image, boxes, crowd)).map(_chain)
  graph = next(iter(ds))
  for e, g in zip(eager, graph):
    np.testing.assert_allclose(e.numpy(), g.numpy(), rtol=1e-6, atol=1e-5)
  # Box 1 is clipped to the image edge, box 2 degenerate, box 3 crowd: two remain.
  np.testing.assert_array_equal(eager[2].numpy(), [0, 0, -1, -1, -1, -1])
