"""The coco/2017 path on tfds.testing.mock_data, the label <-> category id map, bad data.

The pipeline reads images with tfds.decode.SkipDecoding; tfds's automatic mock
then tries to re-encode its random examples and fails on object fields of
unequal length. So the mock here is tfds's own random example generator
(unequal lengths kept) with the image encoded as JPEG, as SkipDecoding
returns it, passed to mock_data as its as_dataset_fn.
"""

import json
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.testing import mocking

from configs import base
from retina_jax.data import buckets
from retina_jax.data import coco
from retina_jax.data import pipeline
from retina_jax.data import source

_SIGNATURE = {
    'image': tf.TensorSpec((), tf.string),
    'image/filename': tf.TensorSpec((), tf.string),
    'image/id': tf.TensorSpec((), tf.int64),
    'objects': {
        'id': tf.TensorSpec((None,), tf.int64),
        'area': tf.TensorSpec((None,), tf.int64),
        'bbox': tf.TensorSpec((None, 4), tf.float32),
        'label': tf.TensorSpec((None,), tf.int64),
        'is_crowd': tf.TensorSpec((None,), tf.bool),
    },
}


def _jpeg(image):
  return tf.io.encode_jpeg(image).numpy()


def _as_dataset(examples):
  """A mock_data as_dataset_fn yielding `examples()` (encoded images), any split."""
  def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
    del self, split, read_config, shuffle_files
    assert isinstance(decoders['image'], tfds.decode.SkipDecoding)
    items = list(examples())
    ds = tf.data.Dataset.from_generator(lambda: iter(items), output_signature=_SIGNATURE)
    return ds.apply(tf.data.experimental.assert_cardinality(len(items)))
  return as_dataset


def _random_examples(num=6):
  """tfds's random coco/2017 examples: object fields of unequal length, odd boxes."""
  features = tfds.builder('coco/2017').info.features
  for i, ex in enumerate(mocking.RandomFakeGenerator(features, num_examples=num)):
    ex['image'] = _jpeg(ex['image'])
    ex['image/id'] = i + 1  # random ids may collide; real ones do not
    yield ex


def _objects(boxes, labels, crowd=None):
  n = len(labels)
  return {'id': np.arange(n, dtype=np.int64), 'area': np.zeros(n, np.int64),
          'bbox': np.asarray(boxes, np.float32).reshape(-1, 4), 'label': np.asarray(labels, np.int64),
          'is_crowd': np.zeros(n, bool) if crowd is None else np.asarray(crowd)}


def _bad_examples():
  """One example per bad-data case, images 40 x 60."""
  good = _jpeg(np.full((40, 60, 3), 128, np.uint8))
  many = [[0.1 * i, 0.1, 0.1 * i + 0.05, 0.5] for i in range(5)]
  cases = [
      ('degenerate', good, _objects([[0.1, 0.1, 0.5, 0.5], [0.2, 0.3, 0.2, 0.6], [0.5, 0.5, 0.4, 0.9]], [1, 2, 3])),
      ('no boxes', good, _objects(np.zeros((0, 4)), [])),
      ('too many', good, _objects(many, [0, 1, 2, 3, 4])),
      ('undecodable', b'\xff\xd8 not really a jpeg', _objects([[0.1, 0.1, 0.5, 0.5]], [1])),
      ('crowd', good, _objects([[0.1, 0.1, 0.5, 0.5], [0.2, 0.2, 0.9, 0.9]], [7, 7], [False, True])),
  ]
  for i, (name, image, objects) in enumerate(cases):
    yield {'image': image, 'image/filename': name, 'image/id': i + 1, 'objects': objects}


def _config(**data):
  c = base.get_config()
  c.data.use_buckets = False  # one canvas here; tests/test_data_buckets.py covers buckets
  c.data.canvas = (128, 128)
  c.data.min_size = 64
  c.data.max_size = 128
  c.data.max_boxes = 3
  c.data.shuffle_buffer = 8
  c.train.batch_size = 2
  c.eval.batch_size = 2
  for k, v in data.items():
    setattr(c.data, k, v)
  return c


