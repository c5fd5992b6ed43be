"""Table 1c: anchor density, varying scales per octave (#sc) and aspect ratios (#ar).

Sec. 5.1: ResNet-50-FPN at 600 px (longer side at most 1000), FL gamma = 2,
alpha = .25, trainval35k / minival. One square anchor per location already gives
30.3 AP; 3 scales x 3 ratios (A = 9, the default) gives 34.0, and denser anchors
saturate (2 x 3 is 34.2, 4 x 3 is 33.8). One ratio is (1,), three are (1:2, 1:1, 2:1)
as height / width; scale k of n is 2**(k / n). Everything else is configs/base.py.

  python -m retina_jax.main --config configs/table1c_anchors.py:row=sc3_ar3 \
      --workdir runs/table1c_anchors/sc3_ar3
  python -m experiments.run_table configs/table1c_anchors.py --dataset coco --dry-run
  python -m experiments.run_table configs/table1c_anchors.py --dataset shapes

Paper (minival):  #sc    1     2     3     1     2     3     4
                  #ar    1     1     1     3     3     3     3
                  AP   30.3  31.9  31.8  32.4  34.2  34.0  33.8
                  AP50 49.0  50.0  49.4  52.3  53.1  52.5  52.1
                  AP75 31.8  34.0  33.7  33.9  36.5  36.5  36.2
"""

from configs import rows
from retina_jax.data import buckets

ONE_RATIO = (1.0,)
THREE_RATIOS = (0.5, 1.0, 2.0)
SCALES_RATIOS = {
    'sc1_ar1': (1, ONE_RATIO),
    'sc2_ar1': (2, ONE_RATIO),
    'sc3_ar1': (3, ONE_RATIO),
    'sc1_ar3': (1, THREE_RATIOS),
    'sc2_ar3': (2, THREE_RATIOS),
    'sc3_ar3': (3, THREE_RATIOS),
    'sc4_ar3': (4, THREE_RATIOS),
}
PAPER = {
    'sc1_ar1': {'AP': 30.3, 'AP50': 49.0, 'AP75': 31.8},
    'sc2_ar1': {'AP': 31.9, 'AP50': 50.0, 'AP75': 34.0},
    'sc3_ar1': {'AP': 31.8, 'AP50': 49.4, 'AP75': 33.7},
    'sc1_ar3': {'AP': 32.4, 'AP50': 52.3, 'AP75': 33.9},
    'sc2_ar3': {'AP': 34.2, 'AP50': 53.1, 'AP75': 36.5},
    'sc3_ar3': {'AP': 34.0, 'AP50': 52.5, 'AP75': 36.5},
    'sc4_ar3': {'AP': 33.8, 'AP50': 52.1, 'AP75': 36.2},
}
X_LABEL = 'anchors (#scales x #ratios)'


def get_config(arg=None):
  a = rows.parse(arg, 'table1c_anchors', SCALES_RATIOS, default='sc3_ar3')
  c = rows.start(a, min_size=600, max_size=1000, backbone='resnet50')
  c.data.buckets = buckets.propose(c.data.min_size, c.data.max_size)  # base's are for 800/1333
  c.anchors.scales_per_octave, c.anchors.ratios = SCALES_RATIOS[a.row]
  return c


def sweep(add):
  """Calls add(row=<name>) once per row of the table, in the paper's order."""
  for row in SCALES_RATIOS:
    add(row=row)
