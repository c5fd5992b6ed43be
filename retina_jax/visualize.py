"""A picture of detections: images with their boxes, class names and scores."""

import matplotlib

matplotlib.use('Agg')  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def denormalize(image, mean, std):
  """Normalized [H, W, 3] float32 -> displayable [H, W, 3] float in [0, 1]."""
  return np.clip(image * np.asarray(std) + np.asarray(mean), 0.0, 255.0) / 255.0


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
  cmap = plt.get_cmap('tab10')
  for ax in axes.ravel():
    ax.axis('off')
  for ax, ex in zip(axes.ravel(), examples):
    h, w = (int(round(float(v))) for v in ex['image_hw'])
    ax.imshow(denormalize(ex['image'], mean, std)[:h, :w])
    for box, score, cls in zip(ex['boxes'], ex['scores'], ex['classes']):
      if score < min_score:
        continue
      x1, y1, x2, y2 = (float(v) for v in box)
      color = cmap(int(cls) % 10)
      ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color=color, lw=1.5))
      ax.text(x1, y1, f'{class_names[int(cls)]} {score:.2f}', color='white', fontsize=7,
              va='bottom', bbox={'facecolor': color, 'alpha': 0.7, 'pad': 1, 'lw': 0})
  fig.tight_layout()
  with tf.io.gfile.GFile(path, 'wb') as f:
    fig.savefig(f, format='png', dpi=80)
  plt.close(fig)
