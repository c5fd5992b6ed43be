"""RetinaNet's classification and box subnets (paper sec. 4, Fig. 3).

Each subnet is `num_convs` x (3x3 conv + ReLU) and a final 3x3 conv; its weights
are shared by all pyramid levels (one submodule applied to every level), and the
two subnets share nothing. New layers start from N(0, 0.01) with zero bias; the
last classification bias is -log((1 - pi) / pi), so every anchor starts at
foreground probability pi and the loss of the ~100k easy negatives cannot
swamp the first iterations.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from retina_jax.model import conv
from retina_jax.model import padding

_head_init = nn.initializers.normal(stddev=0.01)


class GroupNorm(nn.Module):
  """flax's nn.GroupNorm(32) with statistics over the image's cells only (padding.py).

  Without `cells` it is flax's arithmetic and parameters exactly (checkpoints and numbers
  unchanged). flax's own `mask=` would do for the cells but gives NaN on an image with none,
  as the padding rows of an evaluation batch are; here the zeroed map is averaged over all
  cells and rescaled by all cells / image cells (at least one).
  """
  num_groups: int = 32
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, cells=None):
    """x: [B, h, w, C]; cells: [B, h, w, C] bool, True on the image, or None -> [B, h, w, C] in self.dtype."""
    b, h, w, c = x.shape
    g = x.astype(jnp.float32).reshape(b, h, w, self.num_groups, c // self.num_groups)  # [B, h, w, G, C/G]
    axes = (1, 2, 4)
    if cells is not None:
      cells = cells.reshape(g.shape)
      g = jnp.where(cells, g, 0.0)
    mean, mean2 = g.mean(axes), jnp.square(g).mean(axes)  # [B, G]
    if cells is not None:
      share = h * w * (c // self.num_groups) / jnp.maximum(cells.sum(axes, dtype=jnp.float32), 1.0)  # [B, G]
      mean, mean2 = mean * share, mean2 * share
    var = jnp.maximum(0.0, mean2 - jnp.square(mean))  # E[x^2] - E[x]^2, as flax's default
    stat = lambda s: jnp.repeat(s, c // self.num_groups, axis=-1)[:, None, None, :]  # [B, 1, 1, C]
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    y = (x - stat(mean)) * (jax.lax.rsqrt(stat(var) + self.epsilon) * scale) + bias
    return y.astype(self.dtype)


class Subnet(nn.Module):
  """3x3 convs (+ GroupNorm) + ReLU, then a 3x3 conv to `out_features` channels."""
  out_features: int
  width: int = 256
  num_convs: int = 4
  norm: str = 'none'  # 'none' | 'group' (32 groups before each ReLU, detectron2's option)
  out_bias: float = 0.0
  dtype: Any = jnp.float32

  def _conv(self, features, use_bias, bias, name):
    return nn.Conv(
        features, (3, 3), padding=((1, 1), (1, 1)), use_bias=use_bias, kernel_init=_head_init,
        bias_init=nn.initializers.constant(bias), dtype=self.dtype, param_dtype=jnp.float32,
        conv_general_dilated=conv.conv_general_dilated, name=name)

  @nn.compact
  def __call__(self, x, mask=padding.UNPADDED):
    """x: [B, h, w, C] -> [B, h, w, out_features] in self.dtype; see padding.py for `mask`."""
    x = mask(x)
    for i in range(self.num_convs):
      # A conv followed by GroupNorm has no bias (torchvision v2's head), its shift is the norm's.
      x = self._conv(self.width, self.norm == 'none', 0.0, f'conv_{i}')(x)
      if self.norm == 'group':
        x = GroupNorm(dtype=self.dtype, name=f'norm_{i}')(x, mask.cells(x))
      x = mask(nn.relu(x))
    return self._conv(self.out_features, True, self.out_bias, 'out')(x)


class RetinaHead(nn.Module):
  """Both subnets over all levels, flattened in the anchor order of anchors.py."""
  num_classes: int = 80
  num_anchors: int = 9  # per location, a = scale_index * num_ratios + ratio_index
  width: int = 256
  num_convs: int = 4
  norm: str = 'none'
  prior_prob: float = 0.01
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features, mask=padding.UNPADDED):
    """Applies the subnets to every level.

    Args:
      features: list over levels of [B, h_l, w_l, C].
      mask: padding.ImageMask of the images' canvas.
    Returns:
      logits: [B, A, K] float32, A = sum_l h_l * w_l * num_anchors, order (level, y, x, a).
      deltas: [B, A, 4] float32 (dx, dy, dw, dh), same order.
    """
    k, n = self.num_classes, self.num_anchors
    subnet = lambda out, bias, name: Subnet(
        out, self.width, self.num_convs, self.norm, bias, self.dtype, name=name)
    cls_net = subnet(n * k, -math.log((1 - self.prior_prob) / self.prior_prob), 'cls_net')
    box_net = subnet(n * 4, 0.0, 'box_net')
    logits, deltas = [], []
    for x in features:
      b, h, w, _ = x.shape
      # Channel a * K + k of cell (y, x) becomes row (y * w + x) * n + a, column k.
      logits.append(cls_net(x, mask).reshape(b, h * w * n, k))  # [B, h*w*n, K]
      deltas.append(box_net(x, mask).reshape(b, h * w * n, 4))  # [B, h*w*n, 4]
    return (jnp.concatenate(logits, axis=1).astype(jnp.float32),
            jnp.concatenate(deltas, axis=1).astype(jnp.float32))
