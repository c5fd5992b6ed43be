"""The table runner: dry run, row loop, metrics collection, results file and plot."""

import glob
import json
import os
import re
import shlex
import sys

import pytest

from configs import table1b_gamma
from configs import table1e_speed
from experiments import report
from experiments import run_table


def test_dry_run_lists_every_row_of_every_table(capsys, tmp_path):
  for path in sorted(glob.glob('configs/table*.py')):
    name, module = run_table.load_table(path)
    run_table.main([f'configs/{name}.py', '--dataset', 'shapes', '--schedule', '0.5', '--dry-run',
                    '--workdir-root', str(tmp_path)])
    lines = capsys.readouterr().out.strip().splitlines()
    names = run_table.table_rows(module)
    assert len(lines) == len(names), name
    for row, line in zip(names, lines):
      argv = shlex.split(line)
      assert argv[1:3] == ['-m', 'retina_jax.main']
      assert f'--config=configs/{name}.py:row={row},dataset=shapes,schedule=0.5' in argv
      assert f'--workdir={tmp_path.resolve()}/{name}_shapes/{row}' in argv
      module.get_config(argv[3].split(':', 1)[1])  # the printed argument builds
  assert not list(tmp_path.iterdir()), 'a dry run writes nothing'


def test_rows_filter_and_bad_names(capsys):
  run_table.main(['configs/table1c_anchors.py', '--rows', 'sc4_ar3,sc1_ar1', '--dry-run'])
  out = capsys.readouterr().out
  assert 'row=sc1_ar1,dataset=coco' in out.splitlines()[0] and len(out.splitlines()) == 2
  with pytest.raises(SystemExit):
    run_table.main(['configs/table1c_anchors.py', '--rows', 'sc9_ar9', '--dry-run'])
  assert 'sc9_ar9' in capsys.readouterr().err
  with pytest.raises(ValueError, match=r'configs/base.py: not a table config \(it defines no TABLE'):
    run_table.main(['configs/base.py', '--dry-run'])


def _fake_row(workdir, ap, step=100, time_ms=None, num_pos=None, code='abc1234'):
  os.makedirs(workdir, exist_ok=True)
  if num_pos is not None:  # what training logs per step: positives in the global batch
    with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
      for i, n in enumerate(num_pos):
        f.write(json.dumps({'step': i + 1, 'loss': 1.0, 'num_pos': n}) + '\n')
      f.write('{"step": 9, "num_po')  # a torn last line, as a killed run leaves
  metrics = {'AP': ap, 'AP50': ap + 0.2, 'AP75': ap - 0.05, 'APs': 0.1, 'APm': 0.2, 'APl': 0.3, 'step': step}
  with open(os.path.join(workdir, f'eval_{step}.json'), 'w') as f:
    json.dump(metrics, f)
  record = {'hardware': 'fake', 'code': code, 'date': '2024-01-01', 'wall_s': 12.0, 'returncode': 0}
  if time_ms is not None:
    record['time_ms'] = time_ms
  with open(os.path.join(workdir, 'run_table.json'), 'w') as f:
    json.dump(record, f)


def test_collect_reads_the_newest_eval_in_percent(tmp_path):
  _fake_row(tmp_path / 'gamma_2', 0.30, step=50)
  _fake_row(tmp_path / 'gamma_2', 0.45, step=200)
  results = run_table.collect(table1b_gamma, ['gamma_2', 'gamma_5'], 'shapes', 1.0, str(tmp_path))
  assert results[0]['step'] == 200 and results[0]['ours']['AP'] == pytest.approx(45.0)
  assert results[0]['paper']['AP'] == 34.0 and results[0]['hardware'] == 'fake'
  assert results[1]['ours'] is None and not results[1]['failed']


def test_results_file_and_plot_from_fake_metrics_keep_notes(tmp_path):
  names = run_table.table_rows(table1b_gamma)
  for i, row in enumerate(names[:-1]):  # the last row is left "not run"
    _fake_row(tmp_path / 'runs' / row, 0.3 + 0.01 * i)
  results = run_table.collect(table1b_gamma, names, 'shapes', 1.0, str(tmp_path / 'runs'))
  out = tmp_path / 'results'
  md, png = report.write('table1b_gamma', table1b_gamma, 'shapes', results, str(out), 'cmd --x')
  text = open(md).read()
  for row in names:
    assert f'| {row} |' in text
  assert ('| gamma_2 | 34.0 / 35.00 | 52.5 / 55.00 | 36.5 / 30.00 | 1 | `row=gamma_2,dataset=shapes,schedule=1` '
          '| 100 |' in text)
  assert '±' not in text, 'one seed per row: no spread to show'
  assert 'not run' in text and 'cmd --x' in text and 'Spearman' in text
  assert 'best row by AP, paper: gamma_2, ours: gamma_2' in text
  assert open(png, 'rb').read(8) == b'\x89PNG\r\n\x1a\n'
  with open(md, 'a') as f:
    f.write('\nThe toy trend agrees with the paper.\n')
  report.write('table1b_gamma', table1b_gamma, 'shapes', results, str(out), 'cmd --x')
  assert open(md).read().count('The toy trend agrees with the paper.') == 1


