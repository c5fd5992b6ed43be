"""tf.data input pipelines: batches of numpy arrays for training and evaluation.

COCO (tfds coco/2017) and the synthetic 'retina_shapes' set run through the
same code; config.data.dataset only picks the tfds builder. Per example:

  read with SkipDecoding -> decode (an undecodable image is skipped)
  -> clip boxes, drop degenerate ones, drop crowd boxes (they are no targets)
  -> train only: random horizontal flip, scale jitter
  -> resize: shorter side min_size, longer side at most max_size, shrunk
     further when needed so the image fits the canvas (never cropped)
  -> normalize (x - mean) / std -> pad image to the canvas, boxes to M.

Canvases: with data.use_buckets (COCO's default) each image goes to the smallest
of data.buckets that holds it at the paper's scale (data/buckets.py), read from
its JPEG header before decoding; otherwise every image is padded to data.canvas.
Training reads one shuffled, repeated stream per bucket, and the bucket of each
batch is buckets.schedule(step): all processes pick the same bucket at every
step without communicating. Evaluation goes bucket by bucket, each with its own
padded batches (image ids map results back).

Multi-host: each process reads its own slice (tfds.even_splits), so slices
are disjoint and cover the split. Everything random is seeded by config.seed,
the process index, the bucket and the example's position in its stream: the
same config gives the same batches.

Data statistics: pass a `DataStats` to `train_iterator` / `eval_iterator`;
the iterator adds to it as it yields batches (images delivered, images skipped
as undecodable, images without boxes, boxes dropped as degenerate or crowd,
boxes cut beyond max_boxes, the fraction of canvas pixels that are image
pixels). The training loop logs `stats.as_dict()`.
"""

import collections
import dataclasses
import itertools
import math

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from retina_jax import errors
from retina_jax.data import augment
from retina_jax.data import buckets as buckets_lib
from retina_jax.data import coco
from retina_jax.data import shapes
from retina_jax.data import sizes
from retina_jax.data import source

# JAX owns the accelerators; tf only reads data on the host.
try:
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:  # tf already initialised its devices; nothing to hide then
  pass

DatasetInfo = collections.namedtuple('DatasetInfo', ['num_classes', 'class_names', 'category_ids'])

_TRAIN_KEYS = ('image', 'image_hw', 'boxes', 'classes')
_STAT_KEYS = ('num_degenerate', 'num_crowd', 'num_truncated')


@dataclasses.dataclass
class DataStats:
  """What the pipeline dropped or changed so far (counts, cumulative)."""
  images: int = 0  # examples delivered (eval padding not included)
  skipped_images: int = 0  # undecodable, left out
  empty_images: int = 0  # delivered without any box (all anchors negative)
  degenerate_boxes: int = 0  # zero or negative size after clipping to the image
  crowd_boxes: int = 0  # is_crowd boxes left out of the targets
  truncated_boxes: int = 0  # boxes beyond data.max_boxes
  image_pixels: int = 0  # the images' areas on their canvases
  canvas_pixels: int = 0  # the canvases' areas: what the model computes on

  def as_dict(self):
    """The counts, and image_pixel_fraction (image / canvas pixels) in place of the pixel sums."""
    out = dataclasses.asdict(self)
    image, canvas = out.pop('image_pixels'), out.pop('canvas_pixels')
    out['image_pixel_fraction'] = image / canvas if canvas else 0.0
    return out

  def add(self, batch, valid):
    """Adds a batch's per-example counts; valid [b] bool marks real examples."""
    self.images += int(valid.sum())
    self.image_pixels += int(np.prod(np.round(batch['image_hw'][valid]), axis=1).sum())
    self.canvas_pixels += int(valid.sum()) * batch['image'].shape[1] * batch['image'].shape[2]
    self.empty_images += int((valid & np.all(batch['classes'] < 0, axis=1)).sum())
    self.degenerate_boxes += int(batch['num_degenerate'][valid].sum())
    self.crowd_boxes += int(batch['num_crowd'][valid].sum())
    self.truncated_boxes += int(batch['num_truncated'][valid].sum())


# config.data.dataset -> its classes.
DATASETS = {
    'coco': DatasetInfo(len(coco.CATEGORY_IDS), coco.CLASS_NAMES, coco.CATEGORY_IDS),
    'shapes': DatasetInfo(len(shapes.CLASS_NAMES), shapes.CLASS_NAMES,
                          tuple(range(1, len(shapes.CLASS_NAMES) + 1))),
}


