"""Where the examples come from: the tfds builder of config.data.dataset, its splits, reading them.

COCO is never downloaded by a job (~25 GB fetched by every host of a pod, or offline a
long failure): it is prepared beforehand with `tfds build` (README), and reading an
unprepared dataset stops at once saying how. The synthetic 'retina_shapes' set is built
on first use. Split names are checked against the prepared dataset before anything
compiles, naming the config key.
"""

import os

import tensorflow as tf
import tensorflow_datasets as tfds

from retina_jax import errors
from retina_jax.data import shapes


def tfds_builder(config):
  """The tfds builder of config.data.dataset (shapes are built on first use).

  COCO is never downloaded here: ~25 GB fetched by every host of a pod from inside a job,
  and offline a long failure. It is prepared beforehand with `tfds build` (see README);
  `read` says how when it is not.
  """
  if config.data.dataset == 'shapes':
    return shapes.builder(config.data.shapes, config.data.data_dir)
  return tfds.builder('coco/2017', data_dir=config.data.data_dir)


def _not_prepared(builder):
  name = f'{builder.name}/{builder.builder_config.name}'  # coco/2017
  root = os.path.dirname(os.path.dirname(os.path.dirname(builder.data_dir)))  # <root>/coco/2017/<version>
  return errors.NotFound(
      f'{name} is not prepared in config.data.data_dir={root!r} (looked for {builder.data_dir}); jobs do '
      f'not download it. Prepare it once, on a machine with internet: '
      f'tfds build {name} --data_dir={root} --file_format=tfrecord')


def _check_split(builder, split, key):
  """Raises errors.BadValue naming the config key when the prepared builder lacks `split`."""
  if not isinstance(split, str) or not builder.is_prepared():  # mock_data: no split list to check
    return
  try:
    builder.info.splits[split]  # parses slices ('validation[:500]') and unions ('train+validation')
  except (KeyError, ValueError) as e:
    raise errors.BadValue(f'{key}={split!r}: {str(e).splitlines()[0]}') from e


def check_splits(config, *, train, evaluation):
  """Fails fast, before anything compiles, on unprepared data or a wrong split name.

  Args:
    config: the run config.
    train: check data.train_split.
    evaluation: check data.eval_split (with data.eval_images).
  Raises:
    errors.NotFound: the dataset is not prepared in data.data_dir (COCO).
    errors.BadValue: a split the dataset does not have, naming the config key.
  """
  b = tfds_builder(config)
  if train:
    read(b, config.data.train_split, key='config.data.train_split')
  if evaluation:
    read(b, eval_split(config), key='config.data.eval_split')


def options():
  """tf.data options of every pipeline: deterministic, one thread per op."""
  opts = tf.data.Options()
  opts.deterministic = True
  # Parallelism comes from the parallel maps; one thread per op keeps tf off the cores JAX uses.
  opts.threading.max_intra_op_parallelism = 1
  return opts


def read(builder, split, shuffle_seed=None, key='split'):
  """Examples of `split` with the image still encoded, so decoding errors are ours to catch."""
  _check_split(builder, split, key)
  read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, options=options())
  try:
    return builder.as_dataset(split=split, decoders={'image': tfds.decode.SkipDecoding()},
                              shuffle_files=shuffle_seed is not None, read_config=read_config)
  except AssertionError as e:  # tfds' "could not find data" (what tfds.load(download=False) raises)
    if builder.is_prepared():
      raise
    raise _not_prepared(builder) from e


def eval_split(config):
  """data.eval_split, cut to its first data.eval_images examples when that is set."""
  split, limit = config.data.eval_split, int(config.data.eval_images)
  if limit <= 0:
    return split
  if '[' in split or '+' in split:
    raise errors.BadValue(f'config.data.eval_images={limit} needs a plain split name in '
                     f'config.data.eval_split, got {split!r}')
  return f'{split}[:{limit}]'
