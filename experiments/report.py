"""A table's results file and plot: the paper's numbers beside ours.

`write` takes plain data (one dict per row, see experiments/run_table.py's `collect`)
so it runs on fake metrics in the tests as on real runs.
"""

import collections
import datetime
import os

import matplotlib

matplotlib.use('Agg')  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

METRICS = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'time_ms')
NOTES = '## Notes'
CURVE_WINDOW = 50  # steps in the learning curves' moving mean


def percent_metrics(raw):
  """COCO metrics in percent, as the paper prints them, from an eval JSON's dict.

  Args:
    raw: the evaluation's dict; AP, AP50, AP75, APs, APm, APl as fractions in [0, 1]
      (pycocotools' convention; -1 where COCO has no such object) at its top level.
  Returns:
    {metric: percent} for the metrics present.
  """
  return {k: 100.0 * float(raw[k]) if float(raw[k]) >= 0 else float('nan')
          for k in METRICS[:-1] if k in raw}


def spearman(a, b):
  """Rank correlation of two equally long sequences (ties get their mean rank)."""
  def ranks(x):
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind='stable')
    r = np.empty(len(x))
    r[order] = np.arange(len(x), dtype=np.float64)
    for v in np.unique(x):
      r[x == v] = r[x == v].mean()
    return r
  ra, rb = ranks(a), ranks(b)
  if len(ra) < 2 or ra.std() == 0 or rb.std() == 0:
    return float('nan')
  return float(np.corrcoef(ra, rb)[0, 1])


def _cell(paper, ours, sd, key):
  # Two decimals for ours: toy-scale APs of a few percent differ in the second.
  p = f'{paper[key]:.1f}' if key in paper else '-'
  o = f'{ours[key]:.2f}' if ours and key in ours and np.isfinite(ours[key]) else '-'
  if o != '-' and sd and key in sd:
    o += f' ± {sd[key]:.2f}'
  return f'{p} / {o}'


SCALES = {
    'coco': "the paper's settings (configs/base.py and the table file)",
    'shapes': ('the CPU toy scale of configs/rows.py `toy()` on the built-in synthetic set '
               '(the demo model of configs/shapes.py, trained from scratch on a short schedule)'),
    'sparse': ('configs/rows.py `sparse()`: the toy scale\'s model and schedule on sparser 256 px '
               'synthetic images, chosen so that anchors per positive anchor match COCO\'s'),
}


def _spread_check(done):
  """A sentence on whether the best row's lead over the runner-up exceeds the seeds' spread."""
  if len(done) < 2:
    return ''
  best, second = sorted(done, key=lambda r: -r['ours']['AP'])[:2]
  if not (best['sd'] and second['sd']):  # a row of one seed has no spread to compare with
    return ''
  gap = best['ours']['AP'] - second['ours']['AP']
  spread = max(best['sd']['AP'], second['sd']['AP'])
  verdict = 'beyond' if gap > spread else 'within'
  return (f' Best row {best["row"]} leads {second["row"]} by {gap:.2f} AP, {verdict} the larger of their '
          f'seed standard deviations ({spread:.2f}).')


def _imbalance(results, dataset):
  ratios = [r['anchors_per_positive'] for r in results if r.get('anchors_per_positive')]
  if not ratios:
    return []
  from experiments import imbalance  # pylint: disable=g-import-not-at-top
  return ['', f'Imbalance met in training: {np.mean(ratios):,.0f} anchors per positive anchor on {dataset} '
          f'(rows {min(ratios):,.0f} to {max(ratios):,.0f}; anchors per image over the mean `num_pos` per '
          f'image of metrics.jsonl); COCO at 600 px: about {imbalance.COCO_ANCHORS_PER_POSITIVE:,} '
          '(`python -m experiments.imbalance`, which states how it is estimated).']


def _code_versions(results):
  counts = collections.Counter(v or 'not recorded' for r in results for v in (r.get('code') or {}).values())
  if not counts:
    return []
  return ['', 'Code the runs started from (the runner\'s commit): ' +
          ', '.join(f'{version} ({n} run{"s" * (n > 1)})' for version, n in sorted(counts.items())) + '.']


