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

_MODES = ('train', 'eval', 'train_eval')  # what `run` does: evaluate a checkpoint, or train


def _flat(config, prefix=''):
  out = {}
  for k, v in config.items():
    if hasattr(v, 'items'):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def _non_finite(value):
  values = value if isinstance(value, (tuple, list)) else (value,)
  return any(isinstance(v, float) and not math.isfinite(v) for v in values)


def validate(config, num_devices=1, num_processes=1):
  """Checks every key of the config; raises errors.BadValue naming the first bad one.

  Each module checks the options it uses (its `check`); here are the checks of the whole
  config: no unknown key, every float finite, batches that split over devices and processes.

  Args:
    config: the run config.
    num_devices: devices of the mesh (global batches must split over them).
    num_processes: processes of the run (each feeds an equal slice).
  """
  from retina_jax import anchors
  from retina_jax import box_coder
  from retina_jax import evaluate
  from retina_jax import losses
  from retina_jax import matching
  from retina_jax import optim
  from retina_jax import postprocess
  from retina_jax import train
  from retina_jax.data import pipeline
  from retina_jax.model import retinanet
  from retina_jax.model import torchvision_weights

  flat, known = _flat(config), _flat(base.get_config())
  for key in flat:
    if key not in known:
      raise errors.bad_config(key, flat[key], 'unknown key (configs/base.py lists every key)')
    # inf passes every range check (inf > 0) and would surface as a non-finite loss.
    if _non_finite(flat[key]):
      raise errors.bad_config(key, flat[key], 'must be finite')
  errors.check_choice('mode', config.mode, _MODES)
  pipeline.check(config)
  anchors.check(config, pipeline.canvases(config))
  # The model's keys (backbone names, widths, freeze_at, prior, norm, dtype) are checked
  # where they are used, so a new backbone is added in one place.
  try:
    retinanet.build(config)
  except ValueError as e:  # build's messages name the config key
    raise errors.BadValue(str(e)) from e
  torchvision_weights.check(config)
  matching.check(config)
  box_coder.check(config)
  losses.check(config)
  postprocess.check(config)
  optim.check(config)
  train.check(config)
  evaluate.check(config)
  for key in ('train.batch_size', 'eval.batch_size'):
    if flat[key] % num_devices or flat[key] % num_processes:
      raise errors.bad_config(key, flat[key], f'must be divisible by the device count ({num_devices}) '
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
