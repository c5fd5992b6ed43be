"""Two processes on 127.0.0.1 train like one process on the same global batch.

Each process is a fresh interpreter (jax.distributed must start before any
computation); CPU collectives go through gloo. The data is the synthetic set
with COCO-like sizes on size buckets: each of the two processes reads its own
slice, and both pick the bucket of each step without talking (the size counts
are gathered once at the start). The one-process run is fed both slices'
batches side by side, so both runs see exactly the same global batches;
evaluation reads each process's slice bucket by bucket, gathered for COCOeval.
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
process_id, num_processes, port, workdir, data_dir, mode, cache = sys.argv[1:]
process_id, num_processes = int(process_id), int(num_processes)
# Shared by the runs: the one-process run compiles model.init (a minute on one core) for all.
jax.config.update('jax_compilation_cache_dir', cache)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
if num_processes > 1:
  jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=num_processes,
                             process_id=process_id)
from configs import shapes
from retina_jax import train
from retina_jax.data import pipeline

config = shapes.get_config('tiny,buckets')  # what bucket_config below sets
config.data.data_dir = data_dir
config.data.min_size, config.data.max_size = 96, 160
config.data.buckets = ((128, 128), (128, 256), (256, 128))
config.train.steps = 4
config.mode = mode
real = pipeline.train_iterator
canvases = []

def both_slices(config, *, stats=None, **unused):
  """One process fed what two would read: each slice's batch, side by side."""
  hists = np.stack([pipeline.train_size_histogram(config, i, 2) for i in range(2)])
  its = [real(config, process_index=i, process_count=2, stats=stats, histograms=hists) for i in range(2)]
  while True:
    parts = [next(it) for it in its]
    yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

def recorded(*args, **kwargs):
  for batch in (real if num_processes > 1 else both_slices)(*args, **kwargs):
    canvases.append('x'.join(map(str, batch['image'].shape[1:3])))
    yield batch

pipeline.train_iterator = recorded
metrics = train.train_and_evaluate(config, workdir)
print('RESULT', process_id, jax.process_count(), jax.device_count(), metrics and metrics['images'])
print('CANVASES', ','.join(canvases[:config.train.steps]))
'''


def bucket_config(data_dir):
  """The script's config: the tiny model on COCO-like sizes and three buckets, 4 steps."""
  c = shapes.get_config('tiny,buckets')
  c.data.data_dir = data_dir
  c.data.min_size, c.data.max_size = 96, 160
  c.data.buckets = ((128, 128), (128, 256), (256, 128))
  c.train.steps = 4
  return c


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _launch(num_processes, workdir, data_dir, mode, cache):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)  # one CPU device per process
  port = str(_free_port())
  procs = [subprocess.Popen([sys.executable, '-c', _SCRIPT, str(i), str(num_processes), port, workdir,
                             data_dir, mode, cache], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(num_processes)]
  outs = []
  for p in procs:
    # Only a guard against a hang (a process waiting on its peer forever): on 2 busy cores a
    # healthy bucketed run took 572 s, too near the old 600.
    out, err = p.communicate(timeout=1500)
    assert p.returncode == 0, err[-4000:]
    outs.append([[l for l in out.splitlines() if l.startswith(k)][-1].split() for k in ('RESULT', 'CANVASES')])
  return outs


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
  data_dir = str(tmp_path / 'tfds')
  config = bucket_config(data_dir)
  shapes_data.builder(config.data.shapes, data_dir)  # built once, before the processes read it
  one, two, cache = str(tmp_path / 'one'), str(tmp_path / 'two'), str(tmp_path / 'jax_cache')
  [(r1, c1)] = _launch(1, one, data_dir, 'train', cache)
  r2 = _launch(2, two, data_dir, 'train_eval', cache)
  assert r1 == ['RESULT', '0', '1', '1', 'None']
  # Both processes see 2 processes and 2 devices, and evaluate all 8 images together.
  assert sorted(r for r, _ in r2) == [['RESULT', '0', '2', '2', '8'], ['RESULT', '1', '2', '2', '8']]
  # Every step on the same bucket in every process and in the one-process run; the bucket changes.
  assert r2[0][1] == r2[1][1] == c1 and c1[1].split(',') == ['128x128'] * 3 + ['128x256']

  (sa, a), (sb, b) = checkpoint.restore_on_one_device(one), checkpoint.restore_on_one_device(two)
  assert sa == sb == int(a['step']) == int(b['step']) == 4
  for x, y in zip(jax.tree.leaves(a['params']), jax.tree.leaves(b['params'])):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
  with open(os.path.join(two, 'eval_4.json')) as f:
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
