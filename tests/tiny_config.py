"""The tiny end-to-end config as a config file, for command-line tests.

  --config=tests/tiny_config.py:/path/to/dataset
  --config=tests/tiny_config.py:/path/to/dataset,shallow   (main_helpers.shallow: compile mode, many restarts)
"""
from tests import main_helpers


def get_config(arg):
  root, _, variant = arg.partition(",")
  if variant not in ("", "shallow"):
    raise ValueError(f"tests/tiny_config.py:{arg}: expected ROOT or ROOT,shallow")
  config = main_helpers.tiny_config(root)
  return main_helpers.shallow(config) if variant else config
