"""The network's convolution: XLA's forward, and a faster kernel gradient on CPU.

XLA's CPU backend can compute a convolution's kernel gradient (a correlation of the
input with the output gradient, whose "window" is the whole feature map) many times
slower than the forward convolution of the same size; on GPU and TPU it is fine.
The kernel gradient is a sum over output positions of (input patch)^T @ (output
gradient), so on CPU it is computed here as one matrix product per kernel tap (k*k
products of [P, C_in]^T @ [P, C_out], P = B * H_out * W_out), which runs at the
speed of the matrix multiply, for the kernels where that measured faster
(`matmul_is_faster`). How much faster depends on the CPU: on one machine the
products won 3-4x on every dense 3x3 kernel of R50-FPN, on an AVX-512 AMD EPYC
they lost 1.2-1.4x there (XLA's own is within 1.4x of its forward), so for those
kernels the choice is timed once per process (`dense_products_win_here`). Where XLA's
own kernel gradient is kept on CPU, it runs on bands of output rows, summed
(`kernel_grad_row_bands`): it slows down faster than the map grows. The input
gradient of an unpadded 1x1 kernel is one matrix product too (`input_grad_1x1_matmul`);
every other input gradient and the forward pass are XLA's own, unchanged, and every
other backend keeps XLA's gradients: the choice is made when the step is compiled,
per platform (`lax.platform_dependent`), so nothing needs configuring.
experiments/bench_backward.py times both paths side by side.

Use: `nn.Conv(..., conv_general_dilated=conv.conv_general_dilated)`, a drop-in for
`lax.conv_general_dilated` with the same parameters and forward numbers.
"""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_NHWC = ('NHWC', 'HWIO', 'NHWC')

# Read when a gradient is traced. Only experiments/bench_backward.py turns it off, to time XLA's own
# CPU gradients beside this module's in the same process.
matmul_grads_on_cpu = True

# XLA's CPU kernel gradient of a 3x3 kernel took 1.5x its forward on R50-FPN's P3 (2 x 64 x 80 x 256)
# and 3x on an 800-pixel image's P3 (2 x 100 x 168), but ~1.15x on maps of 1-3k positions
# (B * H_out * W_out), so larger maps are cut into bands of rows of about this many positions:
# 256->256 at 2 x 64 x 80 took 95 -> 72 ms, at 2 x 100 x 168 755 -> 254 ms, 128->128 at 2 x 64 x 80
# 26 -> 20 ms (AVX-512 EPYC, 2 cores). Bands of 640-2700 positions all came within 10% of the best;
# under ~300 each call's overhead lost. MAX_ROW_BANDS bounds the program's size on large images.
ROW_BAND_POSITIONS = 1280
MAX_ROW_BANDS = 16
# 64 -> 64 at 2 x 128 x 128 gained nothing (27 -> 26 ms); the demo's narrow layers keep one piece.
ROW_BAND_MIN_CHANNELS = 128


def _lax_conv(x, kernel, strides, padding, groups):
  return lax.conv_general_dilated(
      x, kernel, strides, padding, dimension_numbers=_NHWC, feature_group_count=groups)


