"""Data parallelism on 8 fake CPU devices: same loss and gradients as 1 device, one compile per canvas.

The device count must be fixed before jax starts, and pytest-xdist workers have
already imported jax, so the multi-device check runs in a fresh subprocess.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from retina_jax import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = r'''
import json
import jax, jax.numpy as jnp, numpy as np
from configs import shapes
from retina_jax import evaluate, sharding, train
from retina_jax.model import retinanet

assert jax.device_count() == 8, jax.devices()
config = shapes.get_config('tiny')
config.loss.normalizer = 'running'
model = retinanet.build(config)
rng = np.random.default_rng(0)

def batch(seed, canvas=(128, 128)):
  r = np.random.default_rng(seed)
  b, m = config.train.batch_size, config.data.max_boxes
  xy = r.uniform(0, 90, (b, m, 2)); wh = r.uniform(10, 60, (b, m, 2))
  classes = np.where(r.uniform(size=(b, m)) < 0.2, r.integers(0, 6, (b, m)), -1).astype(np.int32)
  boxes = np.where(classes[..., None] >= 0, np.concatenate([xy, np.minimum(xy + wh, 128)], -1), 0)
  # Images of their own sizes on the canvas: the padding mask is split over devices too.
  image_hw = r.integers(96, np.array(canvas) + 1, (b, 2)).astype(np.float32)
  return {'image': r.normal(size=(b, *canvas, 3)).astype(np.float32), 'image_hw': image_hw,
          'boxes': boxes.astype(np.float32), 'classes': classes}

def step_on(devices):
  """Loss, gradients (read off the first SGD update), BN statistics, compile count, end state."""
  mesh = sharding.make_mesh(devices)
  state, tx = train.create_train_state(config, model, mesh)
  anchors = evaluate.device_anchors(config, mesh, ((128, 128), (128, 256)))
  step_fn = train.make_train_step(config, model, tx, mesh)
  before = jax.device_get(state.params)
  state, metrics = step_fn(state, sharding.global_batch(batch(1), mesh), anchors[128, 128])
  # lr 1, no warm-up, decay or momentum history: the first update is exactly -gradient.
  grads = jax.tree.map(lambda a, b: a - b, before, jax.device_get(state.params))
  stats = jax.device_get(state.batch_stats)
  # Then two size buckets, as bucketed training changes canvas between steps.
  later = []
  for seed, canvas in ((2, (128, 256)), (3, (128, 128)), (4, (128, 256))):
    state, m = step_fn(state, sharding.global_batch(batch(seed, canvas), mesh), anchors[canvas])
    later.append([float(m['loss']), float(m['num_pos'])])
  return grads, jax.device_get(metrics), stats, float(state.normalizer), step_fn._cache_size(), later

config.optim.base_lr = 1.0
config.optim.base_batch = config.train.batch_size
config.optim.warmup_steps = 0
config.optim.weight_decay = 0.0
g8, m8, s8, n8, cache8, p8 = step_on(jax.devices())
g1, m1, s1, n1, cache1, p1 = step_on(jax.devices()[:1])
def diff(a, b):
  return max(float(np.max(np.abs(x - y)) / (1e-6 + np.max(np.abs(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
print('RESULT', json.dumps({
    'loss8': float(m8['loss']), 'loss1': float(m1['loss']), 'pos8': float(m8['num_pos']),
    'pos1': float(m1['num_pos']), 'grad_rel': diff(g8, g1), 'stats_rel': diff(s8, s1),
    'norm8': n8, 'norm1': n1, 'cache8': cache8, 'cache1': cache1, 'later8': p8, 'later1': p1}))
'''


def _run_8_devices():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu',
             PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, '-c', _SCRIPT], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-4000:]
  line = [l for l in out.stdout.splitlines() if l.startswith('RESULT ')][-1]
  return json.loads(line[len('RESULT '):])


@pytest.mark.slow
def test_eight_devices_match_one_device_and_compile_once_per_canvas():
  r = _run_8_devices()
  # The positive count is over the global batch on both meshes, not per device.
  assert r['pos8'] == r['pos1'] > 0
  np.testing.assert_allclose(r['loss8'], r['loss1'], rtol=1e-5)
  assert r['grad_rel'] < 1e-3, r  # read off float32 parameters, so ~1e-4 of rounding
  assert r['stats_rel'] < 1e-4, r  # trainable BatchNorm statistics are over the global batch too
  np.testing.assert_allclose(r['norm8'], r['norm1'], rtol=1e-5)
  # The next step, on the other canvas: the same loss and positives (later steps at lr 1 drift apart).
  np.testing.assert_allclose(r['later8'][0], r['later1'][0], rtol=1e-4)
  assert [p for _, p in r['later8']] == [p for _, p in r['later1']]
  assert r['cache8'] == 2 and r['cache1'] == 2, r  # four steps, one compilation per canvas


def test_mesh_and_global_batch_single_process():
  mesh = sharding.make_mesh()
  assert mesh.axis_names == ('data',)
  n = jax.device_count()
  batch = sharding.global_batch({'x': np.arange(4 * n, dtype=np.float32).reshape(2 * n, 2)}, mesh)
  assert batch['x'].shape == (2 * n, 2)
  assert batch['x'].sharding.spec == jax.sharding.PartitionSpec('data')
  np.testing.assert_array_equal(np.asarray(batch['x']), np.arange(4 * n).reshape(2 * n, 2))


def test_distributed_arguments_all_or_none():
  with pytest.raises(ValueError, match='together'):
    sharding.initialize_distributed('127.0.0.1:1234', None, None)
