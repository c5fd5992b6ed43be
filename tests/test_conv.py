"""The network's convolution: XLA's forward and input gradient, the CPU kernel gradient, per platform."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from retina_jax.model import conv

_NHWC = ('NHWC', 'HWIO', 'NHWC')

# (kernel, C_in, C_out, H, W, stride, groups, padding): ResNet's 1x1 (plain and the stride-2
# downsample), 3x3 (plain, stride 2 on odd and even sizes), the 7x7 stem, ResNeXt's 32-group 3x3,
# a depthwise one, and padding that is asymmetric or cuts into the image.
CASES = [
    (1, 16, 32, 8, 8, 1, 1, ((0, 0), (0, 0))),
    (1, 16, 32, 9, 10, 2, 1, ((0, 0), (0, 0))),
    (3, 8, 12, 9, 7, 1, 1, ((1, 1), (1, 1))),
    (3, 8, 12, 10, 10, 2, 1, ((1, 1), (1, 1))),
    (3, 8, 12, 11, 9, 2, 1, ((1, 1), (1, 1))),
    (7, 3, 8, 16, 16, 2, 1, ((3, 3), (3, 3))),
    (3, 64, 64, 6, 6, 1, 32, ((1, 1), (1, 1))),
    (3, 16, 32, 6, 6, 2, 32 // 2, ((1, 1), (1, 1))),
    (3, 8, 8, 6, 6, 1, 8, ((1, 1), (1, 1))),
    (3, 8, 12, 9, 7, 1, 1, ((0, 2), (2, 1))),
    (3, 8, 12, 9, 7, 1, 1, ((-1, 1), (1, 0))),
]


def _inputs(k, cin, cout, h, w, groups, dtype=jnp.float32):
  # numpy's generator: jax.random would compile a kernel per shape.
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, h, w, cin)), dtype)
  kernel = jnp.asarray(rng.normal(size=(k, k, cin // groups, cout)), dtype)
  return x, kernel


def _grads(conv_fn, x, kernel, stride, groups, padding):
  """Gradients wrt (input, kernel) of a non-linear scalar of the convolution, jitted on CPU."""
  def objective(x, kernel):
    y = conv_fn(x, kernel, (stride, stride), padding, dimension_numbers=_NHWC, feature_group_count=groups)
    return jnp.sum(jnp.sin(y.astype(jnp.float32)))
  return jax.jit(jax.grad(objective, argnums=(0, 1)))(x, kernel)


@pytest.mark.parametrize('k,cin,cout,h,w,stride,groups,padding', CASES)
def test_kernel_gradient_by_matmul_equals_xla(k, cin, cout, h, w, stride, groups, padding):
  x, kernel = _inputs(k, cin, cout, h, w, groups)
  y, vjp = jax.vjp(lambda kernel: lax.conv_general_dilated(
      x, kernel, (stride, stride), padding, dimension_numbers=_NHWC, feature_group_count=groups), kernel)
  dy = jnp.asarray(np.random.default_rng(1).normal(size=y.shape), jnp.float32)
  expected = vjp(dy)[0]
  got = jax.jit(lambda x, dy: conv.kernel_grad_matmul(x, dy, kernel.shape, (stride, stride), padding, groups))(
      x, dy)
  assert got.shape == expected.shape and got.dtype == expected.dtype
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4 * float(jnp.max(jnp.abs(expected))))


@pytest.mark.parametrize('k,cin,cout,h,w,stride,groups,padding', CASES)
def test_forward_is_xlas_own_and_gradients_equal(
    k, cin, cout, h, w, stride, groups, padding):
  x, kernel = _inputs(k, cin, cout, h, w, groups)
  apply = lambda fn: jax.jit(lambda x, kernel: fn(
      x, kernel, (stride, stride), padding, dimension_numbers=_NHWC, feature_group_count=groups))(x, kernel)
  np.testing.assert_array_equal(apply(conv.conv_general_dilated), apply(lax.conv_general_dilated))
  dx, dkernel = _grads(conv.conv_general_dilated, x, kernel, stride, groups, padding)
  dx_xla, dkernel_xla = _grads(lax.conv_general_dilated, x, kernel, stride, groups, padding)
  if k == 1 and stride > 1:  # one matrix product instead of XLA's strided gradient: summed in another order
    np.testing.assert_allclose(dx, dx_xla, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(dx_xla))))
  else:  # XLA's own, or (1x1, stride 1) the same product XLA's CPU convolution computes
    np.testing.assert_array_equal(dx, dx_xla)
  np.testing.assert_allclose(dkernel, dkernel_xla, rtol=1e-5, atol=1e-4 * float(jnp.max(jnp.abs(dkernel_xla))))


def _assert_bfloat16_kernel_gradient_near_xlas(x, kernel):
  """A padded 3x3 convolution's gradients stay bfloat16, the kernel's within bfloat16 rounding of XLA's."""
  dx, dkernel = _grads(conv.conv_general_dilated, x, kernel, 1, 1, ((1, 1), (1, 1)))
  _, dkernel_xla = _grads(lax.conv_general_dilated, x, kernel, 1, 1, ((1, 1), (1, 1)))
  assert dkernel.dtype == jnp.bfloat16 and dx.dtype == jnp.bfloat16
  scale = float(jnp.max(jnp.abs(dkernel_xla.astype(jnp.float32))))
  np.testing.assert_allclose(dkernel.astype(jnp.float32), dkernel_xla.astype(jnp.float32),
                             rtol=2e-2, atol=2e-2 * scale)


