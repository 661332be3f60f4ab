"""report.html: one self-contained page of an evaluation (images embedded, no scripts).

Sections: the metric table against the published numbers; the decisions at the
calibrated threshold, per defect type, and the pixel metrics under both mask
conventions (inspection.py); per class the score histogram with the thresholds drawn
and the ROC and PR curves, then three image strips: the false positives (normal test
images at or above the threshold, highest first; only real ones), the missed defects (defective images below the
threshold, lowest first) and the best detections. Each image shows the input with the
ground truth outlined in green, and the heatmap on the class's fixed colour scale with
the region at or above the threshold outlined in white. Images are base64 PNG / JPEG
data URIs, so the single file can be mailed.
"""
import base64
import html
import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

from dinomaly_jax import storage
from dinomaly_jax.evaluation import inspection as inspection_lib
from dinomaly_jax.evaluation import pictures
from dinomaly_jax.evaluation import report
from dinomaly_jax.evaluation.calibration import ClassCalibration

HTML_FILE = "report.html"
_GREEN, _WHITE = (40, 230, 60), (255, 255, 255)
_TEXT = ' class="text"'  # a left-aligned table cell


def _data_uri(array_uint8: np.ndarray, fmt: str = "JPEG") -> str:
  buf = io.BytesIO()
  Image.fromarray(array_uint8).save(buf, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
  mime = "jpeg" if fmt == "JPEG" else "png"
  return f"data:image/{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _figure_uri(fig) -> str:
  buf = io.BytesIO()
  FigureCanvasAgg(fig)
  fig.savefig(buf, format="png", dpi=80)
  return f"data:image/png;base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def tile(image_uint8, mask, amap, cal: ClassCalibration) -> np.ndarray:
  """(S, S, 3) image, (S, S) ground truth, (S, S) map -> (S, 2S, 3): input | heatmap."""
  image = np.asarray(image_uint8)
  vmin, vmax = cal.heat_range()
  heat = pictures.overlay(image, np.asarray(amap), vmin, vmax)
  return np.concatenate([pictures.outline(image, np.asarray(mask) > 0, _GREEN),
                         pictures.outline(heat, np.asarray(amap) >= cal.threshold, _WHITE)], axis=1)


def strip_choices(scores, labels, threshold: float, k: int) -> dict[str, list[int]]:
  """Indices of the three strips (at most k each), in the order they are shown."""
  scores, labels = np.asarray(scores), np.asarray(labels) > 0
  normal, anomalous = np.flatnonzero(~labels), np.flatnonzero(labels)
  missed = anomalous[scores[anomalous] < threshold]
  flagged = normal[scores[normal] >= threshold]
  return {
      "false positives (normal images at or above the threshold, highest first)":
          [int(i) for i in flagged[np.argsort(-scores[flagged], kind="stable")][:k]],
      "missed defects (below the threshold, lowest scores)":
          [int(i) for i in missed[np.argsort(scores[missed], kind="stable")][:k]],
      "best detections (defective images, highest scores)":
          [int(i) for i in anomalous[np.argsort(-scores[anomalous], kind="stable")][:k]],
  }


def class_view(name: str, names, scores, labels, maps, masks, cal: ClassCalibration,
               f1_threshold: float, k: int, display) -> dict:
  """The HTML pieces of one class (small: only the chosen images are kept).

  names: (N,) image names shown; maps, masks: (N, S, S); display(i) -> (S, S, 3) uint8.
  """
  fig = pictures.score_figure(name, scores, labels, {"calibrated threshold": cal.threshold,
                                                      "F1-optimal (test labels)": f1_threshold})
  strips = []
  for title, chosen in strip_choices(scores, labels, cal.threshold, k).items():
    images = [{"uri": _data_uri(tile(display(i), masks[i], maps[i], cal)), "name": str(names[i]),
               "score": float(cal.normalise(scores[i])), "raw": float(scores[i]),
               "flagged": bool(scores[i] >= cal.threshold)} for i in chosen]
    strips.append((title, images))
  return {"name": name, "figure": _figure_uri(fig), "strips": strips,
          "heat_range": cal.heat_range(), "threshold": cal.threshold}


def _colour_bar_uri() -> str:
  ramp = np.round(255 * pictures.CMAP(np.linspace(0, 1, 256))[:, :3]).astype(np.uint8)  # (256, 3)
  return _data_uri(np.repeat(ramp[None], 14, axis=0), "PNG")


def _table(header, rows, bold=()) -> str:
  head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
  body = []
  for row in rows:
    cls = ' class="bold"' if row[0] in bold else ""
    cells = [f"<td{'' if _is_number(c) else _TEXT}>{html.escape(str(c))}</td>" for c in row]
    body.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
  return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _is_number(cell) -> bool:
  try:
    float(cell)
    return True
  except ValueError:
    return cell == "-"


def _class_section(view: dict) -> str:
  parts = [f'<section class="cls"><h3 id="class-{html.escape(view["name"])}">{html.escape(view["name"])}</h3>',
           f'<img class="fig" alt="scores of {html.escape(view["name"])}" src="{view["figure"]}">',
           f'<p class="small">heatmap scale: {view["heat_range"][0]:.4g} (blue) .. threshold '
           f'{view["threshold"]:.4g} (mid) .. {view["heat_range"][1]:.4g} (red)</p>']
  for title, images in view["strips"]:
    parts.append(f"<h4>{html.escape(title)}</h4>")
    if not images:
      parts.append('<p class="small">none</p>')
      continue
    cells = []
    for im in images:
      flag = "anomalous" if im["flagged"] else "normal"
      cells.append(f'<figure><img alt="{html.escape(im["name"])}" src="{im["uri"]}">'
                   f'<figcaption><b>{im["score"]:.2f}</b> normalised ({flag}), raw {im["raw"]:.4g}'
                   f'<br>{html.escape(im["name"])}</figcaption></figure>')
    parts.append(f'<div class="strip">{"".join(cells)}</div>')
  parts.append("</section>")
  return "\n".join(parts)


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px; color: #222; max-width: 1400px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ccc; }
h3 { font-size: 16px; margin-top: 28px; } h4 { font-size: 14px; margin: 14px 0 6px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0 16px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; white-space: nowrap; }
th:first-child, td:first-child, td.text { text-align: left; }
th { background: #f2f2f2; } tr.bold td { font-weight: bold; background: #fafafa; }
.note { background: #fff3cd; border: 1px solid #e0c36a; padding: 8px 12px; }
.small { font-size: 12px; color: #555; }
.fig { max-width: 100%; }
.strip { display: flex; flex-wrap: wrap; gap: 10px; }
figure { margin: 0; font-size: 11px; max-width: 360px; }
figure img { width: 360px; height: auto; display: block; image-rendering: auto; }
figcaption { word-break: break-all; }
"""


def write(out_dir: str, result: dict, views: list[dict]) -> str:
  """Writes <out_dir>/report.html from write_report's result and the class views."""
  title = report.title(result)
  metric_rows = [[label, *(report.format_value(v) for v in values)] for label, values in report.table_rows(result)]
  ins = result.get("inspection") or {}
  body = [f"<h1>{html.escape(title)}</h1>"]
  if result["extra"].get("random_encoder"):
    body.append(f'<p class="note">{html.escape(report.RANDOM_ENCODER_NOTE)}</p>')
  body += ["<h2>Metrics (percent)</h2>",
           _table(["class", *result["metrics"]], metric_rows, bold=(report.MEAN, "published", "difference"))]
  body += [f'<p class="small">{html.escape(n)}</p>' for n in report.notes(result)]
  if ins:
    body += ["<h2>Decisions at the calibrated threshold</h2>",
             '<p class="small">Anomalous = score at or above the threshold (normalised score &ge; 1: '
             "0 is the median normal image, 1 the threshold). FPR: share of normal test images flagged; "
             "recall: share of defective ones. The F1-optimal columns choose the threshold with the test "
             "labels: a comparison, not a deployable setting.</p>",
             f'<p class="small">{html.escape(inspection_lib.GUARANTEE_NOTE)}</p>',
             *(f'<p class="note">{html.escape(w)}</p>' for w in inspection_lib.warnings(ins)),
             _table(inspection_lib.DECISION_HEADER, inspection_lib.decision_rows(ins)),
             "<h2>Per defect type</h2>",
             _table(inspection_lib.DEFECT_HEADER, inspection_lib.defect_rows(ins)),
             "<h2>Pixel metrics under both ground-truth conventions</h2>",
             '<p class="small">&gt; 0: mask pixels above zero after the bilinear resize (the '
             "reference's, as published); &ge; 0.5: at least half the mask value.</p>",
             _table(inspection_lib.PIXEL_HEADER, inspection_lib.pixel_rows(ins))]
  if views:
    body += ["<h2>Per class</h2>",
             f'<p class="small">Heatmap colours, fixed per class (never per image): '
             f'<img alt="colour scale" src="{_colour_bar_uri()}" style="vertical-align: middle; width: 256px; height: 14px">'
             " blue = the median pixel of normal calibration images, the middle = the threshold, red = as far "
             "above it. Left of each pair: the input with the ground truth outlined in green; right: the "
             "heatmap with the region at or above the threshold outlined in white.</p>"]
    body += [_class_section(v) for v in views]
  page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
          f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
          + "\n".join(body) + "\n</body></html>\n")
  path = storage.join(out_dir, HTML_FILE)
  storage.write_shared(path, page)
  return path