def dataset_info(config):
  """Classes of config.data.dataset: DatasetInfo(num_classes, class_names, category_ids)."""
  errors.check_choice('data.dataset', config.data.dataset, DATASETS)
  return DATASETS[config.data.dataset]


def check(config):
  """Raises errors.BadValue naming the first bad value of config.data (or model.num_classes).

  Every reader of the data (training, evaluation, Detector) calls it, and so does main.validate.
  """
  d = config.data
  info = dataset_info(config)
  for key in ('min_size', 'max_size', 'max_boxes', 'shuffle_buffer'):
    errors.check_range(f'data.{key}', d[key], lo=1)
  errors.check_range('data.eval_images', d.eval_images, lo=0)
  shapes.check(d.shapes)
  canvas = tuple(d.canvas)
  if len(canvas) != 2 or any(not isinstance(s, int) or s <= 0 or s % 128 for s in canvas):
    raise errors.bad_config('data.canvas', canvas, 'must be (H, W), positive integers divisible by 128')
  if d.max_size < d.min_size:
    raise errors.bad_config('data.max_size', d.max_size, f'must be >= data.min_size ({d.min_size})')
  lo, hi = d.scale_jitter
  if not 0 < lo <= hi:
    raise errors.bad_config('data.scale_jitter', d.scale_jitter, 'must be (lo, hi) with 0 < lo <= hi')
  if d.use_buckets:  # evaluation is at jitter 1, training up to hi
    buckets_lib.check(d.buckets, d.min_size * max(1.0, hi), d.max_size)
  for key in ('mean', 'std'):
    if len(d[key]) != 3:
      raise errors.bad_config(f'data.{key}', d[key], 'must have 3 values (RGB)')
  if min(d.std) <= 0:
    raise errors.bad_config('data.std', d.std, 'must be > 0')
  # Fewer outputs would drop classes; more would give detections that no category id can
  # score. The torchvision loader maps its 91 outputs to the dataset's classes instead.
  if config.model.num_classes != info.num_classes:
    raise errors.BadValue(f'config.model.num_classes={config.model.num_classes} must equal the '
                          f'{info.num_classes} classes of dataset {d.dataset!r}')


def _check_config(config, batch_size, batch_key, process_index, process_count):
  check(config)
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, process_count={process_count})')
  if batch_size % process_count or batch_size < process_count:
    raise errors.BadValue(f'{batch_key}={batch_size} must be a positive multiple of the process count {process_count}')


def _decode(ds, index=False):
  """Decodes images in parallel; undecodable examples are dropped (counted by the caller)."""
  if index:
    ds = ds.enumerate().map(lambda i, ex: (i, coco.decode(ex)), tf.data.AUTOTUNE, deterministic=True)
  else:
    ds = ds.map(coco.decode, tf.data.AUTOTUNE, deterministic=True)
  return ds.ignore_errors(log_warning=True)


def _prepare(ex, data, canvas, rand=None):
  """A decoded example -> fixed-shape model input plus per-example counts.

  Args:
    ex: coco.decode's dict.
    data: dict of the config.data values used (plain Python values).
    canvas: (H, W) to pad to.
    rand: [2] uniform numbers (flip, jitter) for training; None for evaluation.
  Returns:
    dict: image [H, W, 3] float32, boxes [M, 4] float32 canvas pixels, classes
    [M] int32 (-1 padding), image_id, orig_hw [2], scale, image_hw [2], valid,
    and the int32 counts num_degenerate, num_crowd, num_truncated.
  """
  image = ex['image']
  hw = tf.shape(image)[:2]
  boxes, keep, counts = augment.clean_boxes(ex['boxes'], ex['is_crowd'], hw[0], hw[1])
  boxes = tf.boolean_mask(boxes, keep)
  classes = tf.boolean_mask(ex['classes'], keep)
  jitter = 1.0
  if rand is not None:
    if data['flip']:
      image, boxes = tf.cond(rand[0] < 0.5, lambda: augment.flip_left_right(image, boxes),
                             lambda: (image, boxes))
    lo, hi = data['scale_jitter']
    jitter = lo + (hi - lo) * rand[1]
  # Jitter moves the shorter side only; the longer-side cap stays (Detectron's multi-scale training).
  image, boxes, scale, new_hw = augment.to_canvas(
      image, boxes, data['min_size'] * jitter, data['max_size'], canvas, data['mean'], data['std'])
  boxes, classes, truncated = augment.pad_boxes(boxes, classes, data['max_boxes'])
  return {
      'image': image, 'boxes': boxes, 'classes': classes, 'image_id': ex['image_id'],
      'orig_hw': tf.cast(hw, tf.float32), 'scale': scale, 'image_hw': tf.cast(new_hw, tf.float32),
      'valid': tf.constant(True), 'num_degenerate': counts['degenerate'],
      'num_crowd': counts['crowd'], 'num_truncated': truncated,
  }


