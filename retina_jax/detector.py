"""Detections on in-memory images, for notebooks and scripts: uint8 arrays in, boxes in their pixels out.

  from configs import shapes
  from retina_jax.detector import Detector
  detector = Detector.from_workdir(shapes.get_config(), 'runs/demo')
  [found] = detector([image])  # image: [H, W, 3] uint8 RGB, any size
  found['boxes'], found['scores'], found['class_names']  # best first

Every image takes the evaluation path: pipeline.prepare_image (the eval iterator's
resize, normalization and padding), evaluate.make_predict_fn (the jitted model and
post-processing), evaluate.to_original_pixels; so the detections are the ones
evaluation scores, and config.postprocess sets the score threshold and the maximum
number per image. Images go through in batches of config.eval.batch_size, each image
on the canvas evaluation gives it (its size bucket, or the config's one canvas), so
the function compiles once per canvas.
"""

import jax
import numpy as np

from retina_jax import checkpoint
from retina_jax import evaluate
from retina_jax import postprocess
from retina_jax import sharding
from retina_jax.data import coco
from retina_jax.data import pipeline
from retina_jax.model import retinanet


class Detector:
  """A RetinaNet with its variables, post-processing and class names, ready to run on images.

  Attributes:
    config: the config the model was built from.
    class_names: [K] names of the model's classes (config.data.dataset's).
    category_ids: [K] COCO category id of each class.
    step: the checkpoint step the variables come from, or None.
  """

  def __init__(self, config, variables, *, mesh=None, step=None):
    """Builds the model of `config` around `variables`.

    Args:
      config: the run config (model, anchors, data canvas and resizing, postprocess,
        eval.batch_size).
      variables: {'params', 'batch_stats'} of retinanet.build(config).
      mesh: a ('data',) mesh; default all local devices.
      step: where the variables come from, for reports.
    """
    pipeline.check(config)  # resizing, canvases and classes, as evaluation reads them
    postprocess.check(config)
    info = pipeline.dataset_info(config)
    self.mesh = mesh if mesh is not None else sharding.make_mesh(jax.local_devices())
    self.batch_size = int(config.eval.batch_size)
    if self.batch_size < 1 or self.batch_size % self.mesh.size:
      raise ValueError(f'config.eval.batch_size={config.eval.batch_size!r}: must be a positive '
                       f'multiple of the device count ({self.mesh.size})')
    self.config, self.step = config, step
    self.class_names, self.category_ids = tuple(info.class_names), tuple(info.category_ids)
    rep = sharding.replicated(self.mesh)
    self.variables = jax.device_put(variables, rep)
    self.anchors = evaluate.device_anchors(config, self.mesh)
    self.predict = evaluate.make_predict_fn(config, retinanet.build(config), self.mesh)

  @classmethod
  def from_workdir(cls, config, workdir, step=None):
    """The model of checkpoint `step` (None or -1: the newest usable) of `workdir`; reads params and batch_stats only."""
    mesh = sharding.make_mesh(jax.local_devices())
    target = retinanet.abstract_variables(retinanet.build(config), sharding.replicated(mesh))
    step, variables = checkpoint.restore_variables(workdir, target, step)
    return cls(config, variables, mesh=mesh, step=step)

  @classmethod
  def from_pretrained(cls, config):
    """The torchvision RetinaNet of config.model.pretrained (.pth, .safetensors or .npz)."""
    from retina_jax.model import torchvision_weights
    m = config.model
    if not m.pretrained:
      raise ValueError('config.model.pretrained is not set: give a workdir or a torchvision RetinaNet file')
    if m.pretrained_kind != 'retinanet':
      raise ValueError(f'config.model.pretrained_kind={m.pretrained_kind!r}: an ImageNet backbone has no '
                       "trained detection heads; a whole torchvision RetinaNet needs 'retinanet'")
    mesh = sharding.make_mesh(jax.local_devices())
    target = retinanet.abstract_variables(retinanet.build(config), sharding.replicated(mesh))
    return cls(config, torchvision_weights.load_torchvision_retinanet(m.pretrained, target, config), mesh=mesh)

  def __call__(self, images):
    """Detects objects in each image.

    Args:
      images: a sequence of [H, W, 3] uint8 RGB arrays, each of any size.
    Returns:
      one dict per image, detections best first: boxes [N, 4] float32 (x1, y1, x2, y2)
      in that image's pixels, scores [N] float32, classes [N] int32 in [0, K),
      category_ids [N] int64 (COCO ids), class_names: list of N str.
    """
    prepared = [self._prepare(i, image) for i, image in enumerate(images)]
    by_canvas = {}  # canvas -> indices of its images, in input order
    for i, p in enumerate(prepared):
      by_canvas.setdefault(p['image'].shape[:2], []).append(i)
    found = [None] * len(prepared)
    for rows in by_canvas.values():
      for start in range(0, len(rows), self.batch_size):
        chunk = rows[start:start + self.batch_size]
        for i, f in zip(chunk, self._run([prepared[i] for i in chunk])):
          found[i] = f
    return found

  def _prepare(self, index, image):
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8 or 0 in image.shape:
      raise ValueError(f'image {index}: expected an [H, W, 3] uint8 RGB array, got shape {image.shape} '
                       f'dtype {image.dtype}')
    canvas, scale, image_hw = pipeline.prepare_image(image, self.config)
    return {'image': canvas.numpy(), 'scale': float(scale), 'image_hw': image_hw.numpy(),
            'orig_hw': np.asarray(image.shape[:2], np.float32)}

  def _run(self, batch):
    """Detections of up to batch_size prepared images of one canvas (padded to a full batch)."""
    n, b = len(batch), self.batch_size
    images = np.zeros((b, *batch[0]['image'].shape), np.float32)
    # Padding rows keep image_hw 0 x 0: post-processing clips every box to nothing there.
    image_hw = np.zeros((b, 2), np.float32)
    for r, p in enumerate(batch):
      images[r], image_hw[r] = p['image'], p['image_hw']
    inputs = sharding.global_batch({'image': images, 'image_hw': image_hw}, self.mesh)
    anchors = self.anchors[batch[0]['image'].shape[:2]]
    dets = jax.device_get(self.predict(self.variables, inputs['image'], inputs['image_hw'], anchors))
    scale = np.asarray([p['scale'] for p in batch], np.float32)
    orig_hw = np.stack([p['orig_hw'] for p in batch])
    boxes = evaluate.to_original_pixels(dets['boxes'][:n], scale, orig_hw)  # [n, D, 4]
    out = []
    for r in range(n):
      keep = dets['valid'][r]
      classes = dets['classes'][r][keep]
      out.append({
          'boxes': boxes[r][keep].astype(np.float32), 'scores': dets['scores'][r][keep],
          'classes': classes, 'category_ids': coco.to_category_ids(classes, self.category_ids),
          'class_names': [self.class_names[c] for c in classes]})
    return out
