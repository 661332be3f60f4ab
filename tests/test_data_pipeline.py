"""grain pipelines: exact batches, shuffling, process shards, eval coverage, packed == folders."""
import subprocess
import sys

import numpy as np
import pytest

from dinomaly_jax.config import defaults
from dinomaly_jax.data import index
from dinomaly_jax.data import pipeline
from dinomaly_jax.data import synthetic
from dinomaly_jax.data import transforms
from dinomaly_jax.errors import DataError

BATCH = 3


@pytest.fixture(scope="module", name="data_config")
def fixture_data_config(tmp_path_factory):
  root = synthetic.generate(str(tmp_path_factory.mktemp("demo")), classes=("brick", "nut"),
                            image_size=48, n_train=6, n_test_good=3, n_test_bad=4)
  c = defaults.base_config().data
  c.root, c.resize, c.crop, c.mask_size, c.workers = root, 32, 28, 16, 0
  return c


@pytest.fixture(scope="module", name="train_records")
def fixture_train_records(data_config):
  return index.build_records(data_config, "train")


@pytest.fixture(scope="module", name="expected_train")
def fixture_expected_train(data_config, train_records):
  """Each training record's model input computed directly, keyed by its bytes."""
  return {transforms.preprocess_image(transforms.load_image(r.image_path), data_config).tobytes(): i
          for i, r in enumerate(train_records)}


def _record_ids(batch, expected):
  return [expected[image.tobytes()] for image in batch["image"]]  # KeyError: not exact


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_train_batches_are_exact_shuffled_epochs(data_config, train_records, expected_train):
  n = len(train_records)  # 12 images -> 4 batches per epoch
  batches = _take(pipeline.train_iterator(train_records, data_config, batch_size=BATCH, seed=7), 12)
  for b in batches:
    assert b["image"].shape == (BATCH, 28, 28, 3) and b["image"].dtype == np.float32
  epochs = [sum((_record_ids(b, expected_train) for b in batches[e * 4:(e + 1) * 4]), [])
            for e in range(3)]
  for ids in epochs:
    assert sorted(ids) == list(range(n))  # every image once per epoch
  assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != list(range(n))
  again = _take(pipeline.train_iterator(train_records, data_config, batch_size=BATCH, seed=7), 4)
  assert sum((_record_ids(b, expected_train) for b in again), []) == epochs[0]
  other = _take(pipeline.train_iterator(train_records, data_config, batch_size=BATCH, seed=8), 4)
  assert sum((_record_ids(b, expected_train) for b in other), []) != epochs[0]


def test_drop_remainder_per_epoch(data_config, train_records, expected_train):
  batches = _take(pipeline.train_iterator(train_records, data_config, batch_size=5, seed=0), 4)
  ids = [_record_ids(b, expected_train) for b in batches]
  assert len(set(ids[0] + ids[1])) == 10  # epoch 1: 2 batches of 5, the last 2 images dropped
  assert len(set(ids[2] + ids[3])) == 10


def test_start_step_resumes_the_same_stream(data_config, train_records):
  full = _take(pipeline.train_iterator(train_records, data_config, batch_size=BATCH, seed=3), 7)
  resumed = _take(pipeline.train_iterator(train_records, data_config, batch_size=BATCH, seed=3,
                                          start_step=5), 2)
  for a, b in zip(full[5:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])


def test_two_processes_split_the_single_process_global_batches(data_config, train_records):
  single = _take(pipeline.train_iterator(train_records, data_config, batch_size=2 * BATCH, seed=0), 4)
  halves = [_take(pipeline.train_iterator(train_records, data_config, batch_size=BATCH, seed=0,
                                          process_index=p, process_count=2), 4) for p in range(2)]
  for step, whole in enumerate(single):
    np.testing.assert_array_equal(
        whole["image"], np.concatenate([halves[0][step]["image"], halves[1][step]["image"]]))


