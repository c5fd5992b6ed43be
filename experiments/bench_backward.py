r"""Where a CPU train step's time goes: the convolutions' gradients, the network, the whole step.

  python -m experiments.bench_backward                       # per-conv table + R50-FPN 2 x 512 x 640
  python -m experiments.bench_backward --skip-network        # the per-conv table only (a minute)
  taskset -c 0 python -m experiments.bench_backward --skip-network --profile /tmp/prof   # where a step's time goes

Run it as the Makefile runs the package, with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (the
Makefile says why; without it the R50-FPN step pays ~370k page faults, 10-12% of it on a VM).

Prints, in one run and for both CPU gradient paths of retina_jax/model/conv.py
('xla': XLA's own convolution gradients everywhere; 'matmul': the package's CPU path, a matrix
product for an unpadded 1x1 kernel's input gradient and matrix products for the kernel gradients
where conv.matmul_is_faster says so, which for dense 3x3 kernels is this CPU's timing, and XLA's
kernel gradient on bands of output rows elsewhere when the map is large, conv.kernel_grad_row_bands):
  1. single convolutions (batch 2, NHWC): forward, gradient wrt the input by both paths,
     gradient wrt the kernel by XLA in one piece, in row bands and by products; and the
     stem's max pool, its gradient by XLA and by
     retina_jax/model/pool.py (which both network rows below use);
  2. R50-FPN RetinaNet, 80 classes, 2 images of 512 x 640 (the paper's model,
     freeze_at 2, frozen BatchNorm), then the demo's model and batch: forward,
     forward + backward of the network alone (gradient of a stand-in scalar), the
     full train step (matching, focal + smooth L1 loss, backward, SGD;
     experiments/bench_train.py's step), each as a multiple of the forward; and
     the rest of the step timed alone: matching + loss with its gradient wrt the
     network's outputs, and the optimizer update (with the step's finiteness
     check and gradient norm).
Times are medians of --repeats calls after one warm-up call; compile time apart. Each
program's calls run back to back, as training runs its step: on the project's VMs memory that
stays free for a second or two goes back to the host (virtio-balloon free page reporting), and
touching it again costs a fault on the host. Timed alternately with the forward (a scratch run), the R50-FPN step
took 6.3-6.7 s instead of 5.4-5.7, with 1.8-2.5 s of kernel time per pair instead of 0.3-0.45 s per step.
--profile DIR also traces one train step of each model (jax.profiler, into DIR) and prints
its time by XLA operation (fusions named by their kind: `ynn_fusion` the forward and
input-gradient convolutions, `dot_general` this module's kernel-gradient products,
`slice_bitcast_fusion` their input patches, ...) and by model part (the Flax module an
operation came from, forward or backward, or the step's code outside the model). Run it
on one core: with more threads an operation's event ends before its work on the thread
pool does.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import base
from configs import shapes
from experiments import bench_train
from retina_jax import evaluate
from retina_jax import losses
from retina_jax import sharding
from retina_jax import train
from retina_jax.model import conv
from retina_jax.model import pool
from retina_jax.model import retinanet

# (kernel, C_in, C_out, H = W, stride, groups): the three, a stride-2 3x3, the stride-2 1x1
# downsample, a ResNeXt grouped 3x3, the head's classification and box outputs, the 7x7 stem and
# one of the demo's narrow layers.
CONVS = [(3, 256, 256, 64, 1, 1), (3, 64, 64, 128, 1, 1), (1, 256, 1024, 32, 1, 1),
         (3, 128, 128, 64, 2, 1), (1, 256, 512, 64, 2, 1), (3, 256, 256, 32, 1, 32),
         (3, 256, 720, 64, 1, 1), (3, 256, 36, 64, 1, 1), (7, 3, 64, 256, 2, 1), (3, 16, 16, 32, 1, 1)]


def _median_s(fn, *args, repeats):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _with_path(path, build):
  """Traces `build()` with the CPU gradient path `path` ('xla' or 'matmul')."""
  conv.matmul_grads_on_cpu = path == 'matmul'
  try:
    return build()
  finally:
    conv.matmul_grads_on_cpu = True


def conv_table(repeats):
  print('| conv | forward ms | grad input: xla ms | grad input: matmul ms | grad kernel: xla ms | '
        'grad kernel: xla in row bands ms | grad kernel: matmul ms | xla / matmul | kernel gradient used on CPU |')
  print('|---|---|---|---|---|---|---|---|---|')
  for k, cin, cout, hw, stride, groups in CONVS:
    pad = ((k // 2, k // 2),) * 2
    key = jax.random.key(0)
    x = jax.random.normal(key, (2, hw, hw, cin))
    kernel = jax.random.normal(key, (k, k, cin // groups, cout)) * 0.01
    f = lambda x, w: conv.conv_general_dilated(
        x, w, (stride, stride), pad, dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=groups)
    dy = jax.random.normal(key, jax.eval_shape(f, x, kernel).shape)
    # The package's input gradient is XLA's except for unpadded 1x1 kernels (conv.input_grad_1x1_matmul).
    grad_x = jax.jit(lambda x, w, dy: jax.vjp(lambda x: f(x, w), x)[1](dy)[0])
    grad_x_xla = _with_path('xla', lambda: jax.jit(
        lambda x, w, dy: jax.vjp(lambda x: f(x, w), x)[1](dy)[0]).lower(x, kernel, dy).compile())
    grad_w_xla = _with_path('xla', lambda: jax.jit(
        lambda x, w, dy: jax.vjp(lambda w: f(x, w), w)[1](dy)[0]).lower(x, kernel, dy).compile())
    # The formulation itself, whether or not matmul_is_faster picks it for this kernel.
    grad_w_matmul = jax.jit(lambda x, dy: conv.kernel_grad_matmul(
        x, dy, kernel.shape, (stride, stride), pad, groups))
    grad_w_bands = jax.jit(lambda x, dy: conv.kernel_grad_row_bands(
        x, dy, kernel.shape, (stride, stride), pad, groups))
    ms = lambda fn, *a: 1000 * _median_s(fn, *a, repeats=repeats)
    fwd, gx_xla, gx = ms(jax.jit(f), x, kernel), ms(grad_x_xla, x, kernel, dy), ms(grad_x, x, kernel, dy)
    gw_xla, gw_bands, gw_mm = ms(grad_w_xla, x, kernel, dy), ms(grad_w_bands, x, dy), ms(grad_w_matmul, x, dy)
    rows, out_h = conv.row_band(kernel.shape, dy.shape[0], dy.shape[1:3]), dy.shape[1]
    used = ('matmul' if conv.matmul_is_faster(kernel.shape, groups)
            else f'xla in {-(-out_h // rows)} bands' if rows < out_h else 'xla')
    name = f'{k}x{k} {cin}->{cout} at {hw}x{hw}' + (f' /{stride}' if stride > 1 else '') + (
        f' g{groups}' if groups > 1 else '')
    print(f'| {name} | {fwd:.0f} | {gx_xla:.0f} | {gx:.0f} | {gw_xla:.0f} | {gw_bands:.0f} | {gw_mm:.0f} | '
          f'{gw_xla / gw_mm:.1f} | {used} |', flush=True)


def pool_table(repeats):
  """The stem's 3x3 / 2 max pool: forward, and its gradient by XLA (select-and-scatter) and by pool.py's taps."""
  print('\n| max pool 3x3 /2 | forward ms | gradient: xla ms | gradient: taps ms | xla / taps |\n|---|---|---|---|---|')
  window = ((3, 3), (2, 2), ((1, 1), (1, 1)))
  for name, shape in (("the demo's stem, 16 x 64 x 64 x 16", (16, 64, 64, 16)),
                      ("R50's stem, 2 x 256 x 320 x 64", (2, 256, 320, 64))):
    x = jax.nn.relu(jax.random.normal(jax.random.key(0), shape))
    y = pool.max_pool(x, *window)
    dy = jax.random.normal(jax.random.key(1), y.shape)
    xla = jax.jit(lambda x, dy: jax.vjp(lambda x: nn.max_pool(x, *window), x)[1](dy)[0])
    taps = jax.jit(lambda x, y, dy: pool.max_pool_grad_taps(x, y, dy, *window))
    ms = lambda fn, *a: 1000 * _median_s(fn, *a, repeats=repeats)
    fwd, g_xla, g_taps = ms(jax.jit(lambda x: pool.max_pool(x, *window)), x), ms(xla, x, dy), ms(taps, x, y, dy)
    print(f'| {name} | {fwd:.1f} | {g_xla:.1f} | {g_taps:.1f} | {g_xla / g_taps:.1f} |', flush=True)


def network(path, config, repeats):
  """(forward s, forward + backward s, full step s) of config's model on its random batch."""
  model = retinanet.build(config)
  batch = bench_train.random_batch(config, 0)
  images, image_hw = jnp.asarray(batch['image']), jnp.asarray(batch['image_hw'])
  variables = jax.jit(model.init)(jax.random.key(0, impl='rbg'), images[:1])

  # With image_hw, as training runs it (the padding mask, all ones on this batch).
  def objective(params, stats, x, hw):
    variables = {'params': params, 'batch_stats': stats}
    if config.model.freeze_bn:
      out = model.apply(variables, x, hw, train=True)
    else:
      out, _ = model.apply(variables, x, hw, train=True, mutable=['batch_stats'])
    return jnp.mean(out['logits'] ** 2) + jnp.mean(out['deltas'] ** 2)

  forward = jax.jit(model.apply).lower(variables, images, image_hw).compile()
  backward = _with_path(path, lambda: jax.jit(jax.grad(objective)).lower(
      variables['params'], variables['batch_stats'], images, image_hw).compile())
  fwd = _median_s(forward, variables, images, image_hw, repeats=repeats)
  bwd = _median_s(backward, variables['params'], variables['batch_stats'], images, image_hw, repeats=repeats)
  _, step = _with_path(path, lambda: bench_train.bench(config, repeats))
  return fwd, bwd, step


