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

_KEYS = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'time_ms')


def _row(depth, scale, *paper):
  return rows.Row(dict(zip(_KEYS, paper)), backbone=f'resnet{depth}' if depth != 50 else None, scale=scale)


TABLE = rows.Table(
    name='table1e_speed',
    min_size=600, max_size=1000, backbone='resnet50',
    rows={
        'r50_400': _row(50, 400, 30.5, 47.8, 32.7, 11.2, 33.8, 46.1, 64),
        'r50_500': _row(50, 500, 32.5, 50.9, 34.8, 13.9, 35.8, 46.7, 72),
        'r50_600': _row(50, 600, 34.3, 53.2, 36.9, 16.2, 37.4, 47.4, 98),
        'r50_700': _row(50, 700, 35.1, 54.2, 37.7, 18.0, 39.3, 46.4, 121),
        'r50_800': _row(50, 800, 35.7, 55.0, 38.5, 18.9, 38.9, 46.3, 153),
        'r101_400': _row(101, 400, 31.9, 49.5, 34.1, 11.6, 35.8, 48.5, 81),
        'r101_500': _row(101, 500, 34.4, 53.1, 36.8, 14.7, 38.5, 49.1, 90),
        'r101_600': _row(101, 600, 36.0, 55.2, 38.7, 17.4, 39.6, 49.7, 122),
        'r101_700': _row(101, 700, 37.1, 56.6, 39.8, 19.1, 40.6, 49.4, 154),
        'r101_800': _row(101, 800, 37.8, 57.5, 40.8, 20.2, 41.1, 49.2, 198),
    },
    default='r101_800',
    x_label='time per image (ms)',
    measure_time=True,
)


def get_config(arg=None):
  return TABLE.config(arg)
