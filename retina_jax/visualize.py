"""Pictures of detections: images with their boxes, class names and scores."""

import matplotlib

matplotlib.use('Agg')  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def denormalize(image, mean, std):
  """Normalized [H, W, 3] float32 -> displayable [H, W, 3] float in [0, 1]."""
  return np.clip(image * np.asarray(std) + np.asarray(mean), 0.0, 255.0) / 255.0


def draw(ax, image, boxes, scores, classes, class_names, min_score, fontsize=7):
  """Shows `image` on `ax` with the detections scoring at least `min_score`.

  Args:
    ax: a matplotlib Axes.
    image: [h, w, 3] float in [0, 1] or uint8.
    boxes: [N, 4] pixels of `image`, (x1, y1, x2, y2).
    scores: [N].
    classes: [N] int, indices into class_names.
    class_names: [K] names.
    min_score: detections below it are not drawn.
    fontsize: of the labels, in points.
  """
  cmap = plt.get_cmap('tab10')
  h, w = image.shape[:2]
  # Pixel i spans [i, i + 1], the package's continuous box coordinates (imshow centres it on i).
  ax.imshow(image, extent=(0, w, h, 0))
  for box, score, cls in zip(boxes, scores, classes):
    if score < min_score:
      continue
    x1, y1, x2, y2 = (float(v) for v in box)
    color = cmap(int(cls) % 10)
    ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color=color, lw=1.5))
    # A label above a box at the top edge would leave the picture: put it inside the box there.
    ax.text(x1, y1, f'{class_names[int(cls)]} {score:.2f}', color='white', fontsize=fontsize,
            va='top' if y1 < 0.06 * h else 'bottom', bbox={'facecolor': color, 'alpha': 0.7, 'pad': 1, 'lw': 0})


def _write(fig, path, dpi):
  with tf.io.gfile.GFile(path, 'wb') as f:
    fig.savefig(f, format='png', dpi=dpi)
  plt.close(fig)


def save_detections(path, examples, class_names, mean, std, min_score=0.3, columns=4):
  """Draws each example's detections above `min_score` and writes one PNG.

  Args:
    path: output file (local or gs://).
    examples: list of dicts with image [H, W, 3] normalized, image_hw [2] (valid
      area on the canvas), boxes [N, 4] canvas px xyxy, scores [N], classes [N].
    class_names: [K] names.
    mean, std: the normalization to undo (config.data.mean / std).
    min_score: detections below this are not drawn (the eval keeps them all).
    columns: images per row.
  """
  n = len(examples)
  cols = min(columns, n)
  rows = -(-n // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows), squeeze=False)
  for ax in axes.ravel():
    ax.axis('off')
  for ax, ex in zip(axes.ravel(), examples):
    h, w = (int(round(float(v))) for v in ex['image_hw'])
    draw(ax, denormalize(ex['image'], mean, std)[:h, :w], ex['boxes'], ex['scores'], ex['classes'],
         class_names, min_score)
  fig.tight_layout()
  _write(fig, path, dpi=80)


def save_image(path, image, boxes, scores, classes, class_names, min_score=0.3, long_side=(640, 1600)):
  """Writes one image with its detections as a PNG, the image filling the picture.

  Args:
    path: output file (local or gs://).
    image: [h, w, 3] uint8, the original image.
    boxes: [N, 4] original pixels (x1, y1, x2, y2); scores [N]; classes [N].
    class_names: [K] names.
    min_score: detections below this are not drawn.
    long_side: (min, max) pixels of the picture's longer side: small images are
      enlarged so labels stay legible, large ones shrunk to keep files small.
  """
  h, w = image.shape[:2]
  size = min(max(max(h, w), long_side[0]), long_side[1])
  dpi = 100
  fig = plt.figure(figsize=(size * w / max(h, w) / dpi, size * h / max(h, w) / dpi))
  ax = fig.add_axes((0, 0, 1, 1))
  ax.axis('off')
  draw(ax, image, boxes, scores, classes, class_names, min_score, fontsize=9)
  _write(fig, path, dpi=dpi)
