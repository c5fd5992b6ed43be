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
def config(tmp_path_factory):
  # The four runs below compile the same step: let the later ones read it from disk.
  jax.config.update('jax_compilation_cache_dir', str(tmp_path_factory.mktemp('jax_cache')))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  c = shapes.get_config('tiny')
  c.data.data_dir = str(tmp_path_factory.mktemp('tfds'))
  c.mode = 'train'
  c.train.steps = 4
  c.train.checkpoint_every = 100  # only the end, SIGTERM and the explicit saves below
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


def test_resume_drops_metrics_written_after_the_checkpoint(config, tmp_path):
  # A run killed without SIGTERM leaves metrics.jsonl lines for steps its checkpoint lacks.
  path = tmp_path / 'metrics.jsonl'
  path.write_text(''.join(json.dumps({'step': s, 'loss': 1.0}) + '\n' for s in (1, 2, 3, 4, 5)))
  progress = train.Progress(config, str(tmp_path), None, 3, pipeline.DataStats(), True)
  progress.record(4, {'loss': np.float32(0.5), 'num_pos': np.float32(7), 'lr': np.float32(0.1)})
  progress.close()
  with open(path) as f:
    steps = [json.loads(line)['step'] for line in f]
  assert steps == [1, 2, 3, 4]


def test_non_finite_loss_names_the_step(config, tmp_path):
  manager = checkpoint.make_manager(str(tmp_path), 1)
  progress = train.Progress(config, str(tmp_path), manager, 0, pipeline.DataStats(), False)
  with pytest.raises(FloatingPointError, match='at step 7; the last good checkpoint'):
    progress.record(7, {'loss': np.float32(np.inf), 'num_pos': np.float32(0), 'lr': np.float32(0.1)})
  progress.close()
  manager.close()
