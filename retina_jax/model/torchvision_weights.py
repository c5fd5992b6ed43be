"""Loads torchvision checkpoints: ImageNet ResNets into the backbone, or a whole retinanet_resnet50_fpn.

Files: .pth / .pt (PyTorch, imported only here and only for these), .safetensors
or .npz (no PyTorch needed), each a flat state dict {torchvision key: array}.

Conversions: conv weights OIHW -> HWIO; BatchNorm weight / bias / running_mean /
running_var -> scale / bias / mean / var. torchvision lays out a location's
anchors ratio-major (a_tv = ratio_index * num_scales + scale_index, from
AnchorGenerator's (w_ratios[:, None] * scales[None, :]).view(-1)); ours are
scale-major, so the output channels of the last class and box convs are permuted.
torchvision's COCO model has 91 classes indexed by COCO category id (0 is
background); with 80 classes the 80 used ids are picked in tfds label order.

A missing key, a shape mismatch or a non-finite value raises an error naming the
file and the key (and both shapes); keys of the file that nothing uses are logged.
"""

import os

import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from retina_jax import errors
from retina_jax.data import coco
from retina_jax.model import resnet

# torchvision's retinanet_resnet50_fpn(weights=COCO_V1) sets its FrozenBatchNorm eps to 0.
RETINANET_V1_BN_EPS = 0.0

_LEAF = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean', 'var': 'running_var'}


def read_state_dict(path):
  """Reads a checkpoint into {key: numpy array}.

  Args:
    path: .pth / .pt (needs torch), .safetensors or .npz file.
  Returns:
    dict of str -> np.ndarray.
  """
  if not os.path.exists(path):
    raise errors.NotFound(f'config.model.pretrained: no such file {path!r}')
  suffix = os.path.splitext(path)[1].lower()
  if suffix in ('.pth', '.pt'):
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise errors.MissingPackage(
          f'{path}: reading a .pth checkpoint needs PyTorch (pip install torch); without it, '
          'convert the file to .safetensors or .npz elsewhere') from e
    state = torch.load(path, map_location='cpu', weights_only=True)
    return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in state.items()}
  elif suffix == '.safetensors':
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    return dict(load_file(path))
  elif suffix == '.npz':
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  raise errors.BadValue(f'{path}: unknown checkpoint format {suffix!r}; expected .pth, .pt, .safetensors or .npz')


def _module_names(path, body):
  """Candidate torchvision names (newest layout first) of one of our modules.

  Args:
    path: our module path, e.g. ('backbone', 'layer1_0', 'downsample_conv').
    body: prefix of the ResNet's keys ('' in ImageNet files, 'backbone.body.' in RetinaNet ones).
  """
  top, *rest = path
  if top == 'backbone':
    parts = [p.replace('_', '.', 1) if p.startswith('layer') else p for p in rest]
    parts = [{'downsample_conv': 'downsample.0', 'downsample_bn': 'downsample.1'}.get(p, p) for p in parts]
    return [body + '.'.join(parts)]
  elif top == 'fpn':
    kind, level = rest[0].split('_') if '_' in rest[0] else (rest[0], '')
    if kind in ('p6', 'p7'):
      return [f'backbone.fpn.extra_blocks.{kind}']
    blocks = 'inner_blocks' if kind == 'lateral' else 'layer_blocks'
    name = f'backbone.fpn.{blocks}.{int(level) - 3}'
    return [name + '.0', name]  # torchvision >= 0.13 wraps each conv in Conv2dNormActivation
  net, layer = rest
  head = 'head.classification_head' if net == 'cls_net' else 'head.regression_head'
  kind, index = layer.split('_') if '_' in layer else (layer, '0')
  if kind == 'out':
    return [head + ('.cls_logits' if net == 'cls_net' else '.bbox_reg')]
  elif kind == 'norm':
    return [f'{head}.conv.{index}.1']
  return [f'{head}.conv.{index}.0', f'{head}.conv.{2 * int(index)}']  # new layout, then the old Sequential


def _to_scale_major(w, num_scales, num_ratios, classes):
  """Reorders a last conv's output axis from torchvision's anchor order to ours.

  Args:
    w: [A * K_src, ...] weight (OIHW) or bias, channel a_tv * K_src + k.
    classes: indices into K_src to keep, or None for all.
  Returns:
    [A * K, ...], channel a * K + k with a = scale_index * num_ratios + ratio_index.
  """
  w = w.reshape(num_ratios, num_scales, -1, *w.shape[1:])  # [R, S, K_src, ...]
  w = np.swapaxes(w, 0, 1)  # [S, R, K_src, ...]
  if classes is not None:
    w = w[:, :, np.asarray(classes)]  # [S, R, K, ...]
  return w.reshape(-1, *w.shape[3:])  # [S * R * K, ...]


