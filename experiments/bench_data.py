"""Images per second of the training input pipeline (decode, flip, resize, normalize, pad).

Runs data.pipeline.train_iterator on the synthetic 'retina_shapes' set at two
canvases: 640 x 640 (512 px images resized up to 640, about COCO's 480 -> 600
ratio) and 1024 x 1024 (800 px images resized to 1024), with a random flip; then
COCO-sized images (COCO-like sizes and aspect ratios, 640 px on the longer side)
at 800/1333, on the square 1408 x 1408 canvas and on size buckets (one stream per
bucket, each reading every record's JPEG header: what that costs shows here).
The datasets are built first (into --data_dir, reused by later runs).

  python -m experiments.bench_data
  python -m experiments.bench_data --batch 16 --batches 30 --data_dir /tmp/tfds

Prints, per canvas, the median and best of --repeats timed stretches of
--batches batches each, after --warmup batches (tf.data autotunes during it).
"""

import argparse
import os
import statistics
import tempfile
import time

from configs import base
from retina_jax.data import pipeline

# (canvas side, source image side) pairs to time.
_CASES = ((640, 512), (1024, 800))


def _config(canvas, image_size, batch, data_dir):
  c = base.get_config()
  c.data.dataset = 'shapes'
  c.data.data_dir = data_dir
  c.data.use_buckets = False
  c.data.canvas = (canvas, canvas)
  c.data.min_size = canvas
  c.data.max_size = canvas
  c.data.shuffle_buffer = 64
  c.data.shapes.image_size = image_size
  c.data.shapes.num_train = 64
  c.data.shapes.num_val = 1
  c.data.shapes.max_objects = 24
  c.data.shapes.min_object_size = 16
  c.model.num_classes = 6
  c.train.batch_size = batch
  return c


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--batches', type=int, default=20, help='batches per timed stretch')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--warmup', type=int, default=5)
  parser.add_argument('--data_dir', default=os.path.join(tempfile.gettempdir(), 'retina_bench_tfds'))
  args = parser.parse_args()
  print(f'{os.cpu_count()} CPU cores; batch {args.batch}; {args.repeats} x {args.batches} batches', flush=True)
  cases = [(f'canvas {canvas} x {canvas} (images {image_size} px)', _config(canvas, image_size, args.batch,
                                                                            args.data_dir))
           for canvas, image_size in _CASES]
  for buckets in (False, True):
    c = _config(1408, 640, args.batch, args.data_dir)
    c.data.min_size, c.data.max_size = 800, 1333
    c.data.shapes.varied_sizes, c.data.use_buckets = True, buckets
    cases.append((f'COCO-like 640 px images at 800/1333, {"buckets" if buckets else "square 1408"}', c))
  for name, config in cases:
    start = time.perf_counter()
    it = pipeline.train_iterator(config)
    for _ in range(args.warmup):
      next(it)
    ready = time.perf_counter() - start
    rates = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      for _ in range(args.batches):
        next(it)
      rates.append(args.batch * args.batches / (time.perf_counter() - start))
    print(f'{name}: {statistics.median(rates):7.1f} img/s '
          f'median, {max(rates):7.1f} best  (build + warm-up {ready:.1f} s)', flush=True)


if __name__ == '__main__':
  main()
