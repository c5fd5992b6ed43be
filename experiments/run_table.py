r"""Runs one of the paper's tables row by row and writes its results file and plot.

  python -m experiments.run_table configs/table1b_gamma.py --dataset shapes
  python -m experiments.run_table configs/table1b_gamma.py --dataset coco --dry-run
  python -m experiments.run_table configs/table1e_speed.py --dataset shapes --rows r50_400,r101_400
  python -m experiments.run_table configs/table1b_gamma.py --dataset sparse --seeds 3

Each row and seed trains and evaluates in its own process,
  python -m retina_jax.main --config <table>.py:row=<row>,dataset=<d>,schedule=<s>[,seed=<k>] \
      --workdir <root>/<table>_<d>/<row>[_seed<k>]
(seed 0 is the config's default and keeps the plain workdir name), one after the
other on this machine, or --parallel at once (for an accelerator that one toy row
leaves mostly idle); all rows of a seed run before the next seed's. --dry-run prints
these commands instead, for a cluster's job scheduler. A row whose workdir already
holds an evaluation is not run again (--force reruns it), so an interrupted table
resumes and a table trained elsewhere is collected by running the same command over
its workdirs (--collect writes the results from the workdirs as they are and trains
nothing). Then experiments/results/<table>_<d>.md gets the paper's numbers beside
ours (mean +- sd over the seeds run) with the imbalance training met (anchors per
positive anchor, from each run's num_pos), <table>_<d>.png the table's trend with
the seeds' spread, and <table>_<d>_curves.png each seed's training loss per row; a
'## Notes' section written by hand in the results file is kept when the file is rewritten. For a table with
measure_time (Table 1e) the runner also times inference (model + post-processing, jitted, after warm-up) per image
on its own device, after each row trains; --retime times every trained row again
in one pass, for when other jobs shared the device while the rows trained.
"""

import argparse
import concurrent.futures
import datetime
import glob
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time

import numpy as np

from configs import rows as rows_lib
from experiments import report
from retina_jax import anchors as anchors_lib

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')
_RECORD = 'run_table.json'  # what the runner knows about a row, beside the row's own outputs


