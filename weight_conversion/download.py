"""Fetching the official DINOv2 checkpoints by name (vits14, vitb14_reg4, ...)."""
import os
import pathlib
import urllib.error
import urllib.request

import tqdm

OFFICIAL_BASE_URL = "https://dl.fbaipublicfiles.com/dinov2"
BASE_URL_ENV = "DINOMALY_DINOV2_BASE_URL"  # overrides OFFICIAL_BASE_URL (mirrors, tests)
DEFAULT_CACHE_DIR = pathlib.Path.home() / ".cache" / "dinomaly_jax" / "dinov2"
OFFICIAL_POS_GRID = 37  # the published models are built at img_size 518
# name -> (vit variant, registers); the file is dinov2_{arch}/dinov2_{name}_pretrain.pth
OFFICIAL_MODELS = {
    f"vit{letter}14{suffix}": (vit, registers)
    for letter, vit in (("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant"))
    for suffix, registers in (("", 0), ("_reg4", 4))
}
_CHUNK = 1 << 20


class DownloadError(RuntimeError):
  """A download that could not be completed; names the URL."""


def official_url(name: str, base_url: str | None = None) -> str:
  if name not in OFFICIAL_MODELS:
    raise DownloadError(f"Unknown DINOv2 model {name!r}; expected one of {', '.join(OFFICIAL_MODELS)}.")
  base = (base_url or os.environ.get(BASE_URL_ENV) or OFFICIAL_BASE_URL).rstrip("/")
  arch = name.split("_")[0]
  return f"{base}/dinov2_{arch}/dinov2_{name}_pretrain.pth"


def download_official(name: str, cache_dir, base_url: str | None = None) -> pathlib.Path:
  """Downloads the official checkpoint `name` into `cache_dir` (reused if present)."""
  url = official_url(name, base_url)
  target = pathlib.Path(cache_dir) / url.rsplit("/", 1)[1]
  if target.is_file():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  partial = target.with_name(target.name + ".part")
  try:
    with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as f:
      size = int(response.headers.get("Content-Length") or 0) or None
      with tqdm.tqdm(total=size, unit="B", unit_scale=True, desc=target.name) as progress:
        while chunk := response.read(_CHUNK):
          f.write(chunk)
          progress.update(len(chunk))
    received = partial.stat().st_size
    if size is not None and received != size:
      raise DownloadError(f"Download of {url} stopped after {received} of {size} bytes.")
  except (urllib.error.URLError, OSError) as e:
    partial.unlink(missing_ok=True)
    raise DownloadError(f"Cannot download {url}: {e}. Without network access, download the file "
                        "elsewhere and run --checkpoint FILE.") from None
  except DownloadError:
    partial.unlink(missing_ok=True)
    raise
  partial.rename(target)
  return target
