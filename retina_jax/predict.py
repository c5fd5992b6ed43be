r"""Detect objects in image files: a thin command line over detector.Detector.

  python -m retina_jax.predict --config configs/shapes.py --workdir runs/demo \
      --output runs/demo/predict runs/demo/images
  python -m retina_jax.predict --config configs/torchvision_retinanet.py \
      --config.model.pretrained=retinanet_resnet50_fpn_coco-eeacb38b.pth \
      --output predictions photos/ 'frames/*.png'

Inputs (the arguments after the flags): image files, folders (their .jpg, .jpeg and
.png files) and globs. JPEG and PNG of any size; grayscale and RGBA become RGB (the
alpha is dropped), decoded as the pipeline decodes (EXIF orientation is not applied,
as in evaluation). A file that does not decode is reported, counted and skipped.

The model: checkpoint config.eval.checkpoint_step (-1, the default: the latest) of
--workdir, its params and batch_stats only; without --workdir, the torchvision
RetinaNet file config.model.pretrained. The config is the one the model was trained
with; --config.postprocess.score_thresh (0.05) and --config.postprocess.max_detections
(100) set which detections are kept, --config.eval.batch_size the batch.

Writes to --output (created if needed; never a folder holding input images):
  detections.json: COCO results (pycocotools' COCO.loadRes reads it), one entry per
    detection: image_id, file_name (the path as given), bbox [x, y, w, h] in the
    file's pixels, score, category_id, class_name. image_id is the number a file is
    named by when every input is named by a distinct number (COCO's 000000397133.jpg,
    the images data/export.py writes), else the input's position from 1.
  <file name>.png (unless --nopictures): the image with its detections scoring at
    least --draw_thresh.
"""

import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
import tensorflow as tf
import tqdm

from retina_jax import boxes as boxes_lib
from retina_jax import detector as detector_lib
from retina_jax import visualize
from retina_jax.data import coco

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png')


def find_images(inputs):
  """Image paths from files, folders and globs, in the order given, each once.

  Args:
    inputs: paths or glob patterns; a folder contributes its IMAGE_SUFFIXES files, sorted.
  Returns:
    list of paths.
  Raises:
    FileNotFoundError: an input matches nothing, or no input names any image.
  """
  paths, seen = [], set()
  for item in inputs:
    if tf.io.gfile.isdir(item):
      found = sorted(os.path.join(item, n) for n in tf.io.gfile.listdir(item)
                     if n.lower().endswith(IMAGE_SUFFIXES) and not tf.io.gfile.isdir(os.path.join(item, n)))
      if not found:
        raise FileNotFoundError(f'input folder {item!r} holds no {", ".join(IMAGE_SUFFIXES)} file')
    elif tf.io.gfile.exists(item):
      found = [item]
    else:
      found = sorted(p for p in tf.io.gfile.glob(item) if not tf.io.gfile.isdir(p))
      if not found:
        raise FileNotFoundError(f'input {item!r}: no such file or folder, and no file matches it as a glob')
    paths.extend(p for p in found if p not in seen)
    seen.update(found)
  if not paths:
    raise FileNotFoundError('no input images: give image files, folders or globs after the flags')
  return paths


def image_ids(paths):
  """COCO image ids: the numbers the files are named by when all are distinct numbers, else 1..N."""
  stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  if all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems):
    return [int(s) for s in stems]
  return list(range(1, len(paths) + 1))


def picture_names(paths):
  """<stem>.png for each path; a stem seen before gets _2, _3, ... so no picture overwrites another."""
  names, seen = [], set()
  for p in paths:
    stem = os.path.splitext(os.path.basename(p))[0]
    name, k = f'{stem}.png', 1
    while name in seen:
      k += 1
      name = f'{stem}_{k}.png'
    seen.add(name)
    names.append(name)
  return names


def read_image(path):
  """[h, w, 3] uint8 RGB of an image file, decoded as the pipeline decodes (coco.decode_image)."""
  with tf.io.gfile.GFile(path, 'rb') as f:
    return coco.decode_image(f.read()).numpy()


def check_output(output, paths):
  """Makes the output folder; refuses a file, or a folder of inputs (pictures would overwrite them)."""
  if tf.io.gfile.exists(output) and not tf.io.gfile.isdir(output):
    raise NotADirectoryError(f'--output {output!r} is a file; give a folder for detections.json and the pictures')
  if any(os.path.abspath(os.path.dirname(p)) == os.path.abspath(output) for p in paths):
    raise ValueError(f'--output {output!r} holds input images, which pictures could overwrite; give another folder')
  try:
    tf.io.gfile.makedirs(output)
  except tf.errors.OpError as e:  # e.g. a parent that is a file, or no permission
    raise NotADirectoryError(f'--output {output!r}: cannot make the folder: {e.message}') from e


