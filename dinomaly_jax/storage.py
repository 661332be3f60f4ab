"""The one file layer: every path is a local path or a URL (gs://, s3://), through etils.epath.

Without TensorFlow, epath reaches gs:// through gcsfs and s3:// through s3fs (the `cloud`
extra); orbax (checkpoints) uses epath and tensorstore itself. Paths stay plain strings in
the rest of the package; this module is the only place that opens, lists or writes them.

Shared files on a pod: no host may assume it sees another host's disk, and two hosts
never write the same object. One rule decides who writes them: `is_primary()` (process 0).
`write_shared` has the primary process write atomically (a temporary file renamed over the
target locally; one object PUT on an object store, which readers see whole or not at all) and,
given a barrier name, makes every process wait there before anyone reads it (`barrier`: the
coordination service's, so hosts may arrive far apart).
"""
import contextlib
import glob as glob_lib
import io
import itertools
import os
import posixpath
import shutil
import uuid

from etils import epath
import fsspec
import jax
from jax._src import distributed as jax_distributed  # the coordination service's client

URL_SCHEMES = ("gs://", "s3://")
SYNC_TIMEOUT_MS = 3_600_000  # a host may be an hour behind (downloading, converting weights)
_sync_ids = itertools.count()  # every process passes the same barriers in the same order
_captures = []  # the {path: bytes} of the open captured_writes blocks, innermost last
_own_shares = []  # non-empty inside own_share_writes blocks (any thread)

_fsspec_configured = False


def _configure_fsspec() -> None:
  """Before the first URL is opened: other hosts write to the same buckets, so fsspec must
  never answer exists/list from a cached listing (set once, not at import)."""
  global _fsspec_configured
  if not _fsspec_configured:
    for protocol in ("gs", "gcs", "s3", "s3a"):
      fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)
    _fsspec_configured = True


def is_url(path) -> bool:
  return str(path).startswith(URL_SCHEMES)


def as_path(path) -> epath.Path:
  if is_url(path):
    _configure_fsspec()
  return epath.Path(path)


def is_primary() -> bool:
  """Whether this process writes the files every process shares, and speaks for the job on
  the console: process 0. The one place that rule is decided."""
  return jax.process_index() == 0


def join(*parts) -> str:
  """os.path.join for local paths, "/"-joining for URLs."""
  if is_url(parts[0]):
    return posixpath.join(*map(str, parts))
  return os.path.join(*map(str, parts))


def _pathmod(path):
  return posixpath if is_url(path) else os.path


def dirname(path) -> str:
  return _pathmod(path).dirname(str(path))


def basename(path) -> str:
  return _pathmod(path).basename(str(path))


def normpath(path) -> str:
  """A local path normalised (no "..", ".", trailing separator); a URL without a trailing "/"."""
  return str(path).rstrip("/") if is_url(path) else os.path.normpath(path)


def relpath(path, start) -> str:
  """`path` relative to the folder `start` (both local, or both URLs)."""
  if is_url(path):
    start = str(start).rstrip("/") + "/"
    if not str(path).startswith(start):
      raise ValueError(f"{path} is not under {start}")
    return str(path)[len(start):].rstrip("/")
  return os.path.relpath(path, start or os.curdir)


def parts(path) -> list[str]:
  """The folder names and file name of a path ("gs://b/x/y.png" -> ["gs:", "b", "x", "y.png"])."""
  if is_url(path):
    return [p for p in str(path).split("/") if p]
  return os.path.normpath(path).split(os.sep)


def common_folder(paths: list[str]) -> str:
  """The deepest folder holding every one of `paths` (files; all local or all URLs)."""
  if not is_url(paths[0]):
    return os.path.dirname(paths[0]) if len(paths) == 1 else os.path.commonpath(paths)
  common = paths[0].split("/")[:-1]
  for path in paths[1:]:
    folder = path.split("/")[:-1]
    n = 0
    while n < min(len(common), len(folder)) and common[n] == folder[n]:
      n += 1
    common = common[:n]
  return "/".join(common)


def absolute(path) -> str:
  """A URL unchanged; a local path made absolute (orbax wants absolute paths)."""
  return str(path) if is_url(path) else os.path.abspath(path)


def exists(path) -> bool:
  return as_path(path).exists() if is_url(path) else os.path.exists(path)


def isdir(path) -> bool:
  return as_path(path).is_dir() if is_url(path) else os.path.isdir(path)


def isfile(path) -> bool:
  if not is_url(path):
    return os.path.isfile(path)
  p = as_path(path)
  return p.exists() and not p.is_dir()


def size(path) -> int:
  return as_path(path).stat().length if is_url(path) else os.path.getsize(path)


def listdir(folder) -> list[str]:
  """The names (not paths) of a folder's entries, sorted."""
  if not is_url(folder):
    return sorted(os.listdir(folder))
  return sorted(p.name for p in as_path(folder).iterdir())


def free_bytes(folder) -> int | None:
  """The bytes free on the disk of a local folder (or of its nearest existing parent); None for
  a URL (an object store has no disk to fill)."""
  if is_url(folder):
    return None
  path = os.path.abspath(folder)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return shutil.disk_usage(path).free


def makedirs(path) -> None:
  """Creates a local folder (and parents); object stores need none."""
  if not is_url(path):
    os.makedirs(path, exist_ok=True)


