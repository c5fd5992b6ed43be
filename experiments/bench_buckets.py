r"""What size buckets save: padding, train-step time per image, compile times, image rates.

1. Padding: canvas pixels per image pixel for a COCO-like size distribution
   (buckets.COCO_LIKE_SIZES, an assumption stated there; --annotations reads the real
   sizes from a COCO instances file), at 800/1333 and 600/1000, for the old square canvas
   and for buckets.propose's buckets.
2. Time (--model, off with --model none): the jitted train step (random batch, so the input
   pipeline is not timed) on every canvas, its compile time and predict's, and the time
   per image averaged over the distribution: what a run pays per image.
3. Rates (--rate_images N): the training pipeline on an N-image synthetic set with COCO-like
   sizes for --rate_epochs epochs, how often each image is seen, square canvas vs buckets.

  python -m experiments.bench_buckets --model none --rate_images 0   # padding only, seconds
  python -m experiments.bench_buckets --model r50 --scales 800/1333 --batch 1
  python -m experiments.bench_buckets --model demo --rate_images 1000
"""

import argparse
import collections
import json
import os
import tempfile
import time

import numpy as np

from retina_jax.data import buckets

SCALES = {'800/1333': (800, 1333), '600/1000': (600, 1000)}


def sizes_from_annotations(path):
  """[N, 3] (height, width, 1) of the images of a COCO instances file."""
  with open(path) as f:
    images = json.load(f)['images']
  return np.asarray([(im['height'], im['width'], 1.0) for im in images], np.float64)


