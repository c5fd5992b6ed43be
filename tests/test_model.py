"""The network: output order against anchors.py, shapes, init, parameter counts, freezing, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from configs import torchvision_retinanet
from retina_jax import anchors
from retina_jax.model import heads
from retina_jax.model import retinanet


def _tiny(**model):
  c = base.get_config()
  c.model.backbone = 'resnet18'
  c.model.backbone_width = 16
  c.model.fpn_width = 32
  c.model.head_width = 32
  c.model.head_convs = 2
  c.model.num_classes = 3
  for k, v in model.items():
    setattr(c.model, k, v)
  return c


def _init(model, images):
  # rbg keys: threefry makes the init of ~100 weight tensors slow to compile on CPU.
  return jax.jit(model.init)(jax.random.key(0, impl='rbg'), images)


@pytest.fixture(scope='module')
def tiny():
  """The tiny model with GroupNorm heads and freeze_at 2, its images and initial variables."""
  config = _tiny(head_norm='group', freeze_at=2)
  model = retinanet.build(config)
  images = jax.random.normal(jax.random.key(1), (1, 128, 128, 3))
  return config, model, images, _init(model, images)


def _num_params(config, canvas=(128, 128)):
  shapes = jax.eval_shape(retinanet.build(config).init, jax.random.key(0), jnp.zeros((1, *canvas, 3)))
  return sum(x.size for x in jax.tree.leaves(shapes['params']))


def _anchor_index_geometry(config, canvas):
  """For every anchor of anchors.generate: its level, cell centre and index a, from its box alone."""
  a = config.anchors
  boxes = anchors.generate(canvas, a.levels, a.sizes, a.scales_per_octave, a.ratios, 0.5)  # [A, 4]
  counts = anchors.level_counts(canvas, a.levels, anchors.num_per_location(a))
  level = np.repeat(np.asarray(a.levels), counts)  # [A]
  size = np.repeat(np.asarray(a.sizes), counts)
  w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
  scale = np.round(np.log2(np.sqrt(w * h) / size) * a.scales_per_octave)
  ratio = np.argmin(np.abs(np.log(h / w)[:, None] - np.log(np.asarray(a.ratios))[None, :]), axis=1)
  index = scale * len(a.ratios) + ratio
  centre = (boxes[:, :2] + boxes[:, 2:]) / 2  # [A, 2] (cx, cy)
  return level, centre, index


@pytest.mark.parametrize('canvas,scales,ratios,levels', [
    ((128, 128), 3, (0.5, 1.0, 2.0), (3, 4, 5, 6, 7)),
    ((256, 384), 2, (1.0,), (3, 4, 5, 6, 7)),
    ((128, 256), 1, (0.5, 1.0, 2.0, 4.0), (3, 4, 5)),
])
def test_head_flattens_in_anchor_order(canvas, scales, ratios, levels):
  c = base.get_config()
  c.anchors.scales_per_octave = scales
  c.anchors.ratios = ratios
  c.anchors.levels = levels
  c.anchors.sizes = tuple(32.0 * 2**(l - 3) for l in levels)
  n = anchors.num_per_location(c.anchors)
  # Each level's feature carries (cell centre x, cell centre y, level) in its channels; a head
  # with no hidden convs and only the centre tap copies them, plus the anchor index as bias.
  features = []
  for l in levels:
    h, w = canvas[0] // 2**l, canvas[1] // 2**l
    cy, cx = np.meshgrid((np.arange(h) + 0.5) * 2**l, (np.arange(w) + 0.5) * 2**l, indexing='ij')
    features.append(jnp.asarray(np.stack([cx, cy, np.full_like(cx, l)], -1)[None], jnp.float32))
  head = heads.RetinaHead(num_classes=3, num_anchors=n, width=8, num_convs=0)
  copy = np.zeros((3, 3, 3, n, 3), np.float32)  # [kh, kw, in, a, out]
  copy[1, 1, 0, :, 0] = copy[1, 1, 1, :, 1] = copy[1, 1, 2, :, 2] = 1.0
  box_copy = np.concatenate([copy, np.zeros((3, 3, 3, n, 1), np.float32)], -1)  # [kh, kw, in, a, 4]
  params = {
      'cls_net': {'out': {'kernel': copy.reshape(3, 3, 3, n * 3), 'bias': np.zeros(n * 3)}},
      'box_net': {'out': {'kernel': box_copy.reshape(3, 3, 3, n * 4),
                          'bias': np.stack([np.zeros(n)] * 3 + [np.arange(n)], -1).reshape(-1)}},
  }
  logits, deltas = jax.jit(head.apply)({'params': params}, features)
  level, centre, a_index = _anchor_index_geometry(c, canvas)
  assert logits.shape == (1, len(level), 3) and deltas.shape == (1, len(level), 4)
  np.testing.assert_allclose(logits[0, :, :2], centre, atol=1e-4)
  np.testing.assert_array_equal(logits[0, :, 2], level)
  np.testing.assert_allclose(deltas[0, :, :2], centre, atol=1e-4)
  np.testing.assert_array_equal(deltas[0, :, 3], a_index)


@pytest.mark.parametrize('canvas', [(128, 128), (256, 384)])
def test_output_shapes_match_anchor_count(canvas):
  c = _tiny()
  model = retinanet.build(c)
  images = jnp.zeros((2, *canvas, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  out = jax.eval_shape(model.apply, variables, images)
  num_anchors = sum(anchors.level_counts(canvas, c.anchors.levels, 9))
  assert out['logits'].shape == (2, num_anchors, 3) and out['logits'].dtype == jnp.float32
  assert out['deltas'].shape == (2, num_anchors, 4) and out['deltas'].dtype == jnp.float32
  assert set(variables) == {'params', 'batch_stats'}


def test_prior_bias_gives_probability_one_percent_at_init(tiny):
  _, model, images, variables = tiny
  probs = jax.nn.sigmoid(jax.jit(model.apply)(variables, images)['logits'])
  assert abs(float(probs.mean()) - 0.01) < 5e-4
  np.testing.assert_allclose(variables['params']['head']['cls_net']['out']['bias'], -np.log(99.0), rtol=1e-6)
  assert float(jnp.abs(variables['params']['head']['box_net']['out']['bias']).max()) == 0.0
  # GroupNorm heads: convs without bias, a GroupNorm before each ReLU.
  assert 'bias' not in variables['params']['head']['cls_net']['conv_0']
  assert set(variables['params']['head']['box_net']['norm_1']) == {'scale', 'bias'}


def test_parameter_counts_match_torchvision_and_detectron2():
  c = torchvision_retinanet.get_config()
  c.model.num_classes = 91  # torchvision's COCO head: 91 category-id slots
  assert _num_params(c) == 34_014_999  # torchvision docs, retinanet_resnet50_fpn
  c.model.num_classes = 80
  assert _num_params(c) == 33_786_804
  # The paper's P6 reads C5 (2048 channels): detectron2's RetinaNet R50-FPN count.
  assert _num_params(base.get_config()) == 37_915_572


def test_frozen_batchnorm_lives_in_batch_stats_and_resnext_is_grouped():
  c = base.get_config()
  c.model.backbone = 'resnext101_32x8d'
  shapes = jax.eval_shape(retinanet.build(c).init, jax.random.key(0), jnp.zeros((1, 128, 128, 3)))
  backbone = shapes['params']['backbone']
  assert 'bn1' not in backbone and set(shapes['batch_stats']['backbone']['bn1']) == {'scale', 'bias', 'mean', 'var'}
  assert backbone['layer1_0']['conv2']['kernel'].shape == (3, 3, 8, 256)  # 32 groups x 8 channels
  assert backbone['layer4_2']['conv3']['kernel'].shape == (1, 1, 2048, 2048)  # width 64 * 32
  assert shapes['params']['fpn']['p6']['kernel'].shape == (3, 3, 2048, 256)


def test_trainable_mask_and_no_gradient_below_freeze_at(tiny):
  c, model, images, variables = tiny
  mask = retinanet.trainable_mask(variables['params'], c)
  assert jax.tree.structure(mask) == jax.tree.structure(variables['params'])
  assert not mask['backbone']['conv1']['kernel'] and not mask['backbone']['layer1_1']['conv2']['kernel']
  assert mask['backbone']['layer2_0']['conv1']['kernel'] and mask['fpn']['p7']['bias']
  assert all(jax.tree.leaves(retinanet.trainable_mask(variables['params'], _tiny(freeze_at=0))))

  def loss(params):
    out = model.apply({**variables, 'params': params}, images)
    return jnp.sum(out['logits'] ** 2) + jnp.sum(out['deltas'] ** 2)

  grads = jax.jit(jax.grad(loss))(variables['params'])
  for path, g in jax.tree_util.tree_leaves_with_path(grads['backbone']):
    frozen = path[0].key in ('conv1',) or path[0].key.startswith('layer1')
    assert (float(jnp.abs(g).max()) == 0.0) == frozen, path


def test_trainable_batchnorm_updates_statistics_except_frozen_stages():
  c = _tiny(freeze_bn=False, freeze_at=2)
  model = retinanet.build(c)
  images = 3.0 + jax.random.normal(jax.random.key(1), (2, 128, 128, 3))
  variables = _init(model, images)
  assert set(variables['params']['backbone']['layer2_0']['bn1']) == {'scale', 'bias'}
  train_apply = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))
  _, updates = train_apply(variables, images)
  old, new = variables['batch_stats']['backbone'], updates['batch_stats']['backbone']
  np.testing.assert_array_equal(new['bn1']['mean'], old['bn1']['mean'])
  np.testing.assert_array_equal(new['layer1_0']['bn1']['var'], old['layer1_0']['bn1']['var'])
  assert not np.allclose(new['layer2_0']['bn1']['mean'], old['layer2_0']['bn1']['mean'])


def test_bfloat16_computes_in_bfloat16_and_returns_float32(tiny):
  c, model32, images, variables = tiny
  c = _tiny(head_norm='group', freeze_at=2, dtype='bfloat16')
  model16 = retinanet.build(c)
  shapes16 = jax.eval_shape(model16.init, jax.random.key(0), images)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes16))
  out32, out16 = jax.jit(model32.apply)(variables, images), jax.jit(model16.apply)(variables, images)
  assert out16['logits'].dtype == jnp.float32 and out16['deltas'].dtype == jnp.float32
  assert not np.array_equal(out16['logits'], out32['logits'])
  np.testing.assert_allclose(out16['logits'], out32['logits'], atol=0.05)


def test_p6_from_p5_and_fewer_levels():
  c = _tiny(p6_from='p5')
  c.anchors.levels, c.anchors.sizes = (3, 4, 5, 6), (32.0, 64.0, 128.0, 256.0)
  model = retinanet.build(c)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 128, 128, 3)))
  assert variables['params']['fpn']['p6']['kernel'].shape == (3, 3, 32, 32)
  assert 'p7' not in variables['params']['fpn']
  out = jax.eval_shape(model.apply, variables, jnp.zeros((1, 128, 128, 3)))
  assert out['logits'].shape[1] == sum(anchors.level_counts((128, 128), c.anchors.levels, 9))


@pytest.mark.parametrize('key,value,message', [
    ('backbone', 'resnet51', 'config.model.backbone'),
    ('p6_from', 'c4', 'config.model.p6_from'),
    ('head_norm', 'batch', 'config.model.head_norm'),
    ('dtype', 'float16', 'config.model.dtype'),
    ('freeze_at', 6, 'config.model.freeze_at'),
])
def test_bad_config_is_named(key, value, message):
  with pytest.raises(ValueError, match=message):
    retinanet.build(_tiny(**{key: value}))


def test_canvas_not_divisible_by_128_is_an_error():
  model = retinanet.build(_tiny())
  with pytest.raises(ValueError, match=r'divisible by 128.*\(1, 96, 128, 3\)'):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 96, 128, 3)))
