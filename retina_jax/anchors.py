"""Anchor boxes of all pyramid levels as one static numpy array, computed once.

Order (the heads flatten their outputs in exactly this order):
  level (first level of `levels` first), then cell row y, then cell column x,
  then the anchor a of that cell, a = scale_index * num_ratios + ratio_index.
For level l with feature map (h, w) = (H // 2**l, W // 2**l) and n anchors per
cell, the anchor of cell (y, x) and index a has flat index
  start_l + (y * w + x) * n + a,
where start_l is the number of anchors of the levels before l (`level_counts`).

Geometry: level l has stride s = 2**l. The anchor with scale index k and ratio
r (= height / width) in cell (y, x) is centred at ((x + offset) * s,
(y + offset) * s); its size is sizes[i] * 2**(k / scales_per_octave) for the
i-th level, its height size * sqrt(r) and width size / sqrt(r), so its area is
size**2 whatever the ratio. Boxes are (x1, y1, x2, y2) float32 pixels.

`integer_sizes=True` reproduces torchvision v1's anchors (to load its weights):
sizes are truncated to int and the corners of the anchor centred at the origin
are rounded to whole pixels, half to even, computed in float32 as torch does.
The order stays ours (scale-major), unlike torchvision's ratio-major order.
"""

import numpy as np

from retina_jax import errors


def num_per_location(anchor_config):
  """Anchors per feature-map cell: scales_per_octave * len(ratios).

  Args:
    anchor_config: config.anchors (scales_per_octave, ratios).
  """
  return int(anchor_config.scales_per_octave) * len(anchor_config.ratios)


