"""A workdir's config record: reruns with other values are refused, evaluations never overwrite it."""

import json
import os

import pytest

from configs import shapes
from retina_jax import workdir


def _config(**changes):
  c = shapes.get_config('tiny')
  for key, value in changes.items():
    section, name = key.split('__')
    setattr(c[section], name, value)
  return c


def _record(path):
  with open(os.path.join(path, 'config.json')) as f:
    return json.load(f)


def test_a_new_run_records_its_config_and_a_rerun_with_the_same_training_values_passes(tmp_path):
  workdir.record_training_config(_config(), str(tmp_path))
  assert _record(tmp_path) == json.loads(json.dumps(_config().to_dict()))
  os.makedirs(tmp_path / 'checkpoints' / '2')  # something was trained under the record
  # Where data lives, how often to log / save / evaluate and the mode change no recorded number.
  same = _config(data__data_dir='/elsewhere', train__log_every=7, train__checkpoint_every=3,
                 eval__visualize=0)
  same.mode = 'train'
  workdir.record_training_config(same, str(tmp_path))
  assert _record(tmp_path)['data']['data_dir'] is None  # the record is not rewritten


def test_a_rerun_with_other_training_values_is_refused_listing_them(tmp_path):
  workdir.record_training_config(_config(), str(tmp_path))
  (tmp_path / 'eval_4.json').write_text('{"AP": 0.5}')  # a result under the recorded config
  before = _record(tmp_path)
  with pytest.raises(ValueError) as info:
    workdir.record_training_config(_config(loss__gamma=0.0, train__steps=9), str(tmp_path))
  message = str(info.value)
  assert 'loss.gamma 2.0 -> 0.0' in message and 'train.steps 4 -> 9' in message
  assert '--allow_config_change' in message and '\n' not in message
  assert _record(tmp_path) == before
  # Eval values count too: a workdir's eval_<step>.json files come from one config.
  with pytest.raises(ValueError, match=r'postprocess\.score_thresh 0\.05 -> 0\.999.*mode=eval'):
    workdir.record_training_config(_config(postprocess__score_thresh=0.999), str(tmp_path))


def test_a_workdir_without_results_takes_the_new_config(tmp_path):
  # A first attempt that failed before saving anything (e.g. COCO not prepared) trained nothing.
  workdir.record_training_config(_config(), str(tmp_path))
  workdir.record_training_config(_config(loss__gamma=0.0), str(tmp_path))
  assert _record(tmp_path)['loss']['gamma'] == 0.0


def test_an_allowed_change_keeps_the_old_record(tmp_path):
  workdir.record_training_config(_config(), str(tmp_path))
  os.makedirs(tmp_path / 'checkpoints' / '4')
  workdir.record_training_config(_config(train__steps=8), str(tmp_path), allow_change=True)
  with open(tmp_path / 'config_until_4.json') as f:
    assert json.load(f)['train']['steps'] == 4
  assert _record(tmp_path)['train']['steps'] == 8


def test_evaluations_get_their_own_directory_per_config(tmp_path):
  workdir.record_training_config(_config(), str(tmp_path))
  before = _record(tmp_path)
  a, changed_a = workdir.evaluation_dir(_config(postprocess__score_thresh=0.999), str(tmp_path))
  b, changed_b = workdir.evaluation_dir(_config(), str(tmp_path))
  c, _ = workdir.evaluation_dir(_config(eval__checkpoint_step=2), str(tmp_path))
  assert a != b and b == c and os.path.dirname(a) == str(tmp_path / 'evals')
  assert changed_a == {'postprocess.score_thresh': [0.05, 0.999]} and changed_b == {}
  with open(os.path.join(a, 'config.json')) as f:
    assert json.load(f)['postprocess']['score_thresh'] == 0.999
  assert _record(tmp_path) == before  # evaluation never rewrites the training record


def test_evaluation_with_other_training_values_is_refused_unless_allowed(tmp_path):
  workdir.record_training_config(_config(), str(tmp_path))
  with pytest.raises(ValueError, match=r'trained with other values: loss\.gamma 2\.0 -> 0\.0'):
    workdir.evaluation_dir(_config(loss__gamma=0.0), str(tmp_path))
  _, changed = workdir.evaluation_dir(_config(loss__gamma=0.0), str(tmp_path), allow_change=True)
  assert changed == {'loss.gamma': [2.0, 0.0]}


def test_evaluation_of_a_workdir_without_record_writes_none(tmp_path):
  directory, changed = workdir.evaluation_dir(_config(), str(tmp_path))  # e.g. pretrained weights
  assert changed == {} and not os.path.exists(tmp_path / 'config.json')
  assert os.path.exists(os.path.join(directory, 'config.json'))


def test_an_unreadable_record_is_named(tmp_path):
  (tmp_path / 'config.json').write_text('{"mode": ')
  with pytest.raises(ValueError, match=r'config\.json is not JSON'):
    workdir.record_training_config(_config(), str(tmp_path))
