"""Config validation, command-line overrides, and one-step train + evaluate end to end."""

import json
import logging as py_logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import flags
from absl import logging as absl_logging
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
def test_one_step_train_and_evaluate_on_shapes(tiny_config, tmp_path):
  c = tiny_config
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


# Issue 12 case 7: errors a user can fix are one line on stderr, no traceback, status 1.

def _main(*args, timeout=300, **popen):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
  return subprocess.run([sys.executable, '-m', 'retina_jax.main', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout, **popen)


@pytest.mark.parametrize('args, message', [
    (['--config=configs/shapez.py'], "--config: [Errno 2] No such file or directory: 'configs/shapez.py'"),
    (['--config=configs/shapes.py:tiny', '--config.train.stepz=3'],
     '--config.train.stepz: unknown config key \'stepz\' (Did you mean "steps" instead of "stepz"?)'),
    (['--config=configs/shapes.py:nano'],
     "--config=configs/shapes.py:nano: ValueError: configs/shapes.py: unknown argument 'nano'"),
    (['--config=configs/shapes.py:tiny', '--config.optim.base_lr=inf'], 'config.optim.base_lr=inf: must be finite'),
])
def test_user_errors_print_one_line(tmp_path, args, message):
  result = _main(*args, f'--workdir={tmp_path}')
  assert result.returncode == 1, result.stderr
  assert 'Traceback' not in result.stderr and result.stdout == ''
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ' + message), result.stderr


@pytest.fixture(scope='module')
def preempted(tmp_path_factory, tfds_dir):
  """A tiny run from the command line, stopped by SIGTERM once step 1 is logged.

  Checkpoints are saved every step, so the workdir holds at least steps 1 and 2.
  Returns:
    (the config as the command line built it, workdir, exit status, stderr).
  """
  c = shapes.get_config('tiny')
  c.data.data_dir = tfds_dir
  c.mode, c.train.steps, c.train.checkpoint_every = 'train', 1000, 1
  workdir = str(tmp_path_factory.mktemp('preempted'))
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
  proc = subprocess.Popen(
      [sys.executable, '-m', 'retina_jax.main', '--config=configs/shapes.py:tiny', f'--workdir={workdir}',
       f'--config.data.data_dir={c.data.data_dir}', '--config.mode=train', '--config.train.steps=1000',
       '--config.train.checkpoint_every=1'],
      cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + 600
  while not (os.path.exists(metrics) and os.path.getsize(metrics)) and time.time() < deadline:
    if proc.poll() is not None:
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=600)
  return c, workdir, proc.returncode, err


def _files(workdir):
  out = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      with open(os.path.join(root, name), 'rb') as f:
        out[os.path.relpath(os.path.join(root, name), workdir)] = f.read()
  return out


def _steps(workdir):
  return sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit())


@pytest.mark.slow
def test_sigterm_saves_and_exits_with_status_143(preempted):
  # Issue 12 case 7: SIGTERM exited 0, so a scheduler could not tell preempted from finished.
  _, workdir, status, err = preempted
  assert status == 143, err[-3000:]
  last = _steps(workdir)[-1]
  assert f'SIGTERM at step {last}; saved in {workdir}; exiting with status 143' in err
  assert 'Traceback' not in err


@pytest.mark.slow
def test_a_rerun_with_another_config_is_refused_and_changes_nothing(preempted):
  # Issue 12 case 2: it evaluated the old model under the new config and rewrote config.json.
  config, workdir, _, _ = preempted
  before = _files(workdir)
  c = config.copy_and_resolve_references()
  c.loss.gamma = 0.0
  with pytest.raises(ValueError, match=r'config\.json records other values: loss\.gamma 2\.0 -> 0\.0'):
    main.run(c, workdir)
  assert _files(workdir) == before


@pytest.mark.slow
def test_evaluation_writes_its_own_record_and_skips_a_damaged_checkpoint(preempted, tmp_path, caplog):
  config, trained_dir, _, _ = preempted
  workdir = str(tmp_path / 'run')
  shutil.copytree(trained_dir, workdir)
  *_, good, latest = _steps(workdir)
  data = [os.path.join(r, f) for r, _, names in os.walk(os.path.join(workdir, 'checkpoints', str(latest)))
          for f in names if f'{os.sep}d{os.sep}' in os.path.join(r, f)]
  for path in data:  # damage the latest step: its arrays no longer match their fingerprints
    with open(path, 'r+b') as f:
      f.seek(os.path.getsize(path) // 2)
      f.write(b'\xff' * 8)
  before = _files(workdir)
  c = config.copy_and_resolve_references()
  c.mode = 'eval'
  c.data.eval_images = 4  # an eval value: the training run's records must not be touched
  metrics = main.run(c, workdir)
  assert metrics['step'] == good and metrics['images'] == 4  # the latest reported and skipped
  assert f'checkpoint step {latest}' in caplog.text and f'using step {good}' in caplog.text
  after = _files(workdir)
  assert {k: v for k, v in after.items() if k in before} == before  # nothing rewritten or removed
  new = sorted(k for k in after if k not in before)
  assert [os.path.basename(k) for k in new] == ['config.json', f'detections_{good}.png', f'eval_{good}.json']
  assert all(k.startswith('evals' + os.sep) for k in new)
  record = json.loads(after[[k for k in new if k.endswith('.json') and 'eval_' in k][0]])
  assert record['changed_from_training'] == {'data.eval_images': [0, 4]}
  assert record['AP'] == metrics['AP']


@pytest.mark.slow
def test_evaluation_reads_the_model_whatever_optimizer_trained_it(preempted, tmp_path):
  # Issue 13: evaluation rebuilt the whole train state with the eval config's optimizer, so
  # other optim.* values (another optimizer state) made every checkpoint unreadable.
  config, trained_dir, _, _ = preempted
  workdir = str(tmp_path / 'run')
  shutil.copytree(trained_dir, workdir)
  c = config.copy_and_resolve_references()
  c.mode = 'eval'
  c.data.eval_images = 4
  c.optim.momentum, c.optim.weight_decay, c.optim.base_lr, c.optim.grad_clip = 0.0, 0.0, 1.0, 5.0
  metrics = main.run(c, workdir, allow_config_change=True)
  assert metrics['step'] == _steps(workdir)[-1] and metrics['images'] == 4


def test_tfds_chatter_stays_out_of_the_progress_bar(tmp_path, caplog):
  # Issue 12: tfds logged 'Using custom data configuration' into the bar's line at every evaluation.
  from retina_jax.data import shapes as shapes_data
  quiet = main._QuietLibraries()  # what main installs unless --verbosity is given
  absl_logger = py_logging.getLogger('absl')
  absl_logger.addFilter(quiet)
  try:
    with caplog.at_level(py_logging.INFO):
      shapes_data.builder(shapes.get_config('tiny').data.shapes, str(tmp_path))
      absl_logging.warning('data: skipped 1 undecodable image(s) of train')  # ours stays
  finally:
    absl_logger.removeFilter(quiet)
  assert 'Using custom data configuration' not in caplog.text
  assert 'data: skipped 1 undecodable image(s)' in caplog.text