def test_category_id_map():
  assert len(coco.CATEGORY_IDS) == len(set(coco.CATEGORY_IDS)) == len(coco.CLASS_NAMES) == 80
  assert coco.CATEGORY_IDS[0] == 1 and coco.CATEGORY_IDS[-1] == 90
  assert list(coco.CATEGORY_IDS) == sorted(coco.CATEGORY_IDS)
  np.testing.assert_array_equal(coco.to_category_ids([0, 11, 12, 79]), [1, 13, 14, 90])
  np.testing.assert_array_equal(coco.to_labels([1, 13, 14, 90]), [0, 11, 12, 79])
  labels = np.arange(80)
  np.testing.assert_array_equal(coco.to_labels(coco.to_category_ids(labels)), labels)
  with pytest.raises(ValueError, match=r'\[12\]'):
    coco.to_labels([12])  # one of COCO's unused ids
  with pytest.raises(ValueError, match='labels must be in'):
    coco.to_category_ids([80])
  info = pipeline.dataset_info(_config())
  assert info.num_classes == 80 and info.category_ids == coco.CATEGORY_IDS
  assert info.class_names[0] == 'person' and info.class_names[-1] == 'toothbrush'


def test_train_on_random_mock_examples():
  config = _config(max_boxes=100)
  stats = pipeline.DataStats()
  with tfds.testing.mock_data(as_dataset_fn=_as_dataset(_random_examples)):
    it = pipeline.train_iterator(config, stats=stats)
    batches = [next(it) for _ in range(4)]
  for b in batches:
    assert set(b) == {'image', 'image_hw', 'boxes', 'classes'}
    assert b['image'].shape == (2, 128, 128, 3) and b['image'].dtype == np.float32
    assert b['boxes'].shape == (2, 100, 4) and b['classes'].dtype == np.int32
    valid = b['classes'] >= 0
    assert np.all(b['classes'][valid] < 80)
    assert np.all(b['boxes'][~valid] == 0)
    kept = b['boxes'][valid]
    assert np.all(kept[:, 2] > kept[:, 0]) and np.all(kept[:, 3] > kept[:, 1])
    assert np.all(kept >= 0) and np.all(kept <= 128)
  # Random normalized corners are unordered about half the time: those boxes are dropped.
  assert stats.images == 8 and stats.degenerate_boxes > 0 and stats.skipped_images == 0


def test_bad_data_is_dropped_and_counted():
  config = _config(flip=False)
  stats = pipeline.DataStats()
  with tfds.testing.mock_data(as_dataset_fn=_as_dataset(_bad_examples)):
    batches = list(pipeline.eval_iterator(config, stats=stats))
  # 5 examples make 3 batches of 2; the undecodable one is skipped, so the
  # 4 others fill two batches and the third is all padding.
  assert len(batches) == 3 and not batches[2]['valid'].any()
  np.testing.assert_array_equal(batches[2]['image_id'], [-1, -1])
  np.testing.assert_array_equal(batches[2]['classes'], -1)
  ids = np.concatenate([b['image_id'] for b in batches])
  valid = np.concatenate([b['valid'] for b in batches])
  np.testing.assert_array_equal(ids[valid], [1, 2, 3, 5])
  classes = np.concatenate([b['classes'] for b in batches])[valid]
  np.testing.assert_array_equal(classes, [[1, -1, -1], [-1, -1, -1], [0, 1, 2], [7, -1, -1]])
  assert stats.as_dict() == {'images': 4, 'skipped_images': 1, 'empty_images': 1,
                             'degenerate_boxes': 2, 'crowd_boxes': 1, 'truncated_boxes': 2,
                             'image_pixel_fraction': 64 * 96 / 128**2}  # padding rows not counted
  # Boxes map back to the original image through `scale` (40 x 60 -> 64 x 96).
  first = batches[0]
  np.testing.assert_allclose(first['scale'][0], 1.6)
  np.testing.assert_allclose(first['orig_hw'][0], [40, 60])
  np.testing.assert_allclose(first['image_hw'][0], [64, 96])
  np.testing.assert_allclose(first['boxes'][0, 0] / first['scale'][0], [6, 4, 30, 20], atol=1e-4)


