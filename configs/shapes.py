"""The CPU demo: a small RetinaNet trained from scratch on the built-in synthetic shapes.

Derives from configs/base.py and changes the scale: a ResNet-18 at a quarter of
the width, narrower FPN and subnets with GroupNorm (trained from scratch there is
nothing pretrained to freeze, so BatchNorm trains and no stage is frozen), a
128 x 128 canvas with anchors halved to fit (16..256 px on P3..P7), and a short
schedule with the paper's shape (warm-up, two decays at 2/3 and 8/9 of it) at
4x the paper's learning rate; synthetic images of 128 px with 10 objects at most,
each at least 12 px. Loss, matching, box coding and post-processing keep the paper's settings.

  make demo
  python -m retina_jax.main --config configs/shapes.py --workdir runs/demo

What it reaches and how long it takes: README.md, "Set-up on a fresh clone".

`configs/shapes.py:tiny` is the test-sized variant (ResNet-18 at width 8, 16-wide
FPN and one-conv subnets, 32 training images, a few steps): it checks that the
pipeline runs, not that it learns.

The toy keeps one square canvas. `configs/shapes.py:buckets` (and `:tiny,buckets`)
runs the COCO way instead: COCO-like image sizes and aspect ratios (the longer
side 128 px for COCO's 640), resized to a shorter side of 128 px capped at 213
(800 / 1333 scaled), padded to size buckets.
"""

from configs import base
from retina_jax.data import buckets

_ARGS = ('tiny', 'buckets')


def get_config(arg=None):
  parts = [p.strip() for p in (arg or '').split(',') if p.strip()]
  if any(p not in _ARGS for p in parts):
    raise ValueError(f"configs/shapes.py: unknown argument {arg!r}; use nothing, 'tiny', 'buckets' "
                     "or 'tiny,buckets'")
  c = base.get_config()
  c.data.dataset = 'shapes'
  c.data.use_buckets = False
  c.data.canvas = (128, 128)
  c.data.min_size = 128
  c.data.max_size = 128
  c.data.max_boxes = 32
  c.data.shuffle_buffer = 512
  c.data.shapes.image_size = 128
  c.data.shapes.num_train = 2000
  c.data.shapes.num_val = 200
  c.data.shapes.max_objects = 10
  c.data.shapes.min_object_size = 12

  c.anchors.sizes = (16.0, 32.0, 64.0, 128.0, 256.0)

  c.model.backbone = 'resnet18'
  c.model.backbone_width = 16
  c.model.freeze_bn = False
  c.model.freeze_at = 0
  c.model.fpn_width = 64
  c.model.head_width = 64
  c.model.head_convs = 2
  c.model.head_norm = 'group'
  c.model.num_classes = 6

  # From scratch with GroupNorm heads, 4x the paper's rate trains stably and twice as fast.
  c.optim.base_lr = 0.04
  c.optim.base_batch = 16
  c.optim.warmup_steps = 100
  c.optim.decay_steps = (1000, 1333)

  c.train.batch_size = 16
  c.train.steps = 1500
  c.train.log_every = 20
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 2

  c.eval.batch_size = 20
  c.eval.visualize = 8
  if 'tiny' in parts:
    _tiny(c)
  if 'buckets' in parts:
    _buckets(c)
  return c


def _buckets(c):
  c.data.shapes.varied_sizes = True
  c.data.use_buckets = True
  c.data.max_size = 213  # 128 * 1333 / 800
  c.data.buckets = buckets.propose(c.data.min_size, c.data.max_size)


def _tiny(c):
  c.data.shapes.num_train = 32
  c.data.shapes.num_val = 8
  c.data.shuffle_buffer = 32
  c.model.backbone_width = 8
  c.model.fpn_width = 16
  c.model.head_width = 16
  c.model.head_convs = 1
  c.model.head_norm = 'none'
  c.optim.warmup_steps = 2
  c.optim.decay_steps = (8,)
  c.postprocess.topk_per_level = 100
  c.train.batch_size = 8
  c.train.steps = 4
  c.train.log_every = 1
  c.train.checkpoint_every = 2
  c.eval.batch_size = 8
  c.eval.visualize = 2
