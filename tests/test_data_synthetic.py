"""The generated demo dataset: layout, determinism, and masks that are exactly the defects."""
import os

import numpy as np
from PIL import Image
import pytest

from dinomaly_jax.config import defaults
from dinomaly_jax.data import index
from dinomaly_jax.data import synthetic

SIZES = dict(image_size=64, n_train=3, n_test_good=2, n_test_bad=4)


@pytest.fixture(scope="module", name="root")
def fixture_root(tmp_path_factory):
  return synthetic.generate(str(tmp_path_factory.mktemp("all")), classes=synthetic.CLASSES, **SIZES)


def _files(root):
  return sorted(os.path.relpath(os.path.join(d, f), root)
                for d, _, files in os.walk(root) for f in files)


def test_layout_indexes_as_mvtec(root):
  c = defaults.base_config().data
  c.root = root
  assert index.list_classes(c) == sorted(synthetic.CLASSES)
  assert len(index.build_records(c, "train")) == 3 * len(synthetic.CLASSES)
  test = index.build_records(c, "test")
  for name in synthetic.CLASSES:
    bad = [r for r in test if r.class_name == name and r.label]
    assert sorted(r.defect_type for r in bad) == sorted(synthetic.DEFECTS[name])
    assert sum(r.class_name == name and not r.label for r in test) == 2
  for r in test:
    assert np.asarray(Image.open(r.image_path)).shape == (64, 64, 3)
    if r.label:
      mask = np.asarray(Image.open(r.mask_path))
      assert set(np.unique(mask)) == {0, 255} and mask.shape == (64, 64)


def test_deterministic_from_seed_and_independent_of_other_classes(root, tmp_path):
  again = synthetic.generate(str(tmp_path / "nut"), classes=("nut",), **SIZES)
  assert _files(again) == [f for f in _files(root) if f.startswith("nut/")]
  for f in _files(again):
    with open(os.path.join(again, f), "rb") as a, open(os.path.join(root, f), "rb") as b:
      assert a.read() == b.read(), f
  other = synthetic.generate(str(tmp_path / "seed1"), seed=1, classes=("nut",), **SIZES)
  a = np.asarray(Image.open(os.path.join(other, "nut/train/good/000.png")))
  assert not np.array_equal(a, np.asarray(Image.open(os.path.join(root, "nut/train/good/000.png"))))


@pytest.mark.parametrize("name", synthetic.CLASSES)
def test_masks_are_exactly_the_changed_pixels(name):
  c = synthetic.CLASSES.index(name)
  for i, kind in enumerate(synthetic.DEFECTS[name]):
    rng_seed = [0, c, 2, i]
    normal, _ = synthetic._sample(name, np.random.default_rng(rng_seed), 64)  # pylint: disable=protected-access
    defective, mask = synthetic._sample(name, np.random.default_rng(rng_seed), 64, kind)  # pylint: disable=protected-access
    changed = (defective != normal).any(axis=-1)
    assert mask.sum() >= 10, (name, kind)
    assert not (changed & ~mask).any(), (name, kind)  # nothing changes outside the mask
    assert changed[mask].mean() > 0.9, (name, kind)  # (a stain may match a pixel by chance)


def test_unknown_class():
  with pytest.raises(ValueError, match="Unknown synthetic classes"):
    synthetic.generate("/nonexistent", classes=("cat",))