def results(found, image_id, path):
  """One image's detections (a Detector output) -> COCO result dicts in the file's pixels."""
  return [{'image_id': image_id, 'file_name': path, 'bbox': [float(v) for v in xywh], 'score': float(s),
           'category_id': int(c), 'class_name': n}
          for xywh, s, c, n in zip(boxes_lib.to_coco(found['boxes']), found['scores'], found['category_ids'],
                                   found['class_names'])]


def load_detector(config, workdir=None):
  """The model of checkpoint config.eval.checkpoint_step of `workdir`, or of config.model.pretrained."""
  if workdir:
    return detector_lib.Detector.from_workdir(config, workdir, config.eval.checkpoint_step)
  return detector_lib.Detector.from_pretrained(config)


def predict_files(detector, paths, output, *, pictures=True, draw_thresh=0.3):
  """Runs `detector` on image files; writes detections.json and the pictures to `output`.

  Args:
    detector: a detector.Detector.
    paths: image files (find_images).
    output: an existing folder (check_output).
    pictures: write one picture per image.
    draw_thresh: pictures show detections scoring at least this.
  Returns:
    dict: images (read), detections, skipped (the paths that did not decode), json (its path).
  """
  ids, names = image_ids(paths), picture_names(paths)
  rows, skipped, done = [], [], 0
  b = detector.batch_size
  # In a job log (no terminal) a redraw per batch would flood the file, as in train.py.
  bar = tqdm.tqdm(total=len(paths), unit='img', desc='predict', disable=len(paths) <= b,
                  mininterval=0.1 if sys.stderr.isatty() else 30.0)
  for start in range(0, len(paths), b):
    batch = []
    for i in range(start, min(start + b, len(paths))):
      try:
        batch.append((i, read_image(paths[i])))
      except (tf.errors.OpError, OSError) as e:  # undecodable or unreadable: report, skip, go on
        skipped.append(paths[i])
        reason = (e.message if isinstance(e, tf.errors.OpError) else str(e)).splitlines()[0]
        tqdm.tqdm.write(f'predict: skipped {paths[i]}: {reason}', file=sys.stderr)
    found = detector([image for _, image in batch]) if batch else []
    for (i, image), dets in zip(batch, found):
      rows.extend(results(dets, ids[i], paths[i]))
      if pictures:
        visualize.save_image(os.path.join(output, names[i]), image, dets['boxes'], dets['scores'],
                             dets['classes'], detector.class_names, min_score=draw_thresh)
    done += len(batch)
    bar.update(min(b, len(paths) - start))
  bar.close()
  path = os.path.join(output, 'detections.json')
  with tf.io.gfile.GFile(path, 'w') as f:
    json.dump(rows, f)
  print(f'predict: {done} images, {len(rows)} detections (score >= {detector.config.postprocess.score_thresh})'
        f' -> {path}' + (f' and {done} pictures' if pictures and done else '')
        + (f'; {len(skipped)} skipped, not decodable: {", ".join(skipped)}' if skipped else ''))
  return {'images': done, 'detections': len(rows), 'skipped': skipped, 'json': path}


def main(argv):
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax and tfds log every file at INFO
  f = flags.FLAGS
  try:
    # Inputs and output first: a typo fails in a second, not after loading the model.
    paths = find_images(argv[1:])
    check_output(f.output, paths)
    detector = load_detector(f.config, f.workdir)
    predict_files(detector, paths, f.output, pictures=f.pictures, draw_thresh=f.draw_thresh)
  except (FileNotFoundError, NotADirectoryError, KeyError, ValueError) as e:
    if f.verbosity >= 1:  # --verbosity=1 shows where it came from
      raise
    sys.exit(f'predict: {e.args[0] if isinstance(e, KeyError) else e}')


def _define_flags():
  # Defined only when run as a program: main.py defines --config too, and tests import both.
  from ml_collections import config_flags
  config_flags.DEFINE_config_file('config', None, 'The config the model was trained with, e.g. configs/shapes.py.')
  flags.DEFINE_string('workdir', None, 'Run directory whose checkpoint to use; without it, '
                      'config.model.pretrained (a torchvision RetinaNet file).')
  flags.DEFINE_string('output', None, 'Folder for detections.json and the pictures.')
  flags.DEFINE_bool('pictures', True, 'Write one picture per image with its detections.')
  flags.DEFINE_float('draw_thresh', 0.3, 'Pictures show the detections scoring at least this.')
  flags.mark_flags_as_required(['config', 'output'])


if __name__ == '__main__':
  _define_flags()
  app.run(main)
