"""Regenerates every table the README quotes: python -m benchmarks [--out benchmarks/results]

Runs `benchmarks.run` (JAX vs the reference procedure in torch, 1 thread and all cores,
ViT-S/224 batch 8 and ViT-B/392 batch 4) and `benchmarks.eval_e2e` (the whole evaluation
of 500 generated images, and predict per image), then `benchmarks.deploy_speed` (JAX,
ONNX Runtime and OpenVINO on one thread). Took 52 minutes on 2 idle cores without
deploy_speed (benchmarks.run 31, eval_e2e with 5 runs a side 21); deploy_speed took 12
minutes on a loaded machine.
"""
import argparse

from benchmarks import deploy_speed
from benchmarks import eval_e2e
from benchmarks import run


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="benchmarks/results")
  args = parser.parse_args()
  run.main(["--out", args.out])
  eval_e2e.main(["--out", args.out])
  deploy_speed.main(["--out", args.out])


if __name__ == "__main__":
  main()
