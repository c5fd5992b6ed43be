"""Feature pyramid on C3..C5, with the extra levels P6, P7 of RetinaNet (paper sec. 4).

P5..P3: lateral 1x1 convolutions, top-down nearest 2x upsampling and sum, then a
3x3 output convolution. P6 is a 3x3 stride-2 convolution on C5 (paper,
Detectron) or on P5 (torchvision v1); each further level is a 3x3 stride-2
convolution on the ReLU of the previous one.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from retina_jax.model import conv
from retina_jax.model import padding

# Detectron's XavierFill / torchvision's kaiming_uniform_(a=1): uniform with variance 1 / fan_in.
_fpn_init = nn.initializers.variance_scaling(1.0, 'fan_in', 'uniform')


def check_levels(levels):
  """Raises unless `levels` are consecutive and start at 3, 4 or 5 (the FPN has no P2)."""
  levels = tuple(levels)
  if not levels or levels[0] not in (3, 4, 5) or levels != tuple(range(levels[0], levels[0] + len(levels))):
    raise ValueError(
        f'config.anchors.levels must be consecutive pyramid levels starting at 3, 4 or 5, got {levels}')


def _upsample2x(x):
  """Nearest-neighbour 2x: [B, h, w, C] -> [B, 2h, 2w, C]."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class FPN(nn.Module):
  """Pyramid features P_l for l in `levels`, all with `width` channels."""
  width: int = 256
  levels: tuple = (3, 4, 5, 6, 7)
  p6_from: str = 'c5'  # 'c5' | 'p5'
  dtype: Any = jnp.float32

  def _conv(self, kernel, stride, name):
    pad = kernel // 2
    return nn.Conv(
        self.width, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
        kernel_init=_fpn_init, bias_init=nn.initializers.zeros, dtype=self.dtype,
        param_dtype=jnp.float32, conv_general_dilated=conv.conv_general_dilated, name=name)

  @nn.compact
  def __call__(self, c3, c4, c5, mask=padding.UNPADDED):
    """Builds the pyramid.

    Args:
      c3, c4, c5: [B, H/8, W/8, C3], [B, H/16, W/16, C4], [B, H/32, W/32, C5].
      mask: padding.ImageMask of the images' canvas; every convolution's input goes through it.
    Returns:
      list over `levels` of [B, H / 2**l, W / 2**l, width] in self.dtype.
    """
    check_levels(self.levels)
    first = self.levels[0]
    inputs = {3: mask(c3), 4: mask(c4), 5: mask(c5)}
    top_down = self._conv(1, 1, 'lateral_5')(inputs[5])
    out = {5: self._conv(3, 1, 'output_5')(mask(top_down))}
    for level in range(4, first - 1, -1):
      top_down = self._conv(1, 1, f'lateral_{level}')(inputs[level]) + _upsample2x(top_down)
      out[level] = self._conv(3, 1, f'output_{level}')(mask(top_down))
    x = inputs[5] if self.p6_from == 'c5' else out[5]
    for level in range(6, self.levels[-1] + 1):
      if level > 6:
        x = nn.relu(x)
      x = out[level] = self._conv(3, 2, f'p{level}')(mask(x))
    return [out[level] for level in self.levels]
