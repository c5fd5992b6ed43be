"""Anchors: hand-computed golden boxes, counts, the flat order, torchvision's integer mode."""

import math

import numpy as np
import pytest

from configs import base
from retina_jax import anchors


def test_golden_tiny_canvas():
  # 16 x 24 canvas, one level of stride 8: a 2 x 3 map, cell centres x in {4, 12, 20},
  # y in {4, 12}; a 32 px square anchor spans centre -16 .. centre +16.
  got = anchors.generate((16, 24), levels=(3,), sizes=(32.0,), scales_per_octave=1, ratios=(1.0,), offset=0.5)
  want = np.array([
      [-12, -12, 20, 20], [-4, -12, 28, 20], [4, -12, 36, 20],
      [-12, -4, 20, 28], [-4, -4, 28, 28], [4, -4, 36, 28],
  ], np.float32)
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, want)


def test_golden_scales_and_ratios_are_scale_major():
  # One 1 x 1 cell (canvas 8, level 3), centre (0, 0) with offset 0, size 8, scales
  # {1, sqrt 2}, ratios h / w in {1/4, 1}: ratio 1/4 gives h = size / 2, w = size * 2.
  got = anchors.generate((8, 8), levels=(3,), sizes=(8.0,), scales_per_octave=2, ratios=(0.25, 1.0), offset=0.0)
  s = 8 * math.sqrt(2)
  want = np.array([
      [-8, -2, 8, 2],  # scale 0, ratio 1/4
      [-4, -4, 4, 4],  # scale 0, ratio 1
      [-s, -s / 4, s, s / 4],  # scale 1, ratio 1/4
      [-s / 2, -s / 2, s / 2, s / 2],  # scale 1, ratio 1
  ], np.float32)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_two_levels_golden():
  # Canvas 8 x 8, levels 2 (2 x 2 map, stride 4) and 3 (1 x 1 map, stride 8), offset 0.5.
  got = anchors.generate((8, 8), levels=(2, 3), sizes=(4.0, 8.0), scales_per_octave=1, ratios=(1.0,), offset=0.5)
  want = np.array([
      [0, 0, 4, 4], [4, 0, 8, 4], [0, 4, 4, 8], [4, 4, 8, 8],  # level 2, row-major
      [0, 0, 8, 8],  # level 3
  ], np.float32)
  np.testing.assert_array_equal(got, want)
  assert anchors.level_counts((8, 8), (2, 3), 1) == (4, 1)


def test_paper_count_640():
  config = base.get_config()
  with config.unlocked():
    config.data.canvas = (640, 640)
  got = anchors.from_config(config)
  # (80^2 + 40^2 + 20^2 + 10^2 + 5^2) cells x 9 anchors.
  assert got.shape == (76725, 4)
  counts = anchors.level_counts((640, 640), config.anchors.levels, anchors.num_per_location(config.anchors))
  assert counts == (57600, 14400, 3600, 900, 225)


@pytest.mark.parametrize('scales', [1, 2, 3, 4])
@pytest.mark.parametrize('ratios', [(1.0,), (0.5, 1.0, 2.0)])
def test_counts_and_areas_any_scales_ratios(scales, ratios):
  got = anchors.generate((128, 256), (3, 4, 5, 6, 7), (32.0, 64.0, 128.0, 256.0, 512.0), scales, ratios, 0.5)
  n = scales * len(ratios)
  counts = anchors.level_counts((128, 256), (3, 4, 5, 6, 7), n)
  assert got.shape == (sum(counts), 4)
  # Every anchor of a cell of the first level has area (32 * 2^(k / S))^2 whatever its ratio.
  first_cell = got[:n]
  areas = (first_cell[:, 2] - first_cell[:, 0]) * (first_cell[:, 3] - first_cell[:, 1])
  want = np.repeat([(32 * 2 ** (k / scales)) ** 2 for k in range(scales)], len(ratios))
  np.testing.assert_allclose(areas, want, rtol=1e-5)


def test_order_level_y_x_a():
  levels, sizes, ratios, scales, offset = (3, 4, 5), (32.0, 64.0, 128.0), (0.5, 1.0, 2.0), 3, 0.5
  canvas = (128, 256)
  got = anchors.generate(canvas, levels, sizes, scales, ratios, offset)
  n = scales * len(ratios)
  starts = np.cumsum((0,) + anchors.level_counts(canvas, levels, n))
  rng = np.random.default_rng(0)
  for _ in range(200):
    i = rng.integers(len(levels))
    h, w = canvas[0] // 2 ** levels[i], canvas[1] // 2 ** levels[i]
    y, x, k, r = rng.integers(h), rng.integers(w), rng.integers(scales), rng.integers(len(ratios))
    size = sizes[i] * 2 ** (k / scales)
    bh, bw = size * math.sqrt(ratios[r]), size / math.sqrt(ratios[r])
    cx, cy = (x + offset) * 2 ** levels[i], (y + offset) * 2 ** levels[i]
    index = starts[i] + (y * w + x) * n + k * len(ratios) + r
    np.testing.assert_allclose(got[index], [cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], rtol=1e-6, atol=1e-4)


def test_integer_sizes_torchvision():
  # torchvision v1: sizes (32, int(32 * 2^(1/3)) = 40, int(32 * 2^(2/3)) = 50), corners of the
  # origin-centred anchor rounded; 45.25 / 2 = 22.63 -> 23, 22.63 / 2 = 11.31 -> 11.
  got = anchors.generate((8, 8), (3,), (32.0,), 3, (0.5, 1.0, 2.0), 0.0, integer_sizes=True)
  want = np.array([
      [-23, -11, 23, 11], [-16, -16, 16, 16], [-11, -23, 11, 23],
      [-28, -14, 28, 14], [-20, -20, 20, 20], [-14, -28, 14, 28],
      [-35, -18, 35, 18], [-25, -25, 25, 25], [-18, -35, 18, 35],
  ], np.float32)
  np.testing.assert_array_equal(got, want)


def test_integer_sizes_round_half_to_even():
  # int(128 * 2^(1/3)) = 161; 161 / 2 = 80.5 rounds to 80 like torch.round, not 81.
  got = anchors.generate((128, 128), (7,), (128.0,), 3, (1.0,), 0.0, integer_sizes=True)
  np.testing.assert_array_equal(got[1], [-80, -80, 80, 80])


def test_from_config_passes_integer_sizes():
  config = base.get_config()
  with config.unlocked():
    config.data.canvas = (128, 128)
    config.anchors.integer_sizes = True
    config.anchors.offset = 0.0
  np.testing.assert_array_equal(anchors.from_config(config)[0], [-23, -11, 23, 11])


@pytest.mark.parametrize('kwargs, match', [
    (dict(canvas_hw=(100, 128)), 'divisible by 128'),
    (dict(sizes=(32.0, 64.0)), 'one size per entry'),
    (dict(ratios=()), 'ratios'),
    (dict(scales_per_octave=0), 'scales_per_octave'),
])
def test_bad_input_names_the_key(kwargs, match):
  args = dict(canvas_hw=(128, 128), levels=(3, 4, 5, 6, 7), sizes=(32.0, 64.0, 128.0, 256.0, 512.0),
              scales_per_octave=3, ratios=(0.5, 1.0, 2.0), offset=0.5)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    anchors.generate(**args)
