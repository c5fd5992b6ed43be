r"""Foreground/background imbalance: anchors per positive anchor, COCO against the toy scales.

The focal loss exists because a detector scores ~100k anchors per image of which
only a few dozen are positive (sec. 3); how many easy negatives there are per
positive decides how much it matters. This prints, for COCO at the ablations'
600 px scale and for each toy scale of configs/rows.py, anchors per image,
objects per image, positive anchors per object and per image, and their ratio
`anchors per positive`, the number a toy scale has to match.

  python -m experiments.imbalance                 # COCO estimate, shapes and sparse
  python -m experiments.imbalance --images 400

COCO's side is computed, not read (COCO cannot be downloaded here):
  * anchors: the paper's layout (P3-P7, 9 per cell) over a 600 x 800 image, the
    ablations' scale applied to COCO's typical 640 x 480 image;
  * objects per image: 7.3 (train2017: 860,001 boxes in 118,287 images);
  * positives per object: our matcher (IoU >= 0.5, low-quality matches on, as
    configs/base.py) on single boxes drawn from COCO's published size mix,
    41% small (area < 32^2), 34% medium (32^2..96^2), 24% large, each log-uniform
    in its side range ([8, 32], [32, 96], [96, 480] px at COCO's own resolution,
    then x1.25 for the 600 px scale), aspect ratio log-uniform in [1/3, 3], placed
    uniformly inside the image. Boxes of one image do not compete for anchors here,
    so this slightly overcounts positives (undercounts the ratio).
The toy scales' side is measured on their training batches, through the real input
pipeline and the same matcher; training logs the same count as `num_pos`, and
experiments/run_table.py puts the ratio measured during training in each results file.
"""

import argparse

import jax
import numpy as np

from configs import table1b_gamma
from retina_jax import anchors as anchors_lib
from retina_jax import matching

# What `coco_estimate` gives with 20,000 boxes (this script's default, ~1.5 min); results files
# quote it, and tests/test_run_table.py checks that a smaller draw still lands near it.
COCO_ANCHORS_PER_POSITIVE = 644
COCO_OBJECTS_PER_IMAGE = 860001 / 118287  # instances_train2017.json: boxes / images
COCO_IMAGE_HW = (600, 800)  # 640 x 480, the commonest COCO size, at min_size 600
_COCO_SIZE_MIX = ((0.41, 8.0, 32.0), (0.34, 32.0, 96.0), (0.25, 96.0, 480.0))  # share, side range
_COCO_RESIZE = 600 / 480


def count(config, boxes, classes):
  """Positive anchors per image of a batch of ground truth.

  Args:
    config: supplies matching.* and the anchors (anchors.*, data.canvas).
    boxes: [B, M, 4] float32 canvas pixels (x1, y1, x2, y2).
    classes: [B, M] int32, -1 for padding.
  Returns:
    [B] number of anchors labelled positive.
  """
  anchors = anchors_lib.from_config(config)
  m = config.matching
  _, labels = jax.jit(lambda b, c: matching.match(
      anchors, b, c, fg_iou=m.fg_iou, bg_iou=m.bg_iou, low_quality=bool(m.low_quality)))(boxes, classes)
  return np.asarray(np.sum(np.asarray(labels) == 1, axis=1))


def anchors_in(hw, anchor_config):
  """Anchors over an image of size hw with no padding: ceil(side / stride) cells per side."""
  per_cell = anchors_lib.num_per_location(anchor_config)
  return sum((-(-hw[0] // 2**l)) * (-(-hw[1] // 2**l)) * per_cell for l in anchor_config.levels)


def coco_estimate(config, n, seed=0):
  """COCO at 600 px: dict of anchors, objects, positives per object and anchors per positive."""
  rng = np.random.default_rng(seed)
  share = np.array([s for s, _, _ in _COCO_SIZE_MIX])
  kind = rng.choice(len(_COCO_SIZE_MIX), n, p=share / share.sum())
  lo = np.array([_COCO_SIZE_MIX[k][1] for k in kind])
  hi = np.array([_COCO_SIZE_MIX[k][2] for k in kind])
  side = np.exp(rng.uniform(np.log(lo), np.log(hi))) * _COCO_RESIZE  # sqrt(area) in pixels
  ratio = np.exp(rng.uniform(np.log(1 / 3), np.log(3), n))  # height / width
  h, w = side * np.sqrt(ratio), side / np.sqrt(ratio)
  ih, iw = COCO_IMAGE_HW
  h, w = np.minimum(h, ih), np.minimum(w, iw)
  x1, y1 = rng.uniform(0, iw - w), rng.uniform(0, ih - h)
  c = config.copy_and_resolve_references()
  c.data.canvas = tuple(-(-s // 128) * 128 for s in COCO_IMAGE_HW)  # anchors must cover the image
  boxes = np.stack([x1, y1, x1 + w, y1 + h], -1).astype(np.float32)[:, None, :]  # [n, 1, 4]
  positives = count(c, boxes, np.zeros((n, 1), np.int32)).mean()
  return summary(anchors_in(COCO_IMAGE_HW, config.anchors), COCO_OBJECTS_PER_IMAGE, positives)


def toy_measured(config, images):
  """A toy scale's training batches: the same dict, measured on `images` training images."""
  from retina_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  objects, positives, seen = 0, 0, 0
  for batch in pipeline.train_iterator(config):
    objects += int(np.sum(batch['classes'] >= 0))
    positives += int(count(config, batch['boxes'], batch['classes']).sum())
    seen += len(batch['classes'])
    if seen >= images:
      break
  a = len(anchors_lib.from_config(config))
  return summary(a, objects / seen, positives / max(objects, 1))


def summary(anchors, objects, positives_per_object):
  positives = objects * positives_per_object
  return {'anchors': anchors, 'objects': objects, 'positives_per_object': positives_per_object,
          'positives': positives, 'anchors_per_object': anchors / objects,
          'anchors_per_positive': anchors / positives}


def line(name, s):
  return (f'| {name} | {s["anchors"]:,.0f} | {s["objects"]:.2f} | {s["positives_per_object"]:.1f} | '
          f'{s["positives"]:.1f} | {s["anchors_per_object"]:,.0f} | {s["anchors_per_positive"]:,.0f} |')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--images', type=int, default=256, help='training images read per toy scale')
  parser.add_argument('--coco-boxes', type=int, default=20000)
  parser.add_argument('--datasets', default='shapes,sparse')
  args = parser.parse_args(argv)
  print('| scale | anchors / image | objects / image | positives / object | positives / image '
        '| anchors / object | anchors / positive |')
  print('|---|---|---|---|---|---|---|')
  coco = table1b_gamma.get_config('dataset=coco')  # the ablations' 600 / 1000
  print(line('COCO 600/1000 (estimate)', coco_estimate(coco, args.coco_boxes)), flush=True)
  for dataset in args.datasets.split(','):
    config = table1b_gamma.get_config(f'dataset={dataset}')
    print(line(f'{dataset} (measured)', toy_measured(config, args.images)), flush=True)


if __name__ == '__main__':
  main()
