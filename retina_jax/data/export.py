r"""Writes images of the synthetic eval split as files, to try `python -m retina_jax.predict` on.

  python -m retina_jax.data.export --config configs/shapes.py --output runs/demo/images --count 8

Each image is written as the dataset stores it (JPEG bytes, not re-encoded) and
named by its image id, <id>.jpg: predict then gives its detections that id, so
its detections.json loads against pipeline.eval_ground_truth(config).
"""

import os

from absl import app
from absl import flags
import tensorflow as tf
import tensorflow_datasets as tfds

from retina_jax.data import shapes


def export_images(config, folder, count):
  """Writes the first `count` images of config.data.eval_split of the synthetic set.

  Args:
    config: a config with data.dataset 'shapes' (the set is built on first use).
    folder: where to write <image id>.jpg (created if needed).
    count: how many images (fewer if the split is smaller).
  Returns:
    the paths written, in split order.
  """
  if config.data.dataset != 'shapes':
    raise ValueError(f"config.data.dataset={config.data.dataset!r}: export writes the synthetic 'shapes' "
                     "set's images; COCO's are image files already")
  if count < 1:
    raise ValueError(f'count must be >= 1, got {count}')
  builder = shapes.builder(config.data.shapes, config.data.data_dir)
  ds = builder.as_dataset(split=config.data.eval_split, decoders={'image': tfds.decode.SkipDecoding()})
  tf.io.gfile.makedirs(folder)
  paths = []
  for ex in ds.take(count).as_numpy_iterator():
    paths.append(os.path.join(folder, f'{int(ex["image/id"])}.jpg'))
    with tf.io.gfile.GFile(paths[-1], 'wb') as f:
      f.write(ex['image'])
  return paths


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  paths = export_images(flags.FLAGS.config, flags.FLAGS.output, flags.FLAGS.count)
  print(f'wrote {len(paths)} images to {flags.FLAGS.output}')


if __name__ == '__main__':
  from ml_collections import config_flags
  config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/shapes.py.')
  flags.DEFINE_string('output', None, 'Folder to write the images to.')
  flags.DEFINE_integer('count', 8, 'Number of images.')
  flags.mark_flags_as_required(['config', 'output'])
  app.run(main)
