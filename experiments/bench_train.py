r"""Train-step speed: compile time, step time, images/s and memory of the full jitted step.

The step is the one training runs (matching + focal loss + backward + SGD, state
donated) on every local device, fed with a fixed random batch so the input
pipeline is not measured (see experiments/bench_data.py for that). --predict also
times inference (model + post-processing, jitted) per image; the score threshold is
set to 0 there so that untrained weights make post-processing do its full work
(1000 candidates per level into NMS), an upper bound on what trained weights cost.

  python -m experiments.bench_train                       # shapes demo + R50-FPN 512, f32 and bf16
  python -m experiments.bench_train --cases shapes --dtypes float32 --steps 20
  python -m experiments.bench_train --cases r50_800,r50_600 --batch 16 --predict   # the paper's scales
  python -m experiments.bench_train --cases r50_800 --canvas 896x1152,1152x896     # other canvases
  python -m experiments.bench_train --cases r50_800 --xla-conv                     # lax's own convolution

Cases: shapes (the CPU demo), r50_512 (R50-FPN on a 512 x 512 canvas), r50_800
(configs/base.py: 800 / 1333 on its 1408 x 1408 canvas), r50_600 (the ablations'
600 / 1000 on 1024 x 1024). --xla-conv builds the network with lax.conv_general_dilated
in place of retina_jax/model/conv.py's drop-in, to check that it changes nothing
off CPU.
"""

import argparse
import os
import time

import jax
import numpy as np

from configs import base
from configs import rows
from configs import shapes
from retina_jax import evaluate
from retina_jax import sharding
from retina_jax import train
from retina_jax.model import conv
from retina_jax.model import retinanet

CASES = ('shapes', 'r50_512', 'r50_800', 'r50_600')


def case_config(name, batch, canvas=None):
  """A benchmarked config (see the module docstring), with the canvas replaced if given."""
  if name == 'shapes':
    c = shapes.get_config()
  elif name in ('r50_512', 'r50_800', 'r50_600'):
    c = base.get_config()
    if name == 'r50_512':
      rows.resize(c, 512, 512)
    elif name == 'r50_600':
      rows.resize(c, 600, 1000)
  else:
    raise ValueError(f'unknown case {name!r}; use one of {", ".join(CASES)}')
  if canvas:
    c.data.canvas = canvas
  if batch:
    c.train.batch_size = batch
    c.eval.batch_size = batch
  return c


def random_batch(config, seed):
  """A global batch of random images and up to 20 random boxes per image."""
  r = np.random.default_rng(seed)
  b, m = config.train.batch_size, config.data.max_boxes
  h, w = config.data.canvas
  n = min(m, 20)
  xy = r.uniform(0, 0.8, (b, n, 2)) * (w, h)
  wh = r.uniform(0.05, 0.4, (b, n, 2)) * (w, h)
  boxes = np.zeros((b, m, 4), np.float32)
  boxes[:, :n] = np.concatenate([xy, np.minimum(xy + wh, (w, h))], -1)
  classes = np.full((b, m), -1, np.int32)
  classes[:, :n] = r.integers(0, config.model.num_classes, (b, n))
  image = r.normal(size=(b, h, w, 3)).astype(np.float32)
  image_hw = np.tile(np.float32([h, w]), (b, 1))  # the image fills the canvas
  return {'image': image, 'image_hw': image_hw, 'boxes': boxes, 'classes': classes}


def peak_memory_gib(device):
  """Peak memory the device has held since the process began, in GiB; None where the backend
  does not say (CPU). Cumulative: run one case per process for a per-case figure."""
  stats = device.memory_stats() or {}
  return stats['peak_bytes_in_use'] / 2**30 if 'peak_bytes_in_use' in stats else None


def setup(config):
  """(jitted train step, fresh state, random global batch, anchors) of config on every local device."""
  mesh = sharding.make_mesh()
  model = retinanet.build(config)
  state, tx = train.create_train_state(config, model, mesh)
  canvas = tuple(config.data.canvas)  # random_batch's, whether or not the config has buckets
  anchors = evaluate.device_anchors(config, mesh, [canvas])[canvas]
  step_fn = train.make_train_step(config, model, tx, mesh)
  return step_fn, state, sharding.global_batch(random_batch(config, 0), mesh), anchors


