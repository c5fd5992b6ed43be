"""Detector API and predict command: equal to the evaluation path, robust to odd files, COCO-loadable output.

The model is the tiny config's with random weights, saved as a real orbax train-state
checkpoint; the images are the synthetic validation images, exported as JPEG files.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from configs import shapes
from retina_jax import boxes as boxes_lib
from retina_jax import checkpoint
from retina_jax import detector as detector_lib
from retina_jax import evaluate
from retina_jax import optim
from retina_jax import predict
from retina_jax import sharding
from retina_jax import train
from retina_jax.data import export
from retina_jax.data import pipeline
from retina_jax.data import shapes as shapes_data
from retina_jax.model import retinanet

pytestmark = pytest.mark.slow  # builds the tiny synthetic set and compiles the tiny model (~10 s each)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP = 3


def _config(data_dir):
  c = shapes.get_config('tiny')
  c.data.data_dir = data_dir
  # The 128 px images at 96 px on the 128 canvas: mapping back to the files' pixels is not the identity.
  c.data.min_size = 96
  c.data.max_size = 96
  c.eval.batch_size = 4
  return c


def _random_variables(config):
  """Random variables, drawn in numpy: compiling model.init costs half a minute on one core.

  He-normal kernels, identity BatchNorm; the output convs are small, and the class
  bias is set so that scores spread over 0.05..0.9 (a dozen detections per image).
  """
  abstract = retinanet.abstract_variables(retinanet.build(config))
  rng = np.random.default_rng(0)

  def draw(path, s):
    name = path[-1].key
    if name == 'kernel':
      std = 0.003 if path[-2].key == 'out' else np.sqrt(2.0 / np.prod(s.shape[:-1]))
      return rng.normal(0.0, std, s.shape).astype(np.float32)
    return np.full(s.shape, 1.0 if name in ('scale', 'var') else 0.0, np.float32)

  variables = jax.tree_util.tree_map_with_path(draw, abstract)
  variables['params']['head']['cls_net']['out']['bias'][:] = -3.0
  return variables


@pytest.fixture(scope='module')
def setup(tmp_path_factory, tfds_dir):
  """(config, workdir with a train-state checkpoint at STEP, folder of the 8 validation images as files)."""
  root = tmp_path_factory.mktemp('predict')
  config = _config(tfds_dir)
  variables = _random_variables(config)
  tx = optim.make_optimizer(config, retinanet.trainable_mask(variables['params'], config))
  state = train.TrainState(step=np.int32(STEP), params=variables['params'], batch_stats=variables['batch_stats'],
                           opt_state=tx.init(variables['params']), normalizer=np.float32(1.0))
  workdir = str(root / 'run')
  manager = checkpoint.make_manager(workdir, 2)
  checkpoint.save(manager, STEP, jax.device_put(state))
  manager.close()
  folder = str(root / 'images')
  export.export_images(config, folder, 8)
  return config, workdir, folder


@pytest.fixture(scope='module')
def detector(setup):
  config, workdir, _ = setup
  return detector_lib.Detector.from_workdir(config, workdir)


def _eval_path_rows(config, det):
  """{image_id: rows [n, 6] (x, y, w, h, score, category_id)} from the eval iterator and to_coco_rows."""
  anchors = evaluate.device_anchors(config, det.mesh)
  rows = []
  for local in pipeline.eval_iterator(config):
    batch = sharding.global_batch({k: local[k] for k in ('image', 'image_hw')}, det.mesh)
    dets = jax.device_get(det.predict(det.variables, batch['image'], batch['image_hw'],
                                      anchors[local['image'].shape[1:3]]))
    rows.append(evaluate.to_coco_rows(dets, local, pipeline.dataset_info(config).category_ids))
  rows = np.concatenate(rows)
  return {int(i): rows[rows[:, 0] == i][:, 1:] for i in np.unique(rows[:, 0])}


def test_api_on_files_equals_the_evaluation_path(setup, detector):
  config, _, folder = setup
  assert detector.step == STEP
  expected = _eval_path_rows(config, detector)
  paths = predict.find_images([folder])
  found = detector([predict.read_image(p) for p in paths])
  counts = []
  for path, f in zip(paths, found, strict=True):
    want = expected.get(int(os.path.basename(path)[:-len('.jpg')]), np.zeros((0, 6)))
    counts.append(len(want))
    assert len(f['scores']) == len(want), path
    np.testing.assert_allclose(boxes_lib.to_coco(f['boxes']), want[:, :4], atol=1e-4)
    np.testing.assert_allclose(f['scores'], want[:, 4], atol=1e-4)
    np.testing.assert_array_equal(f['category_ids'], want[:, 5])
    assert f['class_names'] == [shapes_data.CLASS_NAMES[c] for c in f['classes']]
    assert np.all(f['boxes'] >= 0.0) and np.all(f['boxes'] <= 128.0)  # the files are 128 x 128
  assert len(paths) == 8 and min(counts) > 0, counts  # a comparison of real detections
  assert detector.predict._cache_size() == 1  # 8 images and the eval batches: one compile


def test_batches_of_any_size_compile_once_and_agree(detector):
  rng = np.random.default_rng(1)
  images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((60, 90), (128, 40), (300, 300))]
  alone = [detector([image])[0] for image in images]
  together = detector(images + images[:2])  # 5 images: a full batch of 4, then 1 padded to 4
  for a, b in zip(alone + alone[:2], together):
    np.testing.assert_allclose(a['boxes'], b['boxes'], atol=1e-4)
    np.testing.assert_allclose(a['scores'], b['scores'], atol=1e-5)
  assert detector.predict._cache_size() == 1
  with pytest.raises(ValueError, match=r'image 1: expected an \[H, W, 3\] uint8 RGB array, got shape \(8, 8\)'):
    detector([images[0], np.zeros((8, 8), np.uint8)])
  with pytest.raises(ValueError, match='dtype float32'):
    detector([np.zeros((8, 8, 3), np.float32)])


def test_json_loads_against_the_ground_truth(setup, detector, tmp_path):
  config, _, folder = setup
  paths = predict.find_images([os.path.join(folder, '*.jpg')])
  out = str(tmp_path / 'out')
  predict.check_output(out, paths)
  summary = predict.predict_files(detector, paths, out, pictures=False)
  assert summary['images'] == 8 and not summary['skipped'] and not os.path.exists(os.path.join(out, '1.png'))
  with open(summary['json']) as f:
    rows = json.load(f)
  assert len(rows) == summary['detections'] > 0
  assert set(rows[0]) == {'image_id', 'file_name', 'bbox', 'score', 'category_id', 'class_name'}
  gt = pipeline.eval_ground_truth(config)  # image ids are the tfds ids, which the files are named by
  results = gt.loadRes(summary['json'])
  assert len(results.getAnnIds()) == len(rows)
  assert set(results.getImgIds()) <= set(gt.getImgIds())
  cats = {c['id']: c['name'] for c in gt.loadCats(gt.getCatIds())}
  assert all(cats[r['category_id']] == r['class_name'] for r in rows)
  row = rows[0]
  assert row['file_name'] == os.path.join(folder, f'{row["image_id"]}.jpg')
  metrics = evaluate.coco_metrics(gt, _rows(rows), gt.getImgIds(), verbose=False)
  assert all(-1.0 <= v <= 1.0 for v in metrics.values())


def _rows(rows):
  return np.asarray([[r['image_id'], *r['bbox'], r['score'], r['category_id']] for r in rows], np.float64)


def _odd_folder(folder):
  """A corrupt JPEG, a grayscale PNG, an RGBA PNG and a very wide RGB JPEG."""
  os.makedirs(folder)
  rng = np.random.default_rng(2)
  with open(os.path.join(folder, 'broken.jpg'), 'wb') as f:
    f.write(b'\xff\xd8\xff\xe0' + rng.bytes(300))  # a JPEG header, then noise
  Image.fromarray(rng.integers(0, 256, (90, 70), dtype=np.uint8), 'L').save(os.path.join(folder, 'gray.png'))
  Image.fromarray(rng.integers(0, 256, (64, 80, 4), dtype=np.uint8), 'RGBA').save(os.path.join(folder, 'rgba.png'))
  Image.fromarray(rng.integers(0, 256, (40, 1000, 3), dtype=np.uint8)).save(os.path.join(folder, 'wide.jpg'))


def test_cli_skips_a_corrupt_file_and_reads_the_odd_ones(setup, tmp_path):
  _, workdir, _ = setup
  folder, out = str(tmp_path / 'odd'), str(tmp_path / 'out')
  _odd_folder(folder)
  proc = subprocess.run(
      [sys.executable, '-m', 'retina_jax.predict', '--config', 'configs/shapes.py:tiny',
       '--config.data.min_size=96', '--config.data.max_size=96', '--config.eval.batch_size=4',
       '--config.postprocess.score_thresh=0.02', '--draw_thresh=0.1',
       '--workdir', workdir, '--output', out, folder],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f'predict: skipped {os.path.join(folder, "broken.jpg")}' in proc.stderr
  assert '3 images' in proc.stdout and '1 skipped' in proc.stdout and 'broken.jpg' in proc.stdout
  with open(os.path.join(out, 'detections.json')) as f:
    rows = json.load(f)
  # Files are named by words, so ids are positions: broken 1, gray 2, rgba 3, wide 4.
  by_file = {os.path.basename(r['file_name']): r for r in rows}
  assert set(by_file) == {'gray.png', 'rgba.png', 'wide.jpg'}
  assert {os.path.basename(r['file_name']): r['image_id'] for r in rows} == {'gray.png': 2, 'rgba.png': 3,
                                                                             'wide.jpg': 4}
  wide = np.asarray([r['bbox'] for r in rows if r['file_name'].endswith('wide.jpg')])
  assert np.all(wide[:, 0] + wide[:, 2] <= 1000 + 1e-3) and np.all(wide[:, 1] + wide[:, 3] <= 40 + 1e-3)
  assert sorted(os.listdir(out)) == ['detections.json', 'gray.png', 'rgba.png', 'wide.png']
  with Image.open(os.path.join(out, 'wide.png')) as im:
    assert im.size == (1000, 40)  # the picture keeps the image's aspect


def test_bad_input_fails_early_with_one_line(setup, tmp_path):
  _, workdir, folder = setup
  with pytest.raises(FileNotFoundError, match=r"input 'nowhere/\*\.png': no such file or folder"):
    predict.find_images([folder, 'nowhere/*.png'])
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match='holds no .jpg, .jpeg, .png file'):
    predict.find_images([str(empty)])
  (tmp_path / 'file').write_text('x')
  paths = predict.find_images([folder])
  with pytest.raises(NotADirectoryError, match=r"--output '.*file' is a file"):
    predict.check_output(str(tmp_path / 'file'), paths)
  with pytest.raises(ValueError, match='holds input images'):
    predict.check_output(folder, paths)
  config = _config(None)
  config.eval.checkpoint_step = 7
  with pytest.raises(FileNotFoundError, match=r'checkpoint step 7 not found .* saved steps: \[3\]'):
    predict.load_detector(config, workdir)
  config.model.pretrained_kind = 'backbone'
  config.model.pretrained = 'resnet18.pth'
  with pytest.raises(ValueError, match="pretrained_kind='backbone'"):
    predict.load_detector(config)
  # The command itself: one line on stderr, no traceback, exit status 1.
  proc = subprocess.run(
      [sys.executable, '-m', 'retina_jax.predict', '--config', 'configs/shapes.py:tiny',
       '--workdir', str(empty), '--output', str(tmp_path / 'out'), folder],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == f'predict: no checkpoint in {empty}/checkpoints'
  assert 'Traceback' not in proc.stderr
