"""Benchmark results: one console line per task, a JSON file and a Markdown report.

Times are medians of the timed calls with their [min-max]; ratios are baseline median /
JAX median (> 1: JAX faster) with the range of the pairings and "within noise" where the
two time ranges overlap; GFLOP/s = XLA's FLOP count of the call / its median time (the
same count is used for torch, which does the same work), next to the machine's matmul
rate at that thread count so that impossible figures stand out.
"""
import json

from benchmarks import timing

TARGETS = [("train", 1.2)]  # issue 15: the train step >= 1.2x the reference's
TORCH_NAMES = {"torch_reference": "torch eager, reference attention",
               "torch_sdpa": "torch eager, fused SDPA",
               "torch_compile": "torch.compile (SDPA)"}


def _summaries(row) -> dict:
  return {name: timing.summary(t) for name, t in row["seconds"].items() if t}


def row_line(row) -> str:
  s = _summaries(row)
  parts = [f"{row['task']:12s} {row['vit']:5s} {row['size']} b{row['batch']} t{row['threads']}"]
  for name, summ in s.items():
    parts.append(f"{name} {timing.fmt_seconds(summ)}s{_cores(row, name)}")
  if "jax" in s:
    for name, summ in s.items():
      if name.startswith("torch"):
        parts.append(f"{name}/jax {timing.fmt_ratio(timing.ratio(summ, s['jax']))}")
  parts += [f"error {k}: {v[:80]}" for k, v in row.get("errors", {}).items()]
  return "  ".join(parts) + f"  load {row['load_before']}->{row['load_after']}"


def _cores(row, name) -> str:
  """' (1.0 cores)': median CPU seconds / median wall seconds of the name's calls."""
  cpu = row.get("cpu_seconds", {}).get(name)
  if not cpu:
    return ""
  return f" ({timing.summary(cpu)['median'] / timing.summary(row['seconds'][name])['median']:.1f} cores)"


def _gflops(row, summ) -> str:
  return f"{row['gflop'] / summ['median']:.0f}"


def _load_range(rows) -> str:
  loads = [x for r in rows for x in (r["load_before"], r["load_after"])]
  return f"{min(loads)}-{max(loads)}" if loads else "-"


def markdown(facts: dict, rows) -> str:
  cores = facts["cpu_cores"]
  lines = [f"# Dinomaly-JAX benchmark, {facts['date']}", "",
           f"- Command: `{facts.get('command', 'python -m benchmarks.run')}`",
           f"- Hardware: {facts['cpu']}, {cores} cores, {facts['memory_gib']} GiB; JAX backend "
           f"{facts['jax_backend']}",
           f"- Versions: python {facts['python']}, jax {facts['jax']}, flax {facts['flax']}, "
           f"torch {facts.get('torch', '-')}",
           f"- Each figure: median [min-max] of {facts['repeats']} timed calls after a warm-up "
           "call. Ratio = torch median / JAX median "
           "(> 1: JAX faster), [range of the pairings]; \"within noise\" where the time ranges "
           "overlap.",
           "- Each implementation runs in its own process, one after another, confined to the "
           "same cores (sched_setaffinity before JAX or torch start; XLA sizes its thread pool "
           "from them), torch with torch.set_num_threads to that count. "
           "\"cores\" = median process CPU seconds / median wall seconds of the calls: the "
           "cores each implementation actually kept busy.",
           "- torch variants: " + "; ".join(f"`{k}` = {v}" for k, v in TORCH_NAMES.items()) +
           ". All do the reference's procedure (benchmarks/torch_dinomaly.py).",
           "- GFLOP/img from XLA's cost analysis of the JAX call (torch does the same work); "
           "GFLOP/s = GFLOP per call / median seconds.",
           f"- Wall time of the run: {facts.get('wall_s', '-')} s. The 1-minute load average "
           f"(runnable processes on {cores} cores) before/after each task is in the last column; "
           f"over the whole run: {_load_range(rows)}.", ""]
  for threads in sorted({r["threads"] for r in rows}):
    trows = [r for r in rows if r["threads"] == threads and r["task"] != "train_cached"]
    matmul = facts.get("matmul_gflops", {}).get(str(threads)) or facts.get(
        "matmul_gflops", {}).get(threads)
    impls = [n for n in TORCH_NAMES if any(n in r["seconds"] for r in trows)]
    lines += [f"## {threads} thread{'s' if threads > 1 else ''}", "",
              f"float32 1024^3 matmul GFLOP/s at this thread count: {matmul}", ""]
    header = ["task", "model", "size", "batch", "GFLOP/img", "JAX s", "JAX GFLOP/s"]
    for n in impls:
      header += [f"{n} s", f"{n} / JAX"]
    lines += ["| " + " | ".join(header + ["load before/after"]) + " |",
              "|" + "---|" * (len(header) + 1)]
    for r in trows:
      s = _summaries(r)
      cells = [r["task"], f"ViT-{r['vit']}", str(r["size"]), str(r["batch"]),
               f"{r['gflop'] / r['batch']:.1f}"]
      cells += ([timing.fmt_seconds(s["jax"]) + _cores(r, "jax"), _gflops(r, s["jax"])]
                if "jax" in s else ["-", "-"])
      for n in impls:
        if n in s and "jax" in s:
          cells += [f"{timing.fmt_seconds(s[n])}{_cores(r, n)}, {_gflops(r, s[n])} GFLOP/s",
                    timing.fmt_ratio(timing.ratio(s[n], s["jax"]))]
        else:
          cells += [r.get("errors", {}).get(n, "-")[:60], "-"]
      lines.append("| " + " | ".join(cells + [f"{r['load_before']} / {r['load_after']}"]) + " |")
    lines.append("")
  lines += _targets(rows) + _cached(rows)
  return "\n".join(lines) + "\n"