def _load(state, variables, config, *, source, body, bn_eps, backbone_only, classes=None):
  """Copies `state` into the matching leaves of `variables`; see the public loaders."""
  num_scales, num_ratios = int(config.anchors.scales_per_octave), len(config.anchors.ratios)
  used, out = set(), {}
  for key, value in traverse_util.flatten_dict(variables).items():
    collection, *path = key
    if backbone_only and path[0] != 'backbone':
      out[key] = value
      continue
    where = f'{collection}/{"/".join(path)}'
    candidates = [f'{m}.{_LEAF[path[-1]]}' for m in _module_names(path[:-1], body)]
    name = next((c for c in candidates if c in state), None)
    # The expected source shape, in torch layout, for the messages.
    expected = value.shape if value.ndim != 4 else tuple(value.shape[i] for i in (3, 2, 0, 1))
    if name is None:
      raise errors.MissingKey(f'{source}: missing key {candidates[0]!r} (expected shape {expected}) for {where}')
    w = np.asarray(state[name], np.float32)
    used.add(name)
    bad = int(np.sum(~np.isfinite(w)))
    if bad:  # a NaN here would train (or evaluate) silently into NaN
      raise errors.BadValue(f'{source}: key {name!r} has {bad} non-finite values (of {w.size})')
    if path[-2] == 'out' and w.shape[0] % (num_scales * num_ratios) == 0:
      w = _to_scale_major(w, num_scales, num_ratios, classes if path[-3] == 'cls_net' else None)
    if path[-1] == 'scale' and 'bn' in path[-2] and bn_eps != resnet.BN_EPS:
      # Same output with our eps: scale / sqrt(var + eps_src) = scale' / sqrt(var + BN_EPS).
      var = np.asarray(state[name.rsplit('.', 1)[0] + '.running_var'], np.float32)
      w = w * np.sqrt(var + resnet.BN_EPS) / np.sqrt(var + bn_eps)
    if w.ndim == 4:
      w = w.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if w.shape != value.shape:
      raise errors.BadValue(
          f'{source}: key {name!r} has shape {tuple(state[name].shape)}, expected {expected} for {where}')
    out[key] = jnp.asarray(w, value.dtype)
  unused = sorted(k for k in state if k not in used and not k.endswith('num_batches_tracked')
                  and not k.startswith('fc.'))
  if unused:
    logging.warning('%s: %d keys not used: %s', source, len(unused), ', '.join(unused))
  return traverse_util.unflatten_dict(out)


def _check_width(config, path):
  if config.model.backbone_width != 64:
    raise errors.BadValue(
        f'{path}: torchvision weights need config.model.backbone_width 64, got {config.model.backbone_width}')


def load_torchvision_backbone(path, variables, config, *, bn_eps=resnet.BN_EPS):
  """Loads an ImageNet torchvision ResNet / ResNeXt checkpoint into the backbone.

  Args:
    path: checkpoint of torchvision.models.<config.model.backbone> (keys conv1.weight,
      layer1.0.conv1.weight, ...); fc.* is ignored.
    variables: {'params', 'batch_stats'} of `retinanet.build(config)`.
    config: the run config (model.backbone_width must be 64).
    bn_eps: the checkpoint's BatchNorm eps (torchvision: 1e-5).
  Returns:
    variables with the backbone replaced; FPN and heads untouched.
  """
  _check_width(config, path)
  return _load(read_state_dict(path), variables, config, source=path, body='', bn_eps=bn_eps,
               backbone_only=True)


def load_torchvision_retinanet(path, variables, config, *, bn_eps=RETINANET_V1_BN_EPS, class_indices=None):
  """Loads a whole torchvision retinanet_resnet50_fpn state dict (v1 head, or GroupNorm v2 head).

  Args:
    path: checkpoint with keys backbone.body.*, backbone.fpn.*, head.classification_head.*,
      head.regression_head.* (both the conv.0.0 and the older conv.0 head layouts).
    variables: {'params', 'batch_stats'} of `retinanet.build(config)`.
    config: the run config; model.p6_from must match the file ('p5' for torchvision v1).
    bn_eps: the checkpoint's FrozenBatchNorm eps (0 for torchvision's COCO_V1 weights).
    class_indices: for each of our K classes, the checkpoint's class index. None: all
      classes when the counts match, coco.CATEGORY_IDS for 91 -> 80.
  Returns:
    variables with every leaf replaced.
  """
  _check_width(config, path)
  state = read_state_dict(path)
  num_anchors = int(config.anchors.scales_per_octave) * len(config.anchors.ratios)
  bias = state.get('head.classification_head.cls_logits.bias')
  k = config.model.num_classes
  if class_indices is None and bias is not None:
    k_src = bias.shape[0] // num_anchors
    if k_src == k:
      class_indices = range(k)
    elif k_src == 91 and k == 80:
      class_indices = coco.CATEGORY_IDS  # torchvision indexes its classes by COCO id
    else:
      raise errors.BadValue(
          f'{path}: the checkpoint has {k_src} classes x {num_anchors} anchors, config.model.num_classes '
          f'is {k}; pass class_indices to pick the classes')
  return _load(state, variables, config, source=path, body='backbone.body.', bn_eps=bn_eps,
               backbone_only=False, classes=class_indices)


# config.model.pretrained_kind -> the loader of such a file.
LOADERS = {'backbone': load_torchvision_backbone, 'retinanet': load_torchvision_retinanet}


def check(config):
  """Raises errors.BadValue unless config.model.pretrained_kind names one of LOADERS."""
  errors.check_choice('model.pretrained_kind', config.model.pretrained_kind, LOADERS)
