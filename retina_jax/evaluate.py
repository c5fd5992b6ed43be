"""Evaluation: jitted inference + post-processing on device, COCO metrics on the host.

Detections leave the device as fixed-size arrays [B, D, ...], are gathered from
every process, mapped back to original-image pixels (divide by the resize
scale, clip to the original size) and to COCO category ids, and scored by
pycocotools' COCOeval against data.pipeline.eval_ground_truth(config).

The ground truth is built (and the annotation file and eval split checked) before any
inference, so a wrong input fails in seconds rather than after a pass over the split.
pycocotools prints to stdout, into the progress bar's line: its output goes to the log
(absl, INFO) and the result table is written through tqdm.
"""

import contextlib
import io
import json
import os

import jax
import numpy as np
import tensorflow as tf
import tqdm
from absl import logging
from jax.experimental import multihost_utils
from pycocotools import cocoeval

from retina_jax import anchors as anchors_lib
from retina_jax import boxes as boxes_lib
from retina_jax import checkpoint
from retina_jax import errors
from retina_jax import postprocess
from retina_jax import sharding
from retina_jax import visualize
from retina_jax.data import coco
from retina_jax.data import pipeline
from retina_jax.model import retinanet

METRICS = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl')  # COCOeval.stats[0:6]


def device_anchors(config, mesh, canvases=None):
  """{(H, W): anchors [A, 4] float32 replicated on mesh}, the one place anchors go to the devices.

  Args:
    config: the run config (anchors.*).
    mesh: the ('data',) mesh.
    canvases: (H, W) canvases; default every canvas of the config (one per size bucket).
  """
  rep = sharding.replicated(mesh)
  canvases = pipeline.canvases(config) if canvases is None else [tuple(c) for c in canvases]
  return {c: jax.device_put(anchors_lib.from_config(config, c), rep) for c in canvases}


def check(config):
  """Raises errors.BadValue naming the first bad value of config.eval."""
  e = config.eval
  errors.check_range('eval.batch_size', e.batch_size, lo=1)
  errors.check_range('eval.visualize', e.visualize, lo=0)
  errors.check_range('eval.checkpoint_step', e.checkpoint_step, lo=-1)


def make_predict_fn(config, model, mesh):
  """jit(images -> detections): variables replicated, batch split over 'data'.

  The returned function takes (variables, images [B, H, W, 3], image_hw [B, 2],
  anchors [A, 4] of the images' canvas) and returns postprocess.postprocess's dict
  (boxes [B, D, 4] in canvas pixels, scores [B, D], classes [B, D] int32, valid
  [B, D] bool). It compiles once per canvas.
  """
  p = config.postprocess
  rep, split = sharding.replicated(mesh), sharding.batch_sharding(mesh)

  def predict(variables, images, image_hw, anchors):
    counts = anchors_lib.level_counts(  # static: shapes are known when jit traces
        images.shape[1:3], tuple(config.anchors.levels), anchors_lib.num_per_location(config.anchors))
    out = model.apply(variables, images, image_hw, train=False)
    return postprocess.postprocess(
        out['logits'], out['deltas'], anchors, counts, image_hw, score_thresh=p.score_thresh,
        topk_per_level=p.topk_per_level, nms_iou=p.nms_iou, max_detections=p.max_detections,
        weights=tuple(config.box_coder.weights), clamp=config.box_coder.clamp)

  return jax.jit(predict, in_shardings=(rep, split, split, rep), out_shardings=split)


def to_original_pixels(boxes, scale, orig_hw):
  """Canvas-pixel boxes -> boxes on the original images: undo the resize, clip to the image.

  Args:
    boxes: [B, D, 4] canvas pixels (x1, y1, x2, y2).
    scale: [B] canvas px per original px (the pipeline's `scale`).
    orig_hw: [B, 2] original (height, width).
  Returns:
    [B, D, 4] original pixels (x1, y1, x2, y2).
  """
  scale = np.where(scale > 0, scale, 1.0)  # padding rows (scale 0) have no image to map to
  boxes = boxes / scale[:, None, None]
  return boxes_lib.clip(boxes, orig_hw[:, 0:1], orig_hw[:, 1:2])


