"""The project's import graph: no cycles, and dependencies that point one way.

Every import is read with `ast`, including those inside functions, so a lazy import
cannot hide a cycle. Layers (a module may import its own layer and those below):
  0 utilities     dinomaly_jax.errors, dinomaly_jax.sharding, dinomaly_jax.storage,
                  dinomaly_jax.compiler_options, dinomaly_jax.platforms,
                  dinomaly_jax.tpu_chips
  1 foundations   dinomaly_jax.models, dinomaly_jax.data
  2 setup         dinomaly_jax.config, dinomaly_jax.weights
  3 evaluation    dinomaly_jax.evaluation
  4 training      dinomaly_jax.training
  5 inference     dinomaly_jax.inference, dinomaly_jax.planning
  6 entry points  dinomaly_jax.main, dinomaly_jax.run, dinomaly_jax.command_line, the data CLIs, weight_conversion, configs
  7 dev tools     benchmarks, tests
"""
import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("dinomaly_jax", "weight_conversion", "benchmarks", "configs", "tests")
LAYERS = [  # (module prefix, layer); the longest matching prefix wins
    ("dinomaly_jax.errors", 0), ("dinomaly_jax.sharding", 0), ("dinomaly_jax.storage", 0),
    ("dinomaly_jax.compiler_options", 0), ("dinomaly_jax.platforms", 0),
    ("dinomaly_jax.tpu_chips", 0),
    ("dinomaly_jax.models", 1), ("dinomaly_jax.data", 1),
    ("dinomaly_jax.config", 2), ("dinomaly_jax.weights", 2),
    ("dinomaly_jax.evaluation", 3), ("dinomaly_jax.training", 4), ("dinomaly_jax.inference", 5),
    ("dinomaly_jax.planning", 5),
    ("dinomaly_jax.main", 6), ("dinomaly_jax.run", 6), ("dinomaly_jax.command_line", 6), ("dinomaly_jax.data.pack", 6),
    ("dinomaly_jax.data.visa_prepare", 6), ("weight_conversion", 6), ("configs", 6),
    ("benchmarks", 7), ("tests", 7),
]


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def project_modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _package_of(name: str, path: pathlib.Path) -> str:
  return name if path.name == "__init__.py" else name.rpartition(".")[0]


def imports_of(name: str, path: pathlib.Path, modules) -> set[str]:
  """The project modules that `name` imports, anywhere in the file."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      candidates = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        package = _package_of(name, path).split(".")
        base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
      # `from a.b import c`: the module a.b.c if there is one, else a.b (c is a name in it)
      candidates = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in node.names]
    else:
      continue
    for candidate in candidates:
      while candidate and candidate not in modules:  # `import a.b.c` also imports a.b and a
        candidate = candidate.rpartition(".")[0]
      if candidate and candidate != name:
        found.add(candidate)
  return found


def import_graph() -> dict[str, set[str]]:
  modules = project_modules()
  return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as [a, b, ..., a], or None."""
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state and (cycle := visit(nxt)):
        return cycle
    state[node] = "done"
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state and (cycle := visit(node)):
      return cycle
  return None


def layer(name: str) -> int:
  matches = [(len(prefix), rank) for prefix, rank in LAYERS
             if name == prefix or name.startswith(prefix + ".")]
  assert matches, f"{name} is in no layer: add it to LAYERS in {__file__}"
  return max(matches)[1]


def test_no_import_cycle():
  cycle = find_cycle(import_graph())
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_dependencies_point_down_the_layers():
  wrong = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
           for a, targets in import_graph().items() for b in targets if layer(b) > layer(a)]
  assert not wrong, "\n".join(wrong)


def test_errors_module_imports_nothing():
  tree = ast.parse((ROOT / "dinomaly_jax" / "errors.py").read_text())
  assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]


def test_the_checker_finds_a_cycle_hidden_in_a_function(tmp_path):
  """The checker itself: a lazy import inside a function still closes a cycle."""
  a = tmp_path / "a.py"
  a.write_text("import b\n")
  b = tmp_path / "b.py"
  b.write_text("def f():\n  from a import x\n")  # x: a name in module a
  modules = {"a": a, "b": b}
  graph = {n: imports_of(n, p, modules) for n, p in modules.items()}
  assert find_cycle(graph) == ["a", "b", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("module", ["dinomaly_jax.errors", "dinomaly_jax.models.structure"])
def test_light_modules_do_not_pull_in_the_stack(module):
  """errors and the structure validator load without jax, flax or the stages."""
  code = (f"import sys, {module}; heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
          "('jax', 'flax', 'orbax', 'torch') or m.startswith('dinomaly_jax.training')); print(heavy)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
  assert out.stdout.strip() == "[]"
