"""Config validation, command-line overrides, and one-step train + evaluate end to end."""

import json
import os
import re

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import flags
from ml_collections import config_flags
from tensorflow_datasets.testing import mocking

from configs import base
from configs import shapes
from retina_jax import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('key, value, message', [
    ('data.canvas', (1000, 1408), 'data.canvas'),
    ('matching.bg_iou', 0.6, 'matching.bg_iou'),
    ('matching.fg_iou', 1.5, 'matching.fg_iou'),
    ('loss.gamma', -1.0, 'loss.gamma'),
    ('loss.alpha', 1.5, 'loss.alpha'),
    ('loss.cls', 'softmax', 'loss.cls'),
    ('model.backbone', 'vgg16', 'model.backbone'),
    ('model.prior_prob', 1.5, 'model.prior_prob'),
    ('model.dtype', 'float16', 'model.dtype'),
    ('model.freeze_at', 7, 'model.freeze_at'),
    ('mode', 'serve', 'mode'),
    ('optim.decay_steps', (80000, 60000), 'optim.decay_steps'),
    ('anchors.sizes', (32.0, 64.0), 'anchors.sizes'),
    ('train.steps', 0, 'train.steps'),
])
def test_out_of_range_values_name_the_key(key, value, message):
  c = base.get_config()
  section, _, name = key.rpartition('.')
  setattr(c[section] if section else c, name, value)
  with pytest.raises(ValueError, match=message.replace('.', r'\.')):
    main.validate(c)


@pytest.mark.parametrize('key, value', [
    ('optim.base_lr', float('inf')), ('loss.gamma', float('nan')), ('anchors.sizes', (16.0, float('inf'))),
    ('loss.normalizer_init', float('inf')),
])
def test_non_finite_values_are_refused(key, value):
  # Issue 12: base_lr=inf was accepted and the run failed later with a non-finite loss.
  c = shapes.get_config('tiny')
  section, _, name = key.rpartition('.')
  setattr(c[section], name, value)
  with pytest.raises(ValueError, match=re.escape(f'config.{key}=') + '.*must be finite'):
    main.validate(c)


def test_a_learning_rate_beyond_float32_is_refused():
  c = shapes.get_config('tiny')
  c.optim.base_lr, c.optim.base_batch = 1e38, 1  # times 8 images: beyond float32's 3.4e38
  with pytest.raises(ValueError, match=r'config\.optim\.base_lr=1e\+38: .*float32'):
    main.validate(c)


def test_valid_configs_pass_and_negative_alpha_means_none():
  main.validate(base.get_config())
  main.validate(shapes.get_config())
  main.validate(shapes.get_config('tiny'))
  c = base.get_config()
  c.loss.alpha = -1.0
  main.validate(c)


def test_batch_sizes_must_split_over_devices_and_processes():
  c = base.get_config()
  with pytest.raises(ValueError, match=r'train\.batch_size=16'):
    main.validate(c, num_devices=3)
  c.train.batch_size = 24
  with pytest.raises(ValueError, match=r'eval\.batch_size=8'):
    main.validate(c, num_devices=1, num_processes=3)


def _parse(*overrides):
  argv = ['prog', f'--config={ROOT}/configs/shapes.py', *overrides]
  fv = flags.FlagValues()
  # The override flags are defined from the argv seen at definition time.
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=fv, sys_argv=argv)
  fv(argv)
  return fv.config


def test_command_line_overrides_and_unknown_keys():
  c = _parse('--config.train.steps=7', '--config.loss.gamma=0.5')
  assert c.train.steps == 7 and c.loss.gamma == 0.5
  main.validate(c)
  with pytest.raises(Exception, match='stepz'):
    _parse('--config.train.stepz=7')
  c = _parse('--config.matching.bg_iou=0.9')
  with pytest.raises(ValueError, match=r'matching\.bg_iou=0\.9'):
    main.validate(c)


def test_unknown_key_in_a_config_file_is_rejected():
  c = base.get_config()
  c.unlock()
  c.train.warmup = 3  # a typo'd key a derived file could add
  with pytest.raises(ValueError, match=r'train\.warmup'):
    main.validate(c)


def _check_run(workdir, metrics):
  assert set(metrics) >= {'AP', 'AP50', 'AP75', 'APs', 'APm', 'APl'}
  assert all(0.0 <= metrics[k] <= 1.0 for k in ('AP', 'AP50', 'AP75'))
  with open(os.path.join(workdir, 'eval_1.json')) as f:
    assert json.load(f)['AP'] == metrics['AP']
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  assert rows[0]['step'] == 1 and np.isfinite(rows[0]['loss']) and rows[0]['num_pos'] > 0
  assert os.path.exists(os.path.join(workdir, 'detections_1.png'))
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '1'))


@pytest.mark.slow
def test_one_step_train_and_evaluate_on_shapes(tmp_path):
  c = shapes.get_config('tiny')
  c.data.data_dir = str(tmp_path / 'tfds')
  c.train.steps = 1
  main.validate(c)
  workdir = str(tmp_path / 'run')
  metrics = main.run(c, workdir)
  _check_run(workdir, metrics)
  assert metrics['images'] == c.data.shapes.num_val


_SIGNATURE = {
    'image': tf.TensorSpec((), tf.string), 'image/filename': tf.TensorSpec((), tf.string),
    'image/id': tf.TensorSpec((), tf.int64),
    'objects': {'id': tf.TensorSpec((None,), tf.int64), 'area': tf.TensorSpec((None,), tf.int64),
                'bbox': tf.TensorSpec((None, 4), tf.float32), 'label': tf.TensorSpec((None,), tf.int64),
                'is_crowd': tf.TensorSpec((None,), tf.bool)},
}


def _mock_coco(self, split, decoders=None, read_config=None, shuffle_files=False):
  """tfds's random coco/2017 examples with JPEG bytes, as the pipeline's SkipDecoding reads them."""
  del self, split, decoders, read_config, shuffle_files
  features = tfds.builder('coco/2017').info.features
  items = []
  for i, ex in enumerate(mocking.RandomFakeGenerator(features, num_examples=8)):
    ex['image'] = tf.io.encode_jpeg(ex['image']).numpy()
    ex['image/id'] = i + 1
    items.append(ex)
  ds = tf.data.Dataset.from_generator(lambda: iter(items), output_signature=_SIGNATURE)
  return ds.apply(tf.data.experimental.assert_cardinality(len(items)))


@pytest.mark.slow
def test_one_step_train_and_evaluate_on_mock_coco(tmp_path):
  c = shapes.get_config('tiny')
  c.data.dataset = 'coco'
  c.data.max_boxes = 16
  c.data.shuffle_buffer = 8
  c.model.num_classes = 80
  c.train.steps = 1
  c.train.batch_size = 4
  c.eval.batch_size = 4
  main.validate(c)
  workdir = str(tmp_path / 'run')
  with tfds.testing.mock_data(as_dataset_fn=_mock_coco):
    metrics = main.run(c, workdir)
  _check_run(workdir, metrics)
  assert metrics['images'] == 8
