"""Fixtures many test files share: one tfds data_dir per session and the tiny config pointing at it."""

import pytest

from configs import shapes


@pytest.fixture(scope='session')
def tfds_dir(tmp_path_factory):
  """A tfds data_dir for the whole session, so each synthetic set is built once, on first use.

  Sets with other settings can live side by side in it: the builder's config name
  encodes every setting (data/shapes.py), so they never share files.
  """
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture
def tiny_config(tfds_dir):
  """configs/shapes.py:tiny reading from `tfds_dir`; a fresh copy per test, so changes cannot leak."""
  c = shapes.get_config('tiny')
  c.data.data_dir = tfds_dir
  return c
