"""Detections -> COCO rows (scale, clipping, category ids) and COCO metrics edge cases."""

import os

import flax
import jax
import numpy as np
import pytest
from pycocotools import coco as coco_api

from retina_jax import evaluate
from retina_jax import sharding
from retina_jax import visualize
from retina_jax.data import pipeline
from retina_jax.model import retinanet


def _ground_truth():
  gt = coco_api.COCO()
  gt.dataset = {
      'images': [{'id': 5, 'height': 100, 'width': 200}, {'id': 9, 'height': 50, 'width': 50}],
      'annotations': [
          {'id': 1, 'image_id': 5, 'category_id': 3, 'bbox': [10.0, 20.0, 40.0, 30.0], 'area': 1200.0,
           'iscrowd': 0},
          {'id': 2, 'image_id': 9, 'category_id': 7, 'bbox': [5.0, 5.0, 30.0, 30.0], 'area': 900.0,
           'iscrowd': 0},
      ],
      'categories': [{'id': 3, 'name': 'a'}, {'id': 7, 'name': 'b'}],
  }
  gt.createIndex()
  return gt


def _detections(scale):
  """Canvas-pixel detections matching _ground_truth() exactly after dividing by `scale`."""
  boxes = np.zeros((3, 2, 4), np.float32)
  boxes[0, 0] = np.array([10, 20, 50, 50]) * scale
  boxes[1, 0] = np.array([5, 5, 35, 35]) * scale
  boxes[1, 1] = np.array([-10, -10, 500, 500])  # clipped to the original 50 x 50
  return {
      'boxes': boxes,
      'scores': np.array([[0.9, 0.0], [0.8, 0.1], [0.7, 0.0]], np.float32),
      'classes': np.array([[0, -1], [1, 1], [0, -1]], np.int32),
      'valid': np.array([[True, False], [True, True], [True, False]]),
  }


def _meta(scale):
  return {'image_id': np.array([5, 9, 5]), 'scale': np.full(3, scale, np.float32),
          'orig_hw': np.array([[100, 200], [50, 50], [100, 200]], np.float32),
          'valid': np.array([True, True, False])}  # the third image is batch padding


def test_rows_undo_the_resize_clip_and_map_category_ids():
  rows = evaluate.to_coco_rows(_detections(2.0), _meta(2.0), category_ids=[3, 7])
  # Padding image and invalid detections are dropped.
  np.testing.assert_allclose(rows, [
      [5, 10, 20, 40, 30, 0.9, 3],
      [9, 5, 5, 30, 30, 0.8, 7],
      [9, 0, 0, 50, 50, 0.1, 7],
  ], rtol=1e-6)


def test_perfect_detections_score_ap_one():
  rows = evaluate.to_coco_rows(_detections(0.5), _meta(0.5), category_ids=[3, 7])
  metrics = evaluate.coco_metrics(_ground_truth(), rows, [5, 9], verbose=False)
  np.testing.assert_allclose(metrics['AP'], 1.0)
  np.testing.assert_allclose(metrics['AP50'], 1.0)
  assert metrics['APl'] == -1.0  # no large objects: COCOeval's -1 is kept, not turned into 0
  cells = [c.strip() for c in evaluate.format_table(metrics, 3).splitlines()[-1].strip('| ').split('|')]
  assert cells[0] == '100.00' and cells[5] == '-'  # AP, then APl without large objects


def test_zero_detections_give_zero_ap_and_no_ground_truth_stays_a_dash(capsys):
  # Issue 12: without detections every metric was 0.00, APl included, where there is no large object.
  gt = _ground_truth()
  capsys.readouterr()  # building the test's ground truth prints; evaluation must not
  metrics = evaluate.coco_metrics(gt, np.zeros((0, 7)), [5, 9])
  assert metrics == {'AP': 0.0, 'AP50': 0.0, 'AP75': 0.0, 'APs': 0.0, 'APm': 0.0, 'APl': -1.0}
  assert evaluate.format_table(metrics, 1).splitlines()[-1].split('|')[-2].strip() == '-'
  assert capsys.readouterr().out == ''


def test_pycocotools_prints_nothing_to_stdout(capsys):
  # Issue 12: loadRes and COCOeval printed into the progress bar's line; their text goes to the log.
  rows = evaluate.to_coco_rows(_detections(0.5), _meta(0.5), category_ids=[3, 7])
  gt = _ground_truth()
  capsys.readouterr()
  evaluate.coco_metrics(gt, rows, [5, 9])
  assert capsys.readouterr().out == ''


def test_eval_inputs_are_checked_before_any_inference(tiny_config, tmp_path):
  # Issue 12: a malformed annotation file failed only after inference over the whole split.
  from retina_jax import sharding
  config = tiny_config
  config.data.annotation_file = str(tmp_path / 'instances.json')
  (tmp_path / 'instances.json').write_text('{"images": [], "annotations": [')

  def predict(*args):
    raise AssertionError('inference ran before the inputs were checked')

  with pytest.raises(ValueError, match=r'instances\.json.* is not JSON'):
    evaluate.evaluate(config, None, None, sharding.make_mesh(), 1, str(tmp_path), predict=predict)


