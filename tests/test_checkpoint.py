"""Save / restore round trip, keep-N, and clear errors for a missing step."""

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