def rest_of_step(config, repeats):
  """(matching + loss and its gradient s, optimizer update s) of the train step, each timed alone."""
  mesh = sharding.make_mesh()
  canvas = tuple(config.data.canvas)
  anchors = evaluate.device_anchors(config, mesh, [canvas])[canvas]
  batch = bench_train.random_batch(config, 0)
  b, a, k = config.train.batch_size, anchors.shape[0], config.model.num_classes
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(-4.0, 1.0, (b, a, k)), jnp.float32)  # near the prior's -4.6
  deltas = jnp.asarray(rng.normal(0.0, 0.1, (b, a, 4)), jnp.float32)
  kwargs = losses.kwargs_from_config(config)

  def loss(logits, deltas):
    return losses.detection_loss(logits, deltas, anchors, batch['boxes'], batch['classes'],
                                 running_normalizer=jnp.float32(100.0), **kwargs)[0]

  loss_s = _median_s(jax.jit(jax.grad(loss, (0, 1))), logits, deltas, repeats=repeats)
  state, tx = train.create_train_state(config, retinanet.build(config), mesh)
  grads = jax.tree.map(jnp.ones_like, state.params)

  def update(state, grads):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return params, opt_state, train.all_finite((params, opt_state)), optax.tree.norm(grads)

  return loss_s, _median_s(jax.jit(update), state, grads, repeats=repeats)


