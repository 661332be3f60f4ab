"""A dataset config with a small model, for command-line tests.

  --config=tests/small_config.py:mvtec;method=dinomaly2,encoder=dinov2_vits14_reg4

The part before ";" names configs/<name>.py, the rest is its argument. The model keeps the
first 4 encoder blocks (two groups of two) and 4 decoder blocks.
"""
import importlib


def get_config(arg):
  name, _, config_arg = arg.partition(";")
  c = importlib.import_module(f"configs.{name}").get_config(config_arg)
  c.model.target_layers = [0, 1, 2, 3]
  c.model.fuse_groups = [[0, 1], [2, 3]]
  c.model.decoder_depth = 4
  return c
