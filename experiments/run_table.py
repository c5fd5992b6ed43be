r"""Runs one of the paper's tables row by row and writes its results file and plot.

  python -m experiments.run_table configs/table1b_gamma.py --dataset shapes
  python -m experiments.run_table configs/table1b_gamma.py --dataset coco --dry-run
  python -m experiments.run_table configs/table1e_speed.py --dataset shapes --rows r50_400,r101_400

Each row trains and evaluates in its own process,
  python -m retina_jax.main --config <table>.py:row=<row>,dataset=<d>,schedule=<s> \
      --workdir <root>/<table>_<d>/<row>
one after the other on this machine; --dry-run prints these commands instead, one
per row, for a cluster's job scheduler. A row whose workdir already holds an
evaluation is not run again (--force reruns it), so an interrupted table resumes
and a table trained elsewhere is collected by running the same command over its
workdirs. Then experiments/results/<table>_<d>.md gets the paper's numbers beside
ours and <table>_<d>.png the table's trend; a '## Notes' section written by hand
in the results file is kept when the file is rewritten. For Table 1e the runner
also times inference (model + post-processing, jitted, after warm-up) per image
on its own device, after each row trains; --retime times every trained row again
in one pass, for when other jobs shared the device while the rows trained.
"""

import argparse
import datetime
import glob
import json
import os
import re
import shlex
import subprocess
import sys
import time

from configs import table1a_alpha_ce
from configs import table1b_gamma
from configs import table1c_anchors
from configs import table1d_ohem
from configs import table1e_speed
from configs import table2_final
from experiments import report

TABLES = {
    'table1a_alpha_ce': table1a_alpha_ce,
    'table1b_gamma': table1b_gamma,
    'table1c_anchors': table1c_anchors,
    'table1d_ohem': table1d_ohem,
    'table1e_speed': table1e_speed,
    'table2_final': table2_final,
}
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')
_RECORD = 'run_table.json'  # what the runner knows about a row, beside the row's own outputs


def table_of(config_path):
  """(name, module) of the table file at `config_path`, e.g. configs/table1b_gamma.py."""
  name = os.path.splitext(os.path.basename(config_path))[0]
  if name not in TABLES:
    raise ValueError(f'{config_path}: not a table config; tables: {", ".join(TABLES)}')
  return name, TABLES[name]


def table_rows(module):
  """The row names of a table module, in the order its `sweep` adds them."""
  names = []
  module.sweep(lambda row: names.append(row))
  return names


def config_arg(row, dataset, schedule):
  return f'row={row},dataset={dataset},schedule={schedule:g}'


def row_command(config_path, row, dataset, schedule, workdir):
  """The argv that trains and evaluates one row."""
  return [sys.executable, '-m', 'retina_jax.main',
          f'--config={config_path}:{config_arg(row, dataset, schedule)}', f'--workdir={workdir}']


def latest_eval(workdir):
  """(step, metrics) of the newest eval_<step>.json in `workdir`, or None."""
  found = []
  for path in glob.glob(os.path.join(workdir, 'eval_*.json')):
    m = re.fullmatch(r'eval_(\d+)\.json', os.path.basename(path))
    if m:
      found.append((int(m.group(1)), path))
  if not found:
    return None
  step, path = max(found)
  with open(path) as f:
    return step, json.load(f)


def hardware():
  """This machine's accelerators, as a short string."""
  import jax
  devices = jax.devices()
  return f'{len(devices)} x {devices[0].device_kind} ({devices[0].platform}, {os.cpu_count()} host cores)'


def load_variables(config, workdir, mesh):
  """{'params', 'batch_stats'} of the latest checkpoint in `workdir`, replicated on `mesh`."""
  from retina_jax import checkpoint
  from retina_jax import train
  from retina_jax.model import retinanet
  model = retinanet.build(config)
  state, _ = train.create_train_state(config, model, mesh)
  # orbax wants an absolute path.
  manager = checkpoint.make_manager(os.path.abspath(workdir), config.train.keep_checkpoints)
  restored = checkpoint.restore(manager, state)
  manager.close()
  if restored is None:
    raise FileNotFoundError(f'no checkpoint in {workdir}/checkpoints')
  return model, {'params': restored.params, 'batch_stats': restored.batch_stats}


def time_per_image(config, workdir, *, batches=5, warmup=2):
  """Inference time per image in ms: jitted model forward + post-processing.

  Runs the trained weights of `workdir` (post-processing's NMS stops early when few
  boxes pass the score threshold, so untrained weights would time it too fast) on
  eval batches held in memory (reading and resizing images is not timed), after
  `warmup` calls that compile.

  Returns:
    Milliseconds per image, averaged over `batches` batches of eval.batch_size.
  """
  import jax
  from retina_jax import anchors as anchors_lib
  from retina_jax import evaluate
  from retina_jax import sharding
  from retina_jax.data import pipeline

  mesh = sharding.make_mesh()
  model, variables = load_variables(config, workdir, mesh)
  predict = evaluate.make_predict_fn(config, model, mesh)
  anchors = jax.device_put(anchors_lib.from_config(config), sharding.replicated(mesh))
  held = []
  for batch in pipeline.eval_iterator(config):
    held.append(sharding.global_batch({k: batch[k] for k in ('image', 'image_hw')}, mesh))
    if len(held) == batches:
      break
  total = 0.0
  for i in range(warmup + batches):
    b = held[i % len(held)]
    tick = time.perf_counter()
    jax.block_until_ready(predict(variables, b['image'], b['image_hw'], anchors))
    if i >= warmup:
      total += time.perf_counter() - tick
  return 1000.0 * total / (batches * config.eval.batch_size)


