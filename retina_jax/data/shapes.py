"""'retina_shapes': the built-in synthetic detection dataset (a tfds builder).

It has coco/2017's feature structure (image, image/id, image/filename, objects
with bbox, label, is_crowd, area, id), so the COCO pipeline reads it unchanged.
Every image is drawn from a numpy generator seeded by (seed, split, index):
the same settings always give the same images.

What makes it a detection problem rather than a toy:
  * six classes told apart only by silhouette (every object gets a random
    colour far from the background's base colour, whatever its class);
  * many objects per image, sizes log-uniform from `min_object_size` to
    `_MAX_SIDE` of the image, aspect ratios up to `_MAX_ASPECT`:1, so most
    anchors are background as in COCO;
  * later shapes occlude earlier ones; boxes are the tight box of the visible
    pixels (as COCO's are) and objects less than `_MIN_VISIBLE` visible lose
    their box (their pixels stay, as unlabelled clutter would);
  * textured backgrounds (gradients, sine stripes, smooth blobs) plus pixel
    noise;
  * a few crowd regions (a grid of tiny shapes under one is_crowd box) in
    the validation split, so the evaluation path for crowds is exercised.

With config.data.shapes.varied_sizes the images take COCO-like sizes and aspect ratios
(`varied_sizes` below: drawn square, then resized), so that runs and tests exercise
several size buckets.

Knobs beyond config.data.shapes are the module constants below (base config is
locked). Images are JPEG like COCO's, at quality 95 without chroma
subsampling so edges stay crisp (PNG of noisy textures is 5x larger and slower).
"""

import io

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from retina_jax import errors
from retina_jax.data import buckets

CLASS_NAMES = ('rectangle', 'ellipse', 'triangle', 'cross', 'ring', 'diamond')

_MAX_SIDE = 0.6  # largest object side as a fraction of the image side
_MAX_ASPECT = 2.5  # width / height drawn log-uniformly in [1 / 2.5, 2.5]
_MIN_VISIBLE = 0.5  # fraction of an object's pixels that must stay visible
_MAX_COVER = 0.35  # a new object's box may cover at most this much of an earlier box
_TRIES = 12  # placement candidates per object; an object with none valid is skipped
_MIN_CONTRAST = 60.0  # mean |object - background base| over RGB, 0-255 scale
_CROWD_PROB = 0.15  # validation images with one crowd region
_EMPTY_PROB = 0.02  # images with no objects at all (all anchors negative)
_SPLIT_CODES = {'train': 0, 'validation': 1}


def _hat_matrix(n, knots):
  """[n, knots] linear interpolation weights from `knots` evenly spaced values."""
  pos = (np.arange(n) + 0.5) / n * (knots - 1)
  return np.clip(1.0 - np.abs(pos[:, None] - np.arange(knots)[None, :]), 0.0, None).astype(np.float32)


def _background(rng, size):
  """A textured background and its base colour.

  Returns:
    image: [size, size, 3] float32 in 0-255.
    base: [3] the colour objects must contrast with.
  """
  base = rng.uniform(50.0, 205.0, 3)
  amp = rng.uniform(-45.0, 45.0, 3)  # per-channel strength, so textures are coloured
  t = ((np.arange(size) + 0.5) / size).astype(np.float32)
  theta = rng.uniform(0.0, 2 * np.pi)
  along = np.cos(theta) * t[None, :] + np.sin(theta) * t[:, None]  # [size, size]
  kind = rng.integers(3)
  if kind == 0:  # linear gradient
    pattern = 2.0 * (along - along.mean()) / max(float(np.ptp(along)), 1e-6)
  elif kind == 1:  # smooth sine stripes: texture, but no crisp edges like objects have
    pattern = np.sin(2 * np.pi * rng.uniform(3.0, 12.0) * along + rng.uniform(0, 2 * np.pi))
  else:  # smooth blobs: a coarse random grid, bilinearly upsampled
    knots = int(rng.integers(3, 8))
    interp = _hat_matrix(size, knots)
    pattern = interp @ rng.uniform(-1.0, 1.0, (knots, knots)).astype(np.float32) @ interp.T
  image = base.astype(np.float32) + pattern[..., None] * amp.astype(np.float32)  # [size, size, 3]
  return image, base


