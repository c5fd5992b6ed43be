"""Size buckets: resized sizes equal to tf's, assignment, checks, the proposal, pruning, the schedule."""

import numpy as np
import pytest
import tensorflow as tf

from retina_jax.data import augment
from retina_jax.data import buckets
from retina_jax.data import sizes

COCO_800 = buckets.propose(800, 1333)
COCO_600 = buckets.propose(600, 1000)


@pytest.mark.parametrize('min_size, max_size', [(800, 1333), (600, 1000), (128, 213), (640 * 0.8, 1333)])
def test_numpy_resized_sizes_equal_tf_ones(min_size, max_size):
  # The counting pass, the stream filters and prepare_image use tf; proposals and the benchmark numpy.
  rng = np.random.default_rng(0)
  hw = np.concatenate([rng.integers(1, 3000, (300, 2)), [[480, 640], [427, 640], [333, 500], [1, 2999]]])
  want = buckets.resized_hw(hw[:, 0], hw[:, 1], min_size, max_size)

  def in_tf(size):  # as the pipeline runs it: per image, inside tf.data
    new = augment.resized_hw(size, augment.paper_scale(size[0], size[1], min_size, max_size))
    return new, sizes.bucket_index(size, min_size, max_size, COCO_800)

  got = list(tf.data.Dataset.from_tensor_slices(hw.astype(np.int32)).map(in_tf).as_numpy_iterator())
  np.testing.assert_array_equal([g[0] for g in got], want)
  np.testing.assert_array_equal([g[1] for g in got], buckets.assign(want, COCO_800))


def test_assign_picks_the_smallest_bucket_that_holds():
  b = buckets.canonical([(896, 1408), (1408, 896), (896, 1152), (896, 896)])
  assert b == ((896, 896), (896, 1152), (896, 1408), (1408, 896))  # by area, then (H, W)
  np.testing.assert_array_equal(
      buckets.assign([[800, 1067], [800, 800], [1067, 800], [800, 1333], [896, 1153], [2000, 2000]], b),
      [1, 0, 3, 2, 2, 3])  # the last holds nowhere: the largest bucket, where it is shrunk to fit


def test_a_typical_coco_image():
  # The example: 640 x 480 at 800 px is 1067 x 800, 0.85 Mpx on the 1.98 Mpx square canvas.
  hw = buckets.resized_hw(480, 640, 800, 1333)
  np.testing.assert_array_equal(hw, [800, 1067])
  assert COCO_800[buckets.assign(hw, COCO_800)] == (896, 1152)


def test_proposals_pad_little_and_hold_every_image():
  assert buckets.canvas_per_image([(1408, 1408)], buckets.COCO_LIKE_SIZES, 800, 1333) > 2.2
  assert buckets.canvas_per_image([(1024, 1024)], buckets.COCO_LIKE_SIZES, 600, 1000) > 2.1
  assert buckets.canvas_per_image(COCO_800, buckets.COCO_LIKE_SIZES, 800, 1333) <= 1.25
  assert buckets.canvas_per_image(COCO_600, buckets.COCO_LIKE_SIZES, 600, 1000) <= 1.25
  for b, (lo, hi) in ((COCO_800, (800, 1333)), (COCO_600, (600, 1000))):
    assert all(h % 128 == 0 and w % 128 == 0 for h, w in b)
    buckets.check(b, lo, hi)
    # Every size at all, at the paper's scale (no shrinking): aspect ratios 1:20 to 20:1.
    side = np.exp(np.linspace(0, np.log(20), 400))
    hw = np.concatenate([buckets.resized_hw(np.ones_like(side), side, lo, hi),
                         buckets.resized_hw(side, np.ones_like(side), lo, hi)])
    held = np.asarray(b)[buckets.assign(hw, b)]
    assert np.all(held >= hw)


@pytest.mark.parametrize('value, message', [
    ((), 'must be a non-empty tuple'),
    (((896, 1400),), r'bucket \(896, 1400\) must be positive integers divisible by 128'),
    (((896, 1408), (1408,)), 'must be a non-empty tuple'),
    (((896, 1408),), r'no bucket holds a 1333 x 800 image, which min_size 800 / max_size 1333 gives; '
     r'propose\(800, 1333\) in retina_jax/data/buckets.py gives \(\(896, 1024\)'),
    (((768, 1408), (1408, 768)), 'no bucket holds a 800 x 1333 image'),
])
def test_bad_buckets_name_the_key(value, message):
  with pytest.raises(ValueError, match=r'config\.data\.buckets.*' + message) as e:
    buckets.check(value, 800, 1333)
  assert '\n' not in str(e.value)


def _histogram(sizes, n):
  """[n, n] cell histogram of (h, w) resized sizes."""
  hist = np.zeros((n, n), np.int64)
  for c in buckets.cells(sizes):
    hist[c[0] - 1, c[1] - 1] += 1
  return hist


def test_counts_and_pruning_of_buckets_a_process_cannot_fill():
  b = buckets.canonical([(128, 128), (128, 256), (256, 128)])
  # Process 0 has 5 square images, process 1 only one: the square bucket cannot fill process 1's
  # batch of 2, and (128, 256) holds its images. One portrait image on process 1 stays: no other
  # bucket holds it.
  sizes = [[[100, 100]] * 5 + [[128, 200]] * 4, [[100, 100]] + [[128, 200]] * 3 + [[200, 128]]]
  hists = np.stack([_histogram(s, 2) for s in sizes])
  np.testing.assert_array_equal(buckets.counts(hists, b), [[5, 4, 0], [1, 3, 1]])
  kept = buckets.training_buckets(hists, b, local_batch=2)
  assert kept == ((128, 256), (256, 128))
  np.testing.assert_array_equal(buckets.counts(hists, kept), [[9, 0], [4, 1]])
  assert buckets.training_buckets(hists, b, local_batch=1) == b


def test_schedule_follows_the_shares_evenly():
  counts = np.array([500, 0, 300, 150, 50])
  steps = buckets.schedule(np.arange(10000), counts, seed=3)
  share = np.bincount(steps, minlength=5) / 10000
  np.testing.assert_allclose(share, counts / counts.sum(), atol=2e-3)
  for n in (100, 1000):  # even over short stretches too, unlike independent draws
    part = np.bincount(steps[:n], minlength=5)
    assert np.abs(part - n * counts / counts.sum()).max() <= 3
  assert share[1] == 0  # a bucket without images is never scheduled
  np.testing.assert_array_equal(steps[17], buckets.schedule(17, counts, seed=3))  # from the step alone
  assert not np.array_equal(steps, buckets.schedule(np.arange(10000), counts, seed=4))
  assert set(buckets.schedule(np.arange(1000), [0, 0, 7], seed=0)) == {2}
