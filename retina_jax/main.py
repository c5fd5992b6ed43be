r"""Entry point: train, evaluate, or both, from an ml_collections config file.

  python -m retina_jax.main --config configs/shapes.py --workdir runs/demo
  python -m retina_jax.main --config configs/table1b_gamma.py:row=<name> --workdir runs/g2 \
      --config.train.steps=1000 --config.mode=train
  python -m retina_jax.main --config configs/base.py --workdir gs://bucket/r50 --distributed

config.mode: 'train', 'eval' (checkpoint eval.checkpoint_step of the workdir, -1 the
latest) or 'train_eval' (train, evaluate every train.eval_every steps and at the
end). The whole config is checked by `validate` before anything starts, and a rerun's
config against the one the workdir recorded (workdir.py).
Multi-host (TPU pods, GPU clusters): --distributed lets JAX detect the cluster;
--coordinator_address/--num_processes/--process_id set it by hand.

Exit status: 0 done; 1 an error the message explains (a config value, a path, data not
prepared, a diverged run: one line, no traceback unless --traceback); 143 (128 + SIGTERM)
stopped by SIGTERM after saving, so that a scheduler requeues the job. Other failures are
bugs and keep their traceback.
"""

import logging as py_logging
import math
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
import numpy as np

from configs import base
from retina_jax import errors

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/shapes.py[:arg].')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, metrics, eval results.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Call jax.distributed.initialize() (cluster auto-detection).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Index of this process.')
_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer(
    'distributed_timeout', 300, 'Seconds to wait for every process to join the coordinator.')
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    'allow_config_change', False, 'Continue (or evaluate) a workdir whose config.json records other '
    'values; the old record is kept as config_until_<step>.json.')
_TRACEBACK = flags.DEFINE_bool('traceback', False, 'Show tracebacks of errors a user can fix too.')

PREEMPTED_STATUS = 128 + 15  # what a shell reports for a process ended by SIGTERM

_ENUMS = {
    'mode': ('train', 'eval', 'train_eval'),
    'data.dataset': ('coco', 'shapes'),
    'model.pretrained_kind': ('backbone', 'retinanet'),
    'loss.cls': ('focal', 'ohem'),
    'loss.box': ('smooth_l1', 'l1', 'giou'),
    'loss.normalizer': ('global', 'running'),
}

# key -> (low, high, what); None is an open end; the checks are inclusive.
_RANGES = {
    'data.min_size': (1, None), 'data.max_size': (1, None), 'data.max_boxes': (1, None),
    'data.shuffle_buffer': (1, None), 'data.eval_images': (0, None),
    'data.shapes.image_size': (32, None), 'data.shapes.num_train': (1, None),
    'data.shapes.num_val': (1, None), 'data.shapes.max_objects': (1, None),
    'data.shapes.min_object_size': (1, None),
    'anchors.scales_per_octave': (1, None), 'anchors.offset': (0.0, 1.0),
    'model.head_convs': (0, None),
    'matching.fg_iou': (0.0, 1.0), 'matching.bg_iou': (0.0, 1.0),
    'box_coder.clamp': (0.0, None),
    # loss.alpha: negative means no alpha weighting.
    'loss.alpha': (None, 1.0), 'loss.gamma': (0.0, None), 'loss.beta': (0.0, None),
    'loss.box_weight': (0.0, None), 'loss.normalizer_momentum': (0.0, 1.0),
    'loss.ohem_batch': (1, None), 'loss.ohem_nms': (0.0, 1.0), 'loss.ohem_neg_pos': (0.0, None),
    'postprocess.score_thresh': (0.0, 1.0), 'postprocess.topk_per_level': (1, None),
    'postprocess.nms_iou': (0.0, 1.0), 'postprocess.max_detections': (1, None),
    'optim.base_batch': (1, None), 'optim.momentum': (0.0, 1.0), 'optim.weight_decay': (0.0, None),
    'optim.warmup_steps': (0, None), 'optim.warmup_factor': (0.0, 1.0),
    'optim.decay_factor': (0.0, 1.0), 'optim.grad_clip': (0.0, None),
    'train.batch_size': (1, None), 'train.steps': (1, None), 'train.log_every': (1, None),
    'train.checkpoint_every': (1, None), 'train.keep_checkpoints': (1, None),
    'train.eval_every': (0, None), 'eval.batch_size': (1, None), 'eval.visualize': (0, None),
    'eval.checkpoint_step': (-1, None),
}