def test_training_skips_undecodable_images():
  config = _config()
  stats = pipeline.DataStats()
  with tfds.testing.mock_data(as_dataset_fn=_as_dataset(_bad_examples)):
    it = pipeline.train_iterator(config, stats=stats)
    for _ in range(4):  # 8 images: two epochs of the 4 decodable ones
      next(it)
  # Skips are seen once a later image arrives: the first epoch's is counted for sure.
  assert stats.images == 8 and stats.skipped_images >= 1 and stats.empty_images == 2


def test_bad_images_are_skipped_and_counted_with_buckets():
  config = _config()
  config.data.use_buckets = True
  config.data.buckets = buckets.propose(config.data.min_size, config.data.max_size)
  stats = pipeline.DataStats()
  with tfds.testing.mock_data(as_dataset_fn=_as_dataset(_bad_examples)):
    batches = list(pipeline.eval_iterator(config, stats=stats))
    train_stats = pipeline.DataStats()
    it = pipeline.train_iterator(config, stats=train_stats)
    for _ in range(4):
      next(it)
  ids = np.concatenate([b['image_id'][b['valid']] for b in batches])
  assert sorted(ids.tolist()) == [1, 2, 3, 5]  # the undecodable one is left out
  assert stats.skipped_images == 1 and stats.images == 4
  # 40 x 60 images at min_size 64: 64 x 96, on the 128 x 128 bucket.
  assert {b['image'].shape[1:3] for b in batches} == {(128, 128)}
  assert train_stats.skipped_images == 1 and train_stats.images == 8


def test_ground_truth_from_mock_keeps_crowd():
  config = _config()
  with tfds.testing.mock_data(as_dataset_fn=_as_dataset(_bad_examples)):
    gt = pipeline.eval_ground_truth(config)
  assert sorted(gt.getImgIds()) == [1, 2, 3, 5]
  assert gt.imgs[1]['height'] == 40 and gt.imgs[1]['width'] == 60
  anns = gt.loadAnns(gt.getAnnIds(imgIds=[5]))
  assert [a['iscrowd'] for a in anns] == [0, 1]
  assert [a['category_id'] for a in anns] == [8, 8]  # label 7 is COCO id 8
  np.testing.assert_allclose(anns[1]['bbox'], [12, 8, 42, 28], atol=1e-3)
  assert anns[1]['area'] == pytest.approx(42 * 28, rel=1e-4)  # area 0 in the data: box area
  assert len(gt.getAnnIds(imgIds=[3])) == 5  # ground truth is not cut at max_boxes
  assert len(gt.getAnnIds(imgIds=[1])) == 1  # degenerate boxes dropped


def test_ground_truth_from_annotation_file(tmp_path):
  path = tmp_path / 'instances.json'
  data = {
      'images': [{'id': i, 'height': 40, 'width': 60, 'file_name': f'{i}.jpg'} for i in (1, 2, 3)],
      'annotations': [{'id': 1, 'image_id': 2, 'category_id': 90, 'bbox': [1, 2, 3, 4],
                       'area': 12.0, 'iscrowd': 0}],
      'categories': [{'id': c, 'name': n} for c, n in zip(coco.CATEGORY_IDS, coco.CLASS_NAMES)],
  }
  path.write_text(json.dumps(data))
  gt = pipeline.eval_ground_truth(_config(annotation_file=str(path)))
  assert sorted(gt.getImgIds()) == [1, 2, 3] and gt.anns[1]['category_id'] == 90
  with pytest.raises(FileNotFoundError, match='config.data.annotation_file'):
    pipeline.eval_ground_truth(_config(annotation_file=str(tmp_path / 'missing.json')))