def markdown(name, module, dataset, results, command, plot_file, notes='', curves_file=None):
  """The results file's text.

  Args:
    name: the table's name, e.g. 'table1b_gamma'.
    module: the table's config module (its docstring's first line titles the file).
    dataset: one of configs/rows.py DATASETS.
    results: one dict per row (experiments/run_table.py `collect`): row, paper, ours
      (None when not run), step, config, hardware, date, wall_s, failed; and when seeds
      were run, sd, seeds, ap_per_seed, anchors_per_positive.
    command: the runner's command line.
    plot_file: the plot's file name, beside the results file.
    notes: the hand-written '## Notes' section to keep, or ''.
    curves_file: the learning curves' file name (`plot_curves`), or None when no run logged a loss.
  """
  # The metrics the paper prints for this table; a table of one's own without paper numbers gets COCO's three.
  keys = [k for k in METRICS if any(k in r['paper'] for r in results)] or ['AP', 'AP50', 'AP75']
  title = module.__doc__.strip().splitlines()[0]
  done = [r for r in results if r['ours'] and np.isfinite(r['ours'].get('AP', np.nan))]
  scale = SCALES[dataset]
  seeds = max((r.get('seeds', 1) for r in results), default=1)
  lines = [
      f'# {name} on {dataset}: {title}', '',
      f'Written by experiments/run_table.py on {datetime.date.today().isoformat()}: `{command}`.',
      f'Scale: {scale}. Each row ran as `python -m retina_jax.main --config '
      f'configs/{name}.py:<config>`; its full config is the workdir\'s config.json.',
      'Cells are paper / ours; the paper\'s numbers are COCO (minival for Table 1a-1d, test-dev '
      'for 1e and 2), ours are on the eval split of the dataset above, so compare trends '
      'across rows, not values.' + (
          f' Ours are the mean ± standard deviation over the seeds each row ran (up to {seeds}: '
          'initialisation and data order differ, the images do not); a difference smaller '
          'than the spread is noise.' if seeds > 1 else ''), '',
      '| row | ' + ' | '.join(keys) + ' | seeds | config | steps | wall (s) | hardware | date |',
      '|' + '---|' * (len(keys) + 7),
  ]
  for r in results:
    status = 'failed' if r['failed'] else ('not run' if r['ours'] is None else '')
    steps = r['step'] if r['step'] is not None else status
    wall = f'{r["wall_s"]:.0f}' if r['wall_s'] is not None else ''
    lines.append(f'| {r["row"]} | ' + ' | '.join(_cell(r['paper'], r['ours'], r.get('sd'), k) for k in keys) +
                 f' | {r.get("seeds", 1 if r["ours"] else 0)} | `{r["config"]}` | {steps} | {wall} | '
                 f'{r["hardware"]} | {r["date"]} |')
  lines += ['', f'Computed trend check over the {len(done)} rows with results: ']
  if len(done) >= 2 and not all('AP' in r['paper'] for r in done):
    lines[-1] += (f'best row by AP: {max(done, key=lambda r: r["ours"]["AP"])["row"]} (no paper numbers '
                  'to compare with).' + _spread_check(done))
  elif len(done) >= 2:
    paper_ap = [r['paper']['AP'] for r in done]
    ours_ap = [r['ours']['AP'] for r in done]
    lines[-1] += (f'best row by AP, paper: {done[int(np.argmax(paper_ap))]["row"]}, '
                  f'ours: {done[int(np.argmax(ours_ap))]["row"]}; worst, paper: '
                  f'{done[int(np.argmin(paper_ap))]["row"]}, ours: {done[int(np.argmin(ours_ap))]["row"]}; '
                  f'Spearman rank correlation of AP across rows: {spearman(paper_ap, ours_ap):.2f}'
                  f'{" (on the means)" if seeds > 1 else ""}.' + _spread_check(done))
  else:
    lines[-1] += 'too few rows to compare.'
  lines += _imbalance(results, dataset)
  lines += _code_versions(results)
  lines += ['', f'![{name} trend]({plot_file})']
  if curves_file:
    lines += ['', 'Learning curves: the training loss of each seed (a moving mean over '
              f'{CURVE_WINDOW} steps), to show whether a row still learns when its schedule ends.',
              '', f'![{name} learning curves]({curves_file})']
  lines += ['', NOTES, '', notes.strip() or
            '(Where the trends agree with the paper and where not: written after the runs.)', '']
  return '\n'.join(lines)