# Strictly positive (a zero would divide or produce an empty model).
_POSITIVE = ('optim.base_lr', 'train.schedule', 'loss.normalizer_init')


def _flat(config, prefix=''):
  out = {}
  for k, v in config.items():
    if hasattr(v, 'items'):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def _fail(key, value, what):
  raise errors.BadValue(f'config.{key}={value!r}: {what}')


def _non_finite(value):
  values = value if isinstance(value, (tuple, list)) else (value,)
  return any(isinstance(v, float) and not math.isfinite(v) for v in values)


def validate(config, num_devices=1, num_processes=1):
  """Checks every key of the config; raises errors.BadValue naming the first bad one.

  Args:
    config: the run config.
    num_devices: devices of the mesh (global batches must split over them).
    num_processes: processes of the run (each feeds an equal slice).
  """
  flat, known = _flat(config), _flat(base.get_config())
  for key in flat:
    if key not in known:
      _fail(key, flat[key], 'unknown key (configs/base.py lists every key)')
    # inf passes every range check below (inf > 0) and would surface as a non-finite loss.
    if _non_finite(flat[key]):
      _fail(key, flat[key], 'must be finite')
  for key, values in _ENUMS.items():
    if flat[key] not in values:
      _fail(key, flat[key], f'must be one of {values}')
  for key, (lo, hi) in _RANGES.items():
    v = flat[key]
    if not isinstance(v, (int, float)) or isinstance(v, bool):
      _fail(key, v, 'must be a number')
    if (lo is not None and v < lo) or (hi is not None and v > hi):
      _fail(key, v, f'must be in [{lo if lo is not None else "-inf"}, {hi if hi is not None else "inf"}]')
  for key in _POSITIVE:
    if not flat[key] > 0:
      _fail(key, flat[key], 'must be > 0')

  canvas = tuple(flat['data.canvas'])
  if len(canvas) != 2 or any(not isinstance(s, int) or s <= 0 or s % 128 for s in canvas):
    _fail('data.canvas', canvas, 'must be (H, W), positive integers divisible by 128')
  if flat['data.max_size'] < flat['data.min_size']:
    _fail('data.max_size', flat['data.max_size'], f'must be >= data.min_size ({flat["data.min_size"]})')
  lo, hi = flat['data.scale_jitter']
  if not 0 < lo <= hi:
    _fail('data.scale_jitter', flat['data.scale_jitter'], 'must be (lo, hi) with 0 < lo <= hi')
  canvases = [canvas]
  if flat['data.use_buckets']:
    from retina_jax.data import buckets
    buckets.check(flat['data.buckets'], flat['data.min_size'] * max(1.0, hi), flat['data.max_size'])
    canvases = buckets.canonical(flat['data.buckets'])
  for key in ('data.mean', 'data.std'):
    if len(flat[key]) != 3:
      _fail(key, flat[key], 'must have 3 values (RGB)')
  if min(flat['data.std']) <= 0:
    _fail('data.std', flat['data.std'], 'must be > 0')

  levels, sizes = tuple(flat['anchors.levels']), tuple(flat['anchors.sizes'])
  if not levels or list(levels) != sorted(set(levels)) or levels[0] < 1:
    _fail('anchors.levels', levels, 'must be increasing integers >= 1')
  for c in canvases:
    if 2 ** levels[-1] > min(c):
      _fail('anchors.levels', levels, f'stride 2**{levels[-1]} exceeds the canvas {c}')
  if len(sizes) != len(levels) or min(sizes) <= 0:
    _fail('anchors.sizes', sizes, f'must be {len(levels)} positive sizes, one per level')
  if not flat['anchors.ratios'] or min(flat['anchors.ratios']) <= 0:
    _fail('anchors.ratios', flat['anchors.ratios'], 'must be positive h/w ratios')

  if flat['matching.bg_iou'] > flat['matching.fg_iou']:
    _fail('matching.bg_iou', flat['matching.bg_iou'],
          f'must be <= matching.fg_iou ({flat["matching.fg_iou"]})')
  if len(flat['box_coder.weights']) != 4 or min(flat['box_coder.weights']) <= 0:
    _fail('box_coder.weights', flat['box_coder.weights'], 'must be 4 positive weights')
  lr = flat['optim.base_lr'] * flat['train.batch_size'] / flat['optim.base_batch']
  if not np.isfinite(np.float32(lr)):
    _fail('optim.base_lr', flat['optim.base_lr'], f'gives a learning rate of {lr:g} at train.batch_size '
          f'{flat["train.batch_size"]} (times batch_size / optim.base_batch), beyond float32')
  if flat['optim.momentum'] >= 1:
    _fail('optim.momentum', flat['optim.momentum'], 'must be in [0, 1)')
  decays = list(flat['optim.decay_steps'])
  if decays != sorted(decays) or any(d < 0 for d in decays):
    _fail('optim.decay_steps', tuple(decays), 'must be increasing non-negative steps')

  # The model's keys (backbone names, widths, freeze_at, prior, norm, dtype) are checked
  # where they are used, so a new backbone is added in one place.
  from retina_jax.model import retinanet
  try:
    retinanet.build(config)
  except ValueError as e:  # build's messages name the config key
    raise errors.BadValue(str(e)) from e

  for key in ('train.batch_size', 'eval.batch_size'):
    if flat[key] % num_devices or flat[key] % num_processes:
      _fail(key, flat[key], f'must be divisible by the device count ({num_devices}) '
            f'and the process count ({num_processes})')


