"""Save / restore round trip, keep-N, clear errors for a missing step, damaged checkpoints."""

import logging
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retina_jax import checkpoint


def _state(value):
  return {'step': jnp.asarray(value, jnp.int32), 'params': {'w': jnp.full((2, 3), float(value))},
          'opt': (jnp.arange(4.0) * value,)}


def test_round_trip_keeps_last_n(tmp_path):
  manager = checkpoint.make_manager(str(tmp_path), keep=2)
  assert checkpoint.restore(manager, _state(0)) is None
  for step in (1, 2, 3):
    checkpoint.save(manager, step, _state(step))
  assert checkpoint.latest_step(manager) == 3
  assert sorted(manager.all_steps()) == [2, 3]
  restored = checkpoint.restore(manager, _state(0))
  jax.tree.map(np.testing.assert_array_equal, restored, _state(3))
  older = checkpoint.restore(manager, _state(0), step=2)
  jax.tree.map(np.testing.assert_array_equal, older, _state(2))
  with pytest.raises(FileNotFoundError, match='step 1 not found'):
    checkpoint.restore(manager, _state(0), step=1)
  manager.close()


def test_resume_in_a_new_manager(tmp_path):
  manager = checkpoint.make_manager(str(tmp_path), keep=3)
  checkpoint.save(manager, 7, _state(7))
  manager.close()
  again = checkpoint.make_manager(str(tmp_path), keep=3)
  assert checkpoint.latest_step(again) == 7
  restored = checkpoint.restore(again, _state(0), step=-1)
  assert int(restored['step']) == 7
  assert restored['params']['w'].dtype == jnp.float32
  again.close()


def test_keep_must_be_positive(tmp_path):
  with pytest.raises(ValueError, match='keep_checkpoints'):
    checkpoint.make_manager(str(tmp_path), keep=0)


def _train_state(value):
  return {'step': jnp.asarray(value, jnp.int32),
          'params': {'conv': {'kernel': jnp.full((3, 3, 2, 4), float(value))}},
          'batch_stats': {'bn': {'mean': jnp.arange(4.0) + value}},
          'opt_state': ({'momentum': {'conv': {'kernel': jnp.zeros((3, 3, 2, 4))}}}, jnp.zeros(())),
          'normalizer': jnp.asarray(100.0)}


def _variables_target():
  return jax.eval_shape(lambda: {k: v for k, v in _train_state(0).items() if k in ('params', 'batch_stats')})


def test_restore_variables_reads_params_and_batch_stats_only(tmp_path):
  manager = checkpoint.make_manager(str(tmp_path), keep=3)
  for step in (2, 5):
    checkpoint.save(manager, step, _train_state(step))
  manager.close()
  before = sorted((str(p), p.stat().st_mtime_ns) for p in tmp_path.rglob('*'))
  step, variables = checkpoint.restore_variables(str(tmp_path), _variables_target())
  assert sorted((str(p), p.stat().st_mtime_ns) for p in tmp_path.rglob('*')) == before  # nothing written
  assert step == 5 and set(variables) == {'params', 'batch_stats'}
  np.testing.assert_array_equal(variables['params']['conv']['kernel'], np.full((3, 3, 2, 4), 5.0))
  np.testing.assert_array_equal(variables['batch_stats']['bn']['mean'], np.arange(4.0) + 5)
  step, variables = checkpoint.restore_variables(str(tmp_path), _variables_target(), step=2)
  assert step == 2 and float(variables['params']['conv']['kernel'][0, 0, 0, 0]) == 2.0


def test_restore_variables_errors_name_the_problem(tmp_path):
  with pytest.raises(FileNotFoundError, match='no checkpoint in .*empty/checkpoints'):
    checkpoint.restore_variables(str(tmp_path / 'empty'), _variables_target())
  assert not (tmp_path / 'empty').exists()  # reading creates nothing
  manager = checkpoint.make_manager(str(tmp_path), keep=3)
  checkpoint.save(manager, 4, _train_state(4))
  manager.close()
  with pytest.raises(FileNotFoundError, match=r'step 7 not found .* saved steps: \[4\]'):
    checkpoint.restore_variables(str(tmp_path), _variables_target(), step=7)
  wider = _variables_target()
  wider['params']['conv']['kernel'] = jax.ShapeDtypeStruct((3, 3, 2, 8), jnp.float32)
  with pytest.raises(ValueError, match=r'params/conv/kernel has shape \(3, 3, 2, 4\), the config.s model \(3, 3, 2, 8\)'):
    checkpoint.restore_variables(str(tmp_path), wider)
  more = _variables_target()
  more['params']['head'] = {'bias': jax.ShapeDtypeStruct((4,), jnp.float32)}
  with pytest.raises(ValueError, match='no variable params/head/bias'):
    checkpoint.restore_variables(str(tmp_path), more)


