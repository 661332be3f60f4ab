"""The README's "Check a pod before you rent it" table: the compile mode for each model
and TPU slice (largest global batch that fits, estimated images/s), train and eval.

  python -m benchmarks.tpu_slices [--out benchmarks/results] [--models vit_s,vit_b] [--slices v5e-8]
  python -m benchmarks.tpu_slices --models M --slices S --given eval=126 --because "why"  # no search

Needs libtpu (pip install -e ".[tpu]"). Each cell runs `python -m dinomaly_jax.main
--mode=compile` (the train step and the evaluation map function, each 3 to 5 compiles for the
batch search); a ViT-B train step takes about 7 minutes per compile on 2 busy CPU cores, so
the cells are written to <out>/tpu-slices.json as they finish and a run continues from them.
The compiles are deterministic: a busy machine makes them slower, not different.

Memory per chip of a data-parallel step depends on the chip and the batch per chip, not on
the number of chips, so a slice whose chip type another slice has already searched for the
same model (v5e-256 after v5e-8) is checked by one compile per function at that per-chip
batch instead of a new search; the table says which cells were found that way.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (config argument, crop)
MODELS = {
    "vit_s": ("encoder=dinov2_vits14_reg4", 392),
    "vit_b": ("encoder=dinov2_vitb14_reg4", 392),
    "vit_l": ("encoder=dinov2_vitl14_reg4", 392),
    "dinov3_vit_l": ("encoder=dinov3_vitl16", 448),
}
# name -> topology. The -8 slices are one host of 8 chips on Cloud TPU (v5p-8: 4 chips of
# 2 cores); the topology description may split them over hosts, which changes nothing per chip.
SLICES = {"v5e-8": "v5e:2x4", "v5p-8": "v5p:2x2x1", "v6e-8": "v6e:2x4", "v5e-256": "v5e:16x16"}
START_PER_CHIP = 4  # the search starts from 4 and 8 images per chip


def _chips(topology: str) -> int:
  chips = 1
  for n in topology.split(":")[1].split("x"):
    chips *= int(n)
  return chips


def run_cell(model: str, slice_name: str, workdir: str, searched: dict | None = None,
             functions: tuple = ("train", "eval")) -> dict:
  """The compile mode for one model on one slice. searched: {function: per-chip batch} found
  by another slice of the same chip type (or given by hand, --given); then one compile per
  function checks it here."""
  arg, crop = MODELS[model]
  topology = SLICES[slice_name]
  chips = _chips(topology)
  per_chip = {"train": START_PER_CHIP, "eval": START_PER_CHIP, **(searched or {})}
  cmd = [sys.executable, "-m", "dinomaly_jax.main", f"--config=configs/mvtec.py:{arg}", f"--workdir={workdir}",
         "--mode=compile", f"--config.compile.topology={topology}", f"--config.compile.functions={functions!r}",
         f"--config.train.batch_size={per_chip['train'] * chips}", f"--config.eval.batch_size={per_chip['eval'] * chips}",
         f"--config.compile.find_largest_batch={searched is None}"]
  start = time.time()
  proc = subprocess.run(cmd, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  print(proc.stdout, flush=True)
  if proc.returncode:
    return {"error": _failure(proc.stdout), "seconds": time.time() - start}
  with open(os.path.join(workdir, "compile", topology.replace(":", "_") + ".json")) as f:
    report = json.load(f)
  report["seconds"] = time.time() - start
  report["command"] = " ".join(cmd[1:])
  report["batch_from"] = "checked at the batch per chip searched on a slice of the same chip" if searched else "searched"
  return report


def _failure(output: str) -> str:
  """The line saying why the compile mode failed: its `error:` line, or a crash (the compiler's
  segmentation fault) with the last compile that finished before it."""
  lines = output.strip().splitlines() or ["no output"]
  fatal = [line for line in lines if line.startswith(("error:", "Fatal Python error"))]
  if not fatal or fatal[0].startswith("error:"):
    return (fatal or lines)[-1]
  done = [line.strip() for line in lines if line.strip().startswith("[")]
  return f"{fatal[0]} in the next compile after {done[-1] if done else 'none'}"


def _searched_elsewhere(cells: dict, model: str, slice_name: str) -> dict | None:
  """{function: largest per-chip batch} of a searched cell of the same model and chip type."""
  chip = SLICES[slice_name].split(":")[0]
  for other, topology in SLICES.items():
    cell = cells.get(f"{model}/{other}")
    if (other != slice_name and topology.split(":")[0] == chip and cell and "error" not in cell
        and cell.get("batch_from", "searched") == "searched"):
      return {f: r.get("largest_batch", r)["per_chip_batch"] for f, r in cell["functions"].items()}
  return None


def markdown(cells: dict) -> str:
  lines = ["# Compile mode: TPU slices (largest global batch that fits, estimated images/s)", "",
           "Produced by `python -m benchmarks.tpu_slices` (the compile mode, libtpu "
           f"{_libtpu_version()}, on a CPU machine). Images/s are a roofline ESTIMATE from the chips' "
           "published peak bf16 FLOP/s and HBM bandwidth (dinomaly_jax/tpu_chips.py), not measurements; "
           "the batch is the largest the search found (a line through two compiles, checked by a compile; "
           "bisections where memory grows faster than the line, tries further up where it grows slower).", "",
           "| model | crop | slice (topology) | function | largest global batch (per chip) | memory per chip | "
           "GFLOP per image | est. images/s | bound |",
           "|---|---|---|---|---|---|---|---|---|"]
  footnotes = []
  for model in MODELS:
    for slice_name, topology in SLICES.items():
      cell = cells.get(f"{model}/{slice_name}")
      label = f"| {model} | {MODELS[model][1]} | {slice_name} ({topology}) "
      if cell is None:
        lines.append(label + "| train, eval | not compiled | | | | |")
        continue
      if "error" in cell:
        lines.append(label + f"| train, eval | {cell['error']} | | | | |")
        continue
      how = "" if cell.get("batch_from", "searched") == "searched" else " *"
      for function, r in cell["functions"].items():
        best = r.get("largest_batch", r)
        if "given_because" in r:
          footnotes.append(f"\u2020 {model} {function} on {slice_name}: {r['given_because']}")
        mem = best["memory_per_chip_gib"]
        mark = " \u2020" if "given_because" in r else how
        lines.append(label + f"| {function} | {best['global_batch']} ({best['per_chip_batch']}){mark} | "
                     f"{mem['total']:.2f} of {mem['hbm']:g} GiB | {best['gflop_per_image']:.0f} | "
                     f"{best['estimated_images_per_s']:,.0f} | {best['bound']} |")
  lines += ["", "\\* the largest batch per chip searched on the slice of the same chip type above, checked "
            "here by one compile per function (memory per chip does not depend on the number of chips).",
            *(["", *footnotes] if footnotes else []),
            "", "Compile time on this machine per cell (seconds): " + ", ".join(
                f"{k} {v['seconds']:.0f}" for k, v in cells.items() if "seconds" in v) + "."]
  return "\n".join(lines) + "\n"


def _libtpu_version() -> str:
  try:
    from importlib import metadata  # pylint: disable=import-outside-toplevel
    return metadata.version("libtpu")
  except Exception:  # pylint: disable=broad-except
    return "?"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="benchmarks/results")
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--slices", default=",".join(SLICES))
  parser.add_argument("--functions", default="train,eval", help="with --redo: compile only these again")
  parser.add_argument("--redo", action="store_true", help="compile cells already written again")
  parser.add_argument("--given", default="", help="FUNCTION=PER_CHIP: compile only that function at that "
                      "per-chip batch (no search), for one model and slice, with --because")
  parser.add_argument("--because", default="", help="with --given: why the search could not run (a footnote)")
  args = parser.parse_args(argv)
  functions = tuple(args.functions.split(","))
  given = None
  if args.given:
    function, per_chip = args.given.split("=")
    if "," in args.models + args.slices or not args.because:
      parser.error("--given needs one model, one slice and --because")
    given, functions, args.redo = {function: int(per_chip)}, (function,), True
  path = os.path.join(args.out, "tpu-slices.json")
  cells = json.load(open(path)) if os.path.exists(path) else {}
  for model in args.models.split(","):
    for slice_name in args.slices.split(","):
      key = f"{model}/{slice_name}"
      if key in cells and "error" not in cells[key] and not args.redo:
        continue
      with tempfile.TemporaryDirectory() as workdir:
        cell = run_cell(model, slice_name, workdir, given or _searched_elsewhere(cells, model, slice_name),
                        functions)
      if given and "error" not in cell:
        cell["functions"][function]["given_because"] = args.because
        cell["batch_from"] = cells.get(key, {}).get("batch_from", "searched")
      if key in cells and "error" not in cells[key] and "error" not in cell:  # keep the other functions
        cell["functions"] = {**cells[key]["functions"], **cell["functions"]}
        cell["seconds"] += cells[key]["seconds"]
      cells[key] = cell
      with open(path, "w") as f:
        json.dump(cells, f, indent=2)
      with open(os.path.join(args.out, "tpu-slices.md"), "w") as f:
        f.write(markdown(cells))


if __name__ == "__main__":
  main()
