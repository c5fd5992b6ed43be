"""Table 2: the final RetinaNet models against the state of the art (COCO test-dev).

Sec. 5.2: ResNet-101-FPN and ResNeXt-101-FPN (64x4d, as in Detectron's model zoo),
FL gamma = 2, alpha = .25, trained at 800 px with scale jitter (shorter side
640..800: data.scale_jitter (0.8, 1.0) times data.min_size 800) and 1.5x longer
than the ablations: 135k iterations, lr / 10 at 90k and 120k. Tested at 800 px on
test-dev (ours: the eval split; test-dev needs the evaluation server). Everything
else is configs/base.py.

At the toy scale (dataset=shapes) the rows keep the recipe in relative terms: the
same jitter, train.schedule times 1.5, the toy backbone for R101 and the next
deeper ResNet (rows.DEEPER) standing in for the stronger ResNeXt.

  python -m retina_jax.main --config configs/table2_final.py:row=r101 \
      --workdir runs/table2_final/r101
  python -m experiments.run_table configs/table2_final.py --dataset coco --dry-run

Paper (test-dev):          backbone          AP   AP50  AP75  APs   APm   APl
  Faster R-CNN w FPN       ResNet-101-FPN   36.2  59.1  39.0  18.2  39.0  48.2
  YOLOv2                   DarkNet-19       21.6  44.0  19.2   5.0  22.4  35.5
  SSD513                   ResNet-101-SSD   31.2  50.4  33.3  10.2  34.5  49.8
  DSSD513                  ResNet-101-DSSD  33.2  53.3  35.2  13.0  35.4  51.1
  RetinaNet (row r101)     ResNet-101-FPN   39.1  59.1  42.3  21.8  42.7  50.2
  RetinaNet (row x101)     ResNeXt-101-FPN  40.8  61.1  44.1  24.1  44.2  51.2
"""

from configs import rows

_KEYS = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl')

TABLE = rows.Table(
    name='table2_final',
    backbone='resnet101',  # 800 / 1333, configs/base.py's scale
    overrides={'data.scale_jitter': (0.8, 1.0)},
    coco_overrides={'train.steps': 135000, 'optim.decay_steps': (90000, 120000)},
    toy_overrides={'train.schedule': 1.5},
    rows={
        'r101': rows.Row(dict(zip(_KEYS, (39.1, 59.1, 42.3, 21.8, 42.7, 50.2)))),
        'x101': rows.Row(dict(zip(_KEYS, (40.8, 61.1, 44.1, 24.1, 44.2, 51.2))), backbone='resnext101_64x4d'),
    },
    default='x101',
    x_label='final model',
)


def get_config(arg=None):
  return TABLE.config(arg)
