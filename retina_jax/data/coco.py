"""coco/2017 specifics: labels <-> category ids, decoding, pycocotools ground truth.

tfds coco/2017 numbers the 80 categories 0..79 in the order of their COCO ids
(1..90 with gaps), so label l is CATEGORY_IDS[l]. The synthetic 'retina_shapes'
set has the same features; its category ids are simply label + 1.
"""

import contextlib
import io
import json

import numpy as np
from pycocotools import coco as pycoco
import tensorflow as tf

from retina_jax import boxes as boxes_lib
from retina_jax import errors

CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21,
    22, 23, 24, 25, 27, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44,
    46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65,
    67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90)

CLASS_NAMES = (
    'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'truck', 'boat',
    'traffic light', 'fire hydrant', 'stop sign', 'parking meter', 'bench', 'bird', 'cat',
    'dog', 'horse', 'sheep', 'cow', 'elephant', 'bear', 'zebra', 'giraffe', 'backpack',
    'umbrella', 'handbag', 'tie', 'suitcase', 'frisbee', 'skis', 'snowboard', 'sports ball',
    'kite', 'baseball bat', 'baseball glove', 'skateboard', 'surfboard', 'tennis racket',
    'bottle', 'wine glass', 'cup', 'fork', 'knife', 'spoon', 'bowl', 'banana', 'apple',
    'sandwich', 'orange', 'broccoli', 'carrot', 'hot dog', 'pizza', 'donut', 'cake', 'chair',
    'couch', 'potted plant', 'bed', 'dining table', 'toilet', 'tv', 'laptop', 'mouse',
    'remote', 'keyboard', 'cell phone', 'microwave', 'oven', 'toaster', 'sink',
    'refrigerator', 'book', 'clock', 'vase', 'scissors', 'teddy bear', 'hair drier',
    'toothbrush')


def to_category_ids(labels, category_ids=CATEGORY_IDS):
  """Contiguous labels [...] int -> COCO category ids [...] int64."""
  labels = np.asarray(labels)
  if labels.size and (labels.min() < 0 or labels.max() >= len(category_ids)):
    raise ValueError(f'labels must be in [0, {len(category_ids)}), got {labels.min()}..{labels.max()}')
  return np.asarray(category_ids, np.int64)[labels]


def to_labels(ids, category_ids=CATEGORY_IDS):
  """COCO category ids [...] int -> contiguous labels [...] int32."""
  ids = np.asarray(ids)
  table = np.asarray(category_ids)
  labels = np.searchsorted(table, ids)
  found = (labels < len(table)) & (table[np.minimum(labels, len(table) - 1)] == ids)
  if not np.all(found):
    raise ValueError(f'unknown COCO category ids {np.unique(ids[~found]).tolist()}')
  return labels.astype(np.int32)


def decode_image(encoded):
  """Encoded JPEG / PNG / GIF / BMP bytes -> [h, w, 3] uint8; grayscale becomes RGB, alpha is dropped.

  Every image a model sees is decoded here, in training, evaluation and prediction:
  JPEG decoders differ (TF's default and PIL's differ by up to ~15 levels on the
  synthetic images), and one decoder keeps predictions on files equal to evaluation's.
  Fails with a tf error on bytes that do not decode.
  """
  return tf.io.decode_image(encoded, channels=3, expand_animations=False)


def decode(example):
  """Decodes one coco/2017-structured tfds example read with SkipDecoding.

  Fails (a tf error, which the pipeline counts and skips) when the image bytes
  do not decode. Object fields are cut to their shortest length, since mocked
  or hand-built examples can disagree.

  Args:
    example: dict with 'image' (encoded bytes), 'image/id', and 'objects' with
      'bbox' [N, 4] tfds normalized (ymin, xmin, ymax, xmax), 'label' [N],
      'is_crowd' [N], 'area' [N].
  Returns:
    dict: image [h, w, 3] uint8, boxes [N, 4] float32 (x1, y1, x2, y2) pixels
    of the original image, classes [N] int32, is_crowd [N] bool, area [N]
    float32, image_id int64 scalar.
  """
  image = decode_image(example['image'])
  hw = tf.cast(tf.shape(image)[:2], tf.float32)
  objects = example['objects']
  keys = ('bbox', 'label', 'is_crowd', 'area')
  n = tf.reduce_min(tf.stack([tf.shape(objects[k])[0] for k in keys]))
  bbox = tf.cast(objects['bbox'][:n], tf.float32)
  # The tf twin of boxes.from_tfds: normalized yxyx -> absolute xyxy.
  boxes = tf.stack([bbox[:, 1] * hw[1], bbox[:, 0] * hw[0], bbox[:, 3] * hw[1], bbox[:, 2] * hw[0]], axis=1)
  return {
      'image': image,
      'boxes': boxes,
      'classes': tf.cast(objects['label'][:n], tf.int32),
      'is_crowd': tf.cast(objects['is_crowd'][:n], tf.bool),
      'area': tf.cast(objects['area'][:n], tf.float32),
      'image_id': tf.cast(example['image/id'], tf.int64),
  }


