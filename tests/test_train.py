"""The train loop: SIGTERM saves, a resumed run equals an uninterrupted one, NaN stops cleanly."""

import json
import os
import signal

import jax
import numpy as np
import pytest

from configs import shapes
from retina_jax import checkpoint
from retina_jax import train
from retina_jax.data import pipeline


@pytest.fixture(scope='module')
def config(tmp_path_factory, tfds_dir):
  # The four runs below compile the same step: let the later ones read it from disk.
  jax.config.update('jax_compilation_cache_dir', str(tmp_path_factory.mktemp('jax_cache')))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  c = shapes.get_config('tiny')
  c.data.data_dir = tfds_dir
  c.mode = 'train'
  c.train.steps = 4
  c.train.checkpoint_every = 100  # only the end, SIGTERM and the explicit saves below
  return c


@pytest.fixture(scope='module')
def bucket_config(config):
  """The same run on size buckets: COCO-like image sizes, each batch on one of three canvases."""
  c = config.copy_and_resolve_references()
  c.data.shapes.varied_sizes = True
  c.data.use_buckets = True
  # 4:3 images (96 x 128 at min_size 96) fit 128 x 128, which the square runs compiled already;
  # 3:2 ones (96 x 144) need 128 x 256, portrait 3:2 ones 256 x 128.
  c.data.min_size, c.data.max_size = 96, 160
  c.data.buckets = ((128, 128), (128, 256), (256, 128))
  return c


def _patch_iterator(monkeypatch, on_batch):
  """Wraps the real iterator; on_batch(i, batch) runs as batch i (1-based) is handed out."""
  real = pipeline.train_iterator

  def wrapped(*args, **kwargs):
    for i, batch in enumerate(real(*args, **kwargs), start=1):
      yield on_batch(i, batch)

  monkeypatch.setattr(pipeline, 'train_iterator', wrapped)


@pytest.mark.slow
def test_sigterm_then_resume_equals_uninterrupted_run(config, tmp_path, monkeypatch):
  full = str(tmp_path / 'full')
  train.train_and_evaluate(config, full)

  parts = str(tmp_path / 'parts')

  def sigterm_at_2(i, batch):
    if i == 2:
      os.kill(os.getpid(), signal.SIGTERM)
    return batch

  with monkeypatch.context() as m:
    _patch_iterator(m, sigterm_at_2)
    with pytest.raises(train.Preempted):  # main turns it into exit status 143
      train.train_and_evaluate(config, parts)
  manager = checkpoint.make_manager(parts, 1)
  assert checkpoint.latest_step(manager) == 2  # saved on SIGTERM, then stopped
  manager.close()

  def nan_at_3(i, batch):
    if i == 3:  # batches 1 and 2 are skipped by the resumed run: this one feeds step 3
      batch = dict(batch, image=np.full_like(batch['image'], np.nan))
    return batch

  with monkeypatch.context() as m:
    _patch_iterator(m, nan_at_3)
    with pytest.raises(FloatingPointError, match='step 3'):
      train.train_and_evaluate(config, parts)
  manager = checkpoint.make_manager(parts, 1)
  assert manager.all_steps() == [2]  # the non-finite state was never saved
  manager.close()

  train.train_and_evaluate(config, parts)  # resumes from 2, skipping the 2 consumed batches
  step_full, a = checkpoint.restore_on_one_device(full)
  step_parts, b = checkpoint.restore_on_one_device(parts)
  assert step_full == step_parts == 4
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)

  with open(os.path.join(parts, 'metrics.jsonl')) as f:
    steps = [json.loads(line)['step'] for line in f]
  assert steps == [1, 2, 3, 4]  # the failed step 3 wrote nothing


