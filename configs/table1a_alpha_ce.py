"""Table 1a: alpha-balanced cross entropy (focal loss with gamma = 0), varying alpha.

The paper's first ablation (sec. 5.1): RetinaNet with ResNet-50-FPN trained and
tested at 600 px (shorter side, longer side at most 1000), the classification loss
the alpha-balanced CE, alpha from .10 to .999; trainval35k / minival. alpha = .75
gives the best AP: weighting the rare foreground up helps, but CE alone stays well
below the focal loss (Table 1b). Everything else is configs/base.py.

  python -m retina_jax.main --config configs/table1a_alpha_ce.py:row=alpha_0.75 \
      --workdir runs/table1a_alpha_ce/alpha_0.75
  python -m experiments.run_table configs/table1a_alpha_ce.py --dataset coco --dry-run
  python -m experiments.run_table configs/table1a_alpha_ce.py --dataset shapes

Paper (minival):  alpha   .10   .25   .50   .75   .90   .99  .999
                  AP      0.0  10.8  30.2  31.1  30.8  28.7  25.1
                  AP50    0.0  16.0  46.7  49.4  49.7  47.4  41.7
                  AP75    0.0  11.7  32.8  33.0  32.3  29.9  26.1
"""

from configs import rows
from retina_jax.data import buckets

ALPHAS = {
    'alpha_0.10': 0.10,
    'alpha_0.25': 0.25,
    'alpha_0.50': 0.50,
    'alpha_0.75': 0.75,
    'alpha_0.90': 0.90,
    'alpha_0.99': 0.99,
    'alpha_0.999': 0.999,
}
PAPER = {
    'alpha_0.10': {'AP': 0.0, 'AP50': 0.0, 'AP75': 0.0},
    'alpha_0.25': {'AP': 10.8, 'AP50': 16.0, 'AP75': 11.7},
    'alpha_0.50': {'AP': 30.2, 'AP50': 46.7, 'AP75': 32.8},
    'alpha_0.75': {'AP': 31.1, 'AP50': 49.4, 'AP75': 33.0},
    'alpha_0.90': {'AP': 30.8, 'AP50': 49.7, 'AP75': 32.3},
    'alpha_0.99': {'AP': 28.7, 'AP50': 47.4, 'AP75': 29.9},
    'alpha_0.999': {'AP': 25.1, 'AP50': 41.7, 'AP75': 26.1},
}
X_LABEL = 'alpha (CE, gamma = 0)'


def get_config(arg=None):
  a = rows.parse(arg, 'table1a_alpha_ce', ALPHAS, default='alpha_0.75')
  c = rows.start(a, min_size=600, max_size=1000, backbone='resnet50')
  c.data.buckets = buckets.propose(c.data.min_size, c.data.max_size)  # base's are for 800/1333
  c.loss.cls = 'focal'
  c.loss.gamma = 0.0
  c.loss.alpha = ALPHAS[a.row]
  return c


def sweep(add):
  """Calls add(row=<name>) once per row of the table, in the paper's order."""
  for row in ALPHAS:
    add(row=row)