def test_table1e_plot_uses_time_per_image(tmp_path):
  names = run_table.table_rows(table1e_speed)
  for i, row in enumerate(names):
    _fake_row(tmp_path / row, 0.2 + 0.01 * i, time_ms=5.0 + i)
  results = run_table.collect(table1e_speed, names, 'shapes', 1.0, str(tmp_path))
  md, png = report.write('table1e_speed', table1e_speed, 'shapes', results, str(tmp_path), 'cmd')
  text = open(md).read()
  assert '| r101_800 | 37.8 / 29.00 |' in text and '198.0 / 14.00' in text
  assert os.path.getsize(png) > 1000


def test_retime_measures_trained_rows_again_and_only_for_table1e(tmp_path, monkeypatch, capsys):
  root = tmp_path / 'runs' / 'table1e_speed_shapes'
  _fake_row(root / 'r50_400', 0.2, time_ms=50.0)  # timed while the machine was shared
  timed = []

  def fake_time(config, workdir):
    timed.append((os.path.basename(workdir), config.model.backbone))
    return 4.0

  monkeypatch.setattr(run_table, 'time_per_image', fake_time)
  args = ['configs/table1e_speed.py', '--dataset', 'shapes', '--rows', 'r50_400', '--retime',
          '--workdir-root', str(tmp_path / 'runs'), '--results-dir', str(tmp_path / 'results')]
  assert run_table.main(args) == 0
  assert timed == [('r50_400', table1e_speed.get_config('row=r50_400,dataset=shapes').model.backbone)]
  assert json.load(open(root / 'r50_400' / 'run_table.json'))['time_ms'] == 4.0
  assert '64.0 / 4.00' in (tmp_path / 'results' / 'table1e_speed_shapes.md').read_text()
  with pytest.raises(SystemExit):
    run_table.main(['configs/table1b_gamma.py', '--dataset', 'shapes', '--retime'])
  assert 'only a table with measure_time (Table 1e)' in capsys.readouterr().err


def test_spearman():
  assert report.spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
  assert report.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
  assert report.spearman([1, 1, 2, 2], [1, 1, 2, 2]) == pytest.approx(1.0)


def test_runner_trains_rows_in_turn_skips_done_ones_and_reports_failures(tmp_path, monkeypatch, capsys):
  # Each row's "training" writes an evaluation, except the failing row.
  script = ('import json, os, sys; w = sys.argv[1]; row = sys.argv[2]\n'
            'if row == "gamma_5": sys.exit(3)\n'
            'json.dump({"AP": 0.5, "AP50": 0.7, "AP75": 0.4}, open(os.path.join(w, "eval_10.json"), "w"))')
  calls = []

  def fake_command(config_path, row, dataset, schedule, workdir, seed=0):
    calls.append(row)
    return [sys.executable, '-c', script, workdir, row]

  monkeypatch.setattr(run_table, 'row_command', fake_command)
  args = ['configs/table1b_gamma.py', '--dataset', 'shapes', '--rows', 'gamma_1,gamma_2,gamma_5',
          '--workdir-root', str(tmp_path / 'runs'), '--results-dir', str(tmp_path / 'results')]
  _fake_row(tmp_path / 'runs' / 'table1b_gamma_shapes' / 'gamma_1', 0.4)
  assert run_table.main(args) == 1  # gamma_5 failed
  assert calls == ['gamma_2', 'gamma_5']
  assert 'gamma_1: already evaluated' in capsys.readouterr().out
  text = (tmp_path / 'results' / 'table1b_gamma_shapes.md').read_text()
  assert '| gamma_2 | 34.0 / 50.00 |' in text and '| gamma_5 |' in text and 'failed' in text
  record = json.loads((tmp_path / 'runs' / 'table1b_gamma_shapes' / 'gamma_2' / 'run_table.json').read_text())
  assert record['code'] == run_table.code_version()
  assert re.fullmatch(r'[0-9a-f]{7}(\+edits)?', record['code']), record['code']  # the tests run in a checkout


