r"""Train-step speed: compile time, step time and images/s of the full jitted step.

The step is the one training runs (matching + focal loss + backward + SGD, state
donated) on every local device, fed with a fixed random batch so the input
pipeline is not measured (see experiments/bench_data.py for that).

  python -m experiments.bench_train                       # shapes demo + R50-FPN 512, f32 and bf16
  python -m experiments.bench_train --cases shapes --dtypes float32 --steps 20
"""

import argparse
import time

import jax
import numpy as np

from configs import base
from configs import shapes
from retina_jax import anchors as anchors_lib
from retina_jax import sharding
from retina_jax import train
from retina_jax.model import retinanet


def case_config(name, batch):
  """The benchmarked configs: the CPU demo as is, and the paper's R50-FPN at a 512 x 512 canvas."""
  if name == 'shapes':
    c = shapes.get_config()
  elif name == 'r50_512':
    c = base.get_config()
    c.data.canvas = (512, 512)
    c.data.min_size = 512
    c.data.max_size = 512
  else:
    raise ValueError(f'unknown case {name!r}; use shapes or r50_512')
  if batch:
    c.train.batch_size = batch
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
  return {'image': image, 'boxes': boxes, 'classes': classes}


def bench(config, steps):
  """(compile seconds, median step seconds) of the jitted train step."""
  mesh = sharding.make_mesh()
  model = retinanet.build(config)
  state, tx = train.create_train_state(config, model, mesh)
  anchors = jax.device_put(anchors_lib.from_config(config), sharding.replicated(mesh))
  step_fn = train.make_train_step(config, model, tx, mesh)
  batch = sharding.global_batch(random_batch(config, 0), mesh)
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
  return compile_s, float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--cases', default='shapes,r50_512')
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--steps', type=int, default=5, help='timed steps after one warm-up step')
  parser.add_argument('--batch', type=int, default=0,
                      help='global batch (0: the config\'s; r50_512 uses 2 on CPU)')
  args = parser.parse_args()
  device = jax.devices()[0]
  print(f'devices: {jax.device_count()} x {device.platform} ({device.device_kind})')
  print('| case | dtype | batch | compile s | step s | images/s |')
  print('|---|---|---|---|---|---|')
  for name in args.cases.split(','):
    for dtype in args.dtypes.split(','):
      batch = args.batch or (2 if name == 'r50_512' and device.platform == 'cpu' else 0)
      config = case_config(name, batch)
      config.model.dtype = dtype
      compile_s, step_s = bench(config, args.steps)
      b = config.train.batch_size
      print(f'| {name} | {dtype} | {b} | {compile_s:.1f} | {step_s:.3f} | {b / step_s:.2f} |',
            flush=True)


if __name__ == '__main__':
  main()
