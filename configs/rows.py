"""What the table configs share: the table as data, the row argument and the toy scales.

A table file is data: one `Table` (its rows, each with what it changes and the
paper's numbers; what is fixed for the whole table; what the runner measures)
and `get_config(arg) = TABLE.config(arg)`. experiments/run_table.py runs any such
file by path, so a table of one's own is one new file. `get_config(arg)` takes `row=<name>,dataset=coco|shapes|sparse,schedule=<x>,seed=<n>`
(every part optional, in any order):

  row       one of the table's rows (`TABLE.rows`); default `TABLE.default`, the paper's best.
  dataset   'coco' (default): the paper's setting, on tfds coco/2017, at full scale.
            'shapes': the CPU toy scale of `toy()` on the built-in synthetic set.
            'sparse': `sparse()`, the toy scale with COCO's foreground/background imbalance.
  schedule  multiplies train.schedule (steps, warm-up and decays), default 1.
  seed      config.seed (initialisation and data order; the images stay the same), default 0.

  python -m retina_jax.main --workdir runs/1b/gamma_2 \
      --config configs/table1b_gamma.py:row=gamma_2,dataset=shapes,schedule=0.5
"""

import dataclasses
import re

from configs import base
from configs import shapes
from retina_jax.data import buckets

DATASETS = ('coco', 'shapes', 'sparse')
# Depth in relative terms for the toy scale: the table's deeper network is the next
# deeper ResNet after the toy backbone (Table 1e's 50 -> 101).
DEEPER = {'resnet18': 'resnet34', 'resnet34': 'resnet50', 'resnet50': 'resnet101', 'resnet101': 'resnet152'}


@dataclasses.dataclass(frozen=True)
class Row:
  """One row of a table.

  Attributes:
    paper: the paper's numbers for the row in percent, e.g. {'AP': 34.0, 'AP50': 52.5}
      ('time_ms' for a timed table); empty for a table of one's own.
    overrides: {config key: value} the row sets, e.g. {'loss.gamma': 2.0}, on every scale.
    backbone: the row's network on COCO when it differs from the table's; at a toy scale
      such a row takes the next deeper ResNet after the toy's (`DEEPER`).
    scale: the row's shorter side on COCO (longer side capped in Detectron's proportion,
      1333 at 800); at a toy scale the toy's image size is resized by scale / the table's
      min_size.
  """
  paper: dict = dataclasses.field(default_factory=dict)
  overrides: dict = dataclasses.field(default_factory=dict)
  backbone: str | None = None
  scale: int | None = None


@dataclasses.dataclass(frozen=True)
class Table:
  """A table of the paper (or of one's own) as data: what experiments/run_table.py runs.

  Attributes:
    name: the table file's name, for messages (results files are named after the file).
    rows: {row name: Row}, in the order the table prints them.
    default: the row `get_config` builds when the argument names none.
    x_label: what the rows vary, for the plot.
    min_size, max_size: the table's COCO image scale; None keeps configs/base.py's.
    backbone: the table's network on COCO.
    overrides: {config key: value} for every row on every scale.
    coco_overrides, toy_overrides: the same, on COCO only / on the toy scales only.
    measure_time: the runner times inference per image after each row (Table 1e).
  """
  name: str
  rows: dict
  default: str
  x_label: str
  min_size: int | None = None
  max_size: int | None = None
  backbone: str = 'resnet50'
  overrides: dict = dataclasses.field(default_factory=dict)
  coco_overrides: dict = dataclasses.field(default_factory=dict)
  toy_overrides: dict = dataclasses.field(default_factory=dict)
  measure_time: bool = False

  def config(self, arg=None):
    """The config of the row that `arg` names (see the module docstring)."""
    a = parse(arg, self.name, self.rows, self.default)
    row = self.rows[a.row]
    c = start(a, min_size=self.min_size, max_size=self.max_size, backbone=self.backbone)
    coco = a.dataset == 'coco'
    for overrides in (self.overrides, self.coco_overrides if coco else self.toy_overrides, row.overrides):
      for key, value in overrides.items():
        _set(c, key, value, f'{self.name}, row {a.row}')
    if row.backbone is not None:
      c.model.backbone = row.backbone if coco else DEEPER[c.model.backbone]
    if row.scale is not None:
      if coco:
        resize(c, row.scale, int(row.scale * 1333 / 800 + 0.5))
      else:
        factor = row.scale / self.min_size
        resize(c, round(c.data.min_size * factor), round(c.data.max_size * factor))
    c.train.schedule *= a.schedule
    return c


def _set(c, key, value, where):
  """Sets the dotted config key `key`, which must exist in configs/base.py."""
  *path, leaf = key.split('.')
  node = c
  for part in path:
    node = node.get(part) if hasattr(node, 'get') else None
  if node is None or not hasattr(node, 'get') or leaf not in node:
    raise ValueError(f'{where}: no config key {key!r} in configs/base.py')
  node[leaf] = value


@dataclasses.dataclass(frozen=True)
class Arg:
  row: str
  dataset: str
  schedule: float
  seed: int = 0