def _targets(rows) -> list:
  lines = ["## Targets", "", "| target | model | size | batch | threads | vs | ratio | met |",
           "|---|---|---|---|---|---|---|---|"]
  for task, minimum in TARGETS:
    for r in rows:
      s = _summaries(r)
      if r["task"] != task or "jax" not in s:
        continue
      for n in [n for n in TORCH_NAMES if n in s]:
        rt = timing.ratio(s[n], s["jax"])
        met = "yes" if rt["median"] >= minimum and not rt["within_noise"] else "NO"
        lines.append(f"| {task} >= {minimum}x | ViT-{r['vit']} | {r['size']} | {r['batch']} | "
                     f"{r['threads']} | {n} | {timing.fmt_ratio(rt)} | {met} |")
  return lines + [""]


def _cached(rows) -> list:
  cached = [r for r in rows if r["task"] == "train_cached"]
  if not cached:
    return []
  lines = ["## Cached encoder features vs images (JAX only)", "",
           "The cached-feature step skips the encoder forward; it is compared with the JAX "
           "image step of the same run, not with torch.", "",
           "| model | size | batch | threads | cached step s | image step s | speed-up |",
           "|---|---|---|---|---|---|---|"]
  for r in cached:
    image = [x for x in rows if x["task"] == "train" and all(
        x[k] == r[k] for k in ("vit", "size", "batch", "threads"))]
    c = timing.summary(r["seconds"]["jax_cached"])
    if image and image[0]["seconds"].get("jax"):
      i = timing.summary(image[0]["seconds"]["jax"])
      lines.append(f"| ViT-{r['vit']} | {r['size']} | {r['batch']} | {r['threads']} | "
                   f"{timing.fmt_seconds(c)} | {timing.fmt_seconds(i)} | "
                   f"{timing.fmt_ratio(timing.ratio(i, c))} |")
  return lines + [""]


def write(stem: str, facts: dict, rows) -> tuple[str, str]:
  with open(stem + ".json", "w") as f:
    json.dump({"facts": facts, "rows": rows}, f, indent=1)
  with open(stem + ".md", "w") as f:
    f.write(markdown(facts, rows))
  return stem + ".json", stem + ".md"


def main():
  """Re-renders the Markdown of a results JSON: python -m benchmarks.report <file.json>."""
  import sys  # pylint: disable=g-import-not-at-top
  if len(sys.argv) != 2 or not sys.argv[1].endswith(".json"):
    raise SystemExit("usage: python -m benchmarks.report <results.json>")
  with open(sys.argv[1]) as f:
    data = json.load(f)
  print("Wrote", *write(sys.argv[1][:-len(".json")], data["facts"], data["rows"]))


if __name__ == "__main__":
  main()