def ground_truth(records, category_ids, class_names):
  """A pycocotools COCO object from decoded eval examples.

  Args:
    records: iterable of dicts with image_id, height, width (original pixels),
      boxes [N, 4] (x1, y1, x2, y2) original pixels (degenerate ones already
      dropped), classes [N] labels, is_crowd [N], area [N] (<= 0: box area).
    category_ids: COCO id of each label.
    class_names: name of each label.
  Returns:
    pycocotools.coco.COCO with images, annotations (bbox in COCO xywh,
    area, iscrowd, category_id, id from 1) and categories.
  """
  images, annotations = [], []
  for r in records:
    image_id = int(r['image_id'])
    images.append({'id': image_id, 'height': int(r['height']), 'width': int(r['width']),
                   'file_name': f'{image_id}.jpg'})
    boxes = np.asarray(r['boxes'], np.float64).reshape(-1, 4)
    area = np.where(np.asarray(r['area']) > 0, r['area'], boxes_lib.area(boxes))
    ids = to_category_ids(r['classes'], category_ids)
    for xywh, a, cid, crowd in zip(boxes_lib.to_coco(boxes), area, ids, r['is_crowd']):
      annotations.append({
          'id': len(annotations) + 1, 'image_id': image_id, 'category_id': int(cid),
          'bbox': [float(v) for v in xywh], 'area': float(a), 'iscrowd': int(bool(crowd))})
  return from_dict({
      'images': images, 'annotations': annotations,
      'categories': [{'id': int(c), 'name': n} for c, n in zip(category_ids, class_names)]})


def from_dict(dataset):
  """pycocotools COCO from an in-memory dataset dict (no file, no printing)."""
  gt = pycoco.COCO()
  gt.dataset = dataset
  with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints into the progress bar's line
    gt.createIndex()
  return gt


def _ranges(ids):
  """Sorted ids as compact text: [1, 2, 3, 5] -> '1-3, 5'."""
  ids, out = sorted(ids), []
  for i in ids:
    if out and i == out[-1][1] + 1:
      out[-1][1] = i
    else:
      out.append([i, i])
  return '{' + ', '.join(f'{a}-{b}' if b > a else f'{a}' for a, b in out) + '}'


def read_annotation_file(path, category_ids, key='config.data.annotation_file'):
  """A COCO instances file, checked against the dataset's labels before any inference.

  Args:
    path: instances_*.json (local or gs://).
    category_ids: the COCO id of each label (what detections are reported as).
    key: the config key that named the file, for messages.
  Returns:
    pycocotools.coco.COCO.
  Raises:
    errors.NotFound / errors.BadValue naming the file: missing, not JSON, not a COCO
    instances file, or category ids that do not cover the labels' (e.g. shifted by one,
    which would score every detection against the wrong class), or annotations of
    categories no label maps to.
  """
  if not tf.io.gfile.exists(path):
    raise errors.NotFound(f'{key}={path!r} does not exist')
  with tf.io.gfile.GFile(path) as f:
    try:
      dataset = json.load(f)
    except ValueError as e:
      raise errors.BadValue(f'{key}={path!r} is not JSON: {e}') from e
  missing = [k for k in ('images', 'annotations', 'categories')
             if not isinstance(dataset, dict) or k not in dataset]
  if missing:
    raise errors.BadValue(f'{key}={path!r} is not a COCO instances file: no {", ".join(missing)}')
  try:
    in_file = {int(c['id']) for c in dataset['categories']}
    annotated = {int(a['category_id']) for a in dataset['annotations']}
  except (KeyError, TypeError, ValueError) as e:
    raise errors.BadValue(f'{key}={path!r}: a category without an id or an annotation without '
                          f'a category_id ({e!r})') from e
  labels = {int(c) for c in category_ids}
  if not labels <= in_file or not annotated <= labels:
    raise errors.BadValue(
        f'{key}={path!r}: its category ids {_ranges(in_file)} do not match the dataset\'s {_ranges(labels)} '
        f'(labels without a category: {_ranges(labels - in_file)}; annotated categories without a label: '
        f'{_ranges(annotated - labels)})')
  return from_dict(dataset)
