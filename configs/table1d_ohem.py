"""Table 1d: the focal loss against online hard example mining (OHEM).

Sec. 5.1, "Online Hard Example Mining": ResNet-101-FPN at 600 px (longer side at
most 1000), trainval35k / minival. The OHEM rows train with CE: every anchor is
scored, NMS at the given IoU threshold (loss.ohem_nms) runs over the anchors'
boxes ranked by loss, and the `batch size` highest-loss anchors per image
(loss.ohem_batch) form the minibatch; "OHEM 1:3" caps negatives at three per
positive (loss.ohem_neg_pos = 3). The best OHEM row (32.8 AP) is 3.2 AP below FL
(36.0). Everything else is configs/base.py.

  python -m retina_jax.main --config configs/table1d_ohem.py:row=ohem_128_nms0.5 \
      --workdir runs/table1d_ohem/ohem_128_nms0.5
  python -m experiments.run_table configs/table1d_ohem.py --dataset coco --dry-run

Paper (minival):  method    batch  nms   AP    AP50  AP75
                  OHEM      128    .7   31.1  47.2  33.2
                  OHEM      256    .7   31.8  48.8  33.9
                  OHEM      512    .7   30.6  47.0  32.6
                  OHEM      128    .5   32.8  50.3  35.1
                  OHEM      256    .5   31.0  47.4  33.0
                  OHEM      512    .5   27.6  42.0  29.2
                  OHEM 1:3  128    .5   31.1  47.2  33.2
                  OHEM 1:3  256    .5   28.3  42.4  30.3
                  OHEM 1:3  512    .5   24.0  35.5  25.8
                  FL        n/a    n/a  36.0  54.9  38.7
"""

from configs import rows
from retina_jax.data import buckets

# row -> (loss.cls, ohem_batch, ohem_nms, ohem_neg_pos); the FL row keeps base's OHEM keys (unused).
METHODS = {
    'ohem_128_nms0.7': ('ohem', 128, 0.7, 0.0),
    'ohem_256_nms0.7': ('ohem', 256, 0.7, 0.0),
    'ohem_512_nms0.7': ('ohem', 512, 0.7, 0.0),
    'ohem_128_nms0.5': ('ohem', 128, 0.5, 0.0),
    'ohem_256_nms0.5': ('ohem', 256, 0.5, 0.0),
    'ohem_512_nms0.5': ('ohem', 512, 0.5, 0.0),
    'ohem13_128_nms0.5': ('ohem', 128, 0.5, 3.0),
    'ohem13_256_nms0.5': ('ohem', 256, 0.5, 3.0),
    'ohem13_512_nms0.5': ('ohem', 512, 0.5, 3.0),
    'fl': ('focal', 128, 0.7, 0.0),
}
PAPER = {
    'ohem_128_nms0.7': {'AP': 31.1, 'AP50': 47.2, 'AP75': 33.2},
    'ohem_256_nms0.7': {'AP': 31.8, 'AP50': 48.8, 'AP75': 33.9},
    'ohem_512_nms0.7': {'AP': 30.6, 'AP50': 47.0, 'AP75': 32.6},
    'ohem_128_nms0.5': {'AP': 32.8, 'AP50': 50.3, 'AP75': 35.1},
    'ohem_256_nms0.5': {'AP': 31.0, 'AP50': 47.4, 'AP75': 33.0},
    'ohem_512_nms0.5': {'AP': 27.6, 'AP50': 42.0, 'AP75': 29.2},
    'ohem13_128_nms0.5': {'AP': 31.1, 'AP50': 47.2, 'AP75': 33.2},
    'ohem13_256_nms0.5': {'AP': 28.3, 'AP50': 42.4, 'AP75': 30.3},
    'ohem13_512_nms0.5': {'AP': 24.0, 'AP50': 35.5, 'AP75': 25.8},
    'fl': {'AP': 36.0, 'AP50': 54.9, 'AP75': 38.7},
}
X_LABEL = 'method (OHEM batch, NMS threshold; FL)'


def get_config(arg=None):
  a = rows.parse(arg, 'table1d_ohem', METHODS, default='fl')
  c = rows.start(a, min_size=600, max_size=1000, backbone='resnet101')
  c.data.buckets = buckets.propose(c.data.min_size, c.data.max_size)  # base's are for 800/1333
  c.loss.cls, c.loss.ohem_batch, c.loss.ohem_nms, c.loss.ohem_neg_pos = METHODS[a.row]
  if c.loss.cls == 'ohem':
    # OHEM ranks anchors by plain CE (the paper's baseline): no alpha, no modulation.
    c.loss.gamma = 0.0
    c.loss.alpha = -1.0
  return c


def sweep(add):
  """Calls add(row=<name>) once per row of the table, in the paper's order."""
  for row in METHODS:
    add(row=row)
