"""Speed of the network alone: forward and forward + backward per image, compile time apart.

  python -m experiments.bench_model                      # R50-FPN, 512x512 and 896x1408, batch 2
  python -m experiments.bench_model --canvas=1024x1408 --batch=8 --dtype=bfloat16 --repeats=20

The backward pass is the gradient of a stand-in scalar (mean square of both
outputs) with respect to the parameters, with the config's frozen stages and
frozen BatchNorm, so it costs what the train step's network part costs; no
loss, matching or optimizer is included. Prints one line per canvas with the
per-image medians over `repeats` timed calls after one warm-up call.
"""

import statistics
import time

import jax
import jax.numpy as jnp
from absl import app
from absl import flags

from configs import base
from retina_jax.model import retinanet

_CANVAS = flags.DEFINE_list('canvas', ['512x512', '896x1408'], 'canvases HxW, divisible by 128')
_BATCH = flags.DEFINE_integer('batch', 2, 'images per call')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'timed calls per measurement')
_BACKBONE = flags.DEFINE_string('backbone', 'resnet50', 'config.model.backbone')
_DTYPE = flags.DEFINE_string('dtype', 'float32', 'config.model.dtype')


def _time(fn, *args):
  """Seconds of `repeats` calls after one warm-up call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return times


def main(argv):
  del argv
  config = base.get_config()
  config.model.backbone = _BACKBONE.value
  config.model.dtype = _DTYPE.value
  model = retinanet.build(config)
  print(f'{jax.devices()[0].platform} x{jax.device_count()}, {config.model.backbone}-FPN, '
        f'{config.model.dtype}, batch {_BATCH.value}, freeze_at {config.model.freeze_at}')
  for canvas in _CANVAS.value:
    h, w = (int(v) for v in canvas.split('x'))
    images = jax.random.normal(jax.random.key(0), (_BATCH.value, h, w, 3))
    variables = jax.jit(model.init)(jax.random.key(0, impl='rbg'), images[:1])

    forward = jax.jit(lambda v, x: model.apply(v, x))

    def objective(params, stats, x):
      out = model.apply({'params': params, 'batch_stats': stats}, x, train=True)
      return jnp.mean(out['logits'] ** 2) + jnp.mean(out['deltas'] ** 2)

    backward = jax.jit(jax.grad(objective))
    # Compiled ahead of time so that compilation is measured apart from the runs.
    start = time.perf_counter()
    forward_c = forward.lower(variables, images).compile()
    compile_fwd = time.perf_counter() - start
    start = time.perf_counter()
    backward_c = backward.lower(variables['params'], variables['batch_stats'], images).compile()
    compile_bwd = time.perf_counter() - start
    fwd = _time(forward_c, variables, images)
    bwd = _time(backward_c, variables['params'], variables['batch_stats'], images)
    per_image = lambda t: 1000 * statistics.median(t) / _BATCH.value
    print(f'{h}x{w}: forward {per_image(fwd):.0f} ms/img, forward+backward {per_image(bwd):.0f} ms/img '
          f'(median of {_REPEATS.value}); compile forward {compile_fwd:.1f} s, forward+backward {compile_bwd:.1f} s')


if __name__ == '__main__':
  app.run(main)
