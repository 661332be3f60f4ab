"""Benchmark results: one console line per figure, a JSON file and a Markdown table."""
import dataclasses
import json
import sys


@dataclasses.dataclass
class Row:
  """One benchmark figure: JAX seconds per call next to its baseline's."""
  task: str
  vit: str
  size: int
  batch: int
  jax_s: float
  torch_s: float | None
  compile_s: float
  jax_rss_growth_mib: float
  torch_rss_growth_mib: float | None
  jax_device_peak_mib: float | None
  baseline: str = "torch"  # what `ratio` compares against
  all_seconds: dict | None = None  # every timed call, per framework

  @property
  def ratio(self) -> float | None:
    return None if self.torch_s is None else self.torch_s / self.jax_s


# Issue 7's CPU targets: (task, minimum ratio, input size or None for all sizes).
TARGETS = [("attention_auto", 1.0, 392), ("encoder", 1.0, 392), ("train", 1.2, None), ("cached_vs_uncached", 2.0, None),
           ("e2e_cached_vs_images", 2.0, None)]
CACHED_TASKS = {
    "cached_vs_uncached": "train step, batch in memory",
    "e2e_cached_vs_images": "train step incl. data loading (PNG pipeline vs cache)",
}


def _fmt(x, digits=3):
  return "-" if x is None else f"{x:.{digits}g}"


def row_line(row) -> str:
  ratio = "" if row.ratio is None else f"  x{row.ratio:.2f} vs {row.baseline}"
  other = "" if row.torch_s is None else f"  {row.baseline} {row.torch_s:.4g}s"
  return (f"{row.task:18s} {row.vit:5s} {row.size} b{row.batch:<3d} jax {row.jax_s:.4g}s "
          f"({row.batch / row.jax_s:.3g} img/s){other}{ratio}  compile {row.compile_s:.1f}s")


def _as_dict(row) -> dict:
  d = dataclasses.asdict(row)
  d["ratio"] = row.ratio
  d["jax_images_per_s"] = row.batch / row.jax_s
  d["baseline_images_per_s"] = None if row.torch_s is None else row.batch / row.torch_s
  return d


def markdown(facts: dict, rows) -> str:
  lines = [f"# Dinomaly-JAX benchmark, {facts['date']}", "",
           f"- Hardware: {facts['cpu']}, {facts['cpu_cores']} cores, {facts['memory_gib']} GiB; "
           f"JAX backend {facts['jax_backend']} ({', '.join(sorted(set(facts['devices'])))})",
           f"- Versions: python {facts['python']}, jax {facts['jax']}, flax {facts['flax']}, "
           f"torch {facts.get('torch', '-')} (timed with {facts.get('torch_threads', '-')} "
           "intra-op threads, the faster kept per call)",
           f"- float32 matmul 1024^3 GFLOP/s: {facts.get('matmul_gflops')}",
           f"- Fastest of {facts['repeats']} calls after a warm-up (JSON: every call); JAX and "
           f"torch calls alternate. Ratio = baseline time / JAX time (> 1: JAX faster). Wall time "
           f"{facts['wall_s']} s.",
           "- RSS growth: peak resident memory during the first (warm-up) call minus the "
           "resident memory before it (freed heap returned to the OS first). train_cached's "
           "torch figures are the torch image train step (the twin has no cache).", ""]
  lines += ["## Targets", "", "| target | model | size | batch | ratio | met |", "|---|---|---|---|---|---|"]
  for task, minimum, size in TARGETS:
    for r in rows:
      if r.task == task and (size is None or r.size == size) and r.ratio is not None:
        lines.append(f"| {task} >= {minimum}x | ViT-{r.vit} | {r.size} | {r.batch} | "
                     f"{r.ratio:.2f}x | {'yes' if r.ratio >= minimum else 'NO'} |")
  lines += ["", "## JAX vs PyTorch", "",
            "| task | model | size | batch | JAX s | JAX img/s | torch s | torch img/s | ratio "
            "| JAX compile s | RSS growth MiB JAX / torch | device peak MiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if r.baseline != "torch":
      continue
    torch_ips = None if r.torch_s is None else r.batch / r.torch_s
    lines.append(
        f"| {r.task} | ViT-{r.vit} | {r.size} | {r.batch} | {_fmt(r.jax_s)} | "
        f"{_fmt(r.batch / r.jax_s)} | {_fmt(r.torch_s)} | {_fmt(torch_ips)} | "
        f"{_fmt(r.ratio)} | {r.compile_s:.1f} | {_fmt(r.jax_rss_growth_mib, 5)} / "
        f"{_fmt(r.torch_rss_growth_mib, 5)} | {_fmt(r.jax_device_peak_mib, 5)} |")
  cached = [r for r in rows if r.task in CACHED_TASKS]
  if cached:
    lines += ["", "## Cached encoder features vs images (JAX)", "",
              "Caching removes the encoder forward (and image loading) from each step; the "
              "decoder's forward and backward remain, so the step speed-up is bounded by "
              "1 / (1 - encoder share of the image step); with data loading, image decoding "
              "adds to the image step.", "",
              "| measured | model | size | batch | cached s/step | images s/step | speed-up "
              "| encoder fwd s (share) | bound | cache build s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in cached:
      build = f"{r.compile_s:.1f}" if r.task == "e2e_cached_vs_images" else "-"
      encoder = [e for e in rows if (e.task, e.vit, e.size, e.batch) == ("encoder", r.vit, r.size,
                                                                        r.batch)]
      share = encoder[0].jax_s / r.torch_s if encoder and r.task == "cached_vs_uncached" else None
      profile = "-" if share is None else f"{encoder[0].jax_s:.3g} ({share:.0%})"
      bound = "-" if share is None or share >= 1 else f"{1 / (1 - share):.2f}x"
      lines.append(f"| {CACHED_TASKS[r.task]} | ViT-{r.vit} | {r.size} | {r.batch} | "
                   f"{_fmt(r.jax_s)} | {_fmt(r.torch_s)} | {r.ratio:.2f}x | {profile} | {bound} "
                   f"| {build} |")
  return "\n".join(lines) + "\n"


def write(stem: str, facts: dict, rows) -> tuple[str, str]:
  with open(stem + ".json", "w") as f:
    json.dump({"facts": facts, "rows": [_as_dict(r) for r in rows]}, f, indent=1)
  with open(stem + ".md", "w") as f:
    f.write(markdown(facts, rows))
  return stem + ".json", stem + ".md"


def main():
  """Re-renders the Markdown of a results JSON: python -m benchmarks.report <file.json>."""
  if len(sys.argv) != 2 or not sys.argv[1].endswith(".json"):
    raise SystemExit("usage: python -m benchmarks.report <results.json>")
  with open(sys.argv[1]) as f:
    data = json.load(f)
  fields = {f.name for f in dataclasses.fields(Row)}
  rows = [Row(**{k: v for k, v in r.items() if k in fields}) for r in data["rows"]]
  print("Wrote", *write(sys.argv[1][:-len(".json")], data["facts"], rows))


if __name__ == "__main__":
  main()
