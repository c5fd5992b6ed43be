"""ResNet / ResNeXt backbones (torchvision layout, ResNet v1.5), NHWC.

The layer names follow torchvision (conv1, bn1, layer1_0.conv1, ...,
layer1_0.downsample_conv / downsample_bn) so that torchvision_weights.py maps
checkpoints by renaming only. Padding is explicit and symmetric as in PyTorch:
Flax's 'SAME' pads stride-2 convolutions asymmetrically, and the converted
weights would then see shifted inputs.

Stages: stem = conv1 + bn1 + max-pool (stride 4), layer1 (C2, stride 4),
layer2 (C3, 8), layer3 (C4, 16), layer4 (C5, 32). `freeze_at` follows
Detectron's FREEZE_AT: 0 trains everything, 1 freezes the stem, 2 the stem and
layer1, ... 5 the whole backbone.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from retina_jax import errors
from retina_jax.model import conv
from retina_jax.model import padding
from retina_jax.model import pool

BN_EPS = 1e-5  # torchvision BatchNorm2d and FrozenBatchNorm2d
# torchvision's kaiming_normal_(mode='fan_out', nonlinearity='relu') for backbone convs.
_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


# config.model.backbone -> (bottleneck blocks, blocks per stage, groups, width per group).
BACKBONES = {
    'resnet18': (False, (2, 2, 2, 2), 1, 64),
    'resnet34': (False, (3, 4, 6, 3), 1, 64),
    'resnet50': (True, (3, 4, 6, 3), 1, 64),
    'resnet101': (True, (3, 4, 23, 3), 1, 64),
    'resnet152': (True, (3, 8, 36, 3), 1, 64),
    'resnext101_32x8d': (True, (3, 4, 23, 3), 32, 8),
    'resnext101_64x4d': (True, (3, 4, 23, 3), 64, 4),
}


def spec(name):
  """Architecture of a named backbone.

  Args:
    name: config.model.backbone, a key of BACKBONES.
  Returns:
    (bottleneck: bool, blocks per stage: tuple of 4 ints, groups, width_per_group).
  """
  errors.check_choice('model.backbone', name, BACKBONES)
  return BACKBONES[name]


def out_channels(name, width=64):
  """Channels of (C3, C4, C5) for backbone `name` at stem width `width`."""
  bottleneck = spec(name)[0]
  expansion = 4 if bottleneck else 1
  return tuple(width * 2**i * expansion for i in (1, 2, 3))


class FrozenBatchNorm(nn.Module):
  """BatchNorm with fixed statistics and affine, like torchvision's FrozenBatchNorm2d.

  All four vectors live in the 'batch_stats' collection, so an optimizer over
  'params' never sees them. y = (x - mean) / sqrt(var + eps) * scale + bias.
  """
  dtype: Any = jnp.float32
  epsilon: float = BN_EPS

  @nn.compact
  def __call__(self, x):
    """x: [..., C] -> [..., C] in self.dtype."""
    shape = (x.shape[-1],)
    stat = lambda name, init: self.variable('batch_stats', name, init, shape, jnp.float32).value
    scale, bias = stat('scale', jnp.ones), stat('bias', jnp.zeros)
    mean, var = stat('mean', jnp.zeros), stat('var', jnp.ones)
    # Folded in float32 once per call; the activations then see one multiply-add.
    mul = scale * jax.lax.rsqrt(var + self.epsilon)
    add = bias - mean * mul
    return x * mul.astype(self.dtype) + add.astype(self.dtype)


def norm_layer(freeze_bn, use_running_average, dtype, name):
  """The backbone's BatchNorm: frozen, or trainable with running statistics."""
  if freeze_bn:
    return FrozenBatchNorm(dtype=dtype, name=name)
  return nn.BatchNorm(
      use_running_average=use_running_average, momentum=0.9, epsilon=BN_EPS, dtype=dtype,
      param_dtype=jnp.float32, name=name)


def _conv(features, kernel, stride, dtype, name, groups=1):
  pad = kernel // 2
  return nn.Conv(
      features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
      feature_group_count=groups, use_bias=False, kernel_init=_conv_init, dtype=dtype,
      param_dtype=jnp.float32, conv_general_dilated=conv.conv_general_dilated, name=name)