def train_size_histogram(config, process_index=0, process_count=1):
  """Cell histogram of this process's slice of the train split, at the largest training scale.

  Every process's histogram together (train.py gathers them once at the start) fixes
  the training buckets, their schedule and each bucket stream's epoch.

  Returns:
    [n, n] int64, see sizes.histogram.
  """
  d = _data_values(config)
  split = tfds.split_for_jax_process(config.data.train_split, process_index=process_index,
                                     process_count=process_count)
  return sizes.histogram(source.tfds_builder(config), split, d['min_size'] * d['scale_jitter'][1], d['max_size'])


def prepare_image(image, config):
  """One decoded image as evaluation feeds it to the model (_prepare without boxes or jitter).

  Args:
    image: [h, w, 3] uint8, any size and aspect ratio.
    config: the run config (reads data.canvas or data.buckets, min_size, max_size, mean, std).
  Returns:
    image [H, W, 3] float32 normalized on its canvas (the bucket evaluation puts it in),
    scale float32 (canvas px = original px * scale), image_hw [2] float32 (the image's
    area on the canvas).
  """
  d = _data_values(config)
  canvas = d['canvas']
  if d['use_buckets']:
    canvas = d['buckets'][int(sizes.bucket_index(tf.shape(image)[:2], d['min_size'], d['max_size'], d['buckets']))]
  image, _, scale, hw = augment.to_canvas(
      image, tf.zeros((0, 4), tf.float32), d['min_size'], d['max_size'], canvas, d['mean'], d['std'])
  return image, scale, tf.cast(hw, tf.float32)


def canvases(config):
  """Every canvas the config pads images to: its buckets (smallest first) or (data.canvas,)."""
  if config.data.use_buckets:
    return buckets_lib.canonical(config.data.buckets)
  return (tuple(int(s) for s in config.data.canvas),)


def _data_values(config):
  d = config.data
  return {
      'canvas': tuple(int(s) for s in d.canvas), 'min_size': float(d.min_size),
      'max_size': float(d.max_size), 'scale_jitter': tuple(float(s) for s in d.scale_jitter),
      'flip': bool(d.flip), 'mean': tuple(d.mean), 'std': tuple(d.std), 'max_boxes': int(d.max_boxes),
      'use_buckets': bool(d.use_buckets),
      'buckets': buckets_lib.canonical(d.buckets) if d.use_buckets else None,
  }