# Issue 12 case 3: a damaged latest checkpoint is reported in one line and the previous one is used.

def _largest_data_file(directory, step):
  files = [os.path.join(root, f) for root, _, names in os.walk(os.path.join(directory, str(step)))
           for f in names if os.sep + 'd' + os.sep in os.path.join(root, f)]
  return max(files, key=os.path.getsize)


def _truncate(path):
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[:len(data) // 2])


def _flip_bytes(path):
  with open(path, 'rb') as f:
    data = bytearray(f.read())
  for i in range(len(data) // 2, len(data) // 2 + 8):
    data[i] ^= 0xFF
  with open(path, 'wb') as f:
    f.write(bytes(data))


def _big_state(value):
  """Large enough that orbax writes the arrays as compressed data files."""
  return {'step': jnp.asarray(value, jnp.int32),
          'params': {'w': jnp.arange(4000.0).reshape(40, 100) * value, 'b': jnp.full((7,), float(value))}}


def _two_checkpoints(tmp_path):
  manager = checkpoint.make_manager(str(tmp_path), keep=3)
  checkpoint.save(manager, 2, _big_state(2))
  checkpoint.save(manager, 4, _big_state(4))
  manager.close()
  return str(tmp_path / 'checkpoints')


@pytest.mark.parametrize('damage, reason', [
    (_truncate, 'ValueError: OUT_OF_RANGE'),
    (_flip_bytes, 'differ from what was saved'),
])
def test_a_damaged_latest_step_is_reported_and_the_previous_one_used(tmp_path, capfd, caplog, damage, reason):
  directory = _two_checkpoints(tmp_path)
  damage(_largest_data_file(directory, 4))
  manager = checkpoint.make_manager(str(tmp_path), keep=3)
  restored = checkpoint.restore(manager, _big_state(0))
  jax.tree.map(np.testing.assert_array_equal, restored, _big_state(2))
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert len(warnings) == 1 and '\n' not in warnings[0], warnings
  assert warnings[0].startswith(f'checkpoint step 4 in {directory} cannot be used (') and reason in warnings[0]
  assert warnings[0].endswith('; using step 2')
  assert 'Event loop is closed' not in capfd.readouterr().err  # orbax's dying reads stay quiet
  assert sorted(manager.all_steps()) == [2, 4]  # evaluation only reads: nothing moved or deleted
  with pytest.raises(ValueError, match=r'^checkpoint step 4 in .* cannot be used: '):
    checkpoint.restore(manager, _big_state(0), step=4)  # asked for by number: no fallback
  manager.close()


def test_training_sets_a_damaged_step_aside_and_can_save_it_again(tmp_path):
  directory = _two_checkpoints(tmp_path)
  _truncate(_largest_data_file(directory, 4))
  manager = checkpoint.make_manager(str(tmp_path), keep=3)
  restored = checkpoint.restore(manager, _big_state(0), set_aside=True)
  assert int(restored['step']) == 2 and manager.all_steps() == [2]
  assert os.path.isdir(tmp_path / 'checkpoints_unusable' / '4')  # kept for a post-mortem
  checkpoint.save(manager, 4, _big_state(4))  # the resumed run reaches step 4 again
  jax.tree.map(np.testing.assert_array_equal, checkpoint.restore(manager, _big_state(0)), _big_state(4))
  manager.close()


def test_a_non_finite_or_misnumbered_state_is_not_used(tmp_path):
  manager = checkpoint.make_manager(str(tmp_path), keep=3)
  checkpoint.save(manager, 2, _big_state(2))
  checkpoint.save(manager, 3, _big_state(7))  # a state of another step under this number
  nan = _big_state(4)
  nan['params']['b'] = nan['params']['b'].at[0].set(jnp.nan)
  checkpoint.save(manager, 4, nan)  # as versions before issue 12 could
  with pytest.raises(ValueError) as info:
    checkpoint.restore(manager, _big_state(0), step=4)
  assert 'non-finite' in str(info.value)
  with pytest.raises(ValueError, match='holds the state of step 7'):
    checkpoint.restore(manager, _big_state(0), step=3)
  assert int(checkpoint.restore(manager, _big_state(0))['step']) == 2
  manager.close()


def test_no_usable_checkpoint_is_an_error_naming_every_step(tmp_path):
  directory = _two_checkpoints(tmp_path)
  for step in (2, 4):
    _truncate(_largest_data_file(directory, step))
  manager = checkpoint.make_manager(str(tmp_path), keep=3)
  with pytest.raises(ValueError, match=r'no usable checkpoint in .*: step 4: .*; step 2: '):
    checkpoint.restore(manager, _big_state(0), set_aside=True)
  assert sorted(manager.all_steps()) == [2, 4]  # nothing moved when nothing is usable
  manager.close()


@flax.struct.dataclass
class _State:
  step: jax.Array
  params: dict


def test_a_step_without_its_metadata_is_reported_and_the_previous_one_used(tmp_path, caplog):
  # Issue 12: restoring into a dataclass state without default/_METADATA was a 54-line pytree mismatch.
  manager = checkpoint.make_manager(str(tmp_path), keep=3)
  for step in (2, 4):
    checkpoint.save(manager, step, _State(step=jnp.asarray(step), params={'w': jnp.full((3,), float(step))}))
  manager.close()
  os.remove(tmp_path / 'checkpoints' / '4' / 'default' / '_METADATA')
  manager = checkpoint.make_manager(str(tmp_path), keep=3)
  restored = checkpoint.restore(manager, _State(step=jnp.asarray(0), params={'w': jnp.zeros(3)}))
  assert int(restored.step) == 2
  assert 'checkpoint step 4' in caplog.text and 'using step 2' in caplog.text
  manager.close()


# Evaluation reads the model variables alone (restore_variables), checked as a resumed state is.

def _big_train_state(value):
  """A train state's layout, its variables large enough that orbax writes compressed data files."""
  return {'step': jnp.asarray(value, jnp.int32),
          'params': {'w': jnp.arange(4000.0).reshape(40, 100) * value, 'b': jnp.full((7,), float(value))},
          'batch_stats': {'mean': jnp.arange(5.0) + value},
          'opt_state': ({'trace': {'b': jnp.zeros((7,))}},), 'normalizer': jnp.asarray(100.0)}


def _big_variables(value):
  state = _big_train_state(value)
  return {'params': state['params'], 'batch_stats': state['batch_stats']}


def _two_train_states(tmp_path, later=None):
  manager = checkpoint.make_manager(str(tmp_path), keep=3)
  checkpoint.save(manager, 2, _big_train_state(2))
  checkpoint.save(manager, 4, later if later is not None else _big_train_state(4))
  manager.close()
  return str(tmp_path / 'checkpoints')


@pytest.mark.parametrize('damage, reason', [
    (_truncate, 'ValueError: OUT_OF_RANGE'),
    (_flip_bytes, 'differ from what was saved'),
])
def test_evaluation_reports_a_damaged_latest_step_and_reads_the_previous_one(tmp_path, caplog, damage, reason):
  directory = _two_train_states(tmp_path)
  damage(_largest_data_file(directory, 4))
  target = jax.eval_shape(lambda: _big_variables(0))
  step, variables = checkpoint.restore_variables(str(tmp_path), target)
  assert step == 2
  jax.tree.map(np.testing.assert_array_equal, variables, _big_variables(2))
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert len(warnings) == 1 and '\n' not in warnings[0], warnings
  assert warnings[0].startswith(f'checkpoint step 4 in {directory} cannot be used (') and reason in warnings[0]
  assert warnings[0].endswith('; using step 2')
  assert sorted(os.listdir(directory)) == ['2', '4']  # only read: nothing moved
  with pytest.raises(ValueError, match=r'^checkpoint step 4 in .* cannot be used: '):
    checkpoint.restore_variables(str(tmp_path), target, step=4)  # asked for by number: no fallback


def test_evaluation_skips_non_finite_variables_and_needs_a_checkpoint(tmp_path, caplog):
  nan = _big_train_state(4)
  nan['batch_stats']['mean'] = nan['batch_stats']['mean'].at[1].set(jnp.nan)
  _two_train_states(tmp_path, later=nan)  # as versions before issue 12 could save
  target = jax.eval_shape(lambda: _big_variables(0))
  assert checkpoint.restore_variables(str(tmp_path), target)[0] == 2
  assert 'checkpoint step 4' in caplog.text and 'non-finite' in caplog.text
  with pytest.raises(ValueError, match='step 4 .* cannot be used: it holds non-finite values'):
    checkpoint.restore_variables(str(tmp_path), target, step=4)
  assert checkpoint.restore_variables(str(tmp_path / 'empty'), target, missing_ok=True) is None
  with pytest.raises(FileNotFoundError, match=r'step 3 not found'):
    checkpoint.restore_variables(str(tmp_path / 'empty'), target, step=3, missing_ok=True)
