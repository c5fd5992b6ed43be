"""Loading torchvision checkpoints, tested on random state dicts with torchvision's key names and shapes.

The key lists are written here from the torchvision architectures (ResNet, FPN with
LastLevelP6P7, RetinaNetHead), independently of our module names.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from configs import base
from configs import torchvision_retinanet
from retina_jax.data import coco
from retina_jax.model import resnet
from retina_jax.model import retinanet
from retina_jax.model import torchvision_weights as tvw


def _bn_keys(keys, name, channels, tracked):
  for leaf in ('weight', 'bias', 'running_mean', 'running_var'):
    keys[f'{name}.{leaf}'] = (channels,)
  if tracked:  # torch.nn.BatchNorm2d checkpoints; FrozenBatchNorm2d ones have none
    keys[f'{name}.num_batches_tracked'] = ()


def _resnet_keys(prefix, bottleneck, blocks, tracked):
  keys = {prefix + 'conv1.weight': (64, 3, 7, 7)}
  _bn_keys(keys, prefix + 'bn1', 64, tracked)
  cin = 64
  for stage, num_blocks in enumerate(blocks, start=1):
    planes = 64 * 2**(stage - 1)
    cout = planes * 4 if bottleneck else planes
    for i in range(num_blocks):
      name = f'{prefix}layer{stage}.{i}'
      if bottleneck:
        convs = [(planes, cin, 1), (planes, planes, 3), (cout, planes, 1)]
      else:
        convs = [(planes, cin, 3), (planes, planes, 3)]
      for j, (o, ci, k) in enumerate(convs, start=1):
        keys[f'{name}.conv{j}.weight'] = (o, ci, k, k)
        _bn_keys(keys, f'{name}.bn{j}', o, tracked)
      if i == 0 and cin != cout or i == 0 and stage > 1:
        keys[f'{name}.downsample.0.weight'] = (cout, cin, 1, 1)
        _bn_keys(keys, f'{name}.downsample.1', cout, tracked)
      cin = cout
  return keys


def _retinanet_keys(num_classes=91, old_layout=False, v2=False):
  """torchvision retinanet_resnet50_fpn: 9 anchors, 4 convs per subnet.

  v1: P6 from P5, convs with bias. v2: P6 from C5, each head conv without bias + GroupNorm(32).
  """
  keys = _resnet_keys('backbone.body.', True, (3, 4, 6, 3), tracked=False)
  wrap = '' if old_layout else '.0'
  for i, c in enumerate((512, 1024, 2048)):
    keys[f'backbone.fpn.inner_blocks.{i}{wrap}.weight'] = (256, c, 1, 1)
    keys[f'backbone.fpn.layer_blocks.{i}{wrap}.weight'] = (256, 256, 3, 3)
  keys['backbone.fpn.extra_blocks.p6.weight'] = (256, 2048 if v2 else 256, 3, 3)
  keys['backbone.fpn.extra_blocks.p7.weight'] = (256, 256, 3, 3)
  for head, out, channels in (('classification_head', 'cls_logits', 9 * num_classes),
                              ('regression_head', 'bbox_reg', 9 * 4)):
    for i in range(4):
      keys[f'head.{head}.conv.{2 * i if old_layout else f"{i}.0"}.weight'] = (256, 256, 3, 3)
    keys[f'head.{head}.{out}.weight'] = (channels, 256, 3, 3)
  for name, shape in list(keys.items()):
    if 'fpn' in name or 'head' in name and not (v2 and '.conv.' in name):
      keys[name.replace('.weight', '.bias')] = shape[:1]
    if v2 and '.conv.' in name:
      keys[name.replace('.0.weight', '.1.weight')] = keys[name.replace('.0.weight', '.1.bias')] = shape[:1]
  return keys


def _random_state(keys, seed=0):
  rng = np.random.default_rng(seed)
  state = {}
  for name, shape in keys.items():
    if name.endswith('num_batches_tracked'):
      state[name] = np.array(100, np.int64)
    elif name.endswith('running_var'):
      state[name] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    else:
      state[name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
  return state


def _zero_variables(config, canvas=(128, 128)):
  shapes = jax.eval_shape(retinanet.build(config).init, jax.random.key(0), jnp.zeros((1, *canvas, 3)))
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def _hwio(w):
  return np.transpose(w, (2, 3, 1, 0))


def _torch_conv(x_nchw, w_oihw, stride, pad):
  """PyTorch's Conv2d in its own layout: NCHW input, OIHW weight, symmetric padding."""
  return jax.lax.conv_general_dilated(
      x_nchw, w_oihw, (stride, stride), ((pad, pad), (pad, pad)), dimension_numbers=('NCHW', 'OIHW', 'NCHW'),
      precision=jax.lax.Precision.HIGHEST)


