"""Per-example transforms as plain tf functions (usable eagerly and in tf.data).

Boxes are float32 absolute pixels (x1, y1, x2, y2) of the image they come
with; each transform moves them with the pixels. Nothing here is random: the
pipeline draws the random numbers (stateless, seeded per example) and passes
them in, so every function is a pure function of its inputs.
"""

import tensorflow as tf


def clean_boxes(boxes, is_crowd, height, width, *, keep_crowd=False):
  """Clips boxes to the image and picks the ones to keep.

  A box with zero or negative width or height after clipping (including one
  entirely outside the image) is degenerate and dropped; crowd boxes are
  dropped too unless `keep_crowd` (evaluation ground truth keeps them,
  training targets do not).

  Args:
    boxes: [N, 4] float32 (x1, y1, x2, y2) pixels.
    is_crowd: [N] bool.
    height, width: image size in pixels (scalars).
    keep_crowd: keep crowd boxes.
  Returns:
    boxes [N, 4] clipped, keep [N] bool (apply it with tf.boolean_mask to
    boxes and every per-box field), and int32 counts {'degenerate', 'crowd'}
    of the boxes dropped for each reason.
  """
  h = tf.cast(height, tf.float32)
  w = tf.cast(width, tf.float32)
  boxes = tf.stack([tf.clip_by_value(boxes[:, 0], 0.0, w), tf.clip_by_value(boxes[:, 1], 0.0, h),
                    tf.clip_by_value(boxes[:, 2], 0.0, w), tf.clip_by_value(boxes[:, 3], 0.0, h)], axis=1)
  ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
  keep = ok if keep_crowd else ok & ~is_crowd
  counts = {
      'degenerate': tf.reduce_sum(tf.cast(~ok, tf.int32)),
      'crowd': tf.reduce_sum(tf.cast(ok & ~keep, tf.int32)),
  }
  return boxes, keep, counts


def flip_left_right(image, boxes):
  """Mirrors the image and its boxes horizontally.

  Args:
    image: [h, w, C].
    boxes: [N, 4] (x1, y1, x2, y2) pixels of this image.
  Returns:
    image [h, w, C], boxes [N, 4] with x1' = w - x2, x2' = w - x1.
  """
  w = tf.cast(tf.shape(image)[1], boxes.dtype)
  boxes = tf.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], axis=1)
  return tf.reverse(image, axis=[1]), boxes


def paper_scale(height, width, min_size, max_size):
  """The paper's resize factor: shorter side to min_size, longer side at most max_size.

  Args:
    height, width: image size in pixels (scalars).
    min_size, max_size: target shorter side and cap on the longer side (scalars,
      min_size already multiplied by any scale jitter).
  Returns:
    float32 scalar: resized pixels per original pixel.
  """
  h = tf.cast(height, tf.float32)
  w = tf.cast(width, tf.float32)
  return tf.minimum(tf.cast(min_size, tf.float32) / tf.minimum(h, w),
                    tf.cast(max_size, tf.float32) / tf.maximum(h, w))


def resized_hw(hw, scale):
  """[2] int32 (height, width) of an image of size hw [2] resized by `scale`, in whole pixels.

  buckets.resized_hw computes the same in numpy (float32, rounding half to even).
  """
  return tf.cast(tf.round(tf.cast(hw, tf.float32) * scale), tf.int32)


def resize_scale(height, width, min_size, max_size, canvas_hw):
  """The resize factor: paper_scale, shrunk further when the image would not fit the canvas.

  With one square canvas that happens to no image at scale jitter 1; with a canvas
  too small for an image (a portrait image on a landscape canvas, jitter above 1) the
  image is used at a slightly smaller scale, never cropped.

  Args:
    height, width: image size in pixels (scalars).
    min_size, max_size: as in paper_scale.
    canvas_hw: (H, W) of the padded canvas.
  Returns:
    float32 scalar: canvas pixels per original pixel.
  """
  h = tf.cast(height, tf.float32)
  w = tf.cast(width, tf.float32)
  scale = paper_scale(height, width, min_size, max_size)
  return tf.minimum(scale, tf.minimum(canvas_hw[0] / h, canvas_hw[1] / w))


def resize(image, boxes, scale, canvas_hw):
  """Resizes the image by `scale` (bilinear) and moves the boxes with it.

  The new size is rounded to whole pixels; boxes are scaled by the exact
  per-axis factors of that rounded size, so they stay on their pixels.

  Args:
    image: [h, w, 3] uint8 or float.
    boxes: [N, 4] pixels.
    scale: float32 scalar from resize_scale.
    canvas_hw: (H, W); the result never exceeds it.
  Returns:
    image [h', w', 3] float32, boxes [N, 4] float32, hw [2] int32 = (h', w').
  """
  hw = tf.shape(image)[:2]
  new_hw = tf.clip_by_value(resized_hw(hw, scale), 1, tf.constant(canvas_hw, tf.int32))
  image = tf.image.resize(image, new_hw, method='bilinear')
  factor = tf.cast(new_hw, tf.float32) / tf.cast(hw, tf.float32)  # (sy, sx)
  boxes = boxes * tf.stack([factor[1], factor[0], factor[1], factor[0]])
  return image, boxes, new_hw


def normalize(image, mean, std):
  """(image - mean) / std per RGB channel; mean and std on the 0-255 scale."""
  return (tf.cast(image, tf.float32) - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def pad_image(image, canvas_hw):
  """Pads [h, w, 3] at the bottom and right with zeros to [H, W, 3].

  Zero after normalization is the mean colour, as Detectron pads.
  """
  image = tf.image.pad_to_bounding_box(image, 0, 0, canvas_hw[0], canvas_hw[1])
  image.set_shape((canvas_hw[0], canvas_hw[1], 3))
  return image


def to_canvas(image, boxes, min_size, max_size, canvas_hw, mean, std):
  """Resize, normalize, pad: the one path from a decoded image to the model's input.

  Training, evaluation and prediction all call this (through data/pipeline.py), so a
  user's image reaches the model exactly as an eval image does.

  Args:
    image: [h, w, 3] uint8.
    boxes: [N, 4] float32 pixels of the image (N may be 0).
    min_size, max_size, canvas_hw: as in resize_scale (min_size times any jitter).
    mean, std: as in normalize.
  Returns:
    image [H, W, 3] float32 normalized and padded, boxes [N, 4] canvas pixels, scale
    float32 (canvas px per original px), hw [2] int32 (the image's area on the canvas).
  """
  hw = tf.shape(image)[:2]
  scale = resize_scale(hw[0], hw[1], min_size, max_size, canvas_hw)
  image, boxes, new_hw = resize(image, boxes, scale, canvas_hw)
  return pad_image(normalize(image, mean, std), canvas_hw), boxes, scale, new_hw


def pad_boxes(boxes, classes, max_boxes):
  """Keeps the first `max_boxes` boxes and pads to exactly that many.

  Args:
    boxes: [N, 4] float32.
    classes: [N] int32.
    max_boxes: M.
  Returns:
    boxes [M, 4] (padding 0), classes [M] (padding -1), and the int32 number
    of boxes cut off beyond M.
  """
  truncated = tf.maximum(tf.shape(boxes)[0] - max_boxes, 0)
  boxes = boxes[:max_boxes]
  classes = classes[:max_boxes]
  pad = max_boxes - tf.shape(boxes)[0]
  boxes = tf.pad(boxes, [[0, pad], [0, 0]])
  classes = tf.pad(classes, [[0, pad]], constant_values=-1)
  boxes.set_shape((max_boxes, 4))
  classes.set_shape((max_boxes,))
  return boxes, classes, truncated
