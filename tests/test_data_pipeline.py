"""train_iterator / eval_iterator / eval_ground_truth on a tiny built 'retina_shapes' set."""

import json

import numpy as np
import pytest
import tensorflow as tf

from configs import base
from retina_jax import boxes as boxes_lib
from retina_jax.data import pipeline

pytestmark = pytest.mark.slow  # builds a dataset (16 + 10 images of 64 px, a few seconds)


def _config(tfds_dir, **data):
  c = base.get_config()
  c.data.dataset = 'shapes'
  c.data.data_dir = tfds_dir
  c.data.use_buckets = False  # one canvas here; tests/test_data_buckets.py covers buckets
  c.data.canvas = (128, 128)
  c.data.min_size = 64
  c.data.max_size = 64
  c.data.max_boxes = 12
  c.data.shuffle_buffer = 16
  c.data.shapes.image_size = 64
  c.data.shapes.num_train = 16
  c.data.shapes.num_val = 10
  c.data.shapes.max_objects = 8
  c.data.shapes.min_object_size = 6
  c.model.num_classes = 6
  c.train.batch_size = 4
  c.eval.batch_size = 4
  for k, v in data.items():
    setattr(c.data, k, v)
  return c


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_train_batches(tfds_dir):
  stats = pipeline.DataStats()
  batches = _take(pipeline.train_iterator(_config(tfds_dir), stats=stats), 2)
  b = batches[0]
  assert set(b) == {'image', 'image_hw', 'boxes', 'classes'}
  assert b['image'].shape == (4, 128, 128, 3) and b['image'].dtype == np.float32
  assert b['boxes'].shape == (4, 12, 4) and b['classes'].shape == (4, 12)
  # 64 x 64 images on a 128 canvas: normalized content, zero (mean colour) padding.
  assert np.all(b['image'][:, 64:] == 0) and np.all(b['image'][:, :, 64:] == 0)
  assert np.abs(b['image'][:, :64, :64]).max() > 0.5
  valid = b['classes'] >= 0
  assert valid.any() and np.all(b['classes'][valid] < 6)
  assert np.all(b['boxes'][valid] <= 64) and np.all(b['boxes'][~valid] == 0)
  assert stats.images == 8 and stats.crowd_boxes == 0  # crowds are in validation only


def test_train_is_deterministic_given_seed(tfds_dir):
  config = _config(tfds_dir, scale_jitter=(0.5, 1.0))
  a = _take(pipeline.train_iterator(config), 3)
  b = _take(pipeline.train_iterator(config), 3)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  config.seed = 1
  c = _take(pipeline.train_iterator(config), 3)
  assert not all(np.array_equal(x['image'], y['image']) for x, y in zip(a, c))


def test_scale_jitter_scales_images_and_boxes(tfds_dir):
  b = next(pipeline.train_iterator(_config(tfds_dir, scale_jitter=(0.5, 0.5), flip=False)))
  assert np.all(b['image'][:, 32:] == 0) and np.all(b['image'][:, :, 32:] == 0)
  valid = b['classes'] >= 0
  assert np.all(b['boxes'][valid] <= 32)


def test_train_slices_of_two_processes_are_disjoint_and_cover(tfds_dir):
  config = _config(tfds_dir, flip=False)
  seen = []
  for index in range(2):
    # batch 4 over 2 processes: 2 per process, 4 batches = one epoch of 8 images.
    batches = _take(pipeline.train_iterator(config, process_index=index, process_count=2), 4)
    seen.append({img.tobytes() for b in batches for img in b['image']})
  assert len(seen[0]) == len(seen[1]) == 8
  assert not seen[0] & seen[1]


def test_eval_pads_the_last_batch(tfds_dir):
  stats = pipeline.DataStats()
  batches = list(pipeline.eval_iterator(_config(tfds_dir), stats=stats))
  assert len(batches) == 3  # 10 images, batches of 4
  b = batches[-1]
  np.testing.assert_array_equal(b['valid'], [True, True, False, False])
  np.testing.assert_array_equal(b['image_id'][2:], -1)
  assert np.all(b['classes'][2:] == -1) and np.all(b['image'][2:] == 0)
  ids = np.concatenate([b['image_id'][b['valid']] for b in batches])
  assert sorted(ids.tolist()) == list(range(1, 11))
  assert set(batches[0]) == {'image', 'boxes', 'classes', 'image_id', 'orig_hw', 'scale',
                             'image_hw', 'valid'}
  assert batches[0]['image_id'].dtype == np.int64
  np.testing.assert_array_equal(batches[0]['orig_hw'], 64)
  np.testing.assert_array_equal(batches[0]['scale'], 1.0)
  assert stats.images == 10 and stats.skipped_images == 0


