"""Box coder: golden offsets, weights, round trip, clamp at decode."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from retina_jax import box_coder

ANCHOR = np.array([0.0, 0.0, 10.0, 20.0], np.float32)  # centre (5, 10), size (10, 20)
BOX = np.array([2.0, 4.0, 22.0, 24.0], np.float32)  # centre (12, 14), size (20, 20)


def test_encode_golden():
  # dx = 7 / 10, dy = 4 / 20, dw = log(20 / 10), dh = log(20 / 20).
  np.testing.assert_allclose(box_coder.encode(BOX, ANCHOR), [0.7, 0.2, math.log(2.0), 0.0], rtol=1e-6, atol=1e-7)


def test_encode_weights_golden():
  got = box_coder.encode(BOX, ANCHOR, weights=(10.0, 10.0, 5.0, 5.0))
  np.testing.assert_allclose(got, [7.0, 2.0, 5 * math.log(2.0), 0.0], rtol=1e-6, atol=1e-6)


def test_decode_golden():
  np.testing.assert_allclose(box_coder.decode(jnp.array([0.7, 0.2, math.log(2.0), 0.0]), ANCHOR), BOX, rtol=1e-6)
  np.testing.assert_allclose(box_coder.decode(jnp.zeros(4), ANCHOR), ANCHOR)


def test_round_trip_random_with_weights():
  rng = np.random.default_rng(0)
  xy = rng.uniform(0, 500, (2, 64, 2)).astype(np.float32)
  wh = rng.uniform(4, 300, (2, 64, 2)).astype(np.float32)
  boxes, anchors = np.concatenate([xy, xy + wh], -1)  # [64, 4] each
  for weights in [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]:
    deltas = jax.jit(box_coder.encode, static_argnums=2)(boxes, anchors, weights)
    assert deltas.shape == (64, 4) and deltas.dtype == jnp.float32
    np.testing.assert_allclose(box_coder.decode(deltas, anchors, weights), boxes, rtol=1e-5, atol=1e-3)


def test_decode_clamps_dw_dh():
  # dw = 10 is clamped to log(1000 / 16): width 10 * 62.5 = 625 about the centre x = 5.
  got = box_coder.decode(jnp.array([0.0, 0.0, 10.0, 0.0]), ANCHOR)
  np.testing.assert_allclose(got, [5 - 312.5, 0.0, 5 + 312.5, 20.0], rtol=1e-5)
  # The clamp applies to dw / ww: 50 / 5 = 10 is clamped as well; a custom clamp of log 2 doubles.
  got = box_coder.decode(jnp.array([0.0, 0.0, 50.0, 0.0]), ANCHOR, weights=(1.0, 1.0, 5.0, 5.0))
  np.testing.assert_allclose(got[2] - got[0], 625.0, rtol=1e-5)
  got = box_coder.decode(jnp.array([0.0, 0.0, 3.0, 3.0]), ANCHOR, clamp=math.log(2.0))
  np.testing.assert_allclose(got, [-5.0, -10.0, 15.0, 30.0], rtol=1e-5)
  assert np.all(np.isfinite(box_coder.decode(jnp.full((4,), 1e4), ANCHOR)))


def test_bfloat16_deltas_decode_to_float32():
  got = box_coder.decode(jnp.zeros((3, 4), jnp.bfloat16), jnp.asarray(np.tile(ANCHOR, (3, 1))))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, np.tile(ANCHOR, (3, 1)))