def square(max_size):
  side = -(-int(max_size) // buckets.STRIDE) * buckets.STRIDE
  return ((side, side),)


def padding(sizes, scales):
  """Prints one line per (scale, canvas kind); returns {scale: (square, buckets)}."""
  out = {}
  for name in scales:
    lo, hi = SCALES[name]
    sets = {'square': square(hi), 'buckets': buckets.propose(lo, hi)}
    for kind, b in sets.items():
      ratio = buckets.canvas_per_image(b, sizes, lo, hi)
      print(f'{name} {kind}: canvas pixels per image pixel {ratio:.2f}  ({len(b)} canvas'
            f'{"es" if len(b) > 1 else ""}, one compile each: {", ".join(f"{h}x{w}" for h, w in b)})',
            flush=True)
    out[name] = sets
  return out


def shares(sizes, canvases, lo, hi):
  """[K] share of the images (by weight) that each canvas gets."""
  hw = buckets.resized_hw(sizes[:, 0], sizes[:, 1], lo, hi)
  k = buckets.assign(hw, buckets.canonical(canvases))
  return np.bincount(k, weights=sizes[:, 2], minlength=len(canvases)) / sizes[:, 2].sum()


def model_config(model, lo, hi, batch, dtype):
  from configs import base
  from configs import shapes
  if model == 'r50':
    c = base.get_config()
  else:  # the CPU demo's network, with COCO's 80 classes
    c = shapes.get_config()
    c.data.dataset = 'coco'
    c.model.num_classes = 80
    c.anchors.sizes = base.get_config().anchors.sizes
  c.data.min_size, c.data.max_size = lo, hi
  c.train.batch_size = c.eval.batch_size = batch
  c.model.dtype = dtype
  return c


def time_canvases(config, canvases, steps):
  """{canvas: (train compile s, median step s, predict compile s)} on the local devices."""
  import jax
  from experiments import bench_train
  from retina_jax import evaluate
  from retina_jax import sharding
  from retina_jax import train
  from retina_jax.model import retinanet
  mesh = sharding.make_mesh()
  model = retinanet.build(config)
  state, tx = train.create_train_state(config, model, mesh)
  step_fn = train.make_train_step(config, model, tx, mesh)
  predict = evaluate.make_predict_fn(config, model, mesh)
  anchors_per_canvas = evaluate.device_anchors(config, mesh, canvases)
  out = {}
  for canvas in canvases:
    config.data.canvas = canvas
    anchors = anchors_per_canvas[tuple(canvas)]
    batch = sharding.global_batch(bench_train.random_batch(config, 0), mesh)
    compile_s, step_s, state = bench_train.time_step(step_fn, state, batch, anchors, steps)
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    tick = time.perf_counter()
    predict.lower(variables, batch['image'], batch['image'][:, 0, :2, 0], anchors).compile()
    out[canvas] = (compile_s, step_s, time.perf_counter() - tick)
    print(f'  {canvas[0]}x{canvas[1]}: train step compile {compile_s:.1f} s, step {out[canvas][1]:.2f} s '
          f'({out[canvas][1] / config.train.batch_size:.2f} s/image), predict compile {out[canvas][2]:.1f} s',
          flush=True)
  return out


def timing(sizes, sets, args):
  import jax
  device = jax.devices()[0]
  print(f'\ntrain step on {jax.device_count()} x {device.platform} ({device.device_kind}), model {args.model}, '
        f'{args.dtype}, batch {args.batch}, median of {args.steps} step(s) after one warm-up:', flush=True)
  for name, kinds in sets.items():
    lo, hi = SCALES[name]
    config = model_config(args.model, lo, hi, args.batch, args.dtype)
    per_kind = {}
    for kind, canvases in kinds.items():
      print(f'{name} {kind}:', flush=True)
      t = time_canvases(config, canvases, args.steps)
      share = shares(sizes, canvases, lo, hi)
      per_image = sum(s * t[c][1] for s, c in zip(share, buckets.canonical(canvases))) / args.batch
      per_kind[kind] = per_image
      compiles = sum(v[0] + v[2] for v in t.values())
      print(f'{name} {kind}: train-step time per image {per_image:.3f} s on the size distribution '
            f'(compiles {compiles:.0f} s in all)', flush=True)
    print(f'{name}: buckets take {per_kind["buckets"] / per_kind["square"]:.2f}x the square canvas\'s time '
          'per image', flush=True)


def rates(args):
  """How often each training image is seen in rate_epochs epochs: square canvas vs buckets."""
  from configs import shapes
  from retina_jax.data import pipeline
  print(f'\nimage rates: {args.rate_images} synthetic images with COCO-like sizes, '
        f'{args.rate_epochs} epochs in batches of {args.rate_batch}:', flush=True)
  for kind in ('square', 'buckets'):
    c = shapes.get_config('buckets')
    c.data.data_dir = args.data_dir
    c.data.shapes.num_train = args.rate_images
    c.data.shapes.num_val = 1
    c.data.flip = False  # an image is then the same array each time
    c.train.batch_size = args.rate_batch
    if kind == 'square':
      c.data.use_buckets = False
      c.data.canvas = square(c.data.max_size)[0]
    steps = args.rate_epochs * args.rate_images // args.rate_batch
    it = pipeline.train_iterator(c)
    seen = collections.Counter(image.tobytes() for _ in range(steps) for image in next(it)['image'])
    n = np.asarray(list(seen.values()))
    print(f'  {kind}: {len(n)} of {args.rate_images} images seen, times seen min {n.min()} / mean '
          f'{n.mean():.2f} / max {n.max()} / std {n.std():.2f} (expected {args.rate_epochs})', flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--scales', default='800/1333,600/1000')
  parser.add_argument('--annotations', default=None, help='a COCO instances JSON: its image sizes')
  parser.add_argument('--model', default='r50', choices=('r50', 'demo', 'none'))
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--steps', type=int, default=1, help='timed steps per canvas after a warm-up')
  parser.add_argument('--rate_images', type=int, default=0)
  parser.add_argument('--rate_epochs', type=int, default=10)
  parser.add_argument('--rate_batch', type=int, default=8)
  parser.add_argument('--data_dir', default=os.path.join(tempfile.gettempdir(), 'retina_bench_tfds'))
  args = parser.parse_args()
  if args.annotations:
    sizes = sizes_from_annotations(args.annotations)
    print(f'sizes: {len(sizes)} images of {args.annotations}')
  else:
    sizes = np.asarray(buckets.COCO_LIKE_SIZES, np.float64)
    print('sizes: buckets.COCO_LIKE_SIZES (COCO-like, assumed: 640 px on the longer side, 75% landscape; '
          'see retina_jax/data/buckets.py)')
  sets = padding(sizes, args.scales.split(','))
  if args.model != 'none':
    timing(sizes, sets, args)
  if args.rate_images:
    rates(args)


if __name__ == '__main__':
  main()