@pytest.mark.slow
def test_a_bucketed_run_changes_bucket_and_resumes_exactly(bucket_config, tmp_path, monkeypatch):
  full, parts = str(tmp_path / 'full'), str(tmp_path / 'parts')
  canvases = []

  def record(i, batch):
    canvases.append(batch['image'].shape[1:3])
    return batch

  with monkeypatch.context() as m:
    _patch_iterator(m, record)
    train.train_and_evaluate(bucket_config, full)
  # The schedule of this config and data: 3 steps on 128 x 128, then one on 128 x 256.
  assert len(canvases) == 4 and canvases[2] != canvases[3], canvases

  def sigterm_at_3(i, batch):
    if i == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return batch

  with monkeypatch.context() as m:
    _patch_iterator(m, sigterm_at_3)
    with pytest.raises(train.Preempted):
      train.train_and_evaluate(bucket_config, parts)
  train.train_and_evaluate(bucket_config, parts)  # resumes from 3: step 4 on the next bucket
  step_full, a = checkpoint.restore_on_one_device(full)
  step_parts, b = checkpoint.restore_on_one_device(parts)
  assert step_full == step_parts == 4
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  with open(os.path.join(parts, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  # The padding cost is logged from the first line on: 96 x 128 of 128 x 128, 96 x 144 of 128 x 256, ...
  assert [r['step'] for r in rows] == [1, 2, 3, 4]
  assert all(0.4 < r['data/image_pixel_fraction'] < 1.0 for r in rows)


def test_resume_drops_metrics_written_after_the_checkpoint(config, tmp_path):
  # A run killed without SIGTERM leaves metrics.jsonl lines for steps its checkpoint lacks.
  path = tmp_path / 'metrics.jsonl'
  path.write_text(''.join(json.dumps({'step': s, 'loss': 1.0}) + '\n' for s in (1, 2, 3, 4, 5)))
  progress = train.Progress(config, str(tmp_path), 3, pipeline.DataStats(), True)
  progress.write(4, {'loss': 0.5, 'num_pos': 7.0, 'lr': 0.1})
  progress.close()
  with open(path) as f:
    steps = [json.loads(line)['step'] for line in f]
  assert steps == [1, 2, 3, 4]


def test_a_torn_metrics_line_is_dropped_and_every_line_is_flushed(config, tmp_path, caplog):
  # Issue 12: a kill -9 between buffered writes left a torn last line, and resuming failed
  # with a JSONDecodeError naming no file.
  path = tmp_path / 'metrics.jsonl'
  path.write_text(''.join(json.dumps({'step': s, 'loss': 1.0}) + '\n' for s in (1, 2, 3)) + '{"step": 4, "lo')
  c = config.copy_and_resolve_references()
  c.train.log_every = 100  # not a logged step: the line is flushed all the same
  progress = train.Progress(c, str(tmp_path), 3, pipeline.DataStats(), True)
  assert 'metrics.jsonl: dropped its torn last line' in caplog.text
  progress.write(4, {'loss': 0.5, 'num_pos': 7.0, 'lr': 0.1})
  with open(path) as f:  # before close: what a kill at this point would leave
    steps = [json.loads(line)['step'] for line in f]
  assert steps == [1, 2, 3, 4]
  progress.close()


def test_non_finite_loss_names_the_step(tmp_path):
  manager = checkpoint.make_manager(str(tmp_path), 1)
  values, finite = train.read_metrics({'loss': np.float32(np.inf), 'num_pos': np.float32(0), 'lr': np.float32(0.1)})
  assert not finite and values['loss'] == np.inf and all(type(v) is float for v in values.values())
  message = train.diverged_message(7, values, manager)
  assert message.startswith('non-finite loss inf at step 7; the last good checkpoint: none saved yet in ')
  manager.close()


def test_a_non_finite_state_is_never_saved(config, tmp_path, monkeypatch):
  # Issue 12: a loss can be finite while the state after the step is not, and the old loss
  # check saved such a state as the "last good checkpoint". Images scaled by 1e18 give a finite
  # loss (BatchNorm normalizes them) but overflow BatchNorm's running variance.
  c = config.copy_and_resolve_references()
  c.train.checkpoint_every = 2

  def huge_at_3(i, batch):
    return dict(batch, image=batch['image'] * np.float32(1e18)) if i == 3 else batch

  _patch_iterator(monkeypatch, huge_at_3)
  workdir = str(tmp_path / 'run')
  with pytest.raises(FloatingPointError, match=r'parameters or optimizer state \(loss 1\.\d+.*at step 3; '
                     r'the last good checkpoint: step 2 in '):
    train.train_and_evaluate(c, workdir)
  manager = checkpoint.make_manager(workdir, 1)
  assert manager.all_steps() == [2]
  manager.close()
  _, saved = checkpoint.restore_on_one_device(workdir)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved))


def test_non_finite_state_with_a_finite_loss_names_the_last_good_checkpoint(tmp_path):
  manager = checkpoint.make_manager(str(tmp_path), 1)
  checkpoint.save(manager, 2, {'w': np.ones(3, np.float32)})
  metrics = {'loss': np.float32(3.3e30), 'num_pos': np.float32(5), 'lr': np.float32(0.1),
             'grad_norm': np.float32(np.nan), 'all_finite': np.bool_(False)}
  values, finite = train.read_metrics(metrics)
  assert not finite and 'all_finite' not in values  # not a metric to write
  assert train.diverged_message(3, values, manager) == (
      f'non-finite parameters or optimizer state (loss 3.3e+30, gradient norm nan) at step 3; '
      f'the last good checkpoint: step 2 in {manager.directory} (a non-finite state is never saved)')
  manager.close()


def test_resume_sets_a_damaged_latest_checkpoint_aside_and_continues(config, tmp_path, caplog):
  # Issue 12 case 3: a truncated latest checkpoint gave ~330 lines of tracebacks and no fallback.
  c = config.copy_and_resolve_references()
  c.train.checkpoint_every = 2
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(c, workdir)  # checkpoints 2 and 4
  _, uninterrupted = checkpoint.restore_on_one_device(workdir, 4)
  data = [os.path.join(r, f) for r, _, names in os.walk(os.path.join(workdir, 'checkpoints', '4'))
          for f in names if f'{os.sep}d{os.sep}' in os.path.join(r, f)]
  for path in data:
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)
  train.train_and_evaluate(c, workdir)  # resumes from step 2 and saves step 4 again
  assert 'checkpoint step 4' in caplog.text and 'checkpoints_unusable' in caplog.text
  assert os.path.isdir(os.path.join(workdir, 'checkpoints_unusable', '4'))
  _, resumed = checkpoint.restore_on_one_device(workdir, 4)
  for x, y in zip(jax.tree.leaves(uninterrupted), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(x, y)


def test_a_wrong_eval_split_fails_before_anything_compiles(config, tmp_path, monkeypatch):
  # Issue 12 case 6: a wrong split name failed after compilation (and, in train_eval, after training).
  c = config.copy_and_resolve_references()
  c.mode = 'train_eval'
  c.data.eval_split = 'valdation'

  def no_compiling(*args, **kwargs):
    raise AssertionError('the model was built before the inputs were checked')

  monkeypatch.setattr(train, 'create_train_state', no_compiling)
  with pytest.raises(ValueError, match=r"config\.data\.eval_split='valdation': Unknown split"):
    train.train_and_evaluate(c, str(tmp_path / 'run'))
