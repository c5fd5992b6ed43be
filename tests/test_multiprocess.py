"""Two processes on 127.0.0.1 train like one process on the same global batch.

Each process is a fresh interpreter (jax.distributed must start before any
computation); CPU collectives go through gloo. The training data is a fixed
synthetic global batch per step, sliced by process index, so both runs see
exactly the same global batches; evaluation reads the real synthetic set, each
process its own slice, gathered for COCOeval.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import shapes
from retina_jax import checkpoint
from retina_jax.data import shapes as shapes_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = r'''
import sys
import jax
import numpy as np
process_id, num_processes, port, workdir, data_dir, mode = sys.argv[1:]
process_id, num_processes = int(process_id), int(num_processes)
if num_processes > 1:
  jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=num_processes,
                             process_id=process_id)
from configs import shapes
from retina_jax import train
from retina_jax.data import pipeline

config = shapes.get_config('tiny')
config.data.data_dir = data_dir
config.mode = mode
config.train.steps = 3

def fixed_batches(config, *, process_index=0, process_count=1, stats=None):
  b, m = config.train.batch_size, config.data.max_boxes
  local = b // process_count
  for step in range(10**6):
    r = np.random.default_rng(step)
    xy = r.uniform(0, 90, (b, m, 2)); wh = r.uniform(10, 60, (b, m, 2))
    classes = np.where(r.uniform(size=(b, m)) < 0.2, r.integers(0, 6, (b, m)), -1).astype(np.int32)
    boxes = np.where(classes[..., None] >= 0, np.concatenate([xy, np.minimum(xy + wh, 128)], -1), 0)
    batch = {'image': r.normal(size=(b, 128, 128, 3)).astype(np.float32),
             'boxes': boxes.astype(np.float32), 'classes': classes}
    yield {k: v[process_index * local:(process_index + 1) * local] for k, v in batch.items()}

pipeline.train_iterator = fixed_batches
metrics = train.train_and_evaluate(config, workdir)
print('RESULT', process_id, jax.process_count(), jax.device_count(), metrics and metrics['images'])
'''


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _launch(num_processes, workdir, data_dir, mode):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)  # one CPU device per process
  port = str(_free_port())
  procs = [subprocess.Popen([sys.executable, '-c', _SCRIPT, str(i), str(num_processes), port, workdir,
                             data_dir, mode], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(num_processes)]
  outs = []
  for p in procs:
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-4000:]
    outs.append([l for l in out.splitlines() if l.startswith('RESULT')][-1].split())
  return outs


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
  config = shapes.get_config('tiny')
  data_dir = str(tmp_path / 'tfds')
  shapes_data.builder(config.data.shapes, data_dir)  # built once, before the processes read it
  one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
  r1 = _launch(1, one, data_dir, 'train')
  r2 = _launch(2, two, data_dir, 'train_eval')
  assert r1 == [['RESULT', '0', '1', '1', 'None']]
  # Both processes see 2 processes and 2 devices, and evaluate all 8 images together.
  assert sorted(r2) == [['RESULT', '0', '2', '2', '8'], ['RESULT', '1', '2', '2', '8']]

  (sa, a), (sb, b) = checkpoint.restore_on_one_device(one), checkpoint.restore_on_one_device(two)
  assert sa == sb == int(a['step']) == int(b['step']) == 3
  for x, y in zip(jax.tree.leaves(a['params']), jax.tree.leaves(b['params'])):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
  with open(os.path.join(two, 'eval_3.json')) as f:
    assert json.load(f)['images'] == config.data.shapes.num_val


def test_a_missing_peer_times_out_naming_the_coordinator(tmp_path):
  # Issue 12: with a peer missing the process waited silently (JAX's default is 300 s, then an abort).
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
  address = f'127.0.0.1:{_free_port()}'
  result = subprocess.run(
      [sys.executable, '-m', 'retina_jax.main', '--config=configs/shapes.py:tiny', f'--workdir={tmp_path}',
       f'--coordinator_address={address}', '--num_processes=2', '--process_id=1', '--distributed_timeout=2'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1, result.stderr[-3000:]
  assert f'process 1 of 2 joining {address} (waiting up to 2 s)' in result.stderr
  assert f'error: distributed: process 1 of 2: not every process joined {address} within 2 s' in result.stderr
  assert 'Check failure' not in result.stderr