def test_worker_processes_give_the_same_batches(data_config, train_records):
  in_process = _take(pipeline.train_iterator(train_records, data_config, batch_size=BATCH,
                                             seed=1, workers=0), 3)
  workers = _take(pipeline.train_iterator(train_records, data_config, batch_size=BATCH, seed=1,
                                          workers=1), 3)
  for a, b in zip(in_process, workers):
    np.testing.assert_array_equal(a["image"], b["image"])


def _gather_eval(records, data_config, batch_size, process_count):
  per_process = [list(pipeline.eval_iterator(records, data_config, batch_size=batch_size,
                                             process_index=p, process_count=process_count))
                 for p in range(process_count)]
  return per_process


@pytest.mark.parametrize("batch_size,process_count", [(4, 1), (4, 2), (3, 3), (64, 2)])
def test_eval_scores_every_record_exactly_once(data_config, batch_size, process_count):
  records = index.build_records(data_config, "test")  # 14 records
  per_process = _gather_eval(records, data_config, batch_size, process_count)
  expected_batches = pipeline.num_eval_batches(len(records), batch_size, process_count)
  assert [len(b) for b in per_process] == [expected_batches] * process_count
  counts = np.zeros(len(records), int)
  for batches in per_process:
    for b in batches:
      assert b["image"].shape == (batch_size, 28, 28, 3) and b["image"].dtype == np.float32
      assert b["mask"].shape == (batch_size, 16, 16) and b["mask"].dtype == np.uint8
      assert b["label"].dtype == np.int32 and b["index"].dtype == np.int32
      assert b["valid"].dtype == np.bool_
      assert set(np.unique(b["mask"])) <= {0, 1, 2}
      assert (b["index"][~b["valid"]] == -1).all()
      for k in range(batch_size):
        if not b["valid"][k]:
          continue
        r = records[b["index"][k]]
        counts[b["index"][k]] += 1
        rgb = transforms.load_image(r.image_path)
        np.testing.assert_array_equal(b["image"][k], transforms.preprocess_image(rgb, data_config))
        np.testing.assert_array_equal(
            b["mask"][k], transforms.preprocess_mask(r.mask_path, rgb.shape[:2], data_config))
        assert b["label"][k] == r.label
  np.testing.assert_array_equal(counts, 1)


def test_eval_masks_mark_defects(data_config):
  records = index.build_records(data_config, "test")
  (batches,) = _gather_eval(records, data_config, 16, 1)
  b = batches[0]
  has_defect = b["mask"][b["valid"]].reshape(len(records), -1).any(axis=1)
  np.testing.assert_array_equal(has_defect, [r.label == 1 for r in records])


def test_packed_source_equals_folders(data_config, train_records, tmp_path):
  out = str(tmp_path / "packed")
  subprocess.run([sys.executable, "-m", "dinomaly_jax.data.pack", "--config=configs/mvtec.py",
                  f"--config.data.root={data_config.root}", "--config.data.resize=32",
                  f"--out={out}", "--workers=0"], check=True, capture_output=True)
  packed_config = data_config.copy_and_resolve_references()
  packed_config.packed, packed_config.root = out, ""
  assert index.list_classes(packed_config) == ["brick", "nut"]
  assert index.build_records(packed_config, "train") == train_records
  test_records = index.build_records(data_config, "test")
  assert index.build_records(packed_config, "test") == test_records
  for a, b in zip(_gather_eval(test_records, data_config, 4, 1)[0],
                  _gather_eval(test_records, packed_config, 4, 1)[0]):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  folder = _take(pipeline.train_iterator(train_records, data_config, batch_size=BATCH, seed=2), 3)
  from_pack = _take(pipeline.train_iterator(train_records, packed_config, batch_size=BATCH, seed=2,
                                            workers=1), 3)
  for a, b in zip(folder, from_pack):
    np.testing.assert_array_equal(a["image"], b["image"])
  packed_config.classes = ("nut",)
  assert {r.class_name for r in index.build_records(packed_config, "test")} == {"nut"}
  packed_config.resize = 64
  with pytest.raises(DataError, match="packed at resize 32 but config.data.resize is 64"):
    index.build_records(packed_config, "train")