def test_bfloat16_kernel_gradient_keeps_the_kernels_dtype():
  # Twice as wide out as in, so that the matmul path is taken; accumulated in float32 like XLA's.
  x, kernel = _inputs(3, 128, 256, 4, 4, 1, jnp.bfloat16)
  assert conv.matmul_is_faster(kernel.shape, 1)
  _assert_bfloat16_kernel_gradient_near_xlas(x, kernel)


def test_which_kernels_take_the_matmul_path():
  assert conv.matmul_is_faster((1, 1, 64, 64), 1)  # any 1x1
  assert conv.matmul_is_faster((3, 3, 8, 256), 32)  # ResNeXt's grouped 3x3
  assert conv.matmul_is_faster((3, 3, 256, 720), 1)  # the classification output
  assert conv.matmul_is_faster((3, 3, 64, 128), 1)  # any output twice as wide as the input
  assert not conv.matmul_is_faster((3, 3, 256, 36), 1)  # the box output: narrow
  assert not conv.matmul_is_faster((7, 3, 3, 64), 1)  # the stem: 3 input channels
  # ResNet's layer1, the subnets' 256 -> 256: whichever this CPU timed faster.
  for shape in ((3, 3, 64, 64), (3, 3, 256, 256)):
    assert conv.matmul_is_faster(shape, 1) == conv.dense_products_win_here()


def _lowered_grad(platform, kernel_shape, groups=1):
  x = jnp.zeros((2, 8, 8, kernel_shape[2] * groups))
  kernel = jnp.zeros(kernel_shape)
  pad = ((kernel_shape[0] // 2,) * 2,) * 2
  f = lambda kernel: jnp.sum(conv.conv_general_dilated(
      x, kernel, (1, 1), pad, dimension_numbers=_NHWC, feature_group_count=groups))
  return jax.jit(jax.grad(f)).trace(kernel).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize('kernel_shape,groups', [((1, 1, 16, 32), 1), ((3, 3, 8, 256), 32)])
def test_matmul_kernel_gradient_only_on_cpu(kernel_shape, groups):
  # The gradient's only convolution-shaped work is the kernel gradient (the input is a constant).
  cpu = _lowered_grad('cpu', kernel_shape, groups)
  assert 'stablehlo.dot_general' in cpu and 'stablehlo.convolution' not in cpu
  for platform in ('cuda', 'rocm', 'tpu'):
    text = _lowered_grad(platform, kernel_shape, groups)
    assert 'stablehlo.convolution' in text and 'stablehlo.dot_general' not in text, platform


@pytest.mark.parametrize('stride', [1, 2])
def test_1x1_input_gradient_is_a_matrix_product_only_on_cpu(stride):
  kernel = jnp.zeros((1, 1, 16, 32))
  f = lambda x: jnp.sum(conv.conv_general_dilated(
      x, kernel, (stride, stride), ((0, 0), (0, 0)), dimension_numbers=_NHWC))
  lower = lambda platform: jax.jit(jax.grad(f)).trace(jnp.zeros((2, 8, 8, 16))).lower(
      lowering_platforms=(platform,)).as_text()
  cpu = lower('cpu')  # the kernel is a constant: the input gradient is the only product
  assert 'stablehlo.dot_general' in cpu and 'stablehlo.convolution' not in cpu
  for platform in ('cuda', 'rocm', 'tpu'):
    text = lower(platform)
    assert 'stablehlo.convolution' in text and 'stablehlo.dot_general' not in text, platform


def test_ungrouped_kernel_gradient_is_a_plain_matrix_product():
  # A batch axis (the group axis, even of size 1) makes XLA's CPU dot copy the patch into a
  # transposed layout first, which cost R50-FPN's train step a sixth of its time.
  cpu = _lowered_grad('cpu', (3, 3, 64, 128))
  assert cpu.count('stablehlo.dot_general') == 9 and 'batching_dims' not in cpu
  assert 'batching_dims' in _lowered_grad('cpu', (3, 3, 8, 256), 32)


def test_dense_kernels_follow_this_cpus_timing(monkeypatch):
  conv.dense_products_win_here.cache_clear()
  cpu = _lowered_grad('cpu', (3, 3, 64, 64))  # times both while the gradient is traced, once
  products = conv.dense_products_win_here()
  assert isinstance(products, bool) and conv.dense_products_win_here.cache_info().misses == 1
  assert (cpu.count('stablehlo.dot_general') == 9) == products
  assert ('stablehlo.convolution' in cpu) == (not products)
  for timed in (True, False):  # what either outcome builds, on CPU and elsewhere
    monkeypatch.setattr(conv, 'dense_products_win_here', lambda timed=timed: timed)
    cpu = _lowered_grad('cpu', (3, 3, 64, 64))
    assert (cpu.count('stablehlo.dot_general') == 9) == timed and ('stablehlo.convolution' in cpu) != timed
    cuda = _lowered_grad('cuda', (3, 3, 64, 64))
    assert 'stablehlo.convolution' in cuda and 'stablehlo.dot_general' not in cuda


@pytest.mark.parametrize('k,cin,cout,h,w,stride,groups,padding', CASES + [
    (3, 8, 12, 9, 7, 1, 1, ((4, 5), (1, 1)))])  # bands that see only padding
def test_kernel_gradient_in_row_bands_equals_xla(monkeypatch, k, cin, cout, h, w, stride, groups, padding):
  monkeypatch.setattr(conv, 'ROW_BAND_POSITIONS', 8)  # bands of one or two rows on these small maps
  monkeypatch.setattr(conv, 'ROW_BAND_MIN_CHANNELS', 1)
  x, kernel = _inputs(k, cin, cout, h, w, groups)
  y, vjp = jax.vjp(lambda kernel: lax.conv_general_dilated(
      x, kernel, (stride, stride), padding, dimension_numbers=_NHWC, feature_group_count=groups), kernel)
  assert conv.row_band(kernel.shape, y.shape[0], y.shape[1:3]) < y.shape[1]
  dy = jnp.asarray(np.random.default_rng(1).normal(size=y.shape), jnp.float32)
  expected = vjp(dy)[0]
  got = jax.jit(lambda x, dy: conv.kernel_grad_row_bands(
      x, dy, kernel.shape, (stride, stride), padding, groups))(x, dy)
  assert got.shape == expected.shape and got.dtype == expected.dtype
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(expected))))


