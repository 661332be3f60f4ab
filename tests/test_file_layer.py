"""`storage.py` is the only file layer: no module of the package opens, lists or tests a path
on its own, since any of them may be a gs:// or s3:// URL.

Read with `ast` like the import-layer test: a call of the builtin `open`, of `os.path.*` (but
the pure string function `splitext`), of `os` file functions, `shutil`, `glob` or `etils.epath`
outside storage.py is a finding, unless its line says `# host-local: <why>` (a file that is
this host's by nature: /proc/meminfo, the local cache, a temporary folder).
"""
import ast
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "dinomaly_jax"
EXEMPT = {
    "dinomaly_jax/storage.py": "the file layer itself",
    "dinomaly_jax/inference/exported_model.py": "the export's loader imports nothing of the package",
    "dinomaly_jax/inference/onnx_predictor.py": "the predictor without JAX imports nothing of the package",
}
MARKER = "# host-local:"
OS_FILE_FUNCTIONS = {"listdir", "walk", "scandir", "makedirs", "mkdir", "remove", "unlink", "rename",
                     "replace", "stat", "rmdir"}
PURE_PATH_FUNCTIONS = {"splitext"}
MODULES = {"shutil", "glob", "epath"}


def _dotted(node) -> str:
  parts = []
  while isinstance(node, ast.Attribute):
    parts.append(node.attr)
    node = node.value
  if isinstance(node, ast.Name):
    parts.append(node.id)
  return ".".join(reversed(parts))


def _is_file_call(name: str) -> bool:
  parts = name.split(".")
  if name == "open":
    return True
  if parts[:2] == ["os", "path"]:
    return len(parts) == 3 and parts[2] not in PURE_PATH_FUNCTIONS
  if parts[0] == "os":
    return len(parts) == 2 and parts[1] in OS_FILE_FUNCTIONS
  return parts[0] in MODULES


def findings(path: pathlib.Path) -> list[str]:
  source = path.read_text()
  lines = source.splitlines()
  out = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Call) and _is_file_call(_dotted(node.func)):
      if MARKER not in lines[node.lineno - 1]:
        out.append(f"{path.relative_to(ROOT)}:{node.lineno}: {_dotted(node.func)}(...)")
  return out


def test_only_storage_touches_files():
  found = [f for path in sorted(PACKAGE.rglob("*.py"))
           if str(path.relative_to(ROOT)) not in EXEMPT for f in findings(path)]
  assert not found, "use dinomaly_jax.storage (or mark a file of this host '# host-local: why'):\n" + \
      "\n".join(found)


def test_the_check_finds_what_it_looks_for(tmp_path):
  sample = tmp_path / "sample.py"
  sample.write_text("import os\nimport shutil\nfrom etils import epath\n"
                    "open('a')\nos.path.isdir('b')\nos.listdir('c')\nshutil.copy('d', 'e')\n"
                    "epath.Path('f')\nos.path.splitext('g')\nopen('/proc/meminfo')  # host-local: why\n")
  assert [f.split(": ")[1] for f in findings_in(sample)] == [
      "open(...)", "os.path.isdir(...)", "os.listdir(...)", "shutil.copy(...)", "epath.Path(...)"]


def findings_in(path: pathlib.Path) -> list[str]:
  """findings() for a file outside the repository (the paths are shown relative to its folder)."""
  global ROOT
  root, ROOT = ROOT, path.parent
  try:
    return findings(path)
  finally:
    ROOT = root


def test_importing_storage_leaves_fsspec_alone_until_a_url_is_opened():
  code = ("import fsspec\nfrom dinomaly_jax import storage\nprint(fsspec.config.conf.get('gs'))\n"
          "storage.as_path('gs://bucket/x')\nprint(fsspec.config.conf['gs'])")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                        env={k: v for k, v in os.environ.items() if not k.startswith("FSSPEC")})
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.splitlines() == ["None", "{'use_listings_cache': False}"]


def test_only_the_primary_process_writes_shared_files(tmp_path, monkeypatch):
  from dinomaly_jax import storage  # pylint: disable=g-import-not-at-top
  storage.write_shared(str(tmp_path / "a.txt"), "primary")
  storage.write_shared_with(str(tmp_path / "b.bin"), lambda f: f.write(b"primary"))
  monkeypatch.setattr(storage.jax, "process_index", lambda: 1)
  assert not storage.is_primary()
  storage.write_shared(str(tmp_path / "c.txt"), "secondary")
  storage.write_shared_with(str(tmp_path / "d.bin"), lambda f: f.write(b"secondary"))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin"]