def _exit(message, status=1):
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(status)


def _innermost_message(error):
  """ml_collections wraps a KeyError's text in an AttributeError: the plain text inside."""
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  return str(error.args[0]) if error.args else str(error)


def parse_flags(argv):
  """absl's flag parsing, with a mistake in --config or its overrides reported in one line."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError) as e:
    if '--traceback' in argv:
      raise
    if isinstance(e, flags.Error):
      lines = [l.strip() for l in str(e).strip().splitlines() if l.strip()]
      # A config file's get_config raised: absl's text holds its traceback; the last line says why.
      if 'Traceback' in str(e):
        lines = [lines[0].replace(' Error whilst parsing config file:', ''), lines[-1]]
      _exit(' '.join(lines).removeprefix('flag '))
    # An override of a key the config lacks: ml_collections' "'stepz'\nDid you mean ...".
    name, *hint = _innermost_message(e).splitlines()
    given = [a.split('=')[0] for a in argv if a.startswith('--config.') and name.strip("'") in a]
    _exit(f'{given[0] if given else "--config"}: unknown config key {name}' +
          (f' ({" ".join(hint).strip()})' if hint else ''))


def _load_config():
  config = _CONFIG.value
  try:
    config.keys()  # a config file that failed to load raises its error at first use
  except OSError as e:
    raise errors.NotFound(f'--config: {str(e).strip().splitlines()[-1].strip()}') from e
  return config


class _QuietLibraries(py_logging.Filter):
  """Drops tfds' info and warnings (e.g. 'Using custom data configuration' for the synthetic
  set, once per evaluation), which would break into the progress bar's line."""

  def filter(self, record):
    return record.levelno >= py_logging.ERROR or 'tensorflow_datasets' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax and tfds log every file at INFO
    py_logging.getLogger('absl').addFilter(_QuietLibraries())
  workdir = _WORKDIR.value
  if _CONFIG.value is None or not workdir:
    raise app.UsageError('--config and --workdir are required')
  try:
    config = _load_config()
    if _DISTRIBUTED.value or _COORDINATOR.value is not None:
      from retina_jax import sharding
      sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                      timeout_s=_DISTRIBUTED_TIMEOUT.value)
    import jax
    validate(config, jax.device_count(), jax.process_count())
    from retina_jax import train
    try:
      run(config, workdir, allow_config_change=_ALLOW_CONFIG_CHANGE.value)
    except train.Preempted as e:
      print(f'{e}; exiting with status {PREEMPTED_STATUS} so that the job is requeued', file=sys.stderr)
      sys.exit(PREEMPTED_STATUS)
  except errors.UserError as e:
    if _TRACEBACK.value:
      raise
    _exit(e)


def run(config, workdir, allow_config_change=False):
  """Runs config.mode in `workdir`; returns the last evaluation's metrics (or None).

  Training modes record the config in workdir/config.json, or check a rerun against it;
  mode 'eval' writes under workdir/evals/<key>/ and never touches the training records.
  """
  import jax
  import tensorflow as tf
  from retina_jax import evaluate
  from retina_jax import train
  from retina_jax import workdir as workdir_lib
  tf.io.gfile.makedirs(workdir)
  lead = jax.process_index() == 0
  if config.mode == 'eval':
    out_dir, changed = workdir_lib.evaluation_dir(config, workdir, allow_config_change, lead)
    return evaluate.evaluate_checkpoint(config, workdir, out_dir, record={'changed_from_training': changed})
  workdir_lib.record_training_config(config, workdir, allow_config_change, lead)
  return train.train_and_evaluate(config, workdir)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main, flags_parser=parse_flags)
