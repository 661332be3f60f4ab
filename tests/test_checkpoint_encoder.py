"""The encoder check of a work directory: refused only once a checkpoint exists."""
import json

import pytest

from dinomaly_jax.errors import IncompatibleWorkdirError
from dinomaly_jax.weights import checkpoint


def test_a_run_without_a_finished_checkpoint_may_change_its_encoder(tmp_path):
  (tmp_path / checkpoint.ENCODER_FILE).write_text(json.dumps({"fingerprint": "aaaa", "source": "weights/a"}))
  (tmp_path / checkpoint.CHECKPOINT_DIR).mkdir()  # what orbax leaves when a run dies before step 1's save
  (tmp_path / checkpoint.CHECKPOINT_DIR / "3.orbax-checkpoint-tmp-17").mkdir()  # a save that never finished
  assert not checkpoint.has_checkpoint(str(tmp_path))
  checkpoint.check_encoder(str(tmp_path), "bbbb", "weights/b")  # no checkpoint yet: allowed
  (tmp_path / checkpoint.CHECKPOINT_DIR / "3").mkdir()
  assert checkpoint.has_checkpoint(str(tmp_path))
  with pytest.raises(IncompatibleWorkdirError, match="trained with the encoder weights/a"):
    checkpoint.check_encoder(str(tmp_path), "bbbb", "weights/b")
  checkpoint.check_encoder(str(tmp_path), "aaaa", "weights/a")