def test_eval_slices_of_two_processes(tfds_dir):
  config = _config(tfds_dir, eval_images=9)
  everything = [i for b in pipeline.eval_iterator(config) for i in b['image_id'][b['valid']]]
  assert len(everything) == 9
  slices = []
  for index in range(2):
    batches = list(pipeline.eval_iterator(config, process_index=index, process_count=2))
    assert len(batches) == 3 and all(len(b['valid']) == 2 for b in batches)  # same count on both
    slices.append([i for b in batches for i in b['image_id'][b['valid']]])
  assert [len(s) for s in slices] == [5, 4]
  assert slices[0] + slices[1] == everything  # disjoint, cover, in order


def test_ground_truth_matches_eval_batches(tfds_dir):
  config = _config(tfds_dir, min_size=96, max_size=96)  # scale 1.5
  gt = pipeline.eval_ground_truth(config)
  assert sorted(gt.getImgIds()) == list(range(1, 11))
  assert {c['id'] for c in gt.loadCats(gt.getCatIds())} == set(range(1, 7))
  for b in pipeline.eval_iterator(config):
    for i in np.flatnonzero(b['valid']):
      image_id = int(b['image_id'][i])
      assert gt.imgs[image_id]['height'] == 64 and b['scale'][i] == 1.5
      anns = [a for a in gt.loadAnns(gt.getAnnIds(imgIds=[image_id])) if not a['iscrowd']]
      want = boxes_lib.from_coco(np.array([a['bbox'] for a in anns]).reshape(-1, 4)) * 1.5
      n = min(len(anns), 12)
      np.testing.assert_allclose(b['boxes'][i, :n], want[:n], atol=1e-3)
      np.testing.assert_array_equal(b['classes'][i, :n] + 1, [a['category_id'] for a in anns][:n])


def test_ground_truth_from_file_follows_eval_images(tfds_dir, tmp_path):
  path = tmp_path / 'instances.json'
  path.write_text(json.dumps({
      'images': [{'id': i, 'height': 64, 'width': 64, 'file_name': f'{i}.jpg'} for i in range(1, 11)],
      'annotations': [{'id': i, 'image_id': i, 'category_id': 1, 'bbox': [1, 1, 9, 9], 'area': 81.0,
                       'iscrowd': 0} for i in range(1, 11)],
      'categories': [{'id': i, 'name': str(i)} for i in range(1, 7)],
  }))
  config = _config(tfds_dir, annotation_file=str(path), eval_images=3)
  gt = pipeline.eval_ground_truth(config)
  ids = sorted(int(i) for b in pipeline.eval_iterator(config) for i in b['image_id'][b['valid']])
  assert sorted(gt.getImgIds()) == ids and len(ids) == 3
  assert sorted(a['image_id'] for a in gt.dataset['annotations']) == ids


def test_batch_size_must_split_over_processes(tfds_dir):
  with pytest.raises(ValueError, match='config.eval.batch_size'):
    pipeline.eval_iterator(_config(tfds_dir), process_index=0, process_count=3)
  with pytest.raises(ValueError, match='config.model.num_classes'):
    config = _config(tfds_dir)
    config.model.num_classes = 3
    pipeline.train_iterator(config)
  config = _config(tfds_dir)
  config.model.num_classes = config.model.num_classes + 1  # an output no category id can score
  with pytest.raises(ValueError, match='must equal'):
    pipeline.eval_iterator(config)


def test_scale_jitter_moves_the_shorter_side_only():
  # A 100 x 400 image, shorter side 100 -> 50 by jitter 0.5: scale 0.5 puts the longer side at
  # 200, inside the cap of 300. Jittering the cap too (300 -> 150) would give scale 0.375.
  data = {'canvas': (128, 256), 'min_size': 100.0, 'max_size': 300.0, 'scale_jitter': (0.5, 0.5),
          'flip': False, 'mean': (0.0, 0.0, 0.0), 'std': (1.0, 1.0, 1.0), 'max_boxes': 2}
  ex = {'image': tf.zeros((100, 400, 3), tf.uint8), 'boxes': tf.constant([[0.0, 0.0, 400.0, 100.0]]),
        'classes': tf.constant([1], tf.int32), 'is_crowd': tf.constant([False]),
        'area': tf.constant([40000.0]), 'image_id': tf.constant(7, tf.int64)}
  out = pipeline._prepare(ex, data, data['canvas'], rand=tf.constant([0.9, 0.3]))
  np.testing.assert_allclose(float(out['scale']), 0.5)
  np.testing.assert_allclose(out['boxes'].numpy()[0], [0.0, 0.0, 200.0, 50.0], atol=1e-4)
