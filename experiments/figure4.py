r"""Figure 4: how the focal loss spreads over positive and negative samples.

The paper (sec. 5.1, "Analysis of the Focal Loss") takes a converged model
(ResNet-101, 600 px, gamma = 2), computes for many random images the loss of every
positive and every negative sample under FL with gamma in {0, 0.5, 1, 2}, normalises
each set so that it sums to 1, sorts it from low to high and plots the cumulative
sum against the fraction of samples. For positives the curves barely move with gamma;
for negatives, at gamma = 2 nearly all the loss comes from a small fraction of
samples (the hard negatives): the easy ones are down-weighted away.

A sample here is one binary classifier of one anchor, as the loss sums them: the
true class of a positive anchor is a positive sample, each class of a negative
anchor a negative sample (ignored anchors and the other classes of positive anchors
are left out). alpha is not applied: a constant weight per set cancels in the
normalisation.

  python -m experiments.figure4 --workdir runs/tables/table1b_gamma_shapes/gamma_2 \
      --config configs/table1b_gamma.py:row=gamma_2,dataset=shapes --images 100
"""

import os

import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS

GAMMAS = (0.0, 0.5, 1.0, 2.0)
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')


def sample_losses(logits, classes, labels, gammas=GAMMAS):
  """Focal loss of every sample, per gamma, with the masks of positives and negatives.

  Args:
    logits: [B, A, K] float32.
    classes: [B, A] int32, the matched class of positive anchors, else -1.
    labels: [B, A] int32, 1 positive, 0 negative, -1 ignored.
    gammas: the focusing parameters to evaluate.
  Returns:
    loss: [G, B, A, K] float32, FL without alpha weighting.
    positive: [B, A, K] bool, the true class of a positive anchor.
    negative: [B, A, K] bool, every class of a negative anchor.
  """
  import jax
  import jax.numpy as jnp
  from retina_jax import losses
  targets = jax.nn.one_hot(classes, logits.shape[-1], dtype=jnp.float32)  # [B, A, K], zero rows for -1
  loss = jnp.stack([losses.sigmoid_focal_loss(logits, targets, alpha=None, gamma=g) for g in gammas])
  positive = (targets > 0) & (labels == 1)[..., None]
  negative = jnp.broadcast_to((labels == 0)[..., None], targets.shape)
  return loss, positive, negative


def cumulative_share(values):
  """The normalised cumulative loss of Figure 4.

  Args:
    values: [N] non-negative losses, N >= 1.
  Returns:
    fraction: [N] float64, (i + 1) / N, the fraction of samples up to the i-th smallest.
    share: [N] float64, the share of the total loss of the i + 1 smallest samples.
  """
  v = np.sort(np.asarray(values, np.float64))
  if v.size == 0:
    raise ValueError('cumulative_share: no samples')
  total = v.sum()
  share = np.cumsum(v) / total if total > 0 else np.linspace(1.0 / v.size, 1.0, v.size)
  return np.arange(1, v.size + 1, dtype=np.float64) / v.size, share


def plot(curves, counts, path, title=''):
  """Writes the two panels of Figure 4.

  Args:
    curves: {('positive' | 'negative', gamma): (fraction [N], share [N])}.
    counts: {'positive': n, 'negative': n} samples behind each panel.
    path: the PNG to write.
    title: a line naming the model.
  """
  import matplotlib
  matplotlib.use('Agg')  # files only
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
  for ax, kind in zip(axes, ('positive', 'negative')):
    for gamma in sorted({g for k, g in curves if k == kind}):
      fraction, share = curves[(kind, gamma)]
      step = max(1, fraction.size // 2000)  # the curve needs no more points than pixels
      ax.plot(np.append(fraction[::step], fraction[-1]), np.append(share[::step], share[-1]),
              label=f'gamma = {gamma:g}')
    ax.set_xlabel(f'fraction of {kind} samples ({counts[kind]:,})')
    ax.set_ylabel('cumulative normalized loss')
    ax.set_title(f'{kind} samples')
    ax.grid(alpha=0.3)
    ax.legend(loc='upper left')
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  import jax
  from retina_jax import checkpoint
  from retina_jax import evaluate
  from retina_jax import matching
  from retina_jax import sharding
  from retina_jax.data import pipeline
  from retina_jax.model import retinanet

  config, workdir, images, out = FLAGS.config, FLAGS.workdir, FLAGS.images, FLAGS.out
  mesh = sharding.make_mesh()
  model = retinanet.build(config)
  _, variables = checkpoint.restore_variables(
      workdir, retinanet.abstract_variables(model, sharding.replicated(mesh)))
  anchors = evaluate.device_anchors(config, mesh)  # one per canvas (size bucket)
  m = config.matching

  @jax.jit
  def samples(variables, images, image_hw, boxes, classes, anchors):
    logits = model.apply(variables, images, image_hw, train=False)['logits']
    t = matching.assign(anchors, boxes, classes, fg_iou=m.fg_iou, bg_iou=m.bg_iou,
                        low_quality=m.low_quality, weights=tuple(config.box_coder.weights))
    return sample_losses(logits, t['classes'], t['labels'])

  kept = {kind: [[] for _ in GAMMAS] for kind in ('positive', 'negative')}
  seen = 0
  for local in pipeline.eval_iterator(config):
    batch = sharding.global_batch({k: local[k] for k in ('image', 'image_hw', 'boxes', 'classes')}, mesh)
    loss, positive, negative = jax.device_get(
        samples(variables, batch['image'], batch['image_hw'], batch['boxes'], batch['classes'], anchors[local['image'].shape[1:3]]))
    real = np.asarray(local['valid'])[:, None, None]  # the eval split's padding images are no samples
    for kind, mask in (('positive', positive & real), ('negative', negative & real)):
      for i in range(len(GAMMAS)):
        kept[kind][i].append(loss[i][mask])
    seen += int(real.sum())
    if seen >= images:
      break
  curves, counts = {}, {}
  for kind, per_gamma in kept.items():
    for gamma, parts in zip(GAMMAS, per_gamma):
      curves[(kind, gamma)] = cumulative_share(np.concatenate(parts))
    counts[kind] = int(sum(p.size for p in per_gamma[0]))
  out = out or os.path.join(RESULTS_DIR, f'figure4_{config.data.dataset}.png')
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  plot(curves, counts, out, f'{os.path.basename(os.path.normpath(workdir))}: {seen} images, '
       f'{config.model.backbone}, loss gamma {config.loss.gamma:g}')
  print(f'wrote {out}: {counts["positive"]:,} positive and {counts["negative"]:,} negative samples '
        f'from {seen} images')


def define_flags():
  """The command line; defined on demand so that importing this module defines no flags."""
  config_flags.DEFINE_config_file('config', None, 'The config the workdir was trained with.')
  flags.DEFINE_string('workdir', None, 'A trained run directory (its latest checkpoint).')
  flags.DEFINE_integer('images', 64, 'Eval images to draw samples from.')
  flags.DEFINE_string('out', None, 'PNG path; default experiments/results/figure4_<dataset>.png.')
  flags.mark_flags_as_required(['config', 'workdir'])


if __name__ == '__main__':
  define_flags()
  app.run(main)
