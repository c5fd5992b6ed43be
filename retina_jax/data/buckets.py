"""Size buckets: a few fixed canvases, so that COCO images are padded little and never shrunk.

One square canvas holds every image at the paper's scale (portrait ones too) but pads a
typical COCO image (640 x 480 -> 800 x 1067) to 1408 x 1408: 2.3 canvas pixels per image
pixel. Buckets are a handful of canvases, each divisible by 128 (P7's stride); an image
goes to the smallest-area bucket that holds it at the paper's scale, so no image is shrunk.
Each bucket costs one compile of the train step and one of predict.

Everything here is numpy on sizes; the tf side (pipeline.py) computes the same resized
size (augment.paper_scale, augment.resized_hw: float32, rounding half to even, as here).

Training (pipeline.train_iterator): every global batch comes from one bucket. The bucket
of batch i is `schedule(i, counts, seed)`: a function of the step, the seed and the
buckets' image counts over the whole split, which every process computes alike, so
processes agree without talking to each other. The schedule draws bucket k with the
bucket's share of the images, so every image is seen at the rate it would be without
buckets: B / N per step.

Sizes are counted on a grid of 128-pixel cells: an image resized to (h, w) needs
cell (ceil(h / 128), ceil(w / 128)), and a bucket holds the image iff it holds the cell.
"""

import math

import numpy as np

from retina_jax import errors

STRIDE = 128  # canvases are multiples of the stride of the coarsest level (P7)

# A COCO-like size distribution, (height, width, share). Assumed, not measured (no COCO on
# the development machines): COCO images are mostly 640 px on the longer side and about
# three quarters landscape; 90% of train2014's images have h / w between 0.6 and 1.5 and
# 90% between 167,500 and 355,840 pixels (COCO's statistics page, as summarized by
# Lextal/SotA-CV, datasets/coco_detection.md). Here 92% of the images are in that h / w
# range, 80% at 4:3 or 3:2. experiments/bench_buckets.py --annotations reads real sizes.
COCO_LIKE_SIZES = (
    (480, 640, 0.36), (427, 640, 0.22), (360, 640, 0.05), (512, 640, 0.04), (320, 640, 0.02),
    (375, 500, 0.03), (640, 640, 0.03),
    (640, 480, 0.14), (640, 427, 0.08), (640, 360, 0.01), (640, 512, 0.02),
)


def resized_hw(height, width, min_size, max_size):
  """The size an image gets at the paper's scale (numpy twin of augment.resized_hw).

  Args:
    height, width: [...] image sizes in pixels.
    min_size, max_size: shorter side (times any jitter) and cap on the longer side.
  Returns:
    [..., 2] int64 (height, width): shorter side min_size unless the longer would pass
    max_size, computed in float32 and rounded half to even exactly as tf does.
  """
  h = np.asarray(height, np.float32)
  w = np.asarray(width, np.float32)
  scale = np.minimum(np.float32(min_size) / np.minimum(h, w), np.float32(max_size) / np.maximum(h, w))
  return np.stack([np.round(h * scale), np.round(w * scale)], axis=-1).astype(np.int64)