def to_coco_rows(dets, meta, category_ids):
  """Detections of a batch -> rows [N, 7] (image_id, x, y, w, h, score, category_id).

  Args:
    dets: boxes [B, D, 4] canvas px, scores [B, D], classes [B, D], valid [B, D].
    meta: image_id [B], scale [B], orig_hw [B, 2], valid [B] (False for padding images).
    category_ids: [K] COCO category id of each label.
  Returns:
    float64 [N, 7], only valid detections of valid images.
  """
  boxes = to_original_pixels(dets['boxes'], meta['scale'], meta['orig_hw'])  # [B, D, 4]
  keep = dets['valid'] & meta['valid'][:, None]  # [B, D]
  ids = np.broadcast_to(meta['image_id'][:, None], keep.shape)
  cats = np.asarray(category_ids)[np.maximum(dets['classes'], 0)]
  xywh = boxes_lib.to_coco(boxes)
  return np.concatenate([ids[keep][:, None], xywh[keep], dets['scores'][keep][:, None],
                         cats[keep][:, None]], axis=1).astype(np.float64)


def coco_metrics(coco_gt, rows, image_ids, verbose=True):
  """COCO box AP of `rows` (see to_coco_rows) on `image_ids`.

  Without detections COCOeval still runs (on an empty result set), so a size without
  ground truth stays -1 rather than 0. verbose: COCOeval's summary goes to the log.
  """
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    if len(rows):
      coco_dt = coco_gt.loadRes(rows)
    else:  # loadRes cannot take an empty array
      coco_dt = coco.from_dict({'images': coco_gt.dataset['images'], 'annotations': [],
                                'categories': coco_gt.dataset['categories']})
    e = cocoeval.COCOeval(coco_gt, coco_dt, 'bbox')
    e.params.imgIds = sorted(int(i) for i in image_ids)
    e.evaluate()
    e.accumulate()
    e.summarize()
  if verbose:
    logging.info('COCOeval:\n%s', out.getvalue())
  # COCOeval's -1 (no ground truth of that size, e.g. no large objects) is kept: 0 would
  # read as a model that finds none of them. format_table prints it as '-'.
  return {k: float(v) for k, v in zip(METRICS, e.stats[:6])}


def format_table(metrics, step):
  head = ' | '.join(f'{k:>6}' for k in METRICS)
  vals = ' | '.join(f'{100 * metrics[k]:6.2f}' if metrics[k] >= 0 else f'{"-":>6}' for k in METRICS)
  return f'step {step}\n| {head} |\n| {vals} |'


def ground_truth(config):
  """The eval split's ground truth, with every eval input checked (do this before inference).

  Returns:
    pycocotools.coco.COCO (see pipeline.eval_ground_truth).
  Raises:
    errors.UserError: the eval split does not exist or is not prepared; the annotation file
      is missing, is not a COCO instances file or its categories do not match the dataset's.
  """
  lead = jax.process_index() == 0
  with contextlib.redirect_stdout(io.StringIO()) if not lead else contextlib.nullcontext():
    return pipeline.eval_ground_truth(config)