def train_iterator(config, *, process_index=0, process_count=1, stats=None, histograms=None):
  """Infinite, shuffled training batches of this process.

  Args:
    config: the run config (reads data.*, seed, train.batch_size, model.num_classes).
    process_index, process_count: this process and the number of processes;
      each reads a disjoint slice of data.train_split.
    stats: optional DataStats, updated as batches are yielded.
    histograms: [process_count, n, n] train_size_histogram of every process (with
      buckets); None reads every process's slice here.
  Yields:
    dict of numpy arrays, b = train.batch_size // process_count:
    image [b, H, W, 3] float32 normalized, boxes [b, M, 4] float32 canvas
    pixels (x1, y1, x2, y2), classes [b, M] int32 (-1 padding). With buckets,
    (H, W) is the bucket of the step: the same on every process.
  """
  _check_config(config, config.train.batch_size, 'config.train.batch_size', process_index, process_count)
  batch = config.train.batch_size // process_count
  data = _data_values(config)
  builder = source.tfds_builder(config)
  split = tfds.split_for_jax_process(config.data.train_split, process_index=process_index,
                                     process_count=process_count)
  seed = int(config.seed) * 65537 + process_index  # distinct random streams per process
  stats = stats if stats is not None else DataStats()
  key, name = 'config.data.train_split', config.data.train_split
  ds = source.read(builder, split, shuffle_seed=seed, key=key)
  epoch = int(ds.cardinality())
  if epoch <= 0:  # 0: empty slice; negative: tfds could not tell its size
    raise errors.BadValue(f'{config.data.dataset} split {name!r} gives process '
                     f'{process_index} of {process_count} no examples (or an unknown number)')
  if not data['use_buckets']:
    return _train_batches(_train_stream(ds, data, data['canvas'], seed, config.data.shuffle_buffer, batch),
                          epoch, stats, name)

  if histograms is None:
    histograms = np.stack([train_size_histogram(config, i, process_count) for i in range(process_count)])
  canvases = buckets_lib.training_buckets(histograms, data['buckets'], batch)
  counts = buckets_lib.counts(histograms, canvases)  # [P, K]
  own = counts[process_index]
  if epoch > own.sum():
    logging.warning('data: skipped %d image(s) of %s whose header does not read', epoch - own.sum(), name)
    stats.skipped_images += int(epoch - own.sum())
  streams = {}
  for k in np.flatnonzero(counts.sum(0)):
    # A slice with too few images of a bucket (rare sizes, many processes) reads that bucket's
    # images from the whole split: a few images seen a little more often, never a missing batch.
    whole = own[k] < batch
    epoch_k = int(counts[:, k].sum() if whole else own[k])
    stream_seed = seed * 1009 + int(k) + 1  # distinct per bucket, and from the square canvas's
    ds = source.read(builder, config.data.train_split if whole else split, shuffle_seed=stream_seed, key=key)
    ds = sizes.in_bucket(ds, int(k), data['min_size'] * data['scale_jitter'][1], data['max_size'], canvases)
    # Each stream's buffer gets its share, so memory and the shuffle's reach match one stream's.
    buffer = max(batch, math.ceil(config.data.shuffle_buffer * epoch_k / own.sum()))
    streams[int(k)] = _train_batches(_train_stream(ds, data, canvases[k], stream_seed, buffer, batch),
                                     epoch_k, stats, name)
  return _scheduled(streams, counts.sum(0), int(config.seed))


def _train_stream(ds, data, canvas, seed, buffer, batch):
  """Encoded examples -> shuffled, repeated, prepared batches on `canvas` (a tf.data.Dataset)."""
  ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
  # The position in the epoch survives decoding; its gaps are the skipped images.
  ds = _decode(ds, index=True).repeat().enumerate()

  def prepare(step, item):
    position, ex = item
    rand = tf.random.stateless_uniform([2], seed=tf.stack([tf.constant(seed, tf.int64), step]))
    return {**_prepare(ex, data, canvas, rand), 'position': position}

  ds = ds.map(prepare, tf.data.AUTOTUNE, deterministic=True)
  return ds.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE).with_options(source.options())


def _scheduled(streams, counts, seed):
  """Batch i from the stream of bucket buckets.schedule(i): a function of the step alone."""
  for i in itertools.count():
    yield next(streams[int(buckets_lib.schedule(i, counts, seed))])


def _train_batches(ds, epoch, stats, split):
  expected = 0  # the next position in the epoch if nothing is skipped
  for batch in ds.as_numpy_iterator():
    position = batch['position']
    previous = np.concatenate([[expected], (position[:-1] + 1) % epoch])
    skipped = int(((position - previous) % epoch).sum())
    if skipped:
      logging.warning('data: skipped %d undecodable image(s) of %s', skipped, split)
    stats.skipped_images += skipped
    expected = (int(position[-1]) + 1) % epoch
    stats.add(batch, np.ones(len(position), bool))
    yield {k: batch[k] for k in _TRAIN_KEYS}
  # repeat() ends only when a whole epoch decoded nothing.
  raise errors.BadValue(f'no image of split {split!r} could be decoded')