@pytest.mark.parametrize('key, value, match', [
    ('canvas', (100, 128), 'config.data.canvas'),
    ('min_size', 0, 'config.data.min_size'),
    ('scale_jitter', (1.2, 0.8), 'config.data.scale_jitter'),
    ('max_boxes', 0, 'config.data.max_boxes'),
    ('dataset', 'voc', 'config.data.dataset'),
])
def test_bad_config_names_the_key(key, value, match):
  with pytest.raises(ValueError, match=match):
    pipeline.train_iterator(_config(**{key: value}))


# Issue 12 cases 4 and 6: unprepared COCO and bad eval inputs stop at once, with one clear message.

def test_unprepared_coco_is_never_downloaded(tmp_path):
  # The old pipeline called download_and_prepare: a ~25 GB download from inside the job, or
  # offline a 220 s failure leaving partial files.
  config = _config(data_dir=str(tmp_path))
  for start in (lambda: pipeline.train_iterator(config),
                lambda: source.check_splits(config, train=True, evaluation=True)):
    with pytest.raises(FileNotFoundError) as info:
      start()
    message = str(info.value)
    assert message.startswith(f'coco/2017 is not prepared in config.data.data_dir={str(tmp_path)!r} '
                              f'(looked for {tmp_path}/coco/2017/')
    assert f'tfds build coco/2017 --data_dir={tmp_path} --file_format=tfrecord' in message
    assert '\n' not in message
  assert os.listdir(tmp_path) == []  # nothing downloaded or half-written


def _write(path, text):
  path.write_text(text)
  return str(path)


def _instances(category_ids):
  return {'images': [{'id': 1, 'height': 40, 'width': 60, 'file_name': '1.jpg'}],
          'annotations': [{'id': 1, 'image_id': 1, 'category_id': category_ids[0], 'bbox': [1, 2, 3, 4],
                           'area': 12.0, 'iscrowd': 0}],
          'categories': [{'id': c, 'name': str(c)} for c in category_ids]}


def test_bad_annotation_files_are_named(tmp_path, capsys):
  cases = [
      (_write(tmp_path / 'torn.json', '{"images": ['), r'torn\.json.* is not JSON'),
      (_write(tmp_path / 'list.json', '[]'), r'list\.json.* is not a COCO instances file: no images, annotations'),
      (_write(tmp_path / 'other.json', json.dumps({'images': []})),
       r'not a COCO instances file: no annotations, categories'),
      # Shifted by one: with the old code this scored AP 2.41 instead of 4.87, silently.
      (_write(tmp_path / 'shifted.json', json.dumps(_instances([c - 1 for c in coco.CATEGORY_IDS]))),
       r"shifted\.json': its category ids \{0-10, 12-24, .*\} do not match the dataset's \{1-11, 13-25, .*"
       r'labels without a category: \{11, 25, .*, 90\}; annotated categories without a label: \{0\}'),
  ]
  for path, match in cases:
    with pytest.raises(ValueError, match=match):
      pipeline.eval_ground_truth(_config(annotation_file=path))
  ok = _write(tmp_path / 'ok.json', json.dumps(_instances(coco.CATEGORY_IDS)))
  gt = pipeline.eval_ground_truth(_config(annotation_file=ok))
  assert gt.getImgIds() == [1]
  assert capsys.readouterr().out == ''  # pycocotools' "creating index..." stays out of the progress bar


def test_a_wrong_split_name_is_named_with_the_splits_there_are(tiny_config):
  config = tiny_config
  config.data.eval_split = 'valdation'
  with pytest.raises(ValueError, match=r"^config\.data\.eval_split='valdation': Unknown split 'valdation'\. "
                     r"Should be one of \['train', 'validation'\]"):
    source.check_splits(config, train=True, evaluation=True)
  config.data.eval_split = 'validation[:4]'
  source.check_splits(config, train=True, evaluation=True)  # slices are split names too
