"""The one file layer: every path is a local path or a URL (gs://, s3://), through etils.epath.

Without TensorFlow, epath reaches gs:// through gcsfs and s3:// through s3fs (the `cloud`
extra); orbax (checkpoints) uses epath and tensorstore itself. Paths stay plain strings in
the rest of the package; this module is the only place that opens, lists or writes them.

Shared files on a pod: no host may assume it sees another host's disk, and two hosts
never write the same object. `write_shared` has process 0 write atomically (a temporary
file renamed over the target locally; one object PUT on an object store, which readers see
whole or not at all) and makes every process wait at a barrier before anyone reads it.
"""
import glob as glob_lib
import io
import os
import posixpath
import shutil
import uuid

from etils import epath
import fsspec
import jax
from jax.experimental import multihost_utils

URL_SCHEMES = ("gs://", "s3://")

# Other hosts write to the same buckets: never answer exists/list from a cached listing.
for _protocol in ("gs", "gcs", "s3", "s3a"):
  fsspec.config.conf.setdefault(_protocol, {}).setdefault("use_listings_cache", False)


def is_url(path) -> bool:
  return str(path).startswith(URL_SCHEMES)


def as_path(path) -> epath.Path:
  return epath.Path(path)


def join(*parts) -> str:
  """os.path.join for local paths, "/"-joining for URLs."""
  if is_url(parts[0]):
    return posixpath.join(*map(str, parts))
  return os.path.join(*map(str, parts))


def absolute(path) -> str:
  """A URL unchanged; a local path made absolute (orbax wants absolute paths)."""
  return str(path) if is_url(path) else os.path.abspath(path)


def exists(path) -> bool:
  return as_path(path).exists()


def isdir(path) -> bool:
  return as_path(path).is_dir()


def isfile(path) -> bool:
  p = as_path(path)
  return p.exists() and not p.is_dir()


def size(path) -> int:
  return as_path(path).stat().length


def makedirs(path) -> None:
  """Creates a local folder (and parents); object stores need none."""
  if not is_url(path):
    os.makedirs(path, exist_ok=True)


def read_text(path) -> str:
  return as_path(path).read_text()


def read_bytes(path) -> bytes:
  return as_path(path).read_bytes()


def write_bytes(path, data: bytes) -> None:
  """Writes atomically: readers see the old content or the new one, never a part."""
  if is_url(path):
    as_path(path).write_bytes(data)  # one object PUT
    return
  makedirs(os.path.dirname(str(path)) or ".")
  tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def write_text(path, text: str) -> None:
  write_bytes(path, text.encode())


def write_shared(path, data: bytes | str, barrier: str) -> None:
  """Process 0 writes `path` atomically; every process returns once it is there."""
  if jax.process_index() == 0:
    write_bytes(path, data.encode() if isinstance(data, str) else data)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(barrier)


def buffered_writer(path, write_fn) -> None:
  """Calls write_fn(file object) on an in-memory buffer, then writes it atomically to path.

  For writers that need a seekable file (matplotlib, numpy) on any storage.
  """
  buf = io.BytesIO()
  write_fn(buf)
  write_bytes(path, buf.getvalue())


def glob(pattern: str) -> list[str]:
  """Paths matching a glob pattern (`**` allowed for local paths)."""
  if not is_url(pattern):
    return glob_lib.glob(pattern, recursive=True)
  parts = pattern.split("/")
  first = next((i for i, p in enumerate(parts) if any(c in p for c in "*?[")), None)
  if first is None:  # a plain path
    return [pattern] if exists(pattern) else []
  root = as_path("/".join(parts[:first]))
  return [str(p) for p in root.glob("/".join(parts[first:]))]


def walk_files(folder: str) -> list[str]:
  """Every file under `folder`, recursively."""
  if not is_url(folder):
    return [os.path.join(d, f) for d, _, files in os.walk(folder) for f in files]
  out = []
  for child in as_path(folder).iterdir():
    if child.is_dir():
      out.extend(walk_files(str(child)))
    else:
      out.append(str(child))
  return out


def copy_tree(src: str, dst: str) -> None:
  """Copies every file under src to the same relative path under dst."""
  for f in walk_files(src):
    rel = posixpath.relpath(f, src) if is_url(src) else os.path.relpath(f, src)
    write_bytes(join(dst, rel), read_bytes(f))


def local_cache_dir() -> str:
  """This host's cache folder ($DINOMALY_JAX_CACHE, default ~/.cache/dinomaly_jax)."""
  return os.environ.get("DINOMALY_JAX_CACHE", os.path.expanduser("~/.cache/dinomaly_jax"))


def make_local_once(folder: str, fill_fn) -> str:
  """Creates the local folder `folder` with fill_fn(tmp_folder) unless it is there already.

  Any number of processes on one host may call it at once: each fills its own temporary
  folder and renames it into place; the first rename wins, the others are discarded.
  """
  if os.path.isdir(folder):
    return folder
  tmp = f"{folder}.tmp-{uuid.uuid4().hex[:8]}"
  fill_fn(tmp)
  try:
    os.rename(tmp, folder)
  except OSError:  # another process got there first
    shutil.rmtree(tmp, ignore_errors=True)
  return folder