def eval_iterator(config, *, process_index=0, process_count=1, stats=None):
  """One pass over this process's slice of the eval split, in fixed-size batches.

  Every process yields the same number of batches on the same canvases in the same
  order (per bucket, what the largest slice needs; every process reads every slice's
  image headers to count them); rows past the end of a slice are padding with valid
  False, image_id -1 and classes -1.

  Args:
    config: the run config (reads data.*, eval.batch_size, model.num_classes).
    process_index, process_count: this process and the number of processes.
    stats: optional DataStats, updated as batches are yielded.
  Yields:
    dict of numpy arrays, b = eval.batch_size // process_count: image
    [b, H, W, 3], boxes [b, M, 4] (crowd boxes left out), classes [b, M],
    image_id [b] int64, orig_hw [b, 2] float32 (original height, width),
    scale [b] float32 (canvas px = original px * scale), image_hw [b, 2]
    float32 (valid area on the canvas), valid [b] bool.
  """
  _check_config(config, config.eval.batch_size, 'config.eval.batch_size', process_index, process_count)
  batch = config.eval.batch_size // process_count
  data = _data_values(config)
  builder = source.tfds_builder(config)
  split = source.eval_split(config)
  total = int(source.read(builder, split, key='config.data.eval_split').cardinality())
  slices = tfds.even_splits(split, process_count)
  own = int(source.read(builder, slices[process_index]).cardinality())
  if data['use_buckets']:
    hist = np.stack([sizes.histogram(builder, s, data['min_size'], data['max_size']) for s in slices])
    counts = buckets_lib.counts(hist, data['buckets'])  # [P, K]
    parts = [(k, c, math.ceil(counts[:, k].max() / batch)) for k, c in enumerate(data['buckets'])
             if counts[:, k].any()]
  else:
    parts = [(None, data['canvas'], math.ceil(math.ceil(total / process_count) / batch))]

  def batches():
    for k, canvas, num_batches in parts:
      ds = source.read(builder, slices[process_index])
      if k is not None:
        ds = sizes.in_bucket(ds, k, data['min_size'], data['max_size'], data['buckets'])
      ds = _decode(ds).map(lambda ex, c=canvas: _prepare(ex, data, c), tf.data.AUTOTUNE, deterministic=True)
      padding = {k: tf.zeros(s.shape, s.dtype) for k, s in ds.element_spec.items()}
      padding.update(classes=-tf.ones_like(padding['classes']), image_id=tf.constant(-1, tf.int64),
                     valid=tf.constant(False))
      ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat()).take(num_batches * batch)
      yield from ds.batch(batch).prefetch(tf.data.AUTOTUNE).with_options(source.options()).as_numpy_iterator()

  return _eval_batches(batches(), own, stats if stats is not None else DataStats(), split)


def _eval_batches(batches, own, stats, split):
  seen = 0
  for batch in batches:
    stats.add(batch, batch['valid'])
    seen += int(batch['valid'].sum())
    yield {k: v for k, v in batch.items() if k not in _STAT_KEYS}
  if own > seen:
    logging.warning('data: skipped %d undecodable image(s) of %s', own - seen, split)
  stats.skipped_images += own - seen


def eval_ground_truth(config):
  """Ground truth of the eval split for pycocotools, crowd boxes kept (iscrowd=1).

  From config.data.annotation_file when given (restricted to the first
  data.eval_images images when that is set), else built from the tfds eval
  split: boxes in COCO (x, y, w, h) pixels of the original image, degenerate
  boxes dropped, undecodable images left out, exactly as the eval iterator
  sees them. Image ids are the tfds image/id, as in the eval batches.

  Returns:
    pycocotools.coco.COCO.
  """
  info = dataset_info(config)
  path = config.data.annotation_file
  if path:
    gt = coco.read_annotation_file(path, info.category_ids)
    if config.data.eval_images <= 0:
      return gt
    split = source.read(source.tfds_builder(config), source.eval_split(config), key='config.data.eval_split')
    ids = {int(ex['image/id']) for ex in split.as_numpy_iterator()}
    dataset = dict(gt.dataset)
    dataset['images'] = [im for im in gt.dataset['images'] if im['id'] in ids]
    dataset['annotations'] = [a for a in gt.dataset['annotations'] if a['image_id'] in ids]
    return coco.from_dict(dataset)

  def record(ex):
    hw = tf.shape(ex['image'])[:2]
    boxes, keep, _ = augment.clean_boxes(ex['boxes'], ex['is_crowd'], hw[0], hw[1], keep_crowd=True)
    out = {k: tf.boolean_mask(ex[k], keep) for k in ('classes', 'is_crowd', 'area')}
    return {**out, 'boxes': tf.boolean_mask(boxes, keep), 'image_id': ex['image_id'],
            'height': hw[0], 'width': hw[1]}

  split = source.read(source.tfds_builder(config), source.eval_split(config), key='config.data.eval_split')
  ds = _decode(split)
  ds = ds.map(record, tf.data.AUTOTUNE, deterministic=True).with_options(source.options())
  return coco.ground_truth(ds.as_numpy_iterator(), info.category_ids, info.class_names)
