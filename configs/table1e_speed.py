"""Table 1e: speed against accuracy, varying depth (ResNet-50/101-FPN) and image scale.

Sec. 5.1, "Speed versus Accuracy": FL gamma = 2, alpha = .25, 3 x 3 anchors, trained
and tested at a shorter side of 400..800 px, the longer side capped as Detectron
does (1333 at 800, scaled with the shorter side: 667, 833, 1000, 1167); AP on
test-dev (ours: the eval split), time per image on an Nvidia M40 (ours: the device
the runner runs on, model forward + post-processing, jitted, after warm-up). Larger
scales and the deeper net buy AP with time: 30.5 AP at 64 ms (R50, 400) to 37.8 AP
at 198 ms (R101, 800). Everything else is configs/base.py.

At the toy scale (dataset=shapes) depth and scale are relative: R50 is the toy
backbone and R101 the next deeper ResNet (rows.DEEPER); the toy's own image size
stands for the ablations' 600 px, so scale s resizes the toy images by s / 600,
on the smallest square canvas (divisible by 128) that fits.

  python -m retina_jax.main --config configs/table1e_speed.py:row=r50_600 \
      --workdir runs/table1e_speed/r50_600
  python -m experiments.run_table configs/table1e_speed.py --dataset coco --dry-run

Paper (test-dev):  depth scale   AP  AP50  AP75  APs  APm  APl  time (ms)
                   50    400   30.5  47.8  32.7  11.2 33.8 46.1   64
                   50    500   32.5  50.9  34.8  13.9 35.8 46.7   72
                   50    600   34.3  53.2  36.9  16.2 37.4 47.4   98
                   50    700   35.1  54.2  37.7  18.0 39.3 46.4  121
                   50    800   35.7  55.0  38.5  18.9 38.9 46.3  153
                   101   400   31.9  49.5  34.1  11.6 35.8 48.5   81
                   101   500   34.4  53.1  36.8  14.7 38.5 49.1   90
                   101   600   36.0  55.2  38.7  17.4 39.6 49.7  122
                   101   700   37.1  56.6  39.8  19.1 40.6 49.4  154
                   101   800   37.8  57.5  40.8  20.2 41.1 49.2  198
"""

from configs import rows
from retina_jax.data import buckets

DEPTH_SCALE = {
    f'r{depth}_{scale}': (depth, scale) for depth in (50, 101) for scale in (400, 500, 600, 700, 800)
}
_PAPER_ROWS = (  # AP, AP50, AP75, APs, APm, APl, time in ms
    (30.5, 47.8, 32.7, 11.2, 33.8, 46.1, 64),
    (32.5, 50.9, 34.8, 13.9, 35.8, 46.7, 72),
    (34.3, 53.2, 36.9, 16.2, 37.4, 47.4, 98),
    (35.1, 54.2, 37.7, 18.0, 39.3, 46.4, 121),
    (35.7, 55.0, 38.5, 18.9, 38.9, 46.3, 153),
    (31.9, 49.5, 34.1, 11.6, 35.8, 48.5, 81),
    (34.4, 53.1, 36.8, 14.7, 38.5, 49.1, 90),
    (36.0, 55.2, 38.7, 17.4, 39.6, 49.7, 122),
    (37.1, 56.6, 39.8, 19.1, 40.6, 49.4, 154),
    (37.8, 57.5, 40.8, 20.2, 41.1, 49.2, 198),
)
PAPER = {
    row: dict(zip(('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'time_ms'), values))
    for row, values in zip(DEPTH_SCALE, _PAPER_ROWS)
}
X_LABEL = 'time per image (ms)'


def max_size(scale):
  """Detectron's longer-side cap for a shorter side `scale`: 1333 at 800, in proportion."""
  return int(scale * 1333 / 800 + 0.5)


def get_config(arg=None):
  a = rows.parse(arg, 'table1e_speed', DEPTH_SCALE, default='r101_800')
  depth, scale = DEPTH_SCALE[a.row]
  if a.dataset == 'coco':
    c = rows.start(a, min_size=scale, max_size=max_size(scale), backbone=f'resnet{depth}')
    c.data.buckets = buckets.propose(c.data.min_size, c.data.max_size)  # base's are for 800/1333
    return c
  c = rows.start(a)
  if depth == 101:
    c.model.backbone = rows.DEEPER[c.model.backbone]
  rows.resize(c, round(c.data.min_size * scale / 600), round(c.data.max_size * scale / 600))
  return c


def sweep(add):
  """Calls add(row=<name>) once per row of the table, in the paper's order."""
  for row in DEPTH_SCALE:
    add(row=row)
