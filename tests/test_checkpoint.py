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
