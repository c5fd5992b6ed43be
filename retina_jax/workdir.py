"""What a workdir records, so that no result is misattributed or overwritten.

<workdir>/config.json is the config that trained the run; training writes it once (again
only while the workdir holds no result: no checkpoint, no eval_<step>.json). A rerun in
the same workdir compares its config with that record, key by key:
  * IGNORED keys change no recorded number (where data lives, how often to log, save or
    evaluate, batch sizes of evaluation, which checkpoint mode 'eval' reads);
  * EVAL keys change evaluation results only (post-processing, the eval split and its
    annotation file);
  * every other key changes training.
A training rerun (modes 'train', 'train_eval') refuses any training or EVAL difference:
the checkpoints and eval_<step>.json files of one workdir come from one config. With
allow_change it continues, and the old record is kept as config_until_<step>.json.
Mode 'eval' may change EVAL keys (a training difference is refused unless allowed) and
writes under evals/<key>/: config.json, eval_<step>.json (with what differs from
the training config) and detections_<step>.png, where <key> is a hash of every key that
can change the result. So an evaluation never touches the training run's files, and two
evaluations that differ in any such key never share a file.
"""

import hashlib
import json
import os
import re

import tensorflow as tf

from retina_jax import errors

IGNORED = ('mode', 'data.data_dir', 'train.log_every', 'train.checkpoint_every', 'train.keep_checkpoints',
           'train.eval_every', 'eval.batch_size', 'eval.visualize', 'eval.checkpoint_step')
EVAL = ('postprocess.', 'data.eval_split', 'data.annotation_file', 'data.eval_images')

_MAX_LISTED = 6  # differing keys named in a message; the rest are counted


def flat(config):
  """{dotted key: JSON value} of a ConfigDict or of a config.json dict (tuples become lists)."""
  tree = config.to_dict() if hasattr(config, 'to_dict') else config
  tree = json.loads(json.dumps(tree, default=str))
  out = {}

  def walk(node, prefix):
    for k, v in node.items():
      if isinstance(v, dict):
        walk(v, f'{prefix}{k}.')
      else:
        out[f'{prefix}{k}'] = v
  walk(tree, '')
  return out


def is_eval_key(key):
  return any(key == e or (e.endswith('.') and key.startswith(e)) for e in EVAL)


def differences(recorded, config):
  """{key: [recorded value, new value]} over keys not IGNORED; a missing key reads '<absent>'."""
  old, new = flat(recorded), flat(config)
  out = {}
  for key in sorted(set(old) | set(new)):
    if key in IGNORED:
      continue
    a, b = old.get(key, '<absent>'), new.get(key, '<absent>')
    if a != b:
      out[key] = [a, b]
  return out


def describe(diff):
  """'key old -> new, ...' for a message, at most _MAX_LISTED keys."""
  items = [f'{k} {json.dumps(a)} -> {json.dumps(b)}' for k, (a, b) in diff.items()]
  more = len(items) - _MAX_LISTED
  return ', '.join(items[:_MAX_LISTED]) + (f' (and {more} more)' if more > 0 else '')


def read_config(workdir):
  """The training config recorded in workdir (a dict), or None."""
  path = os.path.join(workdir, 'config.json')
  if not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path) as f:
    try:
      return json.load(f)
    except ValueError as e:
      raise errors.BadValue(f'{path} is not JSON ({e}); it records the config that trained the run: '
                            'restore it, or use a new --workdir') from e


def _write_json(path, value):
  tmp = path + '.tmp'
  with tf.io.gfile.GFile(tmp, 'w') as f:
    f.write(json.dumps(value, indent=2, default=str))
  tf.io.gfile.rename(tmp, path, overwrite=True)


def _has_results(workdir):
  """Whether anything was trained or evaluated under the recorded config."""
  return _latest_checkpoint(workdir) > 0 or bool(tf.io.gfile.glob(os.path.join(workdir, 'eval_*.json')))


def _latest_checkpoint(workdir):
  directory = os.path.join(workdir, 'checkpoints')
  if not tf.io.gfile.isdir(directory):
    return 0
  steps = [int(n.rstrip('/')) for n in tf.io.gfile.listdir(directory) if re.fullmatch(r'\d+/?', n)]
  return max(steps, default=0)


def record_training_config(config, workdir, allow_change=False, lead=True):
  """Writes config.json for a new run, or checks a rerun's config against it.

  Args:
    config: the run config (a training mode).
    workdir: the run directory (exists).
    allow_change: continue even if training or EVAL keys differ; the old record is kept
      as config_until_<latest checkpoint step>.json and config.json becomes the new config.
    lead: whether this process writes (process 0); every process checks.
  Raises:
    errors.BadValue: the config differs from the recorded one (and allow_change is False).
  """
  recorded = read_config(workdir)
  path = os.path.join(workdir, 'config.json')
  # A run that failed before it saved anything (e.g. data not prepared) leaves only its record.
  if recorded is None or not _has_results(workdir):
    if lead:
      _write_json(path, config.to_dict())
    return
  diff = differences(recorded, config)
  if not diff:
    return
  if not allow_change:
    hint = ' (mode=eval evaluates with other eval values)' if all(map(is_eval_key, diff)) else ''
    raise errors.BadValue(
        f'{path} records other values: {describe(diff)}. Use a new --workdir, or pass '
        f'--allow_config_change to continue this run with the new values{hint}')
  if lead:
    tf.io.gfile.copy(path, os.path.join(workdir, f'config_until_{_latest_checkpoint(workdir)}.json'),
                     overwrite=True)
    _write_json(path, config.to_dict())


def evaluation_dir(config, workdir, allow_change=False, lead=True):
  """Where mode 'eval' writes, and how its config differs from the training record.

  Args:
    config: the eval config.
    workdir: the run directory.
    allow_change: evaluate even if training keys differ from config.json.
    lead: whether this process writes evals/<key>/config.json.
  Returns:
    (directory <workdir>/evals/<key>, {key: [training value, eval value]}).
  Raises:
    errors.BadValue: training keys differ (and allow_change is False).
  """
  recorded = read_config(workdir)
  diff = differences(recorded, config) if recorded is not None else {}
  trained = {k: v for k, v in diff.items() if not is_eval_key(k)}
  if trained and not allow_change:
    raise errors.BadValue(
        f'{workdir} was trained with other values: {describe(trained)}; its checkpoints would be '
        'reported under this config. Pass --allow_config_change to evaluate anyway (the '
        'differences are recorded with the results)')
  relevant = {k: v for k, v in flat(config).items() if k not in IGNORED}
  key = hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:10]
  directory = os.path.join(workdir, 'evals', key)
  if lead:
    tf.io.gfile.makedirs(directory)
    _write_json(os.path.join(directory, 'config.json'), config.to_dict())
  return directory, diff