@pytest.fixture(scope='module')
def resnet18_npz(tmp_path_factory):
  keys = _resnet_keys('', False, (2, 2, 2, 2), tracked=True)
  keys.update({'fc.weight': (1000, 512), 'fc.bias': (1000,)})
  state = _random_state(keys)
  path = tmp_path_factory.mktemp('tv') / 'resnet18.npz'
  np.savez(path, **state)
  config = base.get_config()
  config.model.backbone = 'resnet18'
  return config, state, str(path)


def test_backbone_convolutions_and_frozen_bn_compute_what_torch_means(resnet18_npz, caplog):
  config, state, path = resnet18_npz
  zeros = _zero_variables(config)
  with caplog.at_level(logging.WARNING):
    variables = tvw.load_torchvision_backbone(path, zeros, config)
  assert 'not used' not in caplog.text  # fc.* and num_batches_tracked are expected leftovers
  np.testing.assert_array_equal(variables['params']['fpn']['p7']['kernel'], 0.0)  # untouched
  backbone = {'params': variables['params']['backbone'], 'batch_stats': variables['batch_stats']['backbone']}
  x = jax.random.normal(jax.random.key(0), (1, 64, 64, 3))
  _, inter = jax.jit(lambda v, x: resnet.ResNet('resnet18').apply(v, x, capture_intermediates=True))(backbone, x)
  inter = inter['intermediates']
  nchw = lambda a: jnp.transpose(a, (0, 3, 1, 2))
  # Stem: 7x7 stride 2, padding 3.
  conv1 = inter['conv1']['__call__'][0]
  np.testing.assert_allclose(nchw(conv1), _torch_conv(nchw(x), state['conv1.weight'], 2, 3), atol=2e-4)
  # FrozenBatchNorm2d: (x - mean) / sqrt(var + 1e-5) * weight + bias, per channel.
  bn = {k: state[f'bn1.{k}'] for k in ('weight', 'bias', 'running_mean', 'running_var')}
  expected = (conv1 - bn['running_mean']) / np.sqrt(bn['running_var'] + 1e-5) * bn['weight'] + bn['bias']
  np.testing.assert_allclose(inter['bn1']['__call__'][0], expected, atol=1e-4)
  # A stride-2 3x3 conv on an even map: where Flax's 'SAME' would pad asymmetrically.
  block_in = inter['layer1_1']['__call__'][0]
  np.testing.assert_allclose(
      nchw(inter['layer2_0']['conv1']['__call__'][0]),
      _torch_conv(nchw(block_in), state['layer2.0.conv1.weight'], 2, 1), atol=2e-4)
  np.testing.assert_array_equal(
      variables['params']['backbone']['layer2_0']['downsample_conv']['kernel'],
      _hwio(state['layer2.0.downsample.0.weight']))


