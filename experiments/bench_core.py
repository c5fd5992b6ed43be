"""Times the on-device core of a train and an eval step, without the network.

Target assignment (matching.assign) alone, the whole training objective with its
gradient with respect to the head outputs (losses.detection_loss: assignment, then
focal or OHEM and box loss, as a train step runs them; the loss alone costs the
difference), and post-processing (postprocess.postprocess), each jitted on its own,
at the paper's anchor settings. Random head outputs stand in for the model: logits ~ N(-4, 1.5), so
about a quarter of the (anchor, class) pairs pass the 0.05 score threshold and
every level fills its top-k, the worst case for NMS.

  python -m experiments.bench_core                  # 16 images, 896 x 1408, 80 classes, 50 boxes
  python -m experiments.bench_core --batch 2 --canvas 512 512 --repeats 3

Prints the compile time of each function, then the median of --repeats timed
runs after one warm-up run.
"""

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import base
from retina_jax import anchors as anchors_lib
from retina_jax import losses
from retina_jax import matching
from retina_jax import postprocess


def _time(name, fn, args, repeats):
  """Compiles the jitted `fn` for `args`, then times `repeats` runs of it."""
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(*args))  # warm-up
  runs = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    runs.append(time.perf_counter() - start)
  print(f'{name:<36} compile {compile_s:6.2f} s   median {1e3 * statistics.median(runs):9.1f} ms '
        f'(min {1e3 * min(runs):.1f}, {repeats} runs)', flush=True)
  return compiled


def _random_gt(rng, batch, num_boxes, canvas):
  """[B, M, 4] boxes of 16..400 px inside the canvas, [B, M] classes in [0, 80)."""
  h, w = canvas
  size = rng.uniform(16, 400, size=(batch, num_boxes, 2))
  x1 = rng.uniform(0, w - size[..., 0])
  y1 = rng.uniform(0, h - size[..., 1])
  boxes = np.stack([x1, y1, x1 + size[..., 0], y1 + size[..., 1]], -1).astype(np.float32)
  return boxes, rng.integers(0, 80, size=(batch, num_boxes)).astype(np.int32)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--canvas', type=int, nargs=2, default=(896, 1408))
  parser.add_argument('--classes', type=int, default=80)
  parser.add_argument('--boxes', type=int, default=50)
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args()

  config = base.get_config()
  ac = config.anchors
  anchors = anchors_lib.generate(tuple(args.canvas), ac.levels, ac.sizes, ac.scales_per_octave, ac.ratios,
                                 ac.offset)
  counts = anchors_lib.level_counts(tuple(args.canvas), ac.levels, anchors_lib.num_per_location(ac))
  b, a, k = args.batch, anchors.shape[0], args.classes
  print(f'{jax.devices()[0].device_kind} x{jax.device_count()}: B={b} canvas={tuple(args.canvas)} '
        f'A={a} K={k} M={args.boxes}', flush=True)

  rng = np.random.default_rng(0)
  gt_boxes, gt_classes = _random_gt(rng, b, args.boxes, args.canvas)
  outputs = dict(logits=jnp.asarray(rng.normal(-4.0, 1.5, size=(b, a, k)), jnp.float32),
                 deltas=jnp.asarray(rng.normal(0.0, 0.1, size=(b, a, 4)), jnp.float32))
  gt_boxes, gt_classes = jnp.asarray(gt_boxes), jnp.asarray(gt_classes)

  assign = jax.jit(functools.partial(matching.assign, anchors))
  targets = _time('assign', assign, (gt_boxes, gt_classes), args.repeats)(gt_boxes, gt_classes)
  print(f'  positives per image: {float(jnp.mean(jnp.sum(targets["labels"] == 1, axis=1))):.1f}')

  def loss_and_grad(options):
    def objective(outputs, gt_boxes, gt_classes):
      return losses.detection_loss(outputs['logits'], outputs['deltas'], anchors, gt_boxes, gt_classes,
                                   **options)[0]
    return jax.jit(jax.value_and_grad(objective))

  ohem = base.get_config()
  ohem.loss.update(dict(cls='ohem', ohem_batch=128, ohem_nms=0.5, ohem_neg_pos=3.0))
  for name, c in (('focal', config), ('OHEM 1:3, 128', ohem)):
    _time(f'assign + {name} loss + grad', loss_and_grad(losses.kwargs_from_config(c)),
          (outputs, gt_boxes, gt_classes), args.repeats)

  pp = config.postprocess
  post = jax.jit(lambda logits, deltas, image_hw: postprocess.postprocess(
      logits, deltas, anchors, counts, image_hw, score_thresh=pp.score_thresh,
      topk_per_level=pp.topk_per_level, nms_iou=pp.nms_iou, max_detections=pp.max_detections))
  image_hw = jnp.tile(jnp.asarray([args.canvas], jnp.float32), (b, 1))
  post_args = (outputs['logits'], outputs['deltas'], image_hw)
  detections = _time('postprocess', post, post_args, args.repeats)(*post_args)
  print(f'  detections per image: {float(jnp.mean(jnp.sum(detections["valid"], axis=1))):.1f}')


if __name__ == '__main__':
  main()
