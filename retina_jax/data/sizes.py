"""Image sizes read from encoded images, and their buckets: the tf side of data/buckets.py.

A JPEG's size is in its header, so an image is put in its bucket (streams filter by it,
evaluation counts by it) without decoding; other formats are decoded for their size.
The resized size is augment.resized_hw at augment.paper_scale, which buckets.resized_hw
computes alike in numpy (tests/test_buckets.py checks that they agree).
"""

import math

import numpy as np
import tensorflow as tf

from retina_jax.data import augment
from retina_jax.data import buckets
from retina_jax.data import coco
from retina_jax.data import source


def _resized(hw, min_size, max_size):
  return augment.resized_hw(hw, augment.paper_scale(hw[0], hw[1], min_size, max_size))


def bucket_index(hw, min_size, max_size, canvases):
  """tf: index of the smallest canvas holding an image of size hw [2] at the paper's scale.

  buckets.assign on buckets.resized_hw in tf ops; the last (largest) canvas when none
  holds it. canvases: canonical (H, W) pairs.
  """
  new_hw = _resized(hw, min_size, max_size)
  fits = tf.reduce_all(tf.constant(canvases, tf.int32) >= new_hw[None, :], axis=1)  # [K]
  return tf.where(tf.reduce_any(fits), tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32),
                  len(canvases) - 1)


def header_hw(encoded):
  """[2] int32 (height, width) of encoded image bytes; JPEG from its header, without decoding."""
  return tf.cond(tf.io.is_jpeg(encoded), lambda: tf.io.extract_jpeg_shape(encoded)[:2],
                 lambda: tf.shape(coco.decode_image(encoded))[:2])


def in_bucket(ds, k, min_size, max_size, canvases):
  """The examples of ds (read with SkipDecoding) whose bucket is k; unreadable headers are dropped."""
  def with_index(ex):
    return bucket_index(header_hw(ex['image']), min_size, max_size, canvases), ex

  ds = ds.map(with_index, tf.data.AUTOTUNE, deterministic=True).ignore_errors()
  return ds.filter(lambda index, _: index == k).map(lambda _, ex: ex)


def histogram(builder, split, min_size, max_size):
  """[n, n] int64 images of split per 128-pixel cell of their size at (min_size, max_size).

  n = ceil(max_size / 128): no resized side passes max_size. Images whose header does
  not read are not counted.
  """
  def cell(ex):
    return (_resized(header_hw(ex['image']), min_size, max_size) + buckets.STRIDE - 1) // buckets.STRIDE

  n = math.ceil(max_size / buckets.STRIDE)
  hist = np.zeros((n, n), np.int64)
  ds = source.read(builder, split).map(cell, tf.data.AUTOTUNE, deterministic=True).ignore_errors()
  for c in ds.batch(1024).with_options(source.options()).as_numpy_iterator():
    np.add.at(hist, (c[:, 0] - 1, c[:, 1] - 1), 1)
  return hist