def parse(arg, table, rows, default):
  """Reads a table file's argument string.

  Args:
    arg: 'row=<name>,dataset=<coco|shapes|sparse>,schedule=<float>,seed=<int>', any part
      omitted; or None.
    table: the table's name, for error messages.
    rows: the table's row names.
    default: the row used when `arg` names none.
  Returns:
    An Arg.
  Raises:
    ValueError: naming the table and the bad part.
  """
  values = {'row': default, 'dataset': 'coco', 'schedule': '1', 'seed': '0'}
  for part in (arg or '').split(','):
    key, sep, value = part.strip().partition('=')
    if not key and not sep:
      continue
    if not sep or key not in values:
      raise ValueError(f'{table}: cannot read {part!r} in config argument {arg!r}; '
                       f'expected row=<name>,dataset={"|".join(DATASETS)},schedule=<float>,seed=<int>')
    values[key] = value.strip()
  if values['row'] not in rows:
    raise ValueError(f'{table}: unknown row {values["row"]!r}; rows: {", ".join(rows)}')
  if values['dataset'] not in DATASETS:
    raise ValueError(f'{table}: dataset must be one of {DATASETS}, got {values["dataset"]!r}')
  try:
    schedule = float(values['schedule'])
  except ValueError:
    schedule = float('nan')
  if not schedule > 0:
    raise ValueError(f'{table}: schedule must be a positive number, got {values["schedule"]!r}')
  if not re.fullmatch(r'\d+', values['seed']):
    raise ValueError(f'{table}: seed must be a whole number >= 0, got {values["seed"]!r}')
  return Arg(values['row'], values['dataset'], schedule, int(values['seed']))


def start(arg, *, min_size=None, max_size=None, backbone='resnet50'):
  """The config a row starts from: the paper's at the table's fixed settings, or a toy scale.

  arg.schedule is applied by `Table.config`, after the table's own changes.

  The fixed settings (scale, depth) apply to COCO only: at the toy scale the row keeps
  the toy's model and canvas, and changes only what its table varies.

  Args:
    arg: from `parse`.
    min_size, max_size: the table's image scale (shorter side, longer-side cap);
      None keeps base's 800 / 1333.
    backbone: the table's network.
  """
  if arg.dataset == 'coco':
    c = base.get_config()
    if min_size is not None:
      resize(c, min_size, max_size)
    c.model.backbone = backbone
  elif arg.dataset == 'shapes':
    c = toy()
  else:
    c = sparse()
  c.seed = arg.seed
  return c


def toy():
  """The CPU toy scale of every table row with dataset=shapes, in one place.

  The small model, data and canvas are configs/shapes.py's (the CPU demo). The rows
  are compared, not demoed, so they train a schedule of their own, written out here
  so that a change to the demo does not change the tables: 1500 steps of 8 images
  (12,000 images, warm-up 100 steps, lr / 10 at 1000 and 1333: the paper's shape) at
  the demo's learning rate, 0.04 per 16 images (0.02 at 8): long enough that rows are
  ranked by what they learned rather than by noise. What the rows reach, and what a
  row costs: README.md, "Reproduction status".
  """
  c = shapes.get_config()
  c.train.batch_size = 8
  c.optim.base_lr = 0.04
  c.optim.base_batch = 16
  c.train.steps = 1500
  c.train.schedule = 1.0
  c.optim.warmup_steps = 100
  c.optim.decay_steps = (1000, 1333)
  # Harder than the demo's data (objects from 8 px, up to 12 per image) and the paper's
  # 1000 candidates per level; pinned so the demo's own tuning stays its own.
  c.data.shapes.max_objects = 12
  c.data.shapes.min_object_size = 8
  c.postprocess.topk_per_level = 1000
  c.train.checkpoint_every = 1000000  # only the final checkpoint (Table 1e and Figure 4 read it)
  c.eval.visualize = 0
  return c


def sparse():
  """The toy scale with COCO's foreground/background imbalance (dataset=sparse).

  The focal loss is about that imbalance, which `toy()` lacks: ~88 anchors per positive
  anchor against about 640 for the paper's RetinaNet on COCO at 600 px (both from
  `python -m experiments.imbalance`, which says how COCO's is estimated). Here the same
  model and schedule see 256 px images with 1 to 5 objects on a 256 x 256 canvas
  (12,276 anchors per image), the object count chosen before any row was run for
  ~750 anchors per positive (README.md, "Reproduction status", has the counts measured;
  every results file shows the ratio training met). Objects keep `toy()`'s sizes in
  pixels (8 px up), so their sizes relative to the anchors are the toy's; 4x the
  pixels of `toy()`.
  """
  c = toy()
  c.data.shapes.image_size = 256
  c.data.shapes.max_objects = 5
  c.data.canvas = (256, 256)
  c.data.min_size = 256
  c.data.max_size = 256
  return c


def resize(c, min_size, max_size):
  """Sets the image scale, the size buckets for it and the smallest square canvas that fits it.

  The buckets (used where data.use_buckets, as on COCO) are proposed for this scale:
  base's are for 800 / 1333. The square canvas (data.use_buckets False, as on the toy
  scales) keeps portrait images at the scale of landscape ones instead of shrinking
  them; 128 is the stride of the coarsest level (P7).
  """
  c.data.min_size = int(min_size)
  c.data.max_size = int(max_size)
  if c.data.use_buckets:
    c.data.buckets = buckets.propose(c.data.min_size, c.data.max_size)
  side = -(-int(max_size) // 128) * 128
  c.data.canvas = (side, side)
