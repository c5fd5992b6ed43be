"""Canvas padding stays out of the network: an image's outputs do not depend on its canvas."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from retina_jax import anchors as anchors_lib
from retina_jax.model import heads
from retina_jax.model import padding
from retina_jax.model import retinanet


def _config(**model):
  c = base.get_config()
  c.model.update(backbone='resnet18', backbone_width=8, fpn_width=32, head_width=32, head_convs=2,
                 num_classes=3, head_norm='group', freeze_bn=False, freeze_at=0)
  c.model.update(model)
  return c


def _on_canvas(image, canvas):
  """[B, h, w, 3] -> [B, H, W, 3], zeros right and below, as the pipeline pads."""
  out = np.zeros((image.shape[0], *canvas, 3), np.float32)
  out[:, :image.shape[1], :image.shape[2]] = image
  return out


def _image_cells(out, canvas, image_hw, config):
  """The outputs on the image's cells, level by level: list of [B, h_l, w_l, n, K + 4]."""
  levels = tuple(config.anchors.levels)
  n = anchors_lib.num_per_location(config.anchors)
  both = np.concatenate([out['logits'], out['deltas']], -1)
  cells, start = [], 0
  for level, count in zip(levels, anchors_lib.level_counts(canvas, levels, n)):
    h, w = canvas[0] // 2**level, canvas[1] // 2**level
    grid = both[:, start:start + count].reshape(len(both), h, w, n, -1)
    cells.append(grid[:, :-(-image_hw[0] // 2**level), :-(-image_hw[1] // 2**level)])
    start += count
  return cells


def _run(model, variables, images, image_hw, train=False):
  hw = None if image_hw is None else jnp.broadcast_to(jnp.float32(image_hw), (len(images), 2))
  out, updates = jax.jit(lambda v, x, hw: model.apply(v, x, hw, train=train, mutable=['batch_stats']))(
      variables, images, hw)
  return jax.device_get(out), jax.device_get(updates['batch_stats'])


@functools.cache
def _model(**options):
  config = _config(**options)
  model = retinanet.build(config)
  return config, model, retinanet.init_variables(config, model, jax.random.key(0))


# Training with trainable BatchNorm is left out: its batch statistics take in the padding (resnet.py).
@pytest.mark.parametrize('head_norm, p6_from, freeze_bn, train', [
    ('group', 'c5', True, True), ('none', 'p5', False, False)])
def test_an_image_gives_the_same_outputs_on_every_canvas_that_holds_it(head_norm, p6_from, freeze_bn, train):
  config, model, variables = _model(head_norm=head_norm, p6_from=p6_from, freeze_bn=freeze_bn)
  image = np.random.default_rng(0).normal(size=(2, 128, 128, 3)).astype(np.float32)
  # The forward of the image alone (it fills its canvas, nothing masked) is the reference.
  alone, _ = _run(model, variables, image, None, train)
  canvas = (256, 128)
  padded, _ = _run(model, variables, _on_canvas(image, canvas), (128, 128), train)
  for a, b in zip(_image_cells(alone, (128, 128), (128, 128), config),
                  _image_cells(padded, canvas, (128, 128), config)):
    np.testing.assert_allclose(b, a, atol=2e-5, rtol=1e-5)
  # Without the mask the canvas shows through: the check above is not vacuous.
  unmasked, _ = _run(model, variables, _on_canvas(image, canvas), None, train)
  assert np.abs(_image_cells(unmasked, canvas, (128, 128), config)[-1] -
                _image_cells(alone, (128, 128), (128, 128), config)[-1]).max() > 1e-3


def test_an_image_ending_inside_cells_agrees_between_canvases():
  # 100 x 70 px: the image ends inside a cell of every level from P3 up.
  config, model, variables = _model()
  image = np.random.default_rng(1).normal(size=(2, 100, 70, 3)).astype(np.float32)
  small, _ = _run(model, variables, _on_canvas(image, (128, 128)), (100, 70))
  large, _ = _run(model, variables, _on_canvas(image, (256, 256)), (100, 70))
  for a, b in zip(_image_cells(small, (128, 128), (100, 70), config),
                  _image_cells(large, (256, 256), (100, 70), config)):
    np.testing.assert_allclose(b, a, atol=2e-5, rtol=1e-5)


def test_a_full_image_is_untouched_by_the_mask_and_an_empty_row_stays_finite():
  config, model, variables = _model(head_norm='none', p6_from='p5', freeze_bn=False)  # running statistics
  images = np.random.default_rng(2).normal(size=(2, 128, 128, 3)).astype(np.float32)
  plain, _ = _run(model, variables, images, None)
  # Row 0 fills the canvas; row 1 is an evaluation batch's padding row (no image at all).
  masked, _ = _run(model, variables, images, jnp.float32([[128, 128], [0, 0]]))
  for key in plain:
    np.testing.assert_array_equal(masked[key][0], plain[key][0])  # bit for bit: where(True, x, 0) is x
    assert np.isfinite(masked[key][1]).all()


def test_group_norm_is_flax_group_norm_and_counts_only_the_image():
  x = jnp.asarray(np.random.default_rng(3).normal(1.0, 3.0, size=(2, 8, 12, 64)), jnp.float32)
  flax_norm = nn.GroupNorm(num_groups=32, epsilon=1e-5)
  variables = flax_norm.init(jax.random.key(0), x)
  variables = jax.tree.map(lambda v: v + jnp.linspace(-0.5, 0.5, v.size), variables)  # not 1 and 0
  ours = heads.GroupNorm()
  np.testing.assert_array_equal(ours.apply(variables, x), flax_norm.apply(variables, x))
  mask = padding.ImageMask(jnp.float32([[5, 7], [8, 12]]), (8, 12))
  y = ours.apply(variables, jnp.where(mask.cells(x), x, 1e6), mask.cells(x))  # padding holds junk
  np.testing.assert_allclose(y[0, :5, :7], flax_norm.apply(variables, x[:1, :5, :7])[0], atol=1e-5)
  np.testing.assert_allclose(y[1], flax_norm.apply(variables, x[1:])[0], atol=1e-5)


def test_mask_cells_per_stride_round_up():
  mask = padding.ImageMask(jnp.float32([[100, 70]]), (128, 128))
  cells = mask.cells(jnp.zeros((1, 16, 16, 1)))[0, :, :, 0]  # stride 8: ceil(100/8)=13, ceil(70/8)=9
  assert cells.sum(0).max() == 13 and cells.sum(1).max() == 9 and cells[12, 8] and not cells[13, 0]
  with pytest.raises(ValueError, match='not a stride of the canvas'):
    mask.cells(jnp.zeros((1, 48, 48, 1)))
