"""RetinaNet = ResNet + FPN + class / box subnets (paper sec. 4), built from config.model.

  model = build(config)
  variables = init_variables(config, model, rng)        # {'params', 'batch_stats'}
  out = model.apply(variables, images, image_hw, train=False)   # {'logits', 'deltas'}
  out, updates = model.apply(variables, images, image_hw, train=True, mutable=['batch_stats'])
                                                        # only when model.freeze_bn is False

Frozen BatchNorm keeps all of its vectors in 'batch_stats', so the optimizer
sees only 'params'; `trainable_mask` further excludes the stages frozen by
model.freeze_at. No anchors or losses live in the module.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from retina_jax import anchors
from retina_jax.model import fpn as fpn_lib
from retina_jax.model import heads
from retina_jax.model import padding
from retina_jax.model import resnet
from retina_jax.model import torchvision_weights


class RetinaNet(nn.Module):
  """The whole network; see `build` for what each attribute means in config.model."""
  backbone: str = 'resnet50'
  backbone_width: int = 64
  freeze_bn: bool = True
  freeze_at: int = 2
  fpn_width: int = 256
  p6_from: str = 'c5'
  levels: tuple = (3, 4, 5, 6, 7)
  head_width: int = 256
  head_convs: int = 4
  head_norm: str = 'none'
  prior_prob: float = 0.01
  num_classes: int = 80
  num_anchors: int = 9
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, image_hw=None, train=False):
    """Runs the detector.

    Args:
      images: [B, H, W, 3] float32, normalized; H and W divisible by 2**max(levels).
      image_hw: [B, 2] float32 (height, width) of each image on the canvas, the rest being
        padding: the outputs on an image then do not depend on its canvas (padding.py).
        None: every image fills the canvas.
      train: use and update batch statistics (only for trainable BatchNorm).
    Returns:
      dict(logits=[B, A, K] float32, deltas=[B, A, 4] float32) in the anchor order of anchors.py.
    """
    stride = 2**self.levels[-1]
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] % stride or images.shape[2] % stride:
      raise ValueError(
          f'RetinaNet: images must be [B, H, W, 3] with H, W divisible by {stride} (the stride of '
          f'level {self.levels[-1]}), got shape {tuple(images.shape)}')
    mask = padding.ImageMask(image_hw, images.shape[1:3])
    c3, c4, c5 = resnet.ResNet(
        self.backbone, self.backbone_width, self.freeze_bn, self.freeze_at, self.dtype,
        name='backbone')(images, train=train, mask=mask)
    features = fpn_lib.FPN(self.fpn_width, self.levels, self.p6_from, self.dtype, name='fpn')(c3, c4, c5, mask)
    logits, deltas = heads.RetinaHead(
        self.num_classes, self.num_anchors, self.head_width, self.head_convs, self.head_norm,
        self.prior_prob, self.dtype, name='head')(features, mask)
    return {'logits': logits, 'deltas': deltas}


def _dtype(name):
  if name == 'float32':
    return jnp.float32
  elif name == 'bfloat16':
    return jnp.bfloat16
  raise ValueError(f"config.model.dtype must be 'float32' or 'bfloat16', got {name!r}")


def build(config):
  """The RetinaNet of config.model, with config.anchors' anchors per location.

  Args:
    config: the run config (reads config.model and config.anchors).
  Returns:
    RetinaNet (a flax.linen.Module).
  """
  m = config.model
  resnet.spec(m.backbone)  # fails early on an unknown name
  fpn_lib.check_levels(config.anchors.levels)
  if m.p6_from not in ('c5', 'p5'):
    raise ValueError(f"config.model.p6_from must be 'c5' or 'p5', got {m.p6_from!r}")
  if m.head_norm not in ('none', 'group'):
    raise ValueError(f"config.model.head_norm must be 'none' or 'group', got {m.head_norm!r}")
  if m.head_norm == 'group' and m.head_width % 32:
    raise ValueError(f'config.model.head_width {m.head_width} must be divisible by 32 for GroupNorm(32)')
  if not 0 <= m.freeze_at <= 5:
    raise ValueError(f'config.model.freeze_at must be in 0..5, got {m.freeze_at}')
  if not 0 < m.prior_prob < 1:
    raise ValueError(f'config.model.prior_prob must be in (0, 1), got {m.prior_prob}')
  for key in ('backbone_width', 'fpn_width', 'head_width', 'num_classes'):
    if m[key] < 1:
      raise ValueError(f'config.model.{key} must be >= 1, got {m[key]}')
  if m.head_convs < 0:
    raise ValueError(f'config.model.head_convs must be >= 0, got {m.head_convs}')
  return RetinaNet(
      backbone=m.backbone, backbone_width=m.backbone_width, freeze_bn=m.freeze_bn,
      freeze_at=m.freeze_at, fpn_width=m.fpn_width, p6_from=m.p6_from,
      levels=tuple(config.anchors.levels), head_width=m.head_width, head_convs=m.head_convs,
      head_norm=m.head_norm, prior_prob=m.prior_prob, num_classes=m.num_classes,
      num_anchors=anchors.num_per_location(config.anchors), dtype=_dtype(m.dtype))


def _init(model, rng):
  # The variables' shapes do not depend on the image size: the smallest canvas the model
  # takes (one cell at the top level) traces and compiles fastest.
  side = 2**model.levels[-1]
  variables = model.init(rng, jnp.zeros((1, side, side, 3), jnp.float32), train=False)
  return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}


def init_variables(config, model, rng):
  """The variables of a new model, with config.model.pretrained's weights when set.

  Args:
    config: the run config (reads config.model.pretrained and pretrained_kind).
    model: build(config).
    rng: a jax.random key for the weights the pretrained file does not give.
  Returns:
    {'params', 'batch_stats'} of jax.Array.
  """
  variables = jax.jit(lambda r: _init(model, r))(rng)
  if config.model.pretrained:
    load = torchvision_weights.LOADERS[config.model.pretrained_kind]
    variables = load(config.model.pretrained, variables, config)
  return variables


def abstract_variables(model, sharding=None):
  """The variables of `model` as jax.ShapeDtypeStruct placed by `sharding`; nothing is computed.

  What a checkpoint or a pretrained file is read into.
  Returns:
    {'params', 'batch_stats'} of jax.ShapeDtypeStruct.
  """
  shapes = jax.eval_shape(lambda: _init(model, jax.random.key(0)))
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def _stage(name):
  """Backbone stage of a top-level backbone module name: 0 stem, i for layer{i}_*."""
  return int(name[len('layer')]) if name.startswith('layer') else 0


def trainable_mask(params, config):
  """Which parameters the optimizer may change.

  Args:
    params: variables['params'] of `build(config)`.
    config: the run config (reads config.model.freeze_at).
  Returns:
    a pytree like `params` of bool: False for the backbone stages below
    model.freeze_at (stem for 1, stem + layer1 for 2, ...), True elsewhere.
  """
  freeze_at = config.model.freeze_at
  return traverse_util.path_aware_map(
      lambda path, _: path[0] != 'backbone' or _stage(path[1]) >= freeze_at, params)