def run_row(config_path, module, row, dataset, schedule, workdir, *, measure_time):
  """Trains and evaluates one row in a subprocess; writes the runner's record beside it.

  Returns:
    The record (command, hardware, date, wall_s, returncode, time_ms when measured).
  """
  os.makedirs(workdir, exist_ok=True)
  cmd = row_command(config_path, row, dataset, schedule, workdir)
  log = os.path.join(workdir, 'log.txt')
  tick = time.time()
  with open(log, 'a') as f:
    returncode = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False).returncode
  record = {'command': shlex.join(cmd), 'config': config_arg(row, dataset, schedule),
            'hardware': hardware(), 'wall_s': round(time.time() - tick, 1),
            'date': datetime.date.today().isoformat(), 'returncode': returncode}
  if returncode == 0 and measure_time:
    config = module.get_config(config_arg(row, dataset, schedule))
    record['time_ms'] = time_per_image(config, workdir)
  with open(os.path.join(workdir, _RECORD), 'w') as f:
    json.dump(record, f, indent=2)
  return record


def collect(module, names, dataset, schedule, root):
  """One dict per row with the paper's numbers and whatever the row's workdir holds."""
  results = []
  for row in names:
    workdir = os.path.join(root, row)
    found = latest_eval(workdir)
    record = {}
    if os.path.exists(os.path.join(workdir, _RECORD)):
      with open(os.path.join(workdir, _RECORD)) as f:
        record = json.load(f)
    ours = report.percent_metrics(found[1]) if found else None
    if ours is not None and 'time_ms' in record:
      ours['time_ms'] = record['time_ms']
    results.append({
        'row': row, 'paper': module.PAPER[row], 'ours': ours,
        'step': found[0] if found else None,
        'config': record.get('config', config_arg(row, dataset, schedule)),
        'hardware': record.get('hardware', ''),
        'date': record.get('date', ''), 'wall_s': record.get('wall_s'),
        'failed': bool(record) and record.get('returncode', 0) != 0,
    })
  return results


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('config', help='a table file, e.g. configs/table1b_gamma.py')
  parser.add_argument('--dataset', choices=('coco', 'shapes'), default='coco')
  parser.add_argument('--schedule', type=float, default=1.0, help='multiplies each row\'s schedule')
  parser.add_argument('--rows', default='', help='comma-separated row names (default: all)')
  parser.add_argument('--dry-run', action='store_true', help='print one command per row, run nothing')
  parser.add_argument('--force', action='store_true', help='rerun rows that already have an evaluation')
  parser.add_argument('--retime', action='store_true',
                      help='Table 1e: time every trained row again, one after the other, and keep '
                           'these times (for a machine that was shared while the rows trained)')
  parser.add_argument('--workdir-root', default='runs/tables')
  parser.add_argument('--results-dir', default=RESULTS_DIR)
  args = parser.parse_args(argv)

  name, module = table_of(args.config)
  names = table_rows(module)
  if args.rows:
    chosen = [r.strip() for r in args.rows.split(',') if r.strip()]
    unknown = [r for r in chosen if r not in names]
    if unknown:
      parser.error(f'--rows: unknown rows {unknown} of {name}; rows: {", ".join(names)}')
    names = [r for r in names if r in chosen]
  if args.retime and module is not table1e_speed:
    parser.error('--retime: only Table 1e (configs/table1e_speed.py) measures time')
  if not args.schedule > 0:
    parser.error(f'--schedule must be > 0, got {args.schedule}')
  # orbax needs absolute checkpoint paths.
  root = os.path.join(os.path.abspath(args.workdir_root), f'{name}_{args.dataset}')

  if args.dry_run:
    for row in names:
      print(shlex.join(row_command(args.config, row, args.dataset, args.schedule, os.path.join(root, row))))
    return 0
  failed = []
  for i, row in enumerate(names):
    workdir = os.path.join(root, row)
    if latest_eval(workdir) is not None and not args.force:
      print(f'[{i + 1}/{len(names)}] {row}: already evaluated in {workdir}, skipped', flush=True)
      continue
    print(f'[{i + 1}/{len(names)}] {row}: training in {workdir} (log.txt)', flush=True)
    record = run_row(args.config, module, row, args.dataset, args.schedule, workdir,
                     measure_time=module is table1e_speed)
    found = latest_eval(workdir)
    if record['returncode'] != 0 or found is None:
      failed.append(row)
      print(f'  failed (exit code {record["returncode"]}); see {workdir}/log.txt', flush=True)
    else:
      print(f'  AP {report.percent_metrics(found[1])["AP"]:.1f} after {found[0]} steps, '
            f'{record["wall_s"]:.0f} s', flush=True)
  if args.retime:
    for row in names:
      workdir = os.path.join(root, row)
      if row in failed or latest_eval(workdir) is None:
        continue
      path = os.path.join(workdir, _RECORD)
      with open(path) as f:
        record = json.load(f)
      config = module.get_config(config_arg(row, args.dataset, args.schedule))
      record['time_ms'] = time_per_image(config, workdir)
      record['timed'] = datetime.date.today().isoformat()
      with open(path, 'w') as f:
        json.dump(record, f, indent=2)
      print(f'{row}: {record["time_ms"]:.2f} ms per image', flush=True)
  command = f'python -m experiments.run_table {args.config} --dataset {args.dataset}'
  if args.schedule != 1.0:
    command += f' --schedule {args.schedule:g}'
  if args.workdir_root != parser.get_default('workdir_root'):
    command += f' --workdir-root {args.workdir_root}'
  results = collect(module, table_rows(module), args.dataset, args.schedule, root)
  md, png = report.write(name, module, args.dataset, results, args.results_dir, command)
  print(f'wrote {md} and {png}')
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
