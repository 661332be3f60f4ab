"""The tiny end-to-end config as a config file, for command-line tests.

  --config=tests/tiny_config.py:/path/to/dataset
"""
from tests import main_helpers


def get_config(root):
  return main_helpers.tiny_config(root)