def profile_step(config, directory):
  """One traced train step's seconds by XLA operation kind and by model part, largest first, and its wall time.

  A model part is where the operation came from: the Flax module path of its metadata
  (backbone stage, FPN, the head's two subnets; 'fwd' or 'bwd'), or the step's code outside the model.
  """
  step_fn, state, batch, anchors = bench_train.setup(config)
  compiled = step_fn.lower(state, batch, anchors).compile()
  for _ in range(2):  # warm-up
    state, metrics = compiled(state, batch, anchors)
    jax.block_until_ready(metrics)
  start = time.perf_counter()
  with jax.profiler.trace(directory, create_perfetto_trace=True):
    state, metrics = compiled(state, batch, anchors)
    jax.block_until_ready(metrics)
  wall = time.perf_counter() - start
  newest = max(glob.glob(os.path.join(directory, 'plugins/profile/*/*.trace.json.gz')), key=os.path.getmtime)
  with gzip.open(newest) as f:
    events = json.load(f)['traceEvents']
  origin = dict(re.findall(r'%([\w.\-]+) = [^\n]*?metadata=\{op_name="([^"]+)"', compiled.as_text()))
  kinds, parts = collections.Counter(), collections.Counter()
  for e in events:
    # Complete events of the compiled program's thunks: not Python ($...) nor the executor's own.
    if e.get('ph') == 'X' and not e['name'].startswith(('$', 'Thunk', 'Pjit', 'Common', 'Slinky')):
      kinds[re.sub(r'\.\d+$', '', e['name'])] += e['dur'] / 1e6
      parts[_model_part(origin.get(e['name'], ''))] += e['dur'] / 1e6
  return kinds.most_common(), parts.most_common(), wall


