"""Training-pipeline throughput (images/s) at the protocol sizes, per worker count and source.

  python -m benchmarks.data_throughput --workers 0,1,2 --image-size 1024

Generates a synthetic dataset of image_size x image_size PNGs (Real-IAD ships 1024 px,
MVTec-AD 700-1024 px), packs it (448 px PNG in array_record), then times the training
iterator (resize 448, crop 392, normalise, batch 16) from the folders and from the pack
after its first batch (worker start-up excluded). Results go to a JSON file with the date
and machine.
"""
import argparse
import json
import os
import tempfile
import time

from benchmarks import timing
from dinomaly_jax.config import defaults
from dinomaly_jax.data import index
from dinomaly_jax.data import packed
from dinomaly_jax.data import pipeline
from dinomaly_jax.data import synthetic


def images_per_second(records, data_config, workers: int, batch_size: int, batches: int) -> float:
  it = pipeline.train_iterator(records, data_config, batch_size=batch_size, seed=0,
                               workers=workers)
  next(it)  # start-up
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  seconds = time.perf_counter() - start
  del it
  return batches * batch_size / seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workers", default="0,1,2")
  parser.add_argument("--image-size", type=int, default=1024)
  parser.add_argument("--images", type=int, default=64)
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--batches", type=int, default=12)
  parser.add_argument("--out", default="benchmarks/results/data_throughput.json")
  args = parser.parse_args()
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    root = synthetic.generate(f"{tmp}/data", classes=("brick", "nut"), image_size=args.image_size,
                              n_train=args.images // 2, n_test_good=1, n_test_bad=0)
    c = defaults.base_config().data  # resize 448, crop 392
    c.root = root
    records = index.build_records(c, "train")
    packed.write({"train": records}, f"{tmp}/packed", c.resize, workers=2)
    for source in ("folders", "packed"):
      c.packed = f"{tmp}/packed" if source == "packed" else ""
      for workers in (int(w) for w in args.workers.split(",")):
        rate = images_per_second(records, c, workers, args.batch_size, args.batches)
        results.append({"source": source, "workers": workers, "images_per_s": round(rate, 1),
                        "image_size": args.image_size, "resize": c.resize, "crop": c.crop,
                        "batch_size": args.batch_size,
                        "load_average_1min": round(os.getloadavg()[0], 2),  # shared machine
                        "threads_per_process": pipeline.WORKER_THREADS if workers
                        else pipeline.IN_PROCESS_THREADS})
        print(json.dumps(results[-1]), flush=True)
  timing.write_results(args.out, results)


if __name__ == "__main__":
  main()
