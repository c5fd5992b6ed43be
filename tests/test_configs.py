"""The table configs: every row of every table builds, validates and changes only base's keys."""

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from configs import base
from configs import rows
from configs import table1a_alpha_ce
from configs import table1b_gamma
from configs import table1c_anchors
from configs import table1d_ohem
from configs import table1e_speed
from configs import table2_final
from retina_jax import main

TABLES = (table1a_alpha_ce, table1b_gamma, table1c_anchors, table1d_ohem, table1e_speed, table2_final)


def _rows(module):
  return list(module.TABLE.rows)


def _flat(c, prefix=''):
  out = {}
  for k, v in c.items():
    if isinstance(v, ml_collections.ConfigDict):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[prefix + k] = v
  return out


@pytest.mark.parametrize('module', TABLES, ids=lambda m: m.__name__.split('.')[-1])
@pytest.mark.parametrize('dataset', ['coco', 'shapes', 'sparse'])
def test_every_row_builds_validates_and_keeps_base_keys(module, dataset):
  names = _rows(module)
  assert names and len(set(names)) == len(names)
  assert all(module.TABLE.rows[row].paper.get('AP') is not None for row in names), 'the paper\'s numbers'
  base_keys = set(_flat(base.get_config()))
  for row in names:
    c = module.get_config(f'row={row},dataset={dataset}')
    assert set(_flat(c)) == base_keys, row
    main.validate(c)
    assert c.data.dataset == {'sparse': 'shapes'}.get(dataset, dataset)  # sparse: the shapes builder, other settings
    assert all(s % 128 == 0 for s in c.data.canvas)
    assert c.data.canvas[0] >= c.data.min_size


def test_default_row_is_the_papers_best():
  assert table1a_alpha_ce.get_config().loss.alpha == 0.75
  c = table1b_gamma.get_config(None)
  assert (c.loss.gamma, c.loss.alpha) == (2.0, 0.25)
  assert table1c_anchors.get_config('').anchors.scales_per_octave == 3


def test_rows_set_what_their_table_varies():
  c = table1a_alpha_ce.get_config('row=alpha_0.999')
  assert (c.loss.gamma, c.loss.alpha, c.data.min_size, c.data.max_size) == (0.0, 0.999, 600, 1000)
  assert tuple(c.data.canvas) == (1024, 1024)
  c = table1b_gamma.get_config('row=gamma_0.5')
  assert (c.loss.cls, c.loss.gamma, c.loss.alpha) == ('focal', 0.5, 0.5)
  c = table1c_anchors.get_config('row=sc4_ar3')
  assert (c.anchors.scales_per_octave, tuple(c.anchors.ratios)) == (4, (0.5, 1.0, 2.0))
  assert tuple(table1c_anchors.get_config('row=sc2_ar1').anchors.ratios) == (1.0,)
  c = table1d_ohem.get_config('row=ohem13_512_nms0.5')
  assert (c.loss.cls, c.loss.ohem_batch, c.loss.ohem_nms, c.loss.ohem_neg_pos) == ('ohem', 512, 0.5, 3.0)
  assert (c.loss.gamma, c.model.backbone) == (0.0, 'resnet101')
  c = table1d_ohem.get_config('row=fl')
  assert (c.loss.cls, c.loss.gamma, c.loss.alpha) == ('focal', 2.0, 0.25)
  c = table2_final.get_config('row=x101')
  assert (c.model.backbone, c.train.steps, tuple(c.optim.decay_steps)) == (
      'resnext101_64x4d', 135000, (90000, 120000))
  assert tuple(c.data.scale_jitter) == (0.8, 1.0) and c.data.min_size == 800


def test_table1e_scales_depth_and_size():
  c = table1e_speed.get_config('row=r101_400')
  assert (c.model.backbone, c.data.min_size, c.data.max_size) == ('resnet101', 400, 667)
  assert tuple(c.data.canvas) == (768, 768)
  c = table1e_speed.get_config('row=r50_800')
  assert (c.model.backbone, c.data.min_size, c.data.max_size) == ('resnet50', 800, 1333)
  toy = rows.toy()
  small = table1e_speed.get_config('row=r50_400,dataset=shapes')
  large = table1e_speed.get_config('row=r101_800,dataset=shapes')
  assert small.model.backbone == toy.model.backbone
  assert large.model.backbone == rows.DEEPER[toy.model.backbone]
  assert small.data.min_size < toy.data.min_size < large.data.min_size
  assert table1e_speed.get_config('row=r50_600,dataset=shapes').data.min_size == toy.data.min_size


def test_toy_scale_keeps_the_row_and_takes_the_toy_model():
  toy = rows.toy()
  c = table1b_gamma.get_config('row=gamma_0.1,dataset=shapes')
  assert (c.loss.gamma, c.loss.alpha) == (0.1, 0.75)
  assert c.model.backbone == toy.model.backbone and tuple(c.data.canvas) == tuple(toy.data.canvas)
  c = table1d_ohem.get_config('row=ohem_256_nms0.7,dataset=shapes')
  assert (c.loss.ohem_batch, c.model.backbone) == (256, toy.model.backbone)
  half = table1c_anchors.get_config('row=sc1_ar1,dataset=shapes,schedule=0.5')
  assert half.train.schedule == pytest.approx(0.5 * toy.train.schedule)
  assert half.anchors.scales_per_octave == 1


@pytest.mark.parametrize('arg, message', [
    ('row=gamma_3', 'unknown row'),
    ('row=gamma_2,dataset=voc', 'dataset must be'),
    ('schedule=fast', 'schedule must be'),
    ('schedule=0', 'schedule must be'),
    ('gamma_2', 'cannot read'),
    ('rows=gamma_2', 'cannot read'),
])
def test_bad_arguments_name_the_table_and_value(arg, message):
  with pytest.raises(ValueError, match=message) as e:
    table1b_gamma.get_config(arg)
  assert 'table1b_gamma' in str(e.value)


def test_config_flag_reads_the_row_argument():
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'table config', flag_values=fv)
  fv(['prog', '--config=configs/table1b_gamma.py:row=gamma_0.2,dataset=shapes'])
  assert (fv.config.loss.gamma, fv.config.loss.alpha, fv.config.data.dataset) == (0.2, 0.75, 'shapes')
