r"""One trained model evaluated on size buckets and on the single square canvas: AP and detections.

The network keeps the padding out of every convolution and norm (retina_jax/model/padding.py),
so the two canvases should give the same detections up to float rounding (the convolutions
run over different sizes). This prints both COCO AP rows and compares the detections image
by image: each detection of the bucket run is matched to the square run's detection of the
same class with the highest IoU, separately for detections well inside the image (at least
--margin canvas pixels from its right and bottom edges) and for those near them.

  python -m experiments.eval_buckets --config configs/shapes.py:buckets --workdir runs/buckets
  python -m experiments.eval_buckets --config configs/base.py --workdir gs://.../r50 \
      --config.data.data_dir=gs://.../tfds --config.eval.batch_size=64
"""

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

FLAGS = flags.FLAGS


def detections(config, model, variables, mesh):
  """{image_id: (boxes [n, 4] canvas px, scores [n], classes [n], image_hw [2])} and COCO rows."""
  import jax
  from retina_jax import evaluate
  from retina_jax import sharding
  from retina_jax.data import pipeline
  predict = evaluate.make_predict_fn(config, model, mesh)
  anchors = evaluate.device_anchors(config, mesh)
  info = pipeline.dataset_info(config)
  found, rows = {}, []
  for local in pipeline.eval_iterator(config):
    batch = sharding.global_batch({k: local[k] for k in ('image', 'image_hw')}, mesh)
    dets = jax.device_get(predict(variables, batch['image'], batch['image_hw'],
                                  anchors[local['image'].shape[1:3]]))
    rows.append(evaluate.to_coco_rows(dets, local, info.category_ids))
    for r in np.flatnonzero(local['valid']):
      keep = dets['valid'][r]
      found[int(local['image_id'][r])] = (dets['boxes'][r][keep], dets['scores'][r][keep],
                                          dets['classes'][r][keep], local['image_hw'][r])
  return found, np.concatenate(rows)


def _iou(a, b):
  """[n, 4], [m, 4] -> [n, m]."""
  lt = np.maximum(a[:, None, :2], b[None, :, :2])
  rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
  inter = np.prod(np.clip(rb - lt, 0, None), -1)
  area = lambda x: np.prod(x[:, 2:] - x[:, :2], -1)
  return inter / (area(a)[:, None] + area(b)[None, :] - inter + 1e-9)


def compare(bucketed, squared, margin, min_score):
  """Per group (inside / near the edge): matched share, IoU and score differences."""
  groups = {'inside': [], 'near the edge': []}
  for image_id, (boxes, scores, classes, hw) in bucketed.items():
    other = squared[image_id]
    keep = scores >= min_score
    for box, score, cls in zip(boxes[keep], scores[keep], classes[keep]):
      same = other[2] == cls
      iou = _iou(box[None], other[0][same])[0] if same.any() else np.zeros(1)
      j = int(np.argmax(iou))
      delta = abs(float(score) - float(other[1][same][j])) if same.any() else float(score)
      inside = box[2] <= hw[1] - margin and box[3] <= hw[0] - margin
      groups['inside' if inside else 'near the edge'].append((float(iou[j]), delta))
  for name, pairs in groups.items():
    if not pairs:
      print(f'  {name}: no detections')
      continue
    iou, delta = np.asarray(pairs).T
    print(f'  {name}: {len(pairs)} detections (score >= {min_score}); same box (IoU >= 0.9) in the square '
          f'run for {np.mean(iou >= 0.9):.1%}, mean IoU {iou.mean():.3f}; score difference median '
          f'{np.median(delta):.4f}, 95th percentile {np.percentile(delta, 95):.4f}, max {delta.max():.4f}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from retina_jax import checkpoint
  from retina_jax import evaluate
  from retina_jax import sharding
  from retina_jax.model import retinanet
  config = FLAGS.config
  if not config.data.use_buckets:
    raise app.UsageError('the config does not use size buckets (config.data.use_buckets=False)')
  mesh = sharding.make_mesh()
  model = retinanet.build(config)
  _, variables = checkpoint.restore_variables(
      FLAGS.workdir, retinanet.abstract_variables(model, sharding.replicated(mesh)))
  squared_config = config.copy_and_resolve_references()
  squared_config.data.use_buckets = False
  side = -(-int(config.data.max_size) // 128) * 128
  squared_config.data.canvas = (side, side)
  gt = evaluate.ground_truth(config)
  results = {}
  for name, c in (('buckets', config), (f'square {side}', squared_config)):
    found, rows = detections(c, model, variables, mesh)
    metrics = evaluate.coco_metrics(gt, rows, list(found), verbose=False)
    results[name] = found
    print(f'{name}: ' + ', '.join(f'{k} {100 * v:.2f}' for k, v in metrics.items()), flush=True)
  print(f'detections, buckets against square {side}:')
  bucketed, squared = results.values()
  compare(bucketed, squared, FLAGS.margin, FLAGS.min_score)


def define_flags():
  config_flags.DEFINE_config_file('config', None, 'The config the workdir was trained with.')
  flags.DEFINE_string('workdir', None, 'A trained run directory (its latest checkpoint).')
  flags.DEFINE_integer('margin', 64, 'canvas pixels from the right and bottom edges that count as inside')
  flags.DEFINE_float('min_score', 0.3, 'detections compared: at least this score in the bucket run')
  flags.mark_flags_as_required(['config', 'workdir'])


if __name__ == '__main__':
  define_flags()
  app.run(main)