def bench(config, steps):
  """(compile seconds, median step seconds) of the jitted train step."""
  compile_s, step_s, _ = time_step(*setup(config), steps)
  return compile_s, step_s


def time_step(step_fn, state, batch, anchors, steps):
  """(compile seconds, median step seconds, state after) of `step_fn` on one batch.

  The state comes back because the step donates it: a caller timing further canvases
  goes on from this one.
  """
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch, anchors).compile()
  compile_s = time.perf_counter() - t0
  state, metrics = compiled(state, batch, anchors)  # warm-up
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, metrics = compiled(state, batch, anchors)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  return compile_s, float(np.median(times)), state


def bench_predict(config, steps):
  """(compile seconds, median ms per image) of jitted inference: forward + post-processing."""
  config = config.copy_and_resolve_references()
  config.postprocess.score_thresh = 0.0  # every candidate goes on to NMS: see the module docstring
  mesh = sharding.make_mesh()
  model = retinanet.build(config)
  state, _ = train.create_train_state(config, model, mesh)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  canvas = tuple(config.data.canvas)
  anchors = evaluate.device_anchors(config, mesh, [canvas])[canvas]
  predict = evaluate.make_predict_fn(config, model, mesh)
  b = config.eval.batch_size
  images = np.random.default_rng(1).normal(size=(b, *config.data.canvas, 3)).astype(np.float32)
  hw = np.tile(np.asarray(config.data.canvas, np.int32), (b, 1))
  images, hw = sharding.global_batch({'image': images, 'image_hw': hw}, mesh).values()
  t0 = time.perf_counter()
  compiled = predict.lower(variables, images, hw, anchors).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(compiled(variables, images, hw, anchors))
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(compiled(variables, images, hw, anchors))
    times.append(time.perf_counter() - t)
  return compile_s, 1000.0 * float(np.median(times)) / b


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--cases', default='shapes,r50_512', help=f'comma-separated, from {", ".join(CASES)}')
  parser.add_argument('--canvas', default='',
                      help='comma-separated HxW canvases to run each case on (default: the case\'s own)')
  parser.add_argument('--predict', action='store_true', help='also time inference per image')
  parser.add_argument('--xla-conv', action='store_true',
                      help='use lax.conv_general_dilated instead of retina_jax/model/conv.py')
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--steps', type=int, default=5, help='timed steps after one warm-up step')
  parser.add_argument('--batch', type=int, default=0,
                      help='global batch (0: the config\'s; r50_512 uses 2 on CPU)')
  args = parser.parse_args()
  if args.xla_conv:
    conv.conv_general_dilated = jax.lax.conv_general_dilated  # read when the modules are called
  canvases = [tuple(int(v) for v in c.split('x')) for c in args.canvas.split(',') if c] or [None]
  device = jax.devices()[0]
  print(f'devices: {jax.device_count()} x {device.platform} ({device.device_kind}); convolution: '
        f'{"lax" if args.xla_conv else "retina_jax/model/conv.py"}; '
        f'GLIBC_TUNABLES={os.environ.get("GLIBC_TUNABLES", "")!r} (the Makefile says why)')
  print('| case | canvas | dtype | batch | compile s | step s | images/s | peak GiB |'
        + (' predict compile s | predict ms / image |' if args.predict else ''))
  print('|---|---|---|---|---|---|---|---|' + ('---|---|' if args.predict else ''))
  for name in args.cases.split(','):
    for canvas in canvases:
      for dtype in args.dtypes.split(','):
        batch = args.batch or (2 if name.startswith('r50') and device.platform == 'cpu' else 0)
        config = case_config(name, batch, canvas)
        config.model.dtype = dtype
        compile_s, step_s = bench(config, args.steps)
        b = config.train.batch_size
        peak = peak_memory_gib(device)
        line = (f'| {name} | {config.data.canvas[0]}x{config.data.canvas[1]} | {dtype} | {b} | '
                f'{compile_s:.1f} | {step_s:.3f} | {b / step_s:.2f} | '
                f'{"-" if peak is None else f"{peak:.1f}"} |')
        if args.predict:
          line += ' {:.1f} | {:.2f} |'.format(*bench_predict(config, args.steps))
        print(line, flush=True)


if __name__ == '__main__':
  main()