def test_collect_writes_results_and_trains_nothing(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(run_table, 'row_command', lambda *a, **k: pytest.fail('--collect must not train'))
  _fake_row(tmp_path / 'runs' / 'table1b_gamma_sparse' / 'gamma_2', 0.4, num_pos=[80.0, 96.0])
  args = ['configs/table1b_gamma.py', '--dataset', 'sparse', '--seeds', '2', '--collect',
          '--workdir-root', str(tmp_path / 'runs'), '--results-dir', str(tmp_path / 'results')]
  assert run_table.main(args) == 0
  assert 'gamma_2 seed 0: already evaluated' in capsys.readouterr().out
  text = (tmp_path / 'results' / 'table1b_gamma_sparse.md').read_text()
  assert '| gamma_2 | 34.0 / 40.00 |' in text and '| gamma_5 | 32.2 / - |' in text
  assert '![table1b_gamma learning curves](table1b_gamma_sparse_curves.png)' in text


def test_figure4_samples_and_cumulative_share(tmp_path):
  import numpy as np
  from experiments import figure4
  logits = np.array([[[2.0, -1.0], [0.0, 3.0], [-4.0, -2.0]]], np.float32)  # [1, 3, 2]
  classes = np.array([[0, -1, -1]], np.int32)
  labels = np.array([[1, -1, 0]], np.int32)  # positive, ignored, negative
  loss, positive, negative = map(np.asarray, figure4.sample_losses(logits, classes, labels, (0.0, 2.0)))
  assert loss.shape == (2, 1, 3, 2)
  np.testing.assert_array_equal(positive[0], [[True, False], [False, False], [False, False]])
  np.testing.assert_array_equal(negative[0], [[False, False], [False, False], [True, True]])
  ce_pos = np.log1p(np.exp(-2.0))  # -log(sigmoid(2))
  np.testing.assert_allclose(loss[0][positive], [ce_pos], rtol=1e-5)
  p = 1 / (1 + np.exp(-2.0))
  np.testing.assert_allclose(loss[1][positive], [(1 - p) ** 2 * ce_pos], rtol=1e-5)
  fraction, share = figure4.cumulative_share([3.0, 1.0, 0.0, 4.0])
  np.testing.assert_allclose(fraction, [0.25, 0.5, 0.75, 1.0])
  np.testing.assert_allclose(share, [0.0, 0.125, 0.5, 1.0])
  curves = {(k, g): figure4.cumulative_share(np.random.default_rng(0).exponential(size=100) ** (1 + g))
            for k in ('positive', 'negative') for g in figure4.GAMMAS}
  figure4.plot(curves, {'positive': 100, 'negative': 100}, str(tmp_path / 'f4.png'), 'fake')
  assert (tmp_path / 'f4.png').read_bytes()[:4] == b'\x89PNG'


def test_seeds_run_every_row_of_a_seed_before_the_next(capsys, tmp_path):
  run_table.main(['configs/table1b_gamma.py', '--dataset', 'sparse', '--seeds', '2', '--rows',
                  'gamma_0,gamma_2', '--dry-run', '--workdir-root', str(tmp_path)])
  lines = [shlex.split(l) for l in capsys.readouterr().out.strip().splitlines()]
  root = f'{tmp_path.resolve()}/table1b_gamma_sparse'
  assert [(a[3].split(':', 1)[1], a[4]) for a in lines] == [
      ('row=gamma_0,dataset=sparse,schedule=1', f'--workdir={root}/gamma_0'),
      ('row=gamma_2,dataset=sparse,schedule=1', f'--workdir={root}/gamma_2'),
      ('row=gamma_0,dataset=sparse,schedule=1,seed=1', f'--workdir={root}/gamma_0_seed1'),
      ('row=gamma_2,dataset=sparse,schedule=1,seed=1', f'--workdir={root}/gamma_2_seed1')]
  config = table1b_gamma.get_config(lines[3][3].split(':', 1)[1])
  assert config.seed == 1 and tuple(config.data.canvas) == (256, 256)
  assert config.data.shapes.seed == 0, 'a seed changes initialisation and order, not the images'
  with pytest.raises(ValueError, match="seed must be a whole number >= 0, got '-1'"):
    table1b_gamma.get_config('row=gamma_2,seed=-1')


def test_collect_means_sds_and_imbalance_over_seeds(tmp_path):
  root = tmp_path / 'runs'
  for seed, ap in enumerate((0.30, 0.32, 0.34)):
    _fake_row(root / ('gamma_2' if seed == 0 else f'gamma_2_seed{seed}'), ap, num_pos=[80.0, 96.0])
  _fake_row(root / 'gamma_0', 0.20, num_pos=[80.0])
  _fake_row(root / 'gamma_0_seed1', 0.21)
  _fake_row(root / 'gamma_0.1_seed1', 0.5, code=None)  # another row whose name starts the same
  names = run_table.table_rows(table1b_gamma)
  results = {r['row']: r for r in run_table.collect(table1b_gamma, names, 'sparse', 1.0, str(root))}
  g2 = results['gamma_2']
  assert g2['seeds'] == 3 and g2['ours']['AP'] == pytest.approx(32.0)
  assert g2['sd']['AP'] == pytest.approx(2.0)  # sample standard deviation of 30, 32, 34
  assert g2['ap_per_seed'] == pytest.approx({0: 30.0, 1: 32.0, 2: 34.0})
  # 12,276 anchors on the 256 x 256 canvas; 88 positives per batch of 8 images.
  assert g2['anchors_per_positive'] == pytest.approx(12276 / 11.0)
  assert results['gamma_0']['seeds'] == 2 and results['gamma_0.1']['seeds'] == 1
  assert results['gamma_0.1']['sd'] is None and results['gamma_5']['ours'] is None
  md, png = report.write('table1b_gamma', table1b_gamma, 'sparse', list(results.values()),
                         str(tmp_path / 'results'), 'cmd --seeds 3')
  text = open(md).read()
  assert '| gamma_2 | 34.0 / 32.00 ± 2.00 |' in text and '| 3 | `row=gamma_2,dataset=sparse' in text
  assert 'rank correlation of AP across rows' in text and '(on the means)' in text
  assert 'Best row gamma_0.1 leads' not in text  # gamma_0.1 has one seed: no spread to compare with
  assert 'Imbalance met in training: 1,' in text and 'COCO at 600 px: about 644' in text
  assert open(png, 'rb').read(8) == b'\x89PNG\r\n\x1a\n'
  # Learning curves: each finished seed's loss by step (the torn last line left out).
  assert g2['loss_per_seed'] == {seed: ([1, 2], [1.0, 1.0]) for seed in range(3)}
  assert g2['code'] == {0: 'abc1234', 1: 'abc1234', 2: 'abc1234'}
  assert 'Code the runs started from (the runner\'s commit): abc1234 (5 runs), not recorded (1 run).' in text
  assert results['gamma_5']['loss_per_seed'] == {}
  curves = tmp_path / 'results' / 'table1b_gamma_sparse_curves.png'
  assert f'![table1b_gamma learning curves]({curves.name})' in text
  assert curves.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_metric_series_keeps_a_resumed_steps_last_value(tmp_path):
  with open(tmp_path / 'metrics.jsonl', 'w') as f:
    for step, loss in ((1, 3.0), (2, 2.0), (3, 1.5), (2, 2.5), (3, 1.0), (4, 0.5)):
      f.write(json.dumps({'step': step, 'loss': loss}) + '\n')
    f.write(json.dumps({'step': 5}) + '\n')  # a line without the key
  assert run_table.metric_series(str(tmp_path), 'loss') == ([1, 2, 3, 4], [3.0, 2.5, 1.0, 0.5])
  assert run_table.metric_series(str(tmp_path / 'none'), 'loss') == ([], [])


def test_spread_check_calls_a_small_lead_noise():
  row = lambda name, ap, sd: {'row': name, 'ours': {'AP': ap}, 'sd': {'AP': sd}}
  assert 'within' in report._spread_check([row('a', 30.0, 1.0), row('b', 29.5, 0.8)])
  assert 'beyond' in report._spread_check([row('a', 30.0, 1.0), row('b', 25.0, 0.8)])
  # The best two rows by AP decide, wherever they stand in the table; one of one seed gives no sentence.
  one_seed = {'row': 'c', 'ours': {'AP': 35.0}, 'sd': None}
  assert report._spread_check([row('a', 30.0, 1.0), row('b', 25.0, 0.8), one_seed]) == ''
  assert 'Best row a leads b' in report._spread_check([one_seed | {'ours': {'AP': 20.0}}, row('a', 30.0, 1.0),
                                                       row('b', 25.0, 0.8)])


def test_parallel_seeds_all_run_and_are_collected(tmp_path, monkeypatch):
  script = ('import json, os, sys; w = sys.argv[1]\n'
            'json.dump({"AP": 0.1 * (1 + int(sys.argv[2])), "AP50": 0.7, "AP75": 0.4}, '
            'open(os.path.join(w, "eval_10.json"), "w"))')
  monkeypatch.setattr(run_table, 'row_command', lambda config_path, row, dataset, schedule, workdir, seed=0:
                      [sys.executable, '-c', script, workdir, str(seed)])
  args = ['configs/table1c_anchors.py', '--dataset', 'sparse', '--rows', 'sc1_ar1,sc2_ar3', '--seeds', '2',
          '--parallel', '2', '--workdir-root', str(tmp_path / 'runs'), '--results-dir', str(tmp_path / 'results')]
  assert run_table.main(args) == 0
  text = (tmp_path / 'results' / 'table1c_anchors_sparse.md').read_text()
  assert '| sc1_ar1 | 30.3 / 15.00 ± 7.07 |' in text


def test_coco_imbalance_estimate_and_counts():
  from experiments import imbalance
  coco = table1b_gamma.get_config('dataset=coco')
  # P3-P7 cells over 600 x 800: 75*100 + 38*50 + 19*25 + 10*13 + 5*7 = 10,040, 9 anchors each.
  assert imbalance.anchors_in((600, 800), coco.anchors) == 90360
  estimate = imbalance.coco_estimate(coco, 1000, seed=1)
  assert estimate['anchors_per_positive'] == pytest.approx(imbalance.COCO_ANCHORS_PER_POSITIVE, rel=0.06)
  # A box that is exactly one 32 px anchor of P3 is matched by at least that anchor.
  toy = table1b_gamma.get_config('dataset=sparse')
  box = [[[100.0 - 8, 100.0 - 8, 100.0 + 8, 100.0 + 8]]]  # 16 px: toy anchors are half the paper's
  import numpy as np
  positives = imbalance.count(toy, np.array(box, np.float32), np.zeros((1, 1), np.int32))
  assert positives.shape == (1,) and positives[0] >= 1


_MY_TABLE = '''"""My table: the focal loss's gamma at two values, on the toy scale only."""

from configs import rows

TABLE = rows.Table(
    name='my_table',
    overrides={'loss.cls': 'focal', 'loss.alpha': 0.25},
    rows={
        'g1': rows.Row(overrides={'loss.gamma': 1.0}),
        'g3': rows.Row(overrides={'loss.gamma': 3.0}),
    },
    default='g1',
    x_label='gamma',
)


def get_config(arg=None):
  return TABLE.config(arg)
'''


def test_a_new_table_is_one_file_and_no_runner_change(tmp_path, monkeypatch, capsys):
  path = tmp_path / 'my_table.py'
  path.write_text(_MY_TABLE)
  name, module = run_table.load_table(str(path))
  assert name == 'my_table' and run_table.table_rows(module) == ['g1', 'g3']
  c = module.get_config('row=g3,dataset=shapes')
  assert (c.loss.gamma, c.loss.alpha, c.data.dataset) == (3.0, 0.25, 'shapes')
  script = ('import json, os, sys\n'
            'json.dump({"AP": float(sys.argv[2]) / 10, "AP50": 0.7, "AP75": 0.4}, '
            'open(os.path.join(sys.argv[1], "eval_10.json"), "w"))')
  commands = []

  def fake_command(config_path, row, dataset, schedule, workdir, seed=0):
    commands.append(f'{config_path}:{run_table.config_arg(row, dataset, schedule, seed)}')
    return [sys.executable, '-c', script, workdir, row[1]]

  monkeypatch.setattr(run_table, 'row_command', fake_command)
  args = [str(path), '--dataset', 'shapes', '--workdir-root', str(tmp_path / 'runs'),
          '--results-dir', str(tmp_path / 'results')]
  assert run_table.main(args) == 0
  assert commands == [f'{path}:row=g1,dataset=shapes,schedule=1', f'{path}:row=g3,dataset=shapes,schedule=1']
  text = (tmp_path / 'results' / 'my_table_shapes.md').read_text()
  assert '# my_table on shapes: My table: the focal loss' in text
  assert '| g3 | - / 30.00 | - / 70.00 | - / 40.00 |' in text
  assert 'best row by AP: g3 (no paper numbers to compare with)' in text
  bad = tmp_path / 'bad_table.py'
  bad.write_text(_MY_TABLE.replace("'loss.gamma': 3.0", "'loss.gama': 3.0"))
  _, module = run_table.load_table(str(bad))
  with pytest.raises(ValueError, match=r"my_table, row g3: no config key 'loss.gama' in configs/base.py"):
    module.get_config('row=g3')