def plot(name, module, results, path):
  """AP across the table's rows (or, for a timed table, AP against time per image) as a PNG."""
  table = module.TABLE
  if table.measure_time:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = ((axes[0], 'paper', 'paper, ms on an M40'), (axes[1], 'ours', 'ours, ms on this device'))
    networks = list(dict.fromkeys(row.backbone or table.backbone for row in table.rows.values()))
    for ax, who, unit in panels:
      for network in networks:  # one curve per network, its points the rows' scales
        pts = [(r[who]['time_ms'], r[who]['AP'], table.rows[r['row']].scale) for r in results
               if r[who] and 'time_ms' in r[who] and (table.rows[r['row']].backbone or table.backbone) == network]
        if pts:
          t, ap, scale = zip(*pts)
          ax.plot(t, ap, 'o-', label=network)
          for x, y, s in pts:
            ax.annotate(str(s), (x, y), textcoords='offset points', xytext=(3, 3), fontsize=7)
      ax.set_xlabel(f'time per image ({unit})')
      ax.set_ylabel('AP')
      ax.set_title(f'{name}: {who}')
      ax.grid(alpha=0.3)
      if ax.get_legend_handles_labels()[0]:
        ax.legend()
  else:
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(results)), 4.2))
    x = np.arange(len(results))
    ax.plot(x, [r['paper'].get('AP', np.nan) for r in results], 'ko-', label='paper (COCO)')
    ax.set_ylabel('AP, paper (COCO)')
    ax.set_xticks(x, [r['row'] for r in results], rotation=30, ha='right')
    ax.set_xlabel(table.x_label)
    ours = [r['ours']['AP'] if r['ours'] and 'AP' in r['ours'] else np.nan for r in results]
    spread = [r['sd']['AP'] if r.get('sd') else 0.0 for r in results]
    twin = ax.twinx()  # the toy scale's AP lives on another scale: compare shapes, not values
    label = 'ours (mean ± sd over seeds)' if any(spread) else 'ours'
    twin.errorbar(x, ours, yerr=spread, fmt='s--', color='C0', capsize=4, label=label)
    for i, r in enumerate(results):  # every seed, so a reader sees the spread behind the bar
      seeds = [v for v in (r.get('ap_per_seed') or {}).values() if v is not None]
      if len(seeds) > 1:
        twin.plot([i] * len(seeds), seeds, '.', color='C0', alpha=0.4)
    twin.set_ylabel('AP, ours', color='C0')
    ax.set_title(f'{name}: AP per row')
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc='lower center')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_curves(name, results, path):
  """One panel per row with results: each seed's training loss against the step, as a PNG.

  Returns:
    Whether there was a curve to draw (nothing is written otherwise).
  """
  rows = [r for r in results if any(len(steps) for steps, _ in (r.get('loss_per_seed') or {}).values())]
  if not rows:
    return False
  cols = min(4, len(rows))
  lines = (len(rows) + cols - 1) // cols
  fig, axes = plt.subplots(lines, cols, figsize=(3.3 * cols, 2.6 * lines), squeeze=False, sharex=True)
  for ax, r in zip(axes.flat, rows):
    for seed, (steps, loss) in sorted(r['loss_per_seed'].items()):
      if len(loss) >= CURVE_WINDOW:
        smooth = np.convolve(loss, np.ones(CURVE_WINDOW) / CURVE_WINDOW, mode='valid')
        steps, loss = steps[CURVE_WINDOW - 1:], smooth
      ap = (r.get('ap_per_seed') or {}).get(seed)
      ax.plot(steps, loss, lw=1, label=f'seed {seed}' + (f': AP {ap:.1f}' if ap is not None else ''))
    ax.set_yscale('log')
    ax.set_title(r['row'], fontsize=9)
    ax.grid(alpha=0.3, which='both')
    ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(rows):]:
    ax.axis('off')
  for ax in axes[-1]:
    ax.set_xlabel('step')
  fig.suptitle(f'{name}: training loss per seed', fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True


def write(name, module, dataset, results, results_dir, command):
  """Writes <results_dir>/<name>_<dataset>.md, .png and _curves.png, keeping the hand-written notes.

  Returns:
    (markdown path, png path).
  """
  os.makedirs(results_dir, exist_ok=True)
  md_path = os.path.join(results_dir, f'{name}_{dataset}.md')
  png_path = os.path.join(results_dir, f'{name}_{dataset}.png')
  notes = ''
  if os.path.exists(md_path):
    with open(md_path) as f:
      old = f.read()
    if NOTES in old:
      notes = old.split(NOTES, 1)[1]
  plot(name, module, results, png_path)
  curves_path = os.path.join(results_dir, f'{name}_{dataset}_curves.png')
  curves = plot_curves(name, results, curves_path)
  with open(md_path, 'w') as f:
    f.write(markdown(name, module, dataset, results, command, os.path.basename(png_path), notes,
                     os.path.basename(curves_path) if curves else None))
  return md_path, png_path
