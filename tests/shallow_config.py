"""The tiny end-to-end config with a shallow model, for tests that start the command line
many times (tests/test_nothing_lost.py): 2 encoder blocks, 2 decoder blocks.

  --config=tests/shallow_config.py:/path/to/dataset
"""
from tests import main_helpers


def get_config(root):
  c = main_helpers.tiny_config(root)
  c.model.target_layers = [0, 1]
  c.model.fuse_groups = [[0], [1]]
  c.model.decoder_depth = 2
  return c