def test_bfloat16_kernel_gradient_in_row_bands(monkeypatch):
  monkeypatch.setattr(conv, 'ROW_BAND_POSITIONS', 8)
  monkeypatch.setattr(conv, 'ROW_BAND_MIN_CHANNELS', 1)
  x, kernel = _inputs(3, 16, 16, 8, 8, 1, jnp.bfloat16)  # narrow: XLA's gradient, in bands of one row
  assert not conv.matmul_is_faster(kernel.shape, 1) and conv.row_band(kernel.shape, 2, (8, 8)) == 1
  _assert_bfloat16_kernel_gradient_near_xlas(x, kernel)


def test_row_bands_of_about_the_set_size():
  dense = (3, 3, 256, 256)
  assert conv.row_band(dense, 2, (32, 40)) == 32  # 2560 positions: two bands' worth stays whole
  assert conv.row_band(dense, 2, (64, 80)) == 8  # R50-FPN's P3 at 512 x 640: 8 bands of 1280
  assert conv.row_band(dense, 2, (100, 168)) == 7  # at 800 x 1333: capped at 16 bands
  assert conv.row_band(dense, 16, (32, 200)) == 2  # a row wider than a band: at most 16 bands still
  assert conv.row_band((3, 3, 64, 64), 2, (64, 80)) == 64  # narrow: one piece (the demo's layers)


def test_large_map_kernel_gradient_in_bands_only_on_cpu(monkeypatch):
  monkeypatch.setattr(conv, 'ROW_BAND_POSITIONS', 16)  # 2 x 8 x 8 outputs: bands of one row
  monkeypatch.setattr(conv, 'ROW_BAND_MIN_CHANNELS', 16)
  cpu = _lowered_grad('cpu', (3, 3, 16, 16))  # narrow: XLA's gradient on CPU too
  assert cpu.count('stablehlo.convolution') == 8 and 'stablehlo.dot_general' not in cpu
  for platform in ('cuda', 'rocm', 'tpu'):
    assert _lowered_grad(platform, (3, 3, 16, 16)).count('stablehlo.convolution') == 1, platform


def test_narrow_kernel_keeps_xlas_gradient_on_cpu_too():
  cpu = _lowered_grad('cpu', (3, 3, 16, 16))
  assert 'stablehlo.convolution' in cpu and 'stablehlo.dot_general' not in cpu


def test_anything_unusual_goes_to_lax_unchanged():
  x, kernel = _inputs(3, 4, 6, 8, 8, 1)
  dilated = conv.conv_general_dilated(x, kernel, (1, 1), 'SAME', rhs_dilation=(2, 2),
                                      dimension_numbers=_NHWC)
  np.testing.assert_array_equal(dilated, lax.conv_general_dilated(
      x, kernel, (1, 1), 'SAME', rhs_dilation=(2, 2), dimension_numbers=_NHWC))