def level_counts(canvas_hw, levels, num_per_location):  # pylint: disable=redefined-outer-name
  """Anchors per level, in the order of `levels`.

  Args:
    canvas_hw: (H, W) canvas size in pixels.
    levels: pyramid levels, level l has stride 2**l.
    num_per_location: anchors per cell.
  Returns:
    tuple of ints, (H // 2**l) * (W // 2**l) * num_per_location per level.
  """
  height, width = canvas_hw
  return tuple((height // 2**l) * (width // 2**l) * num_per_location for l in levels)


def _check(canvas_hw, levels, sizes, scales_per_octave, ratios):
  """Raises errors.BadValue, naming the config key, for arguments `generate` cannot use."""
  if len(canvas_hw) != 2 or min(canvas_hw) <= 0:
    raise errors.bad_config('data.canvas', tuple(canvas_hw), 'must be (height, width) > 0')
  if not levels or list(levels) != sorted(set(levels)) or levels[0] < 1:
    raise errors.bad_config('anchors.levels', levels, 'must be increasing integers >= 1')
  if len(sizes) != len(levels) or min(sizes) <= 0:
    raise errors.bad_config('anchors.sizes', sizes, f'must be {len(levels)} positive sizes, one size per '
                            f'entry of anchors.levels {levels}')
  if int(scales_per_octave) != scales_per_octave or scales_per_octave < 1:
    raise errors.bad_config('anchors.scales_per_octave', scales_per_octave, 'must be an integer >= 1')
  if not ratios or min(ratios) <= 0:
    raise errors.bad_config('anchors.ratios', ratios, 'must be positive h/w ratios')
  stride = 2**max(levels)
  if canvas_hw[0] % stride or canvas_hw[1] % stride:
    # The network's stride-2 convolutions would round the feature maps up and the
    # number of anchors would no longer match the heads' outputs.
    raise errors.bad_config('anchors.levels', levels, f'the canvas {tuple(canvas_hw)} (config.data.canvas '
                            f'or data.buckets) must be divisible by {stride}, the stride of level {max(levels)}')


def check(config, canvases):
  """Raises errors.BadValue naming the first bad value of config.anchors.

  Args:
    config: the run config.
    canvases: every (H, W) canvas the data pads images to (data.pipeline.canvases).
  """
  a = config.anchors
  errors.check_range('anchors.offset', a.offset, 0.0, 1.0)
  for canvas in canvases:
    _check(canvas, tuple(a.levels), tuple(a.sizes), a.scales_per_octave, tuple(a.ratios))


def _half_extents(size, scales_per_octave, ratios, integer_sizes):
  """Half widths and half heights of one level's anchors of one cell.

  Returns:
    (half_w, half_h), each [n] float64 in order a = scale_index * num_ratios + ratio_index.
  """
  # Python floats, so that int() truncates exactly the values torchvision computes.
  scaled = [size * 2.0 ** (k / scales_per_octave) for k in range(scales_per_octave)]
  if integer_sizes:
    scaled = np.array([int(s) for s in scaled], np.float32)  # [S]
    h_ratio = np.sqrt(np.asarray(ratios, np.float32))  # [R]
    w_ratio = np.float32(1.0) / h_ratio
    # np.round rounds half to even, like torch.round.
    half_w = np.round(scaled[:, None] * w_ratio[None, :] / np.float32(2.0))  # [S, R]
    half_h = np.round(scaled[:, None] * h_ratio[None, :] / np.float32(2.0))  # [S, R]
  else:
    scaled = np.asarray(scaled, np.float64)  # [S]
    sqrt_r = np.sqrt(np.asarray(ratios, np.float64))  # [R]
    half_w = scaled[:, None] / sqrt_r[None, :] / 2.0  # [S, R]
    half_h = scaled[:, None] * sqrt_r[None, :] / 2.0  # [S, R]
  return half_w.reshape(-1).astype(np.float64), half_h.reshape(-1).astype(np.float64)  # [S * R]


def generate(canvas_hw, levels, sizes, scales_per_octave, ratios, offset, integer_sizes=False):
  """All anchors of a canvas, in the order of the module docstring.

  Args:
    canvas_hw: (H, W) canvas in pixels, divisible by 2**max(levels).
    levels: pyramid levels, e.g. (3, 4, 5, 6, 7); level l has stride 2**l.
    sizes: base anchor size per level (the side of the ratio-1 anchor at scale 0).
    scales_per_octave: S, scales 2**(k / S) for k = 0..S-1.
    ratios: aspect ratios height / width.
    offset: cell centre in units of the stride (0.5: centre of the cell, 0: its corner).
    integer_sizes: torchvision v1's truncated sizes and rounded corners.
  Returns:
    [A, 4] float32 (x1, y1, x2, y2), A = sum over levels of
    (H // 2**l) * (W // 2**l) * S * len(ratios).
  """
  levels, sizes, ratios = tuple(levels), tuple(sizes), tuple(ratios)
  _check(canvas_hw, levels, sizes, scales_per_octave, ratios)
  scales_per_octave = int(scales_per_octave)
  height, width = canvas_hw
  per_level = []
  for level, size in zip(levels, sizes):
    stride = 2**level
    half_w, half_h = _half_extents(float(size), scales_per_octave, ratios, integer_sizes)  # [n]
    cy = (np.arange(height // stride) + offset) * stride  # [h]
    cx = (np.arange(width // stride) + offset) * stride  # [w]
    cy, cx = cy[:, None, None], cx[None, :, None]  # [h, 1, 1], [1, w, 1]
    boxes = np.stack(np.broadcast_arrays(cx - half_w, cy - half_h, cx + half_w, cy + half_h), axis=-1)  # [h, w, n, 4]
    per_level.append(boxes.reshape(-1, 4))  # [h * w * n, 4]
  return np.concatenate(per_level, axis=0).astype(np.float32)


def from_config(config, canvas_hw=None):
  """Anchors for a canvas (default config.data.canvas) and config.anchors: [A, 4] float32.

  Every canvas (each size bucket) gets its own; this is the one place that builds them.
  """
  a = config.anchors
  return generate(
      tuple(canvas_hw or config.data.canvas), a.levels, a.sizes, a.scales_per_octave, a.ratios, a.offset,
      integer_sizes=bool(a.integer_sizes))
