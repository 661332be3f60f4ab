"""A tiny config and dataset for end-to-end tests of the main job."""
import importlib
import json
import os

from dinomaly_jax.data import synthetic


def tiny_config(root, **train):
  """The demo config, shrunk: ViT-S at 56x56, a few steps, batch 4."""
  c = importlib.import_module("configs.demo").get_config("crop=56")
  c.data.synthetic = False
  c.data.root = str(root)
  c.train.steps = train.pop("steps", 6)
  c.train.batch_size = 4
  c.train.warmup_steps = 2
  c.train.loss_p_steps = 4
  c.train.log_every = 2
  c.train.checkpoint_every = 3
  c.train.eval_every = 3
  c.eval.batch_size = 8
  c.eval.pictures_per_class = 2
  for k, v in train.items():
    c.train[k] = v
  return c


def shallow(config):
  """The tiny model cut to what a compile needs to be checked quickly: the encoder's first two
  blocks as target layers (it runs no further; its parameters stay whole) and two decoder blocks."""
  config.model.target_layers = [0, 1]
  config.model.fuse_groups = [[0], [1]]
  config.model.decoder_depth = 2
  return config


def tiny_dataset(root):
  return synthetic.generate(str(root), seed=0, classes=("brick", "nut"), image_size=64,
                            n_train=8, n_test_good=3, n_test_bad=3)


def metric_lines(workdir) -> list[dict]:
  """<workdir>/metrics.jsonl, one dict per line."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]