def cells(hw):
  """[..., 2] sizes in pixels -> [..., 2] int64 cells: ceil(size / 128)."""
  return -(-np.asarray(hw, np.int64) // STRIDE)


def canonical(buckets):
  """The buckets as a tuple of (H, W) int pairs, smallest area first, without repeats."""
  return tuple(sorted({(int(h), int(w)) for h, w in buckets}, key=lambda b: (b[0] * b[1], b)))


def assign(hw, buckets):
  """Index of the smallest-area bucket holding each size.

  Args:
    hw: [..., 2] resized (height, width) in pixels.
    buckets: canonical buckets [K] (H, W).
  Returns:
    [...] int64 index into buckets; the largest bucket (K - 1) where none holds the
    size (the pipeline then shrinks the image to fit it, as with one canvas).
  """
  hw = np.asarray(hw, np.int64)
  b = np.asarray(buckets, np.int64)  # [K, 2]
  fits = np.all(b >= hw[..., None, :], axis=-1)  # [..., K]
  return np.where(fits.any(-1), np.argmax(fits, -1), len(b) - 1)


def largest_sizes(min_size, max_size):
  """The two sizes that every other image's size fits under: (landscape, portrait) corners.

  Returns:
    ((h, w), (w, h)) with h = the shorter side (min_size, or max_size when that is
    smaller) and w = max_size, both rounded up to whole pixels.
  """
  short = math.ceil(min(min_size, max_size))
  long = math.ceil(max_size)
  return (short, long), (long, short)


def check(buckets, min_size, max_size, key='config.data.buckets'):
  """Raises errors.BadValue, naming `key`, unless `buckets` hold every image at its scale.

  Args:
    buckets: the configured (H, W) canvases.
    min_size: the largest shorter side of any image (data.min_size times the top of the
      scale jitter, when that is above 1).
    max_size: data.max_size.
  """
  try:
    pairs = [tuple(b) for b in buckets]
  except TypeError:
    pairs = None
  if not pairs or any(len(p) != 2 for p in pairs):
    raise errors.BadValue(f'{key}={buckets!r}: must be a non-empty tuple of (H, W) canvases')
  for p in pairs:
    if any(not isinstance(s, (int, np.integer)) or isinstance(s, bool) or s <= 0 or s % STRIDE for s in p):
      raise errors.BadValue(f'{key}: bucket {p!r} must be positive integers divisible by {STRIDE}')
  for corner in largest_sizes(min_size, max_size):
    if not any(h >= corner[0] and w >= corner[1] for h, w in pairs):
      raise errors.BadValue(
          f'{key}={tuple(pairs)!r}: no bucket holds a {corner[0]} x {corner[1]} image, which '
          f'min_size {min_size:g} / max_size {max_size:g} gives; propose({min_size:g}, {max_size:g}) '
          f'in retina_jax/data/buckets.py gives {propose(min_size, max_size)}')


def canvas_per_image(buckets, sizes, min_size, max_size):
  """Canvas pixels per image pixel when each image goes to its bucket.

  Args:
    buckets: (H, W) canvases.
    sizes: [N] (height, width, share) original image sizes with their weights.
    min_size, max_size: the scale.
  Returns:
    float: sum of share * bucket area / sum of share * resized image area.
  """
  sizes = np.asarray(sizes, np.float64).reshape(-1, 3)
  b = canonical(buckets)
  hw = resized_hw(sizes[:, 0], sizes[:, 1], min_size, max_size)  # [N, 2]
  area = np.prod(np.asarray(b, np.float64), axis=1)[assign(hw, b)]  # [N]
  return float((sizes[:, 2] * area).sum() / (sizes[:, 2] * np.prod(hw, axis=1)).sum())


def propose(min_size, max_size, sizes=COCO_LIKE_SIZES, min_gain=0.005):
  """A bucket set for a scale: the two corners, then greedily what saves the most padding.

  Starts from the smallest landscape and portrait buckets that hold every image, and
  adds the canvas (multiples of 128 up to the corners) that lowers canvas_per_image the
  most, while that lowers it by at least `min_gain` (relative). One more bucket is one
  more compile, a minute or two on an accelerator; 0.5% of a 10-35 hour run is more.

  Returns:
    canonical tuple of (H, W).
  """
  corners = [tuple(STRIDE * c for c in cells(hw)) for hw in largest_sizes(min_size, max_size)]
  top = max(max(c) for c in corners) // STRIDE
  candidates = [(STRIDE * i, STRIDE * j) for i in range(1, top + 1) for j in range(1, top + 1)]
  chosen = canonical(corners)
  ratio = canvas_per_image(chosen, sizes, min_size, max_size)
  while True:
    best = min(candidates, key=lambda c: canvas_per_image(chosen + (c,), sizes, min_size, max_size))
    new = canvas_per_image(chosen + (best,), sizes, min_size, max_size)
    if new > ratio * (1.0 - min_gain):
      return chosen
    chosen, ratio = canonical(chosen + (best,)), new


def _grid(n):
  """[n, n, 2] the pixel size of each cell: (128 (i + 1), 128 (j + 1))."""
  return STRIDE * np.stack(np.meshgrid(np.arange(1, n + 1), np.arange(1, n + 1), indexing='ij'), -1)


def counts(histogram, buckets):
  """Images per bucket from cell histograms.

  Args:
    histogram: [..., n, n] int, images per cell (row i: height cell i + 1, column j:
      width cell j + 1), e.g. one per process.
    buckets: canonical buckets [K].
  Returns:
    [..., K] int64.
  """
  histogram = np.asarray(histogram, np.int64)
  onehot = assign(_grid(histogram.shape[-1]), buckets)[..., None] == np.arange(len(buckets))  # [n, n, K]
  return np.einsum('...ij,ijk->...k', histogram, onehot.astype(np.int64))


def training_buckets(histograms, buckets, local_batch):
  """The buckets training uses: those every process can fill a batch from.

  A bucket where some process has fewer than `local_batch` images (but not none
  anywhere) is dropped when other buckets hold all of its images, which then go to the
  smallest of those; so rare sizes do not make a process repeat a few images. Buckets
  without any image stay (they are never scheduled).

  Args:
    histograms: [P, n, n] cell histograms of every process's slice of the split.
    buckets: canonical buckets [K].
    local_batch: images per process and step.
  Returns:
    canonical tuple, a subset of buckets.
  """
  kept = canonical(buckets)
  histograms = np.asarray(histograms, np.int64)
  grid = _grid(histograms.shape[-1])  # [n, n, 2]
  used = histograms.sum(0) > 0  # [n, n] cells some image needs
  while True:
    per_process = counts(histograms, kept)  # [P, K]
    short = [k for k in np.argsort(per_process.sum(0), kind='stable')
             if 0 < per_process[:, k].sum() and per_process[:, k].min() < local_batch]
    for k in short:
      rest = kept[:k] + kept[k + 1:]
      mine = used & (assign(grid, kept) == k)
      if rest and np.all(np.all(np.asarray(rest)[None, None] >= grid[..., None, :], -1).any(-1)[mine]):
        kept = rest
        break
    else:
      return kept


_ROTATION = (math.sqrt(5.0) - 1.0) / 2.0  # the golden ratio's rotation: the most even spread


def schedule(index, counts, seed):  # pylint: disable=redefined-outer-name
  """The bucket of global batch `index`: the same on every process, from the step and the seed.

  A Weyl sequence u_i = frac(offset + i * 0.618...) falls into bucket k's slice of [0, 1)
  (its share of the images) for a fraction of the steps that differs from the share by
  O(log(steps) / steps): far more even than independent draws, and no state to resume.

  Args:
    index: [...] int, global batch index (0 for the first step).
    counts: [K] images per bucket over the whole split (all processes).
    seed: config.seed; it shifts the sequence.
  Returns:
    [...] int64 bucket index; a bucket without images is never chosen.
  """
  counts = np.asarray(counts, np.float64)
  edges = np.cumsum(counts) / counts.sum()  # [K]: bucket k is u in [edges[k - 1], edges[k])
  edges[np.flatnonzero(counts)[-1]:] = np.inf  # rounding never lands past the last bucket with images
  offset = (seed * math.sqrt(2.0)) % 1.0
  u = (offset + np.asarray(index, np.float64) * _ROTATION) % 1.0
  return np.searchsorted(edges, u, side='right')