def test_same_weights_from_safetensors_and_npz(resnet18_npz, tmp_path):
  config, state, npz_path = resnet18_npz
  path = str(tmp_path / 'resnet18.safetensors')
  save_file(state, path)
  zeros = _zero_variables(config)
  a = tvw.load_torchvision_backbone(path, zeros, config)
  b = tvw.load_torchvision_backbone(npz_path, zeros, config)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_missing_key_shape_mismatch_and_unused_keys_are_reported(resnet18_npz, tmp_path, caplog):
  config, state, _ = resnet18_npz
  zeros = _zero_variables(config)
  missing = dict(state)
  del missing['layer3.1.bn2.running_var']
  np.savez(tmp_path / 'missing.npz', **missing)
  with pytest.raises(KeyError, match=r"missing\.npz: missing key 'layer3\.1\.bn2\.running_var' \(expected shape \(256,\)\)"):
    tvw.load_torchvision_backbone(str(tmp_path / 'missing.npz'), zeros, config)
  wrong = dict(state, **{'layer2.0.conv1.weight': np.zeros((128, 64, 1, 1), np.float32)})
  np.savez(tmp_path / 'wrong.npz', **wrong)
  with pytest.raises(ValueError, match=r"'layer2\.0\.conv1\.weight' has shape \(128, 64, 1, 1\), expected \(128, 64, 3, 3\)"):
    tvw.load_torchvision_backbone(str(tmp_path / 'wrong.npz'), zeros, config)
  np.savez(tmp_path / 'extra.npz', **state, **{'extra.weight': np.zeros(3, np.float32)})
  with caplog.at_level(logging.WARNING):
    tvw.load_torchvision_backbone(str(tmp_path / 'extra.npz'), zeros, config)
  assert '1 keys not used: extra.weight' in caplog.text
  config.model.backbone_width = 32
  with pytest.raises(ValueError, match='backbone_width 64'):
    tvw.load_torchvision_backbone(str(tmp_path / 'extra.npz'), zeros, config)
  with pytest.raises(ValueError, match="unknown checkpoint format '.ckpt'"):
    (tmp_path / 'w.ckpt').write_bytes(b'')
    tvw.read_state_dict(str(tmp_path / 'w.ckpt'))


def test_non_finite_weights_are_refused_naming_file_and_key(resnet18_npz, tmp_path):
  # Issue 12: NaN values in a pretrained file were loaded silently.
  config, state, _ = resnet18_npz
  config = config.copy_and_resolve_references()
  config.model.backbone_width = 64  # an earlier test narrows the shared config
  bad = dict(state)
  bad['layer2.1.bn1.running_var'] = np.array(state['layer2.1.bn1.running_var'])
  bad['layer2.1.bn1.running_var'][[3, 7]] = [np.nan, np.inf]
  path = str(tmp_path / 'nan.npz')
  np.savez(path, **bad)
  with pytest.raises(ValueError, match=r"nan\.npz: key 'layer2\.1\.bn1\.running_var' has 2 non-finite values"):
    tvw.load_torchvision_backbone(path, _zero_variables(config), config)


def test_pth_needs_torch_only_when_used(resnet18_npz, tmp_path):
  _, state, _ = resnet18_npz
  path = str(tmp_path / 'resnet18.pth')
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    (tmp_path / 'resnet18.pth').write_bytes(b'not read')
    with pytest.raises(ImportError, match='needs PyTorch'):
      tvw.read_state_dict(path)
  else:
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}, path)
    np.testing.assert_array_equal(tvw.read_state_dict(path)['conv1.weight'], state['conv1.weight'])


def _head_conv(state, head, i, leaf):
  """Conv i of a subnet in the new (conv.i.0) or the old (conv.2i) layout."""
  return next(state[k] for k in (f'head.{head}.conv.{i}.0.{leaf}', f'head.{head}.conv.{2 * i}.{leaf}') if k in state)