def _mask(kind, h, w):
  """[h, w] bool silhouette of shape class `kind` filling an h x w box."""
  v = ((np.arange(h) + 0.5) / h * 2 - 1)[:, None]  # [h, 1] in (-1, 1), top to bottom
  u = ((np.arange(w) + 0.5) / w * 2 - 1)[None, :]  # [1, w]
  if kind == 0:  # rectangle
    return np.ones((h, w), bool)
  if kind == 1:  # ellipse
    return u**2 + v**2 <= 1.0
  if kind == 2:  # triangle, apex up
    return np.abs(u) <= (v + 1.0) / 2.0 + 1.0 / w
  if kind == 3:  # cross (plus sign), arms a third of the box thick
    return (np.abs(u) <= 1.0 / 3) | (np.abs(v) <= 1.0 / 3)
  if kind == 4:  # ring
    r2 = u**2 + v**2
    return (r2 <= 1.0) & (r2 >= 0.3)
  return np.abs(u) + np.abs(v) <= 1.0 + 1.0 / max(h, w)  # diamond


def _colour(rng, base):
  """A random RGB colour at least _MIN_CONTRAST from `base` (else the farthest of 16)."""
  cand = rng.uniform(0.0, 255.0, (16, 3))
  dist = np.abs(cand - base[None, :]).mean(axis=1)
  ok = np.flatnonzero(dist >= _MIN_CONTRAST)
  return cand[ok[0]] if ok.size else cand[np.argmax(dist)]


