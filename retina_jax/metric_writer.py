"""Training metrics on disk: <workdir>/metrics.jsonl (one JSON object per step) and TensorBoard.

metrics.jsonl must survive the ways a run ends: every line is flushed as it is written,
so a kill loses at most the line being written; a resumed run drops the lines after its
checkpoint (written by a run killed before it could save) and a torn or unreadable line
(a kill mid-write, a full disk), says so in one line, and rewrites the file atomically.
Only process 0 writes.
"""

import json
import os

import tensorflow as tf
from absl import logging
from flax.metrics import tensorboard


def _kept_lines(path, start):
  """The lines of metrics.jsonl to keep on resuming at step `start`, and a note on what was dropped.

  Returns:
    (lines to keep, each ending in a newline; a one-line note or None).
  """
  with tf.io.gfile.GFile(path) as f:
    lines = f.read().splitlines()
  kept, torn = [], []
  for number, line in enumerate(lines, start=1):
    try:
      step = json.loads(line)['step']
    except (ValueError, KeyError, TypeError):
      torn.append(number)
      continue
    if step <= start:  # later lines come from a run killed before it saved them
      kept.append(line + '\n')
  note = None
  if torn:
    where = 'its torn last line' if torn == [len(lines)] else f'unreadable line(s) {", ".join(map(str, torn))}'
    note = f'{path}: dropped {where} (a run killed mid-write, or a full disk)'
  return kept, note


class MetricWriter:
  """Appends one step's metrics to metrics.jsonl and TensorBoard (a no-op unless `lead`)."""

  def __init__(self, workdir, start, lead):
    """Opens the files; a run resuming at step `start` > 0 first drops lines after that step.

    Args:
      workdir: the run directory.
      start: the step the run starts from (0 for a new run: an old file is emptied).
      lead: whether this process writes (process 0).
    """
    self.lead = lead
    if not lead:
      return
    path = os.path.join(workdir, 'metrics.jsonl')
    if tf.io.gfile.exists(path):
      kept, note = _kept_lines(path, start)
      if note:
        logging.warning('%s', note)
      # Written beside and renamed over: a kill during the rewrite leaves the old file whole.
      tmp = path + '.tmp'
      with tf.io.gfile.GFile(tmp, 'w') as f:
        f.write(''.join(kept))
      tf.io.gfile.rename(tmp, path, overwrite=True)
    self.tb = tensorboard.SummaryWriter(os.path.join(workdir, 'tensorboard'))
    self.jsonl = tf.io.gfile.GFile(path, 'a')

  def write(self, step, metrics, flush_tensorboard):
    """Writes metrics (a dict of floats) of `step`; the jsonl line is flushed at once."""
    if not self.lead:
      return
    for k, v in metrics.items():
      self.tb.scalar(f'train/{k}', v, step)
    self.jsonl.write(json.dumps({'step': step, **metrics}) + '\n')
    self.jsonl.flush()
    if flush_tensorboard:
      self.tb.flush()

  def close(self):
    if self.lead:
      self.tb.flush()
      self.jsonl.close()