def load_table(config_path):
  """(name, module) of the table file at `config_path`, any file that defines TABLE = rows.Table(...).

  The name (the file's, e.g. 'table1b_gamma') names the results files and workdirs.
  """
  name = os.path.splitext(os.path.basename(config_path))[0]
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f'{config_path}: no such table file')
  spec = importlib.util.spec_from_file_location(name, config_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not isinstance(getattr(module, 'TABLE', None), rows_lib.Table):
    raise ValueError(f'{config_path}: not a table config (it defines no TABLE = configs.rows.Table(...))')
  return name, module


def table_rows(module):
  """The row names of a table file, in the table's order."""
  return list(module.TABLE.rows)


def config_arg(row, dataset, schedule, seed=0):
  arg = f'row={row},dataset={dataset},schedule={schedule:g}'
  return arg + (f',seed={seed}' if seed else '')


def row_workdir(root, row, seed):
  """Where one row and seed runs: <root>/<row> for seed 0, <root>/<row>_seed<k> for others."""
  return os.path.join(root, row if seed == 0 else f'{row}_seed{seed}')


def row_command(config_path, row, dataset, schedule, workdir, seed=0):
  """The argv that trains and evaluates one row."""
  return [sys.executable, '-m', 'retina_jax.main',
          f'--config={config_path}:{config_arg(row, dataset, schedule, seed)}', f'--workdir={workdir}']


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
  # The runner only names the devices: without this, JAX would hold 75% of a GPU's memory in
  # this process for as long as the table runs, beside the rows' own processes.
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  import jax
  devices = jax.devices()
  return f'{len(devices)} x {devices[0].device_kind} ({devices[0].platform}, {os.cpu_count()} host cores)'


def code_version():
  """The runner's checkout: '<commit>', '<commit>+edits' with uncommitted changes to tracked files, None outside git.

  Recorded per run: a change that only reorders float sums moves a toy row as much as a seed does.
  """
  def git(*args):
    return subprocess.run(['git', *args], capture_output=True, text=True, check=True,
                          cwd=os.path.dirname(RESULTS_DIR)).stdout.strip()
  try:
    commit = git('rev-parse', '--short=7', 'HEAD')
    edited = git('status', '--porcelain', '--untracked-files=no')
  except (OSError, subprocess.CalledProcessError):
    return None
  return commit + ('+edits' if edited else '')


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
  from retina_jax import checkpoint
  from retina_jax import evaluate
  from retina_jax import sharding
  from retina_jax.data import pipeline
  from retina_jax.model import retinanet

  mesh = sharding.make_mesh()
  model = retinanet.build(config)
  _, variables = checkpoint.restore_variables(
      workdir, retinanet.abstract_variables(model, sharding.replicated(mesh)))
  predict = evaluate.make_predict_fn(config, model, mesh)
  anchors = evaluate.device_anchors(config, mesh)  # one per canvas (size bucket)
  held = []
  for batch in pipeline.eval_iterator(config):
    held.append(sharding.global_batch({k: batch[k] for k in ('image', 'image_hw')}, mesh))
    if len(held) == batches:
      break
  total = 0.0
  for i in range(warmup + batches):
    b = held[i % len(held)]
    tick = time.perf_counter()
    jax.block_until_ready(predict(variables, b['image'], b['image_hw'], anchors[b['image'].shape[1:3]]))
    if i >= warmup:
      total += time.perf_counter() - tick
  return 1000.0 * total / (batches * config.eval.batch_size)


def run_row(config_path, module, row, dataset, schedule, workdir, *, measure_time, seed=0, share=1):
  """Trains and evaluates one row in a subprocess; writes the runner's record beside it.

  Args:
    share: how many rows run at once; each may take 1 / share of an accelerator's memory
      (JAX otherwise reserves 75% of it per process).
  Returns:
    The record (command, hardware, code, date, wall_s, returncode, time_ms when measured).
  """
  os.makedirs(workdir, exist_ok=True)
  cmd = row_command(config_path, row, dataset, schedule, workdir, seed)
  log = os.path.join(workdir, 'log.txt')
  env = dict(os.environ)
  if share > 1:
    env['XLA_PYTHON_CLIENT_MEM_FRACTION'] = f'{0.9 / share:.3f}'
  code = code_version()  # what the run starts from, not what the checkout holds hours later
  tick = time.time()
  with open(log, 'a') as f:
    returncode = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False, env=env).returncode
  record = {'command': shlex.join(cmd), 'config': config_arg(row, dataset, schedule, seed),
            'hardware': hardware(), 'code': code, 'wall_s': round(time.time() - tick, 1),
            'date': datetime.date.today().isoformat(), 'returncode': returncode}
  if returncode == 0 and measure_time:
    config = module.get_config(config_arg(row, dataset, schedule))
    record['time_ms'] = time_per_image(config, workdir)
  with open(os.path.join(workdir, _RECORD), 'w') as f:
    json.dump(record, f, indent=2)
  return record


def seed_workdirs(root, row):
  """{seed: workdir} of every run of `row` under `root` (seed 0 is <root>/<row>)."""
  found = {}
  if os.path.isdir(os.path.join(root, row)):
    found[0] = os.path.join(root, row)
  for path in glob.glob(os.path.join(glob.escape(root), glob.escape(row) + '_seed*')):
    m = re.fullmatch(re.escape(row) + r'_seed(\d+)', os.path.basename(path))
    if m:
      found[int(m.group(1))] = path
  return dict(sorted(found.items()))


def metric_series(workdir, key):
  """(steps, values) of one metric of a run's metrics.jsonl, by step; ([], []) without the file.

  A step logged twice (a run resumed from a checkpoint before it) keeps its last value.
  """
  path = os.path.join(workdir, 'metrics.jsonl')
  by_step = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          entry = json.loads(line)
          by_step[int(entry['step'])] = float(entry[key])
        except (ValueError, KeyError):  # a torn last line, or a line of another kind
          continue
  steps = sorted(by_step)
  return steps, [by_step[s] for s in steps]


