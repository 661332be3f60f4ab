"""The per-class metric table: printed, and written as report.json / .csv / .md.

Values are fractions in JSON (NaN as null) and percent in the tables. The mean row
is over the classes where a metric is defined (NaN classes are listed). Where the
dataset has published numbers (`reference_results`), a published row and our
difference to it follow the mean.
"""
import csv
import io
import json
import math

from dinomaly_jax import storage
from dinomaly_jax.evaluation import inspection as inspection_lib
from dinomaly_jax.evaluation import reference_results
from dinomaly_jax.evaluation.metrics import METRIC_NAMES

MEAN = "mean"


def _mean(per_class: dict[str, dict[str, float]], name: str) -> float:
  values = [v[name] for v in per_class.values() if not math.isnan(v[name])]
  return sum(values) / len(values) if values else math.nan


def table_rows(result: dict) -> list[tuple[str, list[float]]]:
  """(label, percent values) for every table row."""
  rows = [(name, [100 * v[m] for m in METRIC_NAMES]) for name, v in result["classes"].items()]
  rows.append((MEAN, [100 * result["mean"][m] for m in METRIC_NAMES]))
  if result["published"]:
    published = [100 * result["published"]["mean"][m] for m in METRIC_NAMES]
    rows.append(("published", published))
    rows.append(("difference", [ours - p for ours, p in zip(rows[-2][1], published)]))
  return rows


def format_value(v: float) -> str:
  """A metric in percent as the tables show it: two decimals, "-" when undefined."""
  return "-" if math.isnan(v) else f"{v:.2f}"


RANDOM_ENCODER_NOTE = ("NOTE: this model uses a RANDOM encoder (no pretrained weights): the numbers "
                       "below show that the pipeline works, not what Dinomaly reaches.")


def _warnings(result: dict) -> list[str]:
  return [RANDOM_ENCODER_NOTE] if result["extra"].get("random_encoder") else []


def format_table(result: dict) -> str:
  """Aligned plain-text table (percent) with a title line."""
  rows = [(label, [format_value(v) for v in values]) for label, values in table_rows(result)]
  width = max(len(label) for label, _ in rows + [("class", [])])
  col = max(len(m) for m in METRIC_NAMES) + 1
  lines = [*_warnings(result), title(result),
           "class".ljust(width) + "".join(m.rjust(col) for m in METRIC_NAMES)]
  for label, values in rows:
    if label == MEAN:
      lines.append("-" * (width + col * len(METRIC_NAMES)))
    lines.append(label.ljust(width) + "".join(v.rjust(col) for v in values))
  return "\n".join(lines + notes(result))


def title(result: dict) -> str:
  step = "" if result["step"] is None else f", step {result['step']}"
  return f"Evaluation ({result['dataset'] or 'custom dataset'}{step}), metrics in percent"


def notes(result: dict) -> list[str]:
  notes = []
  undefined = {m: [c for c, v in result["classes"].items() if math.isnan(v[m])] for m in METRIC_NAMES}
  for m, names in undefined.items():
    if names:
      notes.append(f"{m} undefined (one class of label only) for: {', '.join(names)}")
  if result["published"]:
    p = result["published"]
    notes.append(f"published: {p['source']}; mean over {p['dataset_classes']} classes, "
                 f"this run has {len(result['classes'])}")
  return notes


def _markdown(result: dict) -> str:
  lines = [f"## {title(result)}", "", *(f"**{n}**\n" for n in _warnings(result)),
           "| class | " + " | ".join(METRIC_NAMES) + " |",
           "|---|" + "---:|" * len(METRIC_NAMES)]
  for label, values in table_rows(result):
    bold = label in (MEAN, "published", "difference")
    cells = [format_value(v) for v in values]
    label = f"**{label}**" if bold else label
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  text = "\n".join(lines + [""] + [f"- {n}" for n in notes(result)]) + "\n"
  if result.get("inspection"):
    text += "\n" + inspection_lib.markdown(result["inspection"])
  return text


def _json_safe(x):
  if isinstance(x, float) and math.isnan(x):
    return None
  if isinstance(x, dict):
    return {k: _json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_safe(v) for v in x]
  return x


def write_report(workdir: str, per_class: dict[str, dict[str, float]], *, dataset: str | None,
                 extra: dict | None = None, step: int | None = None,
                 inspection: dict | None = None) -> dict:
  """Adds the mean row, prints the table, writes report.{json,csv,md} into workdir; returns the dict.

  `inspection`: {class: inspection.class_results(...)}, added to the JSON and markdown.
  """
  if not per_class:
    raise ValueError("write_report: no classes were evaluated (the test set is empty).")
  for name, values in per_class.items():
    missing = [m for m in METRIC_NAMES if m not in values]
    if missing:
      raise ValueError(f"write_report: class {name!r} lacks metrics {missing}.")
  classes = {c: {m: float(v[m]) for m in METRIC_NAMES} for c, v in per_class.items()}
  means = reference_results.published_means(dataset, classes)
  published = None if means is None else {
      "source": reference_results.SOURCE, "mean": {m: v / 100 for m, v in means.items()},
      "dataset_classes": len(reference_results.CLASSES[dataset])}
  result = {"dataset": dataset, "step": step, "metrics": list(METRIC_NAMES), "classes": classes,
            "mean": {m: _mean(classes, m) for m in METRIC_NAMES}, "published": published,
            "extra": dict(extra or {}), "inspection": dict(inspection or {})}
  print("\n".join([format_table(result), *inspection_lib.summary_lines(result["inspection"])]), flush=True)
  storage.write_shared(storage.join(workdir, "report.json"), json.dumps(_json_safe(result), indent=2))
  table = io.StringIO(newline="")
  writer = csv.writer(table)
  writer.writerow(["class", *METRIC_NAMES])
  for label, values in table_rows(result):
    writer.writerow([label, *("" if math.isnan(v) else f"{v:.4f}" for v in values)])
  storage.write_shared(storage.join(workdir, "report.csv"), table.getvalue())
  storage.write_shared(storage.join(workdir, "report.md"), _markdown(result))
  return result