def evaluate(config, model, variables, mesh, step, workdir, predict=None, coco_gt=None, record=None):
  """Runs the eval split, writes eval_<step>.json and detections_<step>.png.

  Args:
    config: the run config.
    model: the RetinaNet module.
    variables: {'params', 'batch_stats'}, replicated over the mesh.
    mesh: the ('data',) mesh.
    step: training step, for the file names.
    workdir: the directory to write to (the run's, or its evals/<key> for mode 'eval').
    predict: a make_predict_fn result to reuse (periodic evaluation compiles it once).
    coco_gt: ground_truth(config), to reuse; built (and checked) here before inference if None.
    record: more entries for eval_<step>.json (e.g. how the config differs from training's).
  Returns:
    dict AP, AP50, AP75, APs, APm, APl (fractions in [0, 1], -1 where the eval split has no
    object of that size, as COCOeval) plus step, images, detections.
  """
  coco_gt = coco_gt if coco_gt is not None else ground_truth(config)
  predict = predict or make_predict_fn(config, model, mesh)
  anchors = device_anchors(config, mesh)
  info = pipeline.dataset_info(config)
  rows, image_ids, shown = [], [], []
  it = pipeline.eval_iterator(config, process_index=jax.process_index(),
                              process_count=jax.process_count())
  for local in it:
    local['image_id'] = _int32_ids(local['image_id'])
    batch = sharding.global_batch(local, mesh)
    dets = predict(variables, batch['image'], batch['image_hw'], anchors[local['image'].shape[1:3]])
    dets = multihost_utils.process_allgather(dets, tiled=True)
    meta = multihost_utils.process_allgather(
        {k: batch[k] for k in ('image_id', 'scale', 'orig_hw', 'valid')}, tiled=True)
    rows.append(to_coco_rows(dets, meta, info.category_ids))
    image_ids.extend(meta['image_id'][meta['valid']].tolist())
    if len(shown) < config.eval.visualize:
      shown.extend(_for_picture(local, dets, meta, config.eval.visualize - len(shown)))
  rows = np.concatenate(rows) if rows else np.zeros((0, 7))
  lead = jax.process_index() == 0
  metrics = coco_metrics(coco_gt, rows, image_ids, verbose=lead)
  metrics.update(step=int(step), images=len(image_ids), detections=len(rows))
  if lead:
    tqdm.tqdm.write(format_table(metrics, step))  # clears and redraws a training progress bar
    with tf.io.gfile.GFile(os.path.join(workdir, f'eval_{step}.json'), 'w') as f:
      json.dump({**metrics, **(record or {})}, f, indent=2)
    if shown:
      visualize.save_detections(
          os.path.join(workdir, f'detections_{step}.png'), shown, info.class_names,
          config.data.mean, config.data.std)
  return metrics


def _int32_ids(ids):
  ids = np.asarray(ids)
  if ids.size and (ids.max() >= 2**31 or ids.min() < -2**31):
    raise errors.BadValue(f'image_id {ids.max()} does not fit int32 (JAX runs without 64-bit ints)')
  return ids.astype(np.int32)


def _for_picture(local, dets, meta, n):
  """Up to n of this process's valid images with their detections, matched by image id."""
  out = []
  gathered = {int(i): r for r, i in enumerate(meta['image_id']) if meta['valid'][r]}
  for r in range(len(local['image_id'])):
    if len(out) == n or not local['valid'][r]:
      continue
    g = gathered[int(local['image_id'][r])]
    keep = dets['valid'][g]
    out.append({'image': local['image'][r], 'image_hw': local['image_hw'][r],
                'boxes': dets['boxes'][g][keep], 'scores': dets['scores'][g][keep],
                'classes': dets['classes'][g][keep]})
  return out


def evaluate_checkpoint(config, workdir, out_dir=None, record=None):
  """Mode 'eval': evaluates checkpoint eval.checkpoint_step (-1 the newest usable) of workdir.

  Reads the model variables only (checkpoint.restore_variables), so the optim.* settings
  of the eval config need not be training's. Without any checkpoint, evaluates the
  initial (e.g. pretrained) weights as step 0.

  Args:
    config: the eval config.
    workdir: the run directory whose checkpoints are read.
    out_dir: where eval_<step>.json and detections_<step>.png go (default: workdir).
    record: more entries for eval_<step>.json.
  """
  coco_gt = ground_truth(config)  # inputs checked before anything compiles
  mesh = sharding.make_mesh()
  model = retinanet.build(config)
  rep = sharding.replicated(mesh)
  restored = checkpoint.restore_variables(
      workdir, retinanet.abstract_variables(model, rep), config.eval.checkpoint_step, missing_ok=True)
  if restored is None and not config.model.pretrained:
    raise errors.NotFound(f'no checkpoint in {workdir}/checkpoints and no config.model.pretrained to evaluate')
  if restored is None:
    restored = 0, jax.device_put(retinanet.init_variables(config, model, jax.random.key(config.seed)), rep)
  step, variables = restored
  return evaluate(config, model, variables, mesh, step, out_dir or workdir, coco_gt=coco_gt, record=record)