def kernel_grad_matmul(x, dy, kernel_shape, strides, padding, groups):
  """Kernel gradient of an NHWC convolution as k_h * k_w matrix products.

  Args:
    x: [B, H, W, C_in] the convolution's input.
    dy: [B, H_out, W_out, C_out] the gradient of its output.
    kernel_shape: (k_h, k_w, C_in / groups, C_out).
    strides: (s_h, s_w).
    padding: ((lo_h, hi_h), (lo_w, hi_w)), as given to the convolution.
    groups: feature_group_count.
  Returns:
    [k_h, k_w, C_in / groups, C_out] in the kernel's dtype, what XLA's gradient gives.
  """
  kh, kw, cig, co = kernel_shape
  b, ho, wo, _ = dy.shape
  (lo_h, hi_h), (lo_w, hi_w) = padding
  # lax.pad takes negative padding too, so any padding the convolution accepts works here.
  xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (lo_h, hi_h, 0), (lo_w, hi_w, 0), (0, 0, 0)))
  dy = dy.reshape(b * ho * wo, groups, co // groups)  # [P, G, C_out / G]
  taps = []
  for i in range(kh):
    for j in range(kw):
      patch = window_tap(xp, i, j, (ho, wo), strides)  # [B, H_out, W_out, C_in]
      taps.append(_sum_over_positions(patch.reshape(b * ho * wo, groups, cig), dy))
  grad = jnp.stack(taps).reshape(kh, kw, groups, cig, co // groups)
  # HWIO of a grouped convolution: output channel g * (C_out / G) + o belongs to group g.
  return grad.transpose(0, 1, 3, 2, 4).reshape(kernel_shape)


def row_band(kernel_shape, batch, out_hw):
  """Output rows per band for `kernel_grad_row_bands`: all of them for a map of at most two bands
  or a kernel under ROW_BAND_MIN_CHANNELS on either side."""
  (ho, wo), (_, _, cig, co) = out_hw, kernel_shape
  if batch * ho * wo <= 2 * ROW_BAND_POSITIONS or min(cig, co) < ROW_BAND_MIN_CHANNELS:
    return ho
  return max(ROW_BAND_POSITIONS // (batch * wo), -(-ho // MAX_ROW_BANDS), 1)


def kernel_grad_row_bands(x, dy, kernel_shape, strides, padding, groups):
  """XLA's kernel gradient summed over bands of output rows (`row_band` rows each).

  Band [r0, r1) of the output reads input rows [r0 * s_h - lo_h, (r1 - 1) * s_h + k_h - lo_h);
  the part of that range outside the input is the band's own zero padding, so each band is
  XLA's gradient of a smaller convolution and the bands' sum is the whole gradient, rounded
  in another order.

  Args: as `kernel_grad_matmul`.
  Returns:
    [k_h, k_w, C_in / groups, C_out] in dy's dtype, as XLA's.
  """
  kh, h = kernel_shape[0], x.shape[1]
  b, ho, wo, _ = dy.shape
  sh = strides[0]
  (lo_h, _), padding_w = padding
  rows = row_band(kernel_shape, b, (ho, wo))
  grad = None
  for r0 in range(0, ho, rows):
    r1 = min(r0 + rows, ho)
    top, bottom = r0 * sh - lo_h, (r1 - 1) * sh + kh - lo_h
    first, end = max(top, 0), min(bottom, h)
    if end <= first:  # the band sees only padding: no gradient
      continue
    band = _kernel_grad_xla(x[:, first:end], dy[:, r0:r1], kernel_shape, strides,
                            ((first - top, bottom - end), padding_w), groups).astype(jnp.float32)
    grad = band if grad is None else grad + band  # summed in float32 for a bfloat16 network
  return jnp.zeros(kernel_shape, dy.dtype) if grad is None else grad.astype(dy.dtype)


def input_grad_1x1_matmul(dy, kernel, x_shape, strides):
  """Input gradient of an unpadded, ungrouped 1x1 convolution as one matrix product.

  Each output pixel took one input pixel (every s-th), so the gradient there is dy @ W^T and
  zero between. On XLA's CPU backend the product ran 1.1-2.1x faster than XLA's gradient
  convolution of R50-FPN's 1x1 layers (bench_backward's table), with the same numbers
  where the stride is 1.

  Args:
    dy: [B, H_out, W_out, C_out] the gradient of the convolution's output.
    kernel: [1, 1, C_in, C_out].
    x_shape: (B, H, W, C_in) of the convolution's input.
    strides: (s_h, s_w).
  Returns:
    [B, H, W, C_in] in dy's dtype.
  """
  _, ho, wo, _ = dy.shape
  (_, h, w, _), (sh, sw) = x_shape, strides
  matrix = kernel[0, 0].astype(dy.dtype)  # [C_in, C_out]
  dx = lax.dot_general(dy, matrix, (((3,), (1,)), ((), ())),  # [B, H_out, W_out, C_in]
                       preferred_element_type=jnp.float32).astype(dy.dtype)
  if (sh, sw) == (1, 1):
    return dx
  # Strided: the products land on rows and columns 0, s, 2s, ... of the input, zeros between and after.
  return lax.pad(dx, jnp.zeros((), dx.dtype),
                 ((0, 0, 0), (0, h - (ho - 1) * sh - 1, sh - 1), (0, w - (wo - 1) * sw - 1, sw - 1), (0, 0, 0)))


def window_tap(xp, i, j, out_hw, strides):
  """[B, H_out, W_out, C]: the pixels of the padded map xp [B, H, W, C] that tap (i, j) of a window sees at every output."""
  (ho, wo), (sh, sw) = out_hw, strides
  end = (xp.shape[0], i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, xp.shape[3])
  return lax.slice(xp, (0, i, j, 0), end, (1, sh, sw, 1))


def _sum_over_positions(patch, dy):
  """[G, C_in / G, C_out / G] = sum over P of patch[P, G, C_in / G] x dy[P, G, C_out / G].

  Without groups it is one 2-D product contracting both operands' leading axis, which XLA's
  CPU matrix multiply reads in place. With a group axis it becomes a batched product, for
  which XLA first copies `patch` into a transposed layout (a copy that, fused with the
  elementwise op that made `patch`, took up to 9x longer than the product in R50-FPN).
  """
  if patch.shape[1] == 1:
    return lax.dot_general(patch[:, 0], dy[:, 0], (((0,), (0,)), ((), ())),
                           preferred_element_type=jnp.float32)[None]
  return lax.dot_general(patch, dy, (((0,), (0,)), ((1,), (1,))), preferred_element_type=jnp.float32)


def matmul_is_faster(kernel_shape, groups):
  """Whether `kernel_grad_matmul` beats XLA's CPU kernel gradient for this kernel.

  Measured per layer of R50-FPN and of the demo on two CPUs (experiments/bench_backward.py,
  README "Benchmarks"). On both, a 1x1 kernel (one matrix product) wins 2-10x, a grouped
  kernel by orders of magnitude (XLA's grouped kernel gradient takes seconds), and a k x k
  kernel whose output is at least twice as wide as its input (the classification output,
  256 -> 720) 2-4.5x; a kernel under 64 channels on either side loses up to 5x, its k * k
  products being too thin (the 256 -> 36 box output, the demo's 16-32-wide layers, the 7x7
  stem on 3 channels). The other dense k x k kernels (ResNet's 3x3, the FPN's and the
  subnets' 256 -> 256) won 1.0-4.5x on one CPU and lost 1.2-1.4x on another, so for them this
  CPU's timing decides (`dense_products_win_here`).

  Args:
    kernel_shape: (k_h, k_w, C_in / groups, C_out).
    groups: feature_group_count.
  """
  kh, kw, cig, co = kernel_shape
  if kh * kw == 1 or groups > 1:
    return True
  if min(cig, co) < 64:
    return False
  return co >= 2 * cig or dense_products_win_here()


@functools.cache
def dense_products_win_here():
  """Whether, on this process's CPU, the tap products clearly beat XLA's dense 3x3 kernel gradient.

  Times both (best of 3 after a warm-up, about a second, once per process) on a 3x3
  64 -> 64 kernel at 4 x 64 x 64, XLA's as the CPU branch runs it (`kernel_grad_row_bands`).
  At 2 x 128 x 128 XLA's (in one piece) took 320 ms against the products' 90 on one CPU,
  26 against 56 on another. Called while a train step is traced, so it runs
  compiled executables directly. The products must win by 25%, so a CPU where both are
  close keeps XLA's own and the choice does not flip from run to run. Nothing is timed on
  an accelerator (the CPU branch is never used there) nor in a run of several processes,
  which must all compile the same program: those keep XLA's own.
  """
  if jax.default_backend() != 'cpu':
    return True
  if jax.process_count() > 1:
    return False
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 64, 64, 64)).astype(np.float32)
  dy = rng.normal(size=(4, 64, 64, 64)).astype(np.float32)
  args = ((3, 3, 64, 64), (1, 1), ((1, 1), (1, 1)), 1)
  seconds = []
  for fn in (kernel_grad_row_bands, kernel_grad_matmul):
    compiled = jax.jit(lambda x, dy, fn=fn: fn(x, dy, *args)).lower(x, dy).compile()
    jax.block_until_ready(compiled(x, dy))
    runs = []
    for _ in range(3):
      start = time.perf_counter()
      jax.block_until_ready(compiled(x, dy))
      runs.append(time.perf_counter() - start)
    seconds.append(min(runs))
  xla_s, products_s = seconds
  return xla_s > 1.25 * products_s


def _kernel_grad_xla(x, dy, kernel_shape, strides, padding, groups):
  kernel = jnp.zeros(kernel_shape, dy.dtype)
  _, vjp = jax.vjp(lambda k: _lax_conv(x, k, strides, padding, groups), kernel)
  return vjp(dy)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, kernel, strides, padding, groups):
  return _lax_conv(x, kernel, strides, padding, groups)


