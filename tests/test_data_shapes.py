"""The synthetic 'retina_shapes' dataset: drawing, determinism, coco/2017 structure."""

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from retina_jax.data import shapes

_SETTINGS = dict(image_size=64, num_train=8, num_val=6, max_objects=8, min_object_size=6, seed=3,
                 varied_sizes=False)


@pytest.fixture(scope='module')
def built(tfds_dir):
  return shapes.builder(ml_collections.ConfigDict(_SETTINGS), tfds_dir)


def _draw(seed, size=256, crowd=False):
  return shapes.draw_image(np.random.default_rng(seed), size, 24, 8, crowd)


@pytest.mark.parametrize('kind', range(len(shapes.CLASS_NAMES)))
def test_silhouettes_touch_all_sides_of_their_box(kind):
  # A drawn object's box is then exactly its placement box when nothing hides it.
  for h, w in [(6, 6), (7, 15), (40, 17)]:
    mask = shapes._mask(kind, h, w)
    assert mask.any(axis=0)[[0, -1]].all() and mask.any(axis=1)[[0, -1]].all(), (kind, h, w)


def test_silhouettes_differ_between_classes():
  masks = [shapes._mask(k, 24, 24) for k in range(len(shapes.CLASS_NAMES))]
  for i in range(len(masks)):
    for j in range(i):
      assert (masks[i] != masks[j]).mean() > 0.05, (shapes.CLASS_NAMES[i], shapes.CLASS_NAMES[j])


def test_draw_is_deterministic_by_seed():
  a, b, c = _draw((0, 0, 5)), _draw((0, 0, 5)), _draw((0, 0, 6))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a[0], c[0])


def test_draw_statistics():
  draws = [_draw((1, 0, i)) for i in range(30)]
  counts = [len(d[2]) for d in draws]
  boxes = np.concatenate([d[1] for d in draws])
  sides = np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
  labels = np.concatenate([d[2] for d in draws])
  assert np.mean(counts) > 8 and max(counts) <= 24
  assert sides.min() < 12 and sides.max() > 80  # from about min_object_size to much of the image
  assert np.all(boxes >= 0) and np.all(boxes <= 256)
  assert np.all(boxes[:, 2:] > boxes[:, :2])
  assert set(labels.tolist()) == set(range(len(shapes.CLASS_NAMES)))
  for image, box, _, _, area in draws:
    assert image.dtype == np.uint8 and image.shape == (256, 256, 3)
    assert np.all(area <= (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1]))
    assert np.all(area > 0)


def test_crowd_regions_only_when_asked():
  assert not any(_draw((2, 0, i))[3].any() for i in range(20))
  crowds = [_draw((2, 1, i), crowd=True)[3] for i in range(40)]
  assert 0 < sum(c.any() for c in crowds) < 40 and all(c.sum() <= 1 for c in crowds)


@pytest.mark.slow
def test_builder_has_coco_structure(built):
  coco_features = tfds.builder('coco/2017').info.features
  ours = built.info.features
  assert set(ours.keys()) == set(coco_features.keys())
  assert set(ours['objects'].feature.keys()) == set(coco_features['objects'].feature.keys())
  for key in ('image', 'image/filename', 'image/id'):
    assert type(ours[key]) is type(coco_features[key]), key
  for key in ('bbox', 'label', 'is_crowd', 'area', 'id'):
    assert ours['objects'][key].dtype == coco_features['objects'][key].dtype, key
  assert ours['objects']['label'].names == list(shapes.CLASS_NAMES)
  assert built.info.splits['train'].num_examples == 8
  assert built.info.splits['validation'].num_examples == 6
  assert built.info.file_format.value == 'tfrecord'


@pytest.mark.slow
def test_builder_stores_what_draw_image_draws(built):
  for ex in built.as_dataset(split='validation').as_numpy_iterator():
    index = int(ex['image/id']) - 1
    image, boxes, labels, crowd, area = shapes.draw_image(
        np.random.default_rng((3, 1, index)), 64, 8, 6, crowd=True)
    stored = ex['objects']['bbox'][:, [1, 0, 3, 2]] * 64  # tfds yxyx normalized -> xyxy
    np.testing.assert_allclose(stored, boxes, atol=1e-4)
    np.testing.assert_array_equal(ex['objects']['label'], labels)
    np.testing.assert_array_equal(ex['objects']['is_crowd'], crowd)
    np.testing.assert_array_equal(ex['objects']['area'], area)
    assert np.abs(ex['image'].astype(float) - image).mean() < 6.0  # JPEG q95 of pixel noise


@pytest.mark.slow
def test_settings_have_their_own_directory(built, tmp_path):
  other = shapes.RetinaShapes(config=shapes.RetinaShapesConfig(**{**_SETTINGS, 'seed': 4}),
                              data_dir=str(tmp_path))
  assert built.builder_config.name == '64px_8tr_6va_8obj_6min_seed3'
  assert other.builder_config.name != built.builder_config.name
  assert not other.is_prepared()
  again = shapes.builder(ml_collections.ConfigDict(_SETTINGS), str(built.data_dir_root))
  assert again.data_dir == built.data_dir  # built once, then reused
  first = next(iter(again.as_dataset(split='train', decoders={'image': tfds.decode.SkipDecoding()})))
  assert tf.io.decode_image(first['image']).shape == (64, 64, 3)


def test_bad_settings_name_the_key():
  with pytest.raises(ValueError, match='config.data.shapes'):
    shapes.RetinaShapesConfig(**{**_SETTINGS, 'image_size': 20})