def _model_part(op_name):
  """'head/cls_net bwd', 'backbone/layer3 fwd', 'step outside the model: exp', ... from an op's metadata name."""
  if not op_name:
    return '(no metadata: layout copies, iotas)'
  path = op_name.split('/')
  if 'RetinaNet)' not in op_name:
    return 'step outside the model: ' + ('while loop' if '/while' in op_name else path[-1])
  inside = path[next(i for i, p in enumerate(path) if 'RetinaNet)' in p) + 1:]
  module = '/'.join(re.sub(r'_\d+$', '', p) for p in inside[:2] if '(' not in p)
  return f'{module} {"bwd" if op_name.startswith("jit(step)/transpose(") else "fwd"}'


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--canvas', type=int, nargs=2, default=(512, 640))
  parser.add_argument('--batch', type=int, default=2)
  parser.add_argument('--skip-network', action='store_true')
  parser.add_argument('--profile', metavar='DIR', help='also trace one train step of each model into DIR')
  args = parser.parse_args()
  device = jax.devices()[0]
  print(f'{jax.device_count()} x {device.platform} ({device.device_kind}), jax {jax.__version__}; '
        f'dense 3x3 kernel gradients on this CPU: '
        f'{"matrix products" if conv.dense_products_win_here() else "XLA"} (conv.dense_products_win_here); '
        f'GLIBC_TUNABLES={os.environ.get("GLIBC_TUNABLES", "")!r} (the Makefile says why)')
  conv_table(args.repeats)
  pool_table(args.repeats)
  r50 = base.get_config()
  r50.data.canvas = tuple(args.canvas)
  r50.train.batch_size = args.batch
  h, w = args.canvas
  cases = [(f'R50-FPN, {args.batch} x {h} x {w}, 80 classes', r50),
           ('the demo (configs/shapes.py), 16 x 128 x 128', shapes.get_config())]
  for title, config in cases if args.profile else ():
    kinds, parts, wall = profile_step(config, args.profile)
    total = sum(s for _, s in kinds)
    print(f'\nOne train step of {title}, traced: {wall:.3f} s wall, {total:.3f} s in operations')
    for what, rows in (('operation', kinds), ('model part', parts)):
      print(f'| {what} | s | share of the operations |\n|---|---|---|')
      for name, s in rows[:12]:
        print(f'| {name} | {s:.3f} | {s / total:.0%} |')
  if args.skip_network:
    return
  for title, config in cases:
    print(f'\n{title}, float32 (seconds per call, median of {args.repeats}; x = multiple of the forward)')
    print('| CPU gradients | forward | forward + backward | full train step |')
    print('|---|---|---|---|')
    for path in ('xla', 'matmul'):
      fwd, bwd, step = network(path, config, args.repeats)
      print(f'| {path} | {fwd:.3f} | {bwd:.3f} ({bwd / fwd:.2f}x) | {step:.3f} ({step / fwd:.2f}x) |', flush=True)
    loss_s, update_s = rest_of_step(config, args.repeats)
    print(f'The rest of the step, timed alone: matching + loss and its gradient {loss_s:.3f} s, '
          f'optimizer update {update_s:.3f} s.', flush=True)


if __name__ == '__main__':
  main()