def _check_whole_model(variables, state, classes):
  """Every group of leaves against the source, with the anchor permutation of the last convs."""
  p, s = variables['params'], variables['batch_stats']
  np.testing.assert_array_equal(p['backbone']['layer3_5']['conv3']['kernel'],
                                _hwio(state['backbone.body.layer3.5.conv3.weight']))
  name = 'backbone.body.layer4.0.downsample.1'
  # The COCO_V1 weights run FrozenBatchNorm with eps 0; our eps 1e-5 is folded into the scale.
  var = state[f'{name}.running_var']
  bn = s['backbone']['layer4_0']['downsample_bn']
  np.testing.assert_allclose(bn['scale'] / np.sqrt(bn['var'] + resnet.BN_EPS), state[f'{name}.weight'] / np.sqrt(var),
                             rtol=1e-6)
  np.testing.assert_array_equal(bn['mean'], state[f'{name}.running_mean'])
  x = jax.random.normal(jax.random.key(0), (4, 2048))
  y = resnet.FrozenBatchNorm().apply({'batch_stats': bn}, x)
  expected = (x - state[f'{name}.running_mean']) / np.sqrt(var) * state[f'{name}.weight'] + state[f'{name}.bias']
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
  weight = lambda key: next(state[k] for k in (key + '.0.weight', key + '.weight') if k in state)
  np.testing.assert_array_equal(p['fpn']['lateral_5']['kernel'], _hwio(weight('backbone.fpn.inner_blocks.2')))
  np.testing.assert_array_equal(p['fpn']['output_3']['kernel'], _hwio(weight('backbone.fpn.layer_blocks.0')))
  np.testing.assert_array_equal(p['fpn']['p6']['kernel'], _hwio(state['backbone.fpn.extra_blocks.p6.weight']))
  np.testing.assert_array_equal(p['head']['box_net']['conv_3']['bias'], _head_conv(state, 'regression_head', 3, 'bias'))
  np.testing.assert_array_equal(p['head']['cls_net']['conv_1']['kernel'],
                                _hwio(_head_conv(state, 'classification_head', 1, 'weight')))
  # Ours: channel (s * 3 + r) * K + k; torchvision: (r * 3 + s) * K_src + class.
  k = len(classes)
  cls_w, cls_b = state['head.classification_head.cls_logits.weight'], state['head.classification_head.cls_logits.bias']
  box_w = state['head.regression_head.bbox_reg.weight']
  k_src = cls_b.shape[0] // 9
  for s_idx in range(3):
    for r_idx in range(3):
      ours, theirs = s_idx * 3 + r_idx, r_idx * 3 + s_idx
      src = theirs * k_src + np.asarray(classes)
      np.testing.assert_array_equal(p['head']['cls_net']['out']['bias'][ours * k:(ours + 1) * k], cls_b[src])
      np.testing.assert_array_equal(p['head']['cls_net']['out']['kernel'][..., ours * k:(ours + 1) * k],
                                    _hwio(cls_w[src]))
      np.testing.assert_array_equal(p['head']['box_net']['out']['kernel'][..., ours * 4:(ours + 1) * 4],
                                    _hwio(box_w[theirs * 4:(theirs + 1) * 4]))


def test_whole_torchvision_retinanet_80_classes_from_safetensors(tmp_path, caplog):
  keys = _retinanet_keys()
  # torchvision docs; FrozenBatchNorm2d keeps its four vectors in buffers, not parameters.
  assert sum(np.prod(v) for k, v in keys.items() if len(v) == 4 or not k.startswith('backbone.body')) == 34_014_999
  state = _random_state(keys, seed=1)
  path = str(tmp_path / 'retinanet.safetensors')
  save_file(state, path)
  config = torchvision_retinanet.get_config()  # 80 classes
  with caplog.at_level(logging.WARNING):
    variables = tvw.load_torchvision_retinanet(path, _zero_variables(config), config)
  assert 'not used' not in caplog.text
  _check_whole_model(variables, state, coco.CATEGORY_IDS)
  config.model.num_classes = 20
  with pytest.raises(ValueError, match='91 classes x 9 anchors, config.model.num_classes is 20'):
    tvw.load_torchvision_retinanet(path, _zero_variables(config), config)


def test_whole_torchvision_retinanet_old_key_layout_91_classes(tmp_path):
  state = _random_state(_retinanet_keys(old_layout=True), seed=2)
  path = str(tmp_path / 'retinanet_old.npz')
  np.savez(path, **state)
  config = torchvision_retinanet.get_config()
  config.model.num_classes = 91
  variables = tvw.load_torchvision_retinanet(path, _zero_variables(config), config)
  _check_whole_model(variables, state, range(91))


def test_whole_torchvision_retinanet_v2_groupnorm_head(tmp_path):
  state = _random_state(_retinanet_keys(v2=True), seed=3)
  path = str(tmp_path / 'retinanet_v2.npz')
  np.savez(path, **state)
  config = torchvision_retinanet.get_config()
  config.model.p6_from, config.model.head_norm = 'c5', 'group'
  variables = tvw.load_torchvision_retinanet(path, _zero_variables(config), config, bn_eps=resnet.BN_EPS)
  net = variables['params']['head']['cls_net']
  assert 'bias' not in net['conv_2']
  np.testing.assert_array_equal(net['norm_2']['scale'], state['head.classification_head.conv.2.1.weight'])
  np.testing.assert_array_equal(net['norm_2']['bias'], state['head.classification_head.conv.2.1.bias'])
  np.testing.assert_array_equal(variables['params']['fpn']['p6']['kernel'],
                                _hwio(state['backbone.fpn.extra_blocks.p6.weight']))
  bn = variables['batch_stats']['backbone']['bn1']
  np.testing.assert_array_equal(bn['scale'], state['backbone.body.bn1.weight'])  # same eps: no folding