def _conv_fwd(x, kernel, strides, padding, groups):
  return _lax_conv(x, kernel, strides, padding, groups), (x, kernel)


def _conv_bwd(strides, padding, groups, residuals, dy):
  x, kernel = residuals
  input_grad_xla = lambda dy: jax.vjp(
      lambda x: _lax_conv(x, kernel, strides, padding, groups), x)[1](dy)[0]
  args = (kernel.shape, strides, padding, groups)
  if not matmul_grads_on_cpu:
    return input_grad_xla(dy), _kernel_grad_xla(x, dy, *args)
  if kernel.shape[:2] == (1, 1) and groups == 1 and padding == ((0, 0), (0, 0)):
    dx = lax.platform_dependent(
        dy, cpu=lambda dy: input_grad_1x1_matmul(dy, kernel, x.shape, strides).astype(x.dtype),
        default=input_grad_xla)
  else:
    dx = input_grad_xla(dy)
  if not matmul_is_faster(kernel.shape, groups):
    return dx, lax.platform_dependent(
        x, dy, cpu=lambda x, dy: kernel_grad_row_bands(x, dy, *args),
        default=lambda x, dy: _kernel_grad_xla(x, dy, *args))
  dkernel = lax.platform_dependent(
      x, dy, cpu=lambda x, dy: kernel_grad_matmul(x, dy, *args).astype(kernel.dtype),
      default=lambda x, dy: _kernel_grad_xla(x, dy, *args))
  return dx, dkernel


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None):
  """`lax.conv_general_dilated` for nn.Conv, with the CPU kernel gradient of this module.

  Takes the 2-D NHWC / HWIO convolutions with explicit padding the network uses;
  anything else (dilation, other layouts, 'SAME' padding, a precision) goes to
  lax.conv_general_dilated as it is, so no call can get a wrong answer here.
  """
  plain = (lhs.ndim == 4 and not isinstance(padding, str) and precision is None
           and all(d in (None, 1) for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
           and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
           == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
  if not plain:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, precision=precision)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  return _conv(lhs, rhs, tuple(window_strides), padding, feature_group_count)