def positives_per_image(workdir, batch_size):
  """Mean positive anchors per training image of a run, from metrics.jsonl's num_pos; None without."""
  _, counts = metric_series(workdir, 'num_pos')
  return float(np.mean(counts)) / batch_size if counts else None


def collect(module, names, dataset, schedule, root):
  """One dict per row: the paper's numbers, and the mean and sd over the row's seeds of ours.

  Each dict: row, paper, ours (mean per metric, None when no seed has finished), sd (per
  metric, None with fewer than 2 seeds), ap_per_seed, seeds (how many finished), step,
  config, hardware, date, wall_s, failed, anchors_per_positive (training's imbalance),
  loss_per_seed ({seed: (steps, training loss)} of the finished seeds: the learning curves),
  code ({seed: the runner's code_version, None where not recorded} of the finished seeds).
  """
  results = []
  for row in names:
    config = module.get_config(config_arg(row, dataset, schedule))
    num_anchors = len(anchors_lib.from_config(config))
    runs, records, ratios, curves, code = [], [], [], {}, {}
    for seed, workdir in seed_workdirs(root, row).items():
      record = {}
      if os.path.exists(os.path.join(workdir, _RECORD)):
        with open(os.path.join(workdir, _RECORD)) as f:
          record = json.load(f)
      records.append(record)
      found = latest_eval(workdir)
      if found is None:
        continue
      ours = report.percent_metrics(found[1])
      if 'time_ms' in record:
        ours['time_ms'] = record['time_ms']
      runs.append((seed, found[0], ours))
      curves[seed] = metric_series(workdir, 'loss')
      code[seed] = record.get('code')
      positives = positives_per_image(workdir, config.train.batch_size)
      if positives:
        ratios.append(num_anchors / positives)
    keys = sorted(set().union(*(ours for _, _, ours in runs))) if runs else []
    mean = {k: float(np.mean([o[k] for _, _, o in runs if k in o])) for k in keys} or None
    sd = ({k: float(np.std([o[k] for _, _, o in runs if k in o], ddof=1)) for k in keys}
          if len(runs) >= 2 else None)
    first = records[0] if records else {}
    results.append({
        'row': row, 'paper': module.TABLE.rows[row].paper, 'ours': mean, 'sd': sd,
        'ap_per_seed': {seed: o.get('AP') for seed, _, o in runs}, 'seeds': len(runs),
        'step': runs[0][1] if runs else None,
        'config': first.get('config', config_arg(row, dataset, schedule)),
        'hardware': ', '.join(sorted({r['hardware'] for r in records if r.get('hardware')})),
        'date': max((r['date'] for r in records if r.get('date')), default=''),
        'wall_s': (float(np.mean([r['wall_s'] for r in records if r.get('wall_s') is not None]))
                   if any(r.get('wall_s') is not None for r in records) else None),
        'failed': any(r.get('returncode', 0) != 0 for r in records) and not runs,
        'anchors_per_positive': float(np.mean(ratios)) if ratios else None,
        'loss_per_seed': curves,
        'code': code,
    })
  return results


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('config', help='a table file, e.g. configs/table1b_gamma.py')
  parser.add_argument('--dataset', choices=rows_lib.DATASETS, default='coco')
  parser.add_argument('--schedule', type=float, default=1.0, help='multiplies each row\'s schedule')
  parser.add_argument('--rows', default='', help='comma-separated row names (default: all)')
  parser.add_argument('--seeds', type=int, default=1,
                      help='runs per row, seeds 0..N-1 (initialisation and data order)')
  parser.add_argument('--parallel', type=int, default=1,
                      help='runs at once, each taking 1/N of the accelerator\'s memory')
  parser.add_argument('--dry-run', action='store_true', help='print one command per row, run nothing')
  parser.add_argument('--collect', action='store_true',
                      help='write the results file from the workdirs as they are, train nothing '
                           '(for rows still training, or trained elsewhere)')
  parser.add_argument('--force', action='store_true', help='rerun rows that already have an evaluation')
  parser.add_argument('--retime', action='store_true',
                      help='Table 1e: time every trained row again, one after the other, and keep '
                           'these times (for a machine that was shared while the rows trained)')
  parser.add_argument('--workdir-root', default='runs/tables')
  parser.add_argument('--results-dir', default=RESULTS_DIR)
  args = parser.parse_args(argv)

  name, module = load_table(args.config)
  names = table_rows(module)
  if args.rows:
    chosen = [r.strip() for r in args.rows.split(',') if r.strip()]
    unknown = [r for r in chosen if r not in names]
    if unknown:
      parser.error(f'--rows: unknown rows {unknown} of {name}; rows: {", ".join(names)}')
    names = [r for r in names if r in chosen]
  if args.retime and not module.TABLE.measure_time:
    parser.error(f'--retime: only a table with measure_time (Table 1e) times its rows; {name} does not')
  if not args.schedule > 0:
    parser.error(f'--schedule must be > 0, got {args.schedule}')
  if args.seeds < 1 or args.parallel < 1:
    parser.error(f'--seeds and --parallel must be >= 1, got {args.seeds} and {args.parallel}')
  if args.parallel > 1 and module.TABLE.measure_time:
    parser.error(f'--parallel: {name} times inference, which needs the device to itself')
  # orbax needs absolute checkpoint paths.
  root = os.path.join(os.path.abspath(args.workdir_root), f'{name}_{args.dataset}')

  runs = [(row, seed, row_workdir(root, row, seed)) for seed in range(args.seeds) for row in names]
  if args.dry_run:
    for row, seed, workdir in runs:
      print(shlex.join(row_command(args.config, row, args.dataset, args.schedule, workdir, seed)))
    return 0
  todo = []
  for i, (row, seed, workdir) in enumerate(runs):
    label = f'[{i + 1}/{len(runs)}] {row}' + (f' seed {seed}' if args.seeds > 1 else '')
    if latest_eval(workdir) is not None and not args.force:
      print(f'{label}: already evaluated in {workdir}, skipped', flush=True)
    else:
      todo.append((label, row, seed, workdir))
  if args.collect:
    todo = []  # what is not evaluated yet shows as "not run"

  command = f'python -m experiments.run_table {args.config} --dataset {args.dataset}'
  if args.schedule != 1.0:
    command += f' --schedule {args.schedule:g}'
  if args.seeds > 1:
    command += f' --seeds {args.seeds}'
  if args.workdir_root != parser.get_default('workdir_root'):
    command += f' --workdir-root {args.workdir_root}'
  writing = threading.Lock()

  def write_results():
    with writing:
      results = collect(module, table_rows(module), args.dataset, args.schedule, root)
      return report.write(name, module, args.dataset, results, args.results_dir, command)

  def run(job):
    label, row, seed, workdir = job
    print(f'{label}: training in {workdir} (log.txt)', flush=True)
    record = run_row(args.config, module, row, args.dataset, args.schedule, workdir,
                     measure_time=module.TABLE.measure_time, seed=seed, share=args.parallel)
    found = latest_eval(workdir)
    if record['returncode'] != 0 or found is None:
      print(f'{label}: failed (exit code {record["returncode"]}); see {workdir}/log.txt', flush=True)
      return row
    print(f'{label}: AP {report.percent_metrics(found[1])["AP"]:.1f} after {found[0]} steps, '
          f'{record["wall_s"]:.0f} s', flush=True)
    write_results()  # a table that takes hours shows each result as it lands
    return None

  with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
    failed = [row for row in pool.map(run, todo) if row is not None]
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
  md, png = write_results()
  print(f'wrote {md} and {png}')
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