class Block(nn.Module):
  """Basic (two 3x3) or bottleneck (1x1, 3x3 with the stride, 1x1) residual block."""
  planes: int
  stride: int
  bottleneck: bool
  groups: int
  width_per_group: int
  freeze_bn: bool
  use_running_average: bool
  dtype: Any

  def norm(self, name):
    # Trainable BatchNorm's batch statistics still take in the padding while training: flax's
    # BatchNorm(mask=) gave backbone gradients 1-3% apart on 8 devices and on 1 (unexplained;
    # tests/test_sharding.py). Evaluation normalizes with the running statistics, the same on
    # every canvas, so its outputs stay canvas independent.
    return norm_layer(self.freeze_bn, self.use_running_average, self.dtype, name)

  @nn.compact
  def __call__(self, x, mask=padding.UNPADDED):
    """x: [B, H, W, C_in] -> [B, H / stride, W / stride, planes * expansion]; see padding.py for `mask`."""
    x = mask(x)
    if self.bottleneck:
      out_features = self.planes * 4
      width = int(self.planes * self.width_per_group / 64) * self.groups
      y = mask(nn.relu(self.norm('bn1')(_conv(width, 1, 1, self.dtype, 'conv1')(x))))
      y = _conv(width, 3, self.stride, self.dtype, 'conv2', self.groups)(y)
      y = mask(nn.relu(self.norm('bn2')(y)))
      y = self.norm('bn3')(_conv(out_features, 1, 1, self.dtype, 'conv3')(y))
    else:
      out_features = self.planes
      y = mask(nn.relu(self.norm('bn1')(_conv(self.planes, 3, self.stride, self.dtype, 'conv1')(x))))
      y = self.norm('bn2')(_conv(self.planes, 3, 1, self.dtype, 'conv2')(y))
    if self.stride != 1 or x.shape[-1] != out_features:
      x = self.norm('downsample_bn')(_conv(out_features, 1, self.stride, self.dtype, 'downsample_conv')(x))
    return nn.relu(x + y)


class ResNet(nn.Module):
  """ResNet / ResNeXt trunk returning C3, C4, C5 (`backbone` is a name accepted by `spec`)."""
  backbone: str = 'resnet50'
  width: int = 64  # stem width; every stage scales with it
  freeze_bn: bool = True
  freeze_at: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train=False, mask=padding.UNPADDED):
    """Runs the trunk.

    Args:
      x: [B, H, W, 3] images, any float dtype (cast to self.dtype).
      train: batch statistics for trainable BatchNorm (ignored when freeze_bn).
      mask: padding.ImageMask of the images' canvas (see padding.py).
    Returns:
      (c3, c4, c5): [B, H/8, W/8, C3], [B, H/16, W/16, C4], [B, H/32, W/32, C5] in self.dtype.
    """
    bottleneck, blocks, groups, width_per_group = spec(self.backbone)
    if bottleneck and int(self.width * width_per_group / 64) == 0:
      raise ValueError(f'config.model.backbone_width {self.width} is too small for {self.backbone}')
    x = mask(x.astype(self.dtype))
    # A frozen stage keeps its running statistics too (detectron2 converts it to FrozenBN).
    bn1 = norm_layer(self.freeze_bn, not train or self.freeze_at >= 1, self.dtype, 'bn1')
    # Zeros after the ReLU pool like the -inf padding of an image alone: every value is >= 0.
    x = mask(nn.relu(bn1(_conv(self.width, 7, 2, self.dtype, 'conv1')(x))))
    x = pool.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
    if self.freeze_at >= 1:
      # Nothing below a frozen stage needs gradients: cut the backward pass here.
      x = jax.lax.stop_gradient(x)
    features = []
    for stage, num_blocks in enumerate(blocks, start=1):
      frozen = self.freeze_at >= stage + 1
      for i in range(num_blocks):
        x = Block(
            planes=self.width * 2**(stage - 1), stride=2 if i == 0 and stage > 1 else 1,
            bottleneck=bottleneck, groups=groups, width_per_group=width_per_group,
            freeze_bn=self.freeze_bn, use_running_average=not train or frozen, dtype=self.dtype,
            name=f'layer{stage}_{i}')(x, mask)
      if frozen:
        x = jax.lax.stop_gradient(x)
      features.append(x)
    return tuple(features[1:])