def _place(rng, size, min_side, boxes):
  """Samples an object box that hides at most _MAX_COVER of any earlier box.

  Args:
    boxes: [N, 4] int earlier boxes (x1, y1, x2, y2).
  Returns:
    (x1, y1, x2, y2) ints, or None when no candidate fits.
  """
  max_side = max(int(_MAX_SIDE * size), min_side + 1)
  side = np.exp(rng.uniform(np.log(min_side), np.log(max_side), _TRIES))
  aspect = np.exp(rng.uniform(-np.log(_MAX_ASPECT), np.log(_MAX_ASPECT), _TRIES))
  w = np.clip(np.round(side * np.sqrt(aspect)), min_side, size).astype(int)
  h = np.clip(np.round(side / np.sqrt(aspect)), min_side, size).astype(int)
  x1 = (rng.uniform(0, 1, _TRIES) * (size - w + 1)).astype(int)
  y1 = (rng.uniform(0, 1, _TRIES) * (size - h + 1)).astype(int)
  cand = np.stack([x1, y1, x1 + w, y1 + h], axis=1)  # [T, 4]
  if len(boxes):
    old = np.asarray(boxes)
    iw = np.minimum(cand[:, None, 2], old[None, :, 2]) - np.maximum(cand[:, None, 0], old[None, :, 0])
    ih = np.minimum(cand[:, None, 3], old[None, :, 3]) - np.maximum(cand[:, None, 1], old[None, :, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)  # [T, N]
    old_area = (old[:, 2] - old[:, 0]) * (old[:, 3] - old[:, 1])
    ok = np.all(inter <= _MAX_COVER * old_area[None, :], axis=1)
  else:
    ok = np.ones(_TRIES, bool)
  idx = np.flatnonzero(ok)
  return tuple(cand[idx[0]]) if idx.size else None


def _paint(image, owner, box, mask, colour, k):
  x1, y1, x2, y2 = box
  image[y1:y2, x1:x2][mask] = colour
  owner[y1:y2, x1:x2][mask] = k


def _crowd(rng, image, owner, base, min_side, k):
  """Draws a grid of tiny shapes of one class; returns (box, label) of the region."""
  size = image.shape[0]
  label = int(rng.integers(len(CLASS_NAMES)))
  n = int(rng.integers(3, 6))
  cell = int(min_side * rng.uniform(1.3, 1.8))
  side = max(int(0.75 * cell), 2)
  extent = n * cell
  if extent >= size:
    return None
  x0, y0 = (int(v) for v in rng.integers(0, size - extent, 2))
  mask = _mask(label, side, side)
  colour = _colour(rng, base)
  for i in range(n):
    for j in range(n):
      x, y = x0 + j * cell, y0 + i * cell
      _paint(image, owner, (x, y, x + side, y + side), mask, colour, k)
  return (x0, y0, x0 + (n - 1) * cell + side, y0 + (n - 1) * cell + side), label


def draw_image(rng, size, max_objects, min_object_size, crowd):
  """Draws one image and its annotations.

  Args:
    rng: np.random.Generator.
    size: image side in pixels.
    max_objects: most objects drawn.
    min_object_size: smallest object side in pixels.
    crowd: whether this image may get a crowd region.
  Returns:
    image: [size, size, 3] uint8.
    boxes: [N, 4] float32 (x1, y1, x2, y2) absolute pixels, tight on visible pixels.
    labels: [N] int64.
    is_crowd: [N] bool.
    areas: [N] int64 visible pixel counts (a crowd region's box area).
  """
  image, base = _background(rng, size)
  owner = np.full((size, size), -1, np.int32)  # which object each pixel shows
  placed = []  # (box, label, mask, is_crowd)
  if crowd and rng.uniform() < _CROWD_PROB:
    region = _crowd(rng, image, owner, base, min_object_size, 0)
    if region is not None:
      placed.append((region[0], region[1], None, True))
  num = 0 if rng.uniform() < _EMPTY_PROB else int(rng.integers(max_objects // 3, max_objects + 1))
  for _ in range(num):
    box = _place(rng, size, min_object_size, [p[0] for p in placed])
    if box is None:
      continue
    label = int(rng.integers(len(CLASS_NAMES)))
    mask = _mask(label, box[3] - box[1], box[2] - box[0])
    _paint(image, owner, box, mask, _colour(rng, base), len(placed))
    placed.append((box, label, mask, False))

  boxes, labels, crowds, areas = [], [], [], []
  for k, (box, label, mask, is_crowd) in enumerate(placed):
    x1, y1, x2, y2 = box
    if is_crowd:
      boxes.append(box)
      areas.append((x2 - x1) * (y2 - y1))
    else:
      visible = owner[y1:y2, x1:x2] == k  # [h, w]
      count = int(visible.sum())
      if count < _MIN_VISIBLE * mask.sum():
        continue
      rows = np.flatnonzero(visible.any(axis=1))
      cols = np.flatnonzero(visible.any(axis=0))
      boxes.append((x1 + cols[0], y1 + rows[0], x1 + cols[-1] + 1, y1 + rows[-1] + 1))
      areas.append(count)
    labels.append(label)
    crowds.append(is_crowd)

  image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(rng.uniform(2.0, 8.0))
  image = np.clip(image + 0.5, 0, 255).astype(np.uint8)
  return (image, np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64),
          np.asarray(crowds, bool), np.asarray(areas, np.int64))


def varied_sizes(rng, image, boxes, areas, size):
  """A square drawn image resized to a COCO-like size (buckets.COCO_LIKE_SIZES, 640 px -> size).

  Resizing keeps every box exact and tight (it scales with its pixels); shapes get
  stretched by at most 16:9, less than their own random aspect ratios (_MAX_ASPECT).

  Args:
    rng: np.random.Generator, for the size only.
    image: [size, size, 3] uint8 from draw_image; boxes [N, 4] and areas [N] its annotations.
    size: the square's side, the longer side of a 640 px COCO image.
  Returns:
    image [h, w, 3] uint8, boxes [N, 4] float32 pixels of it, areas [N] int64.
  """
  table = np.asarray(buckets.COCO_LIKE_SIZES)
  h0, w0, _ = table[rng.choice(len(table), p=table[:, 2] / table[:, 2].sum())]
  h, w = max(int(round(h0 * size / 640)), 1), max(int(round(w0 * size / 640)), 1)
  resized = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
  scale = np.asarray([w / size, h / size, w / size, h / size], np.float32)
  return resized, boxes * scale, np.round(areas * (h * w) / size**2).astype(np.int64)


def _check_object_size(image_size, min_object_size):
  if image_size < 4 * min_object_size or min_object_size < 2:
    raise errors.BadValue(f'config.data.shapes: image_size={image_size} must be >= 4 * min_object_size '
                          f'({min_object_size}) and min_object_size >= 2')


def check(shapes_config):
  """Raises errors.BadValue naming the first bad value of config.data.shapes."""
  s = shapes_config
  errors.check_range('data.shapes.image_size', s.image_size, lo=32)
  for key in ('num_train', 'num_val', 'max_objects', 'min_object_size'):
    errors.check_range(f'data.shapes.{key}', s[key], lo=1)
  _check_object_size(s.image_size, s.min_object_size)


class RetinaShapesConfig(tfds.core.BuilderConfig):
  """Dataset settings; the name encodes them so different settings never share files."""

  def __init__(self, *, image_size, num_train, num_val, max_objects, min_object_size, seed,
               varied_sizes=False):
    super().__init__(
        name=f'{image_size}px_{num_train}tr_{num_val}va_{max_objects}obj_{min_object_size}min_seed{seed}'
        + ('_varied' if varied_sizes else ''),
        version=tfds.core.Version('1.0.0'),
        description='Synthetic shapes with coco/2017 features.')
    _check_object_size(image_size, min_object_size)
    self.image_size = image_size
    self.num_train = num_train
    self.num_val = num_val
    self.max_objects = max_objects
    self.min_object_size = min_object_size
    self.seed = seed
    self.varied_sizes = varied_sizes


class RetinaShapes(tfds.core.GeneratorBasedBuilder):
  """Synthetic shapes in coco/2017's feature structure (registered as 'retina_shapes')."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
            'image/filename': tfds.features.Text(),
            'image/id': np.int64,
            'objects': tfds.features.Sequence({
                'id': np.int64,
                'area': np.int64,
                'bbox': tfds.features.BBoxFeature(),
                'label': tfds.features.ClassLabel(names=CLASS_NAMES),
                'is_crowd': np.bool_,
            }),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    c = self.builder_config
    return {'train': self._generate_examples('train', c.num_train),
            'validation': self._generate_examples('validation', c.num_val)}

  def _generate_examples(self, split, num):
    c = self.builder_config
    size = c.image_size
    for index in range(num):
      rng = np.random.default_rng((c.seed, _SPLIT_CODES[split], index))
      image, boxes, labels, crowds, areas = draw_image(
          rng, size, c.max_objects, c.min_object_size, crowd=split == 'validation')
      if c.varied_sizes:  # a generator of its own: the drawing stays that of the square set
        image, boxes, areas = varied_sizes(
            np.random.default_rng((c.seed, _SPLIT_CODES[split], index, 1)), image, boxes, areas, size)
      image_id = index + 1
      encoded = io.BytesIO()
      Image.fromarray(image).save(encoded, format='JPEG', quality=95, subsampling=0)
      yield index, {
          'image': encoded.getvalue(),
          'image/filename': f'{split}_{image_id:06d}.jpg',
          'image/id': image_id,
          'objects': {
              'id': image_id * 1000 + np.arange(len(labels), dtype=np.int64),
              'area': areas,
              # tfds normalized (ymin, xmin, ymax, xmax)
              'bbox': boxes[:, [1, 0, 3, 2]] / np.asarray(image.shape[:2] * 2, np.float32),
              'label': labels,
              'is_crowd': crowds,
          },
      }


def builder(shapes_config, data_dir=None):
  """The 'retina_shapes' builder for config.data.shapes, built on first use.

  Args:
    shapes_config: config.data.shapes (image_size, num_train, num_val,
      max_objects, min_object_size, seed, varied_sizes).
    data_dir: tfds data_dir; None is tfds's default.
  Returns:
    A prepared RetinaShapes builder (tfrecord files).
  """
  config = RetinaShapesConfig(
      image_size=int(shapes_config.image_size), num_train=int(shapes_config.num_train),
      num_val=int(shapes_config.num_val), max_objects=int(shapes_config.max_objects),
      min_object_size=int(shapes_config.min_object_size), seed=int(shapes_config.seed),
      varied_sizes=bool(shapes_config.varied_sizes))
  b = RetinaShapes(config=config, data_dir=data_dir, file_format='tfrecord')
  if b.is_prepared():
    return b
  try:
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(
        compute_stats=tfds.download.ComputeStatsMode.SKIP))
  except OSError:
    # Processes sharing a data_dir build at once; tfds renames a finished build
    # into place, so a loser's rename fails while the winner's data is there.
    b = RetinaShapes(config=config, data_dir=data_dir, file_format='tfrecord')
    if not b.is_prepared():
      raise
  return b
