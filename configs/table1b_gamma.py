"""Table 1b: the focal loss, varying gamma (each with its best alpha).

Sec. 5.1: ResNet-50-FPN at 600 px (longer side at most 1000), trainval35k / minival;
the loss is FL with the (gamma, alpha) pairs the paper found best for each gamma.
gamma = 0 is the best CE of Table 1a. AP rises with gamma up to 2 (+2.9 AP over CE),
and the best alpha falls as gamma grows: easy negatives are down-weighted by the
modulating factor, so the positives need less weight. gamma = 2, alpha = .25 is
the paper's default. Everything else is configs/base.py.

  python -m retina_jax.main --config configs/table1b_gamma.py:row=gamma_2 \
      --workdir runs/table1b_gamma/gamma_2
  python -m experiments.run_table configs/table1b_gamma.py --dataset coco --dry-run
  python -m experiments.run_table configs/table1b_gamma.py --dataset shapes

Paper (minival):  gamma    0    0.1   0.2   0.5   1.0   2.0   5.0
                  alpha   .75   .75   .75   .50   .25   .25   .25
                  AP     31.1  31.4  31.9  32.9  33.7  34.0  32.2
                  AP50   49.4  49.9  50.7  51.7  52.0  52.5  49.6
                  AP75   33.0  33.1  33.4  35.2  36.2  36.5  34.8
"""

from configs import rows
from retina_jax.data import buckets

GAMMA_ALPHA = {
    'gamma_0': (0.0, 0.75),
    'gamma_0.1': (0.1, 0.75),
    'gamma_0.2': (0.2, 0.75),
    'gamma_0.5': (0.5, 0.50),
    'gamma_1': (1.0, 0.25),
    'gamma_2': (2.0, 0.25),
    'gamma_5': (5.0, 0.25),
}
PAPER = {
    'gamma_0': {'AP': 31.1, 'AP50': 49.4, 'AP75': 33.0},
    'gamma_0.1': {'AP': 31.4, 'AP50': 49.9, 'AP75': 33.1},
    'gamma_0.2': {'AP': 31.9, 'AP50': 50.7, 'AP75': 33.4},
    'gamma_0.5': {'AP': 32.9, 'AP50': 51.7, 'AP75': 35.2},
    'gamma_1': {'AP': 33.7, 'AP50': 52.0, 'AP75': 36.2},
    'gamma_2': {'AP': 34.0, 'AP50': 52.5, 'AP75': 36.5},
    'gamma_5': {'AP': 32.2, 'AP50': 49.6, 'AP75': 34.8},
}
X_LABEL = 'gamma (with its alpha)'


def get_config(arg=None):
  a = rows.parse(arg, 'table1b_gamma', GAMMA_ALPHA, default='gamma_2')
  c = rows.start(a, min_size=600, max_size=1000, backbone='resnet50')
  c.data.buckets = buckets.propose(c.data.min_size, c.data.max_size)  # base's are for 800/1333
  c.loss.cls = 'focal'
  c.loss.gamma, c.loss.alpha = GAMMA_ALPHA[a.row]
  return c


def sweep(add):
  """Calls add(row=<name>) once per row of the table, in the paper's order."""
  for row in GAMMA_ALPHA:
    add(row=row)
