"""The pipeline with size buckets, on the synthetic set with COCO-like sizes (data.shapes.varied_sizes)."""

import collections

import numpy as np
import pytest
import tensorflow as tf

from configs import shapes
from retina_jax.data import buckets
from retina_jax.data import pipeline
from retina_jax.data import source

pytestmark = pytest.mark.slow  # builds a dataset (48 + 12 images of at most 96 px, a few seconds)

STEPS = 120  # 10 epochs of 48 images in batches of 4


@pytest.fixture(scope='module')
def config(tfds_dir):
  c = shapes.get_config('tiny,buckets')
  c.data.data_dir = tfds_dir
  c.data.shapes.image_size = 96  # COCO's 640 px: 4:3 images are 72 x 96, resized to 128 x 171
  c.data.shapes.num_train = 48
  c.data.shapes.num_val = 12
  c.data.shuffle_buffer = 16
  c.data.flip = False  # so that an image is the same array each time it is seen
  c.train.batch_size = 4
  c.eval.batch_size = 4
  return c


@pytest.fixture(scope='module')
def trained_on(config):
  """(STEPS training batches of one process, its DataStats)."""
  stats = pipeline.DataStats()
  it = pipeline.train_iterator(config, stats=stats)
  return [next(it) for _ in range(STEPS)], stats


@pytest.fixture(scope='module')
def evaluated_on(config):
  """(the eval batches of one process, its DataStats)."""
  stats = pipeline.DataStats()
  return list(pipeline.eval_iterator(config, stats=stats)), stats


def _histograms(config, processes):
  return np.stack([pipeline.train_size_histogram(config, i, processes) for i in range(processes)])


def test_train_batches_follow_the_schedule_on_each_bucket(config, trained_on):
  batches, stats = trained_on
  hists = _histograms(config, 1)
  kept = buckets.training_buckets(hists, config.data.buckets, 4)
  schedule = buckets.schedule(np.arange(STEPS), buckets.counts(hists, kept).sum(0), config.seed)
  assert [b['image'].shape[1:3] for b in batches] == [kept[k] for k in schedule]
  assert len(set(schedule[:4])) > 1  # the run changes bucket between steps
  for b in batches:
    h, w = b['image'].shape[1:3]
    valid = b['classes'] >= 0
    assert np.all(b['boxes'][valid][:, [0, 2]] <= w) and np.all(b['boxes'][valid][:, [1, 3]] <= h)
  # The fraction logged as data/image_pixel_fraction: 4:3 images (128 x 171) on 128 x 256, ...
  assert stats.images == STEPS * 4 and 0.6 < stats.as_dict()['image_pixel_fraction'] < 0.9


def test_each_image_is_seen_at_the_rate_it_would_be_without_buckets(trained_on):
  seen = collections.Counter(image.tobytes() for b in trained_on[0] for image in b['image'])
  rate = np.asarray(list(seen.values()))
  assert len(rate) == 48  # every image, each always on the same canvas
  # 10 epochs' worth of steps: each image 10 times, give or take the ends of its stream's epochs.
  assert rate.min() >= 8 and rate.max() <= 12, sorted(rate)


def test_deterministic_and_two_processes_agree_on_every_step(config, trained_on):
  again = pipeline.train_iterator(config)
  for x in trained_on[0][:6]:
    y = next(again)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  hists = _histograms(config, 2)
  slices = []
  for i in range(2):
    it = pipeline.train_iterator(config, process_index=i, process_count=2, histograms=hists)
    slices.append([next(it) for _ in range(12)])
  assert [x['image'].shape for x in slices[0]] == [x['image'].shape for x in slices[1]]  # same bucket
  assert len({x['image'].shape for x in slices[0]}) > 1
  seen = [{image.tobytes() for x in part for image in x['image']} for part in slices]
  assert not seen[0] & seen[1]  # disjoint slices


def test_eval_puts_each_image_on_its_bucket_once(config, evaluated_on):
  batches, stats = evaluated_on
  ids = np.concatenate([b['image_id'][b['valid']] for b in batches])
  assert sorted(ids.tolist()) == list(range(1, 13)) and stats.images == 12
  canvases = [b['image'].shape[1:3] for b in batches]
  assert len(set(canvases)) > 1 and canvases == sorted(canvases, key=config.data.buckets.index)
  for b in batches:
    for i in np.flatnonzero(b['valid']):
      hw = buckets.resized_hw(*b['orig_hw'][i], config.data.min_size, config.data.max_size)
      np.testing.assert_array_equal(b['image_hw'][i], hw)  # the paper's scale, not shrunk
      assert b['image'].shape[1:3] == config.data.buckets[buckets.assign(hw, config.data.buckets)]
  # Two processes: the same canvases in the same order, each image once.
  parts = [list(pipeline.eval_iterator(config, process_index=i, process_count=2)) for i in range(2)]
  assert [p['image'].shape for p in parts[0]] == [p['image'].shape for p in parts[1]]
  both = np.concatenate([p['image_id'][p['valid']] for part in parts for p in part])
  assert sorted(both.tolist()) == list(range(1, 13))


def test_prepare_image_uses_the_canvas_evaluation_uses(config, evaluated_on):
  ds = source.read(source.tfds_builder(config), 'validation')
  encoded = {int(ex['image/id']): ex['image'] for ex in ds.as_numpy_iterator()}
  for b in evaluated_on[0]:
    for i in np.flatnonzero(b['valid']):
      image = tf.io.decode_image(encoded[int(b['image_id'][i])], channels=3)
      canvas, scale, hw = pipeline.prepare_image(image, config)
      np.testing.assert_array_equal(canvas.numpy(), b['image'][i])
      assert float(scale) == b['scale'][i] and np.array_equal(hw.numpy(), b['image_hw'][i])
