"""The benchmark commands run at their smallest size and write their results files."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, tmp_path, env=None):
  out = [] if tmp_path is None else ["--out", str(tmp_path)]
  proc = subprocess.run([sys.executable, "-m", *args, *out], cwd=REPO, capture_output=True, text=True,
                        timeout=900, env=None if env is None else {**os.environ, **env})
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc


def test_benchmark_quick_writes_json_and_markdown(tmp_path):
  _run(["benchmarks.run", "--quick", "--grid", "small:28:2"], tmp_path)
  names = sorted(os.listdir(tmp_path))
  (json_name,) = [n for n in names if n.endswith(".json")]
  assert json_name.replace(".json", ".md") in names
  result = json.load(open(tmp_path / json_name))
  threads = {row["threads"] for row in result["rows"]}
  assert threads == {1, os.cpu_count()}  # each thread count in its own pinned process
  train = [r for r in result["rows"] if r["task"] == "train"]
  assert len(train) == 2  # one grid entry x two thread counts, JAX and torch in each row
  assert all(len(r["seconds"]["jax"]) == 2 and len(r["seconds"]["torch_reference"]) == 2
             for r in train)
  assert all(r["gflop"] > 0 and r["load_before"] >= 0 for r in result["rows"])
  # The 1-thread process is confined to one core: no implementation keeps more than one
  # core busy (CPU seconds <= wall seconds, + 10% for clock granularity).
  for row in [r for r in result["rows"] if r["threads"] == 1]:
    for name, wall in row["seconds"].items():
      assert sum(row["cpu_seconds"][name]) <= 1.1 * sum(wall), (row["task"], name)
  markdown = open(tmp_path / json_name.replace(".json", ".md")).read()
  assert "## 1 thread" in markdown and "Cached encoder features" in markdown


def test_gpu_check_smoke_runs_on_cpu_and_writes_outside_the_source_tree(tmp_path):
  """Without --out, the smoke run writes into a new temporary folder, not benchmarks/results."""
  results = os.path.join(REPO, "benchmarks", "results")
  before = sorted(os.listdir(results)) if os.path.isdir(results) else []
  proc = _run(["benchmarks.gpu_check", "--smoke"], None, env={"TMPDIR": str(tmp_path)})
  (folder,) = os.listdir(tmp_path)
  (name,) = os.listdir(tmp_path / folder)
  assert name.startswith("cpu-check-smoke-") and name.endswith(".json")
  assert f"Wrote {tmp_path / folder / name}" in proc.stdout
  assert set(json.load(open(tmp_path / folder / name))) >= {"attention", "train", "train_cached"}
  assert (sorted(os.listdir(results)) if os.path.isdir(results) else []) == before


def test_deploy_speed_writes_all_runtimes_and_their_parity(tmp_path):
  _run(["benchmarks.deploy_speed", "--grid", "small:28:2", "--name", "deploy"], tmp_path)
  result = json.load(open(tmp_path / "deploy.json"))
  rows = {r["impl"]: r for r in result["results"]}
  assert list(rows) == ["jax", "onnxruntime", "openvino_f32", "openvino_bf16"]
  for name, row in rows.items():
    assert len(row["seconds"]) == 5 and row["threads"] == 1
    assert sum(row["cpu_seconds"]) <= 1.1 * sum(row["seconds"]), name  # confined to one core
  for name in ("onnxruntime", "openvino_f32"):  # float32 runtimes: the JAX maps and scores
    assert rows[name]["max_abs_map_diff"] <= 1e-5 and rows[name]["max_abs_score_diff"] <= 1e-5, name
  assert "| ViT-small | 28 | 2 | openvino_bf16 |" in open(tmp_path / "deploy.md").read()


def test_tpu_slices_table_names_crashes_and_given_batches():
  """The compile table's bookkeeping (no compile): a compiler crash is recorded with the last
  compile before it; a batch given by hand (--given) is marked and its reason footnoted."""
  from benchmarks import tpu_slices  # pylint: disable=g-import-not-at-top
  crash = ("Compiling for v5e:2x4\n  [evaluation map function at 8 per chip: 2.29 GiB per chip; 69 s]\n"
           "Fatal Python error: Segmentation fault\n\nExtension modules: numpy (total: 1)\n")
  assert tpu_slices._failure(crash) == ("Fatal Python error: Segmentation fault in the next compile after "  # pylint: disable=protected-access
                                        "[evaluation map function at 8 per chip: 2.29 GiB per chip; 69 s]")
  assert tpu_slices._failure("a\nerror: config.train.batch_size=9: x\n") == "error: config.train.batch_size=9: x"  # pylint: disable=protected-access
  result = lambda per_chip, **extra: {"global_batch": 8 * per_chip, "per_chip_batch": per_chip, "gflop_per_image": 1.0,
                                      "estimated_images_per_s": 10.0, "bound": "memory",
                                      "memory_per_chip_gib": {"total": 1.5, "hbm": 16}, **extra}
  cells = {"vit_s/v5e-8": {"seconds": 1, "functions": {
      "train": {"largest_batch": result(38)}, "eval": result(126, given_because="the compiler crashes over the HBM")}},
           "vit_b/v5e-8": {"error": "Fatal Python error: Segmentation fault in the next compile after none"}}
  table = tpu_slices.markdown(cells)
  assert "| vit_s | 392 | v5e-8 (v5e:2x4) | train | 304 (38) | 1.50 of 16 GiB |" in table
  assert "| vit_s | 392 | v5e-8 (v5e:2x4) | eval | 1008 (126) \u2020 |" in table
  assert "\u2020 vit_s eval on v5e-8: the compiler crashes over the HBM" in table
  assert "| vit_b | 392 | v5e-8 (v5e:2x4) | train, eval | Fatal Python error: Segmentation fault" in table
  assert tpu_slices._searched_elsewhere(cells, "vit_s", "v5e-256") == {"train": 38, "eval": 126}  # pylint: disable=protected-access