def test_picture_is_written(tmp_path):
  image = np.random.default_rng(0).normal(size=(64, 64, 3)).astype(np.float32)
  ex = {'image': image, 'image_hw': np.array([60, 50]), 'boxes': np.array([[4, 4, 30, 40.0]]),
        'scores': np.array([0.9]), 'classes': np.array([1])}
  path = str(tmp_path / 'detections.png')
  visualize.save_detections(path, [ex, ex], ['a', 'b'], (123.7, 116.3, 103.5), (58.4, 57.1, 57.4))
  with open(path, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  shown = visualize.denormalize(image, (1.0, 2.0, 3.0), (2.0, 2.0, 2.0))
  assert shown.min() >= 0.0 and shown.max() <= 1.0


def test_single_picture_has_the_image_aspect(tmp_path):
  from PIL import Image
  image = np.random.default_rng(0).integers(0, 255, size=(50, 400, 3), dtype=np.uint8)
  path = str(tmp_path / 'wide.png')
  visualize.save_image(path, image, np.array([[10, 5, 120, 45.0]]), np.array([0.8]), np.array([0]), ['a'])
  with Image.open(path) as im:
    assert im.size == (640, 80)  # long side enlarged to 640 px, aspect kept


def test_without_a_checkpoint_the_pretrained_weights_are_evaluated_as_step_0(tmp_path, monkeypatch):
  import jax
  import jax.numpy as jnp
  from configs import shapes
  from retina_jax.model import retinanet
  from retina_jax.model import torchvision_weights
  config = shapes.get_config('tiny')
  config.model.pretrained = 'resnet18.npz'
  loaded, evaluated = [], {}
  # Compiling the model's init takes minutes on one busy core; the wiring is what is tested here.
  monkeypatch.setattr(retinanet, '_init', lambda model, rng: {'params': {'w': jnp.zeros(3)}, 'batch_stats': {}})

  def load(path, variables, config):
    loaded.append(path)
    return jax.tree.map(lambda x: x + 1, variables)

  def fake_evaluate(config, model, variables, mesh, step, workdir, coco_gt=None, record=None):
    evaluated.update(step=step, variables=variables)

  monkeypatch.setitem(torchvision_weights.LOADERS, 'backbone', load)
  monkeypatch.setattr(evaluate, 'ground_truth', lambda config: None)
  monkeypatch.setattr(evaluate, 'evaluate', fake_evaluate)
  workdir = str(tmp_path / 'run')
  evaluate.evaluate_checkpoint(config, workdir)
  assert loaded == ['resnet18.npz'] and evaluated['step'] == 0
  np.testing.assert_array_equal(evaluated['variables']['params']['w'], np.ones(3))  # init, then the file's
  assert not os.path.exists(workdir)  # evaluation only reads
  config.model.pretrained = None
  with pytest.raises(FileNotFoundError, match=r'no checkpoint in .*run/checkpoints and no config\.model\.pretrained'):
    evaluate.evaluate_checkpoint(config, workdir)


def test_buckets_and_the_square_canvas_give_the_same_detections(tiny_config):
  """What experiments/eval_buckets.py measures on a trained model, here on a random one.

  The network masks the padding (model/padding.py), so each image's detections must not
  depend on the canvas it was padded to.
  """
  c = tiny_config
  c.data.shapes.varied_sizes = True
  c.data.use_buckets = True
  c.data.min_size, c.data.max_size = 96, 160
  c.data.buckets = ((128, 128), (128, 256), (256, 128))
  c.postprocess.score_thresh = 0.0  # every image keeps its top detections, however unsure
  square = c.copy_and_resolve_references()
  square.data.use_buckets, square.data.canvas = False, (256, 256)
  mesh = sharding.make_mesh()
  model = retinanet.build(c)
  variables = retinanet.init_variables(c, model, jax.random.key(0))
  # Spread the scores: at init every anchor sits near the 1% prior.
  variables['params'] = flax.traverse_util.path_aware_map(
      lambda path, v: v * 30.0 if path[-2] == 'out' and path[-1] == 'kernel' else v, variables['params'])
  found = {}
  for name, config in (('buckets', c), ('square', square)):
    predict, anchors = evaluate.make_predict_fn(config, model, mesh), evaluate.device_anchors(config, mesh)
    rows, canvases = [], set()
    for local in pipeline.eval_iterator(config):
      canvases.add(local['image'].shape[1:3])
      batch = sharding.global_batch(local, mesh)
      dets = jax.device_get(predict(variables, batch['image'], batch['image_hw'], anchors[local['image'].shape[1:3]]))
      rows.append(evaluate.to_coco_rows(dets, local, pipeline.dataset_info(config).category_ids))
    rows = np.concatenate(rows)
    found[name] = {i: rows[rows[:, 0] == i] for i in np.unique(rows[:, 0])}
    assert len(canvases) >= (2 if name == 'buckets' else 1), canvases  # more than one bucket is exercised
  assert found['buckets'].keys() == found['square'].keys()
  # Each image's best 10 detections of either run are among the other's (same box, class and
  # score). Not all 100: anchors centred on the padding exist on one canvas only, and at a
  # threshold of 0 their near-prior scores fill the tail.
  for image_id in found['buckets']:
    for a, b in ((found['buckets'][image_id], found['square'][image_id]),
                 (found['square'][image_id], found['buckets'][image_id])):
      for row in a[np.argsort(-a[:, 5])][:10]:  # [image_id, x, y, w, h, score, category]
        same = (b[:, 6] == row[6]) & (np.abs(b[:, 1:5] - row[1:5]).max(1) < 1e-3) & (np.abs(b[:, 5] - row[5]) < 1e-5)
        assert same.any(), (image_id, row)