def read_text(path) -> str:
  return as_path(path).read_text()


def read_bytes(path) -> bytes:
  return as_path(path).read_bytes()


def read_tail(path, n: int) -> bytes:
  """The last `n` bytes of a file (all of it if shorter)."""
  with as_path(path).open("rb") as f:
    f.seek(max(0, size(path) - n))
    return f.read()


def write_bytes(path, data: bytes) -> None:
  """This process writes `path` atomically: readers see the old content or the new one, never
  a part. For this host's own files and single-process tools; files of the job go through
  write_shared."""
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


def append_text(path, text: str) -> None:
  """Appends to a local file and flushes it to the disk (rows that survive a kill). Object
  stores cannot append: callers write part files there (inference/prediction_csv.py)."""
  if is_url(path):
    raise ValueError(f"append_text: {path} is a URL; objects cannot be appended.")
  makedirs(os.path.dirname(str(path)) or ".")
  with open(path, "a", encoding="utf-8", newline="") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())


def remove(path) -> None:
  """Deletes a file (local or URL); a missing file is no error (nor is a delete that an object
  store carried out but whose reply was lost: its retry finds nothing to delete)."""
  try:
    as_path(path).unlink()
  except FileNotFoundError:
    pass


def _coordination_client():
  """jax.distributed's client, or None in a single-process job."""
  return jax_distributed.global_state.client if jax.process_count() > 1 else None


def barrier(name: str) -> None:
  """Every process waits here until all have arrived. The coordination service's barrier,
  not a device collective: hosts may arrive far apart (one still converting weights)."""
  client = _coordination_client()
  if client is not None:
    client.wait_at_barrier(f"dinomaly/{next(_sync_ids)}/{name}", SYNC_TIMEOUT_MS)


def primary_decides(value: bool) -> bool:
  """The primary process's `value` on every process: a decision several hosts must share
  (does this file exist yet?) is taken once, never on each host. Call it on every process."""
  client = _coordination_client()
  if client is None:
    return bool(value)
  key = f"dinomaly/{next(_sync_ids)}/decision"
  if is_primary():
    client.key_value_set(key, "1" if value else "0")
  return client.blocking_key_value_get(key, SYNC_TIMEOUT_MS) == "1"


def write_shared(path, data: bytes | str, barrier_name: str | None = None) -> None:
  """A file of the job (work directory, predictions, export): the primary process writes
  `path` atomically, the others write nothing.

  With a barrier_name, every process returns only once the file is there (call it on every
  process); without one, the others return at once (files no process reads back in the run).
  Inside `captured_writes`, every process keeps the file instead.
  """
  data = data.encode() if isinstance(data, str) else data
  if _captures:
    if barrier_name is not None:
      raise ValueError(f"write_shared({path}): no barrier inside captured_writes")
    _captures[-1][str(path)] = data
    return
  if _own_shares and barrier_name is not None:
    raise ValueError(f"write_shared({path}): no barrier inside own_share_writes")
  if is_primary() or _own_shares:
    write_bytes(path, data)
  if barrier_name is not None:
    barrier(barrier_name)


def write_shared_with(path, write_fn, barrier_name: str | None = None) -> None:
  """write_shared of what write_fn(file object) writes (encoded only where it is kept)."""
  write_shared(path, encoded(write_fn) if is_primary() or _captures or _own_shares else b"", barrier_name)


@contextlib.contextmanager
def own_share_writes():
  """Inside (on every thread), write_shared writes on every process: the job's files that each
  process makes for its own share of the work, under names no other process uses (prediction's
  heatmaps of the images it scored)."""
  _own_shares.append(True)
  try:
    yield
  finally:
    _own_shares.pop()


@contextlib.contextmanager
def captured_writes():
  """Inside, the job's files (write_shared) are kept as {path: bytes} on any process instead of
  written: work one host does for the job, whose files the primary process writes afterwards
  (write_captured) once they have reached it."""
  files = {}
  _captures.append(files)
  try:
    yield files
  finally:
    _captures.pop()


def write_captured(files: dict[str, bytes]) -> None:
  """The primary process writes files kept by captured_writes (on this or another process)."""
  for path, data in files.items():
    write_shared(path, data)


def encoded(write_fn) -> bytes:
  """The bytes write_fn(file object) writes into an in-memory buffer (matplotlib, numpy and
  PIL need a seekable file)."""
  buf = io.BytesIO()
  write_fn(buf)
  return buf.getvalue()


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


def walk_files(folder: str, *, skip_hidden: bool = False) -> list[str]:
  """Every file under `folder`, recursively, sorted within each folder; skip_hidden leaves
  out files and folders whose name starts with "." (".DS_Store", ".git")."""
  keep = (lambda name: not name.startswith(".")) if skip_hidden else (lambda name: True)
  if not is_url(folder):
    found = []
    for parent, dirs, files in os.walk(folder):
      dirs[:] = sorted(d for d in dirs if keep(d))
      found += [os.path.join(parent, f) for f in sorted(files) if keep(f)]
    return found
  files, dirs = [], []
  for child in sorted(as_path(folder).iterdir(), key=lambda p: p.name):
    if keep(child.name):
      (dirs if child.is_dir() else files).append(str(child))
  return files + [f for d in dirs for f in walk_files(d, skip_hidden=skip_hidden)]


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
