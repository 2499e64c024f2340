"""The package layout's invariants, read from the source with `ast` (nothing is imported):

* no import cycle among our own modules (internvl_jax/, kernels/), counting function-level imports too;
* a function-level import of one of our modules says why, in a comment on its line or the line above;
* no source file over MAX_LINES lines.

The import graph's builder is itself tested on small synthetic trees written into tmp_path.
"""
from __future__ import annotations

import ast
import collections
import io
import pathlib
import tokenize

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("internvl_jax", "kernels")
MAX_LINES = 500

Import = collections.namedtuple("Import", "src dst path line end_line in_function")


def module_files(root: pathlib.Path, packages=PACKAGES) -> dict[str, pathlib.Path]:
  """Dotted module name -> file, for every .py under the packages; a package is named by its __init__.py."""
  files = {}
  for package in packages:
    for path in sorted((root / package).rglob("*.py")):
      parts = path.relative_to(root).with_suffix("").parts
      if parts[-1] == "__init__":
        parts = parts[:-1]
      files[".".join(parts)] = path
  return files


def _is_type_checking(test: ast.expr) -> bool:
  return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
      isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
  """(node, in_function) for every Import / ImportFrom, skipping `if TYPE_CHECKING:` bodies (never run)."""
  def walk(node, in_function):
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.Import, ast.ImportFrom)):
        yield child, in_function
      elif isinstance(child, ast.If) and _is_type_checking(child.test):
        for grandchild in child.orelse:
          yield from walk(ast.Module(body=[grandchild], type_ignores=[]), in_function)
      else:
        yield from walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))
  yield from walk(tree, False)


def _known(name: str, modules) -> str | None:
  """The longest prefix of a dotted name that is one of our modules (`import a.b.c` binds to a.b.c)."""
  parts = name.split(".")
  for n in range(len(parts), 0, -1):
    if ".".join(parts[:n]) in modules:
      return ".".join(parts[:n])
  return None


def resolve(node: ast.Import | ast.ImportFrom, src: str, is_package: bool, modules) -> list[str]:
  """Our modules that one import statement in module `src` loads, as edges of the graph.

  `from a.b import c` is an edge to module a.b.c when c is a submodule (file or package) and to a.b
  otherwise (c is then a name defined in, or re-exported by, a/b/__init__.py); relative forms resolve
  against src's package first.
  """
  if isinstance(node, ast.Import):
    return [m for m in (_known(alias.name, modules) for alias in node.names) if m]
  if node.level:
    package = src.split(".") if is_package else src.split(".")[:-1]
    if node.level - 1 > len(package) - 1:
      return []  # beyond the top-level package: not ours
    base_parts = package[:len(package) - (node.level - 1)]
    base = ".".join(base_parts + ([node.module] if node.module else []))
  else:
    base = node.module or ""
  targets = []
  for alias in node.names:
    sub = f"{base}.{alias.name}"
    target = sub if alias.name != "*" and sub in modules else _known(base, modules)
    if target and target not in targets:
      targets.append(target)
  return targets


def collect_imports(root: pathlib.Path, packages=PACKAGES) -> list[Import]:
  files = module_files(root, packages)
  imports = []
  for src, path in files.items():
    tree = ast.parse(path.read_text(), filename=str(path))
    for node, in_function in _import_nodes(tree):
      for dst in resolve(node, src, path.name == "__init__.py", files):
        if dst != src:  # a package's `from . import name` of its own names, or a harmless self-import
          imports.append(Import(src, dst, path.relative_to(root), node.lineno, node.end_lineno, in_function))
  return imports


def import_graph(imports) -> dict[str, set[str]]:
  graph = collections.defaultdict(set)
  for imp in imports:
    graph[imp.src].add(imp.dst)
  return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Cycles [a, b, ..., a], each starting at its smallest module: inside every strongly connected component
  (Tarjan) of more than one module, the shortest cycle through each of its modules, without repeats."""
  index, low, on_stack, stack, components = {}, {}, set(), [], []
  nodes = sorted(set(graph) | {d for ds in graph.values() for d in ds})

  def strongconnect(v):  # recursive; our graph has a few hundred nodes at most
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        strongconnect(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      components.append(set(component))

  for v in nodes:
    if v not in index:
      strongconnect(v)
  cycles = set()
  for component in components:
    for start in sorted(component) if len(component) > 1 else ():
      parent, queue = {}, collections.deque([start])  # BFS inside the component back to start
      while queue:
        v = queue.popleft()
        if start in graph.get(v, ()):
          path = [v]
          while path[-1] != start:
            path.append(parent[path[-1]])
          path = path[::-1]
          k = path.index(min(path))
          cycles.add(tuple(path[k:] + path[:k]))
          break
        for w in sorted(graph.get(v, ()) & component):
          if w not in parent and w != start:
            parent[w] = v
            queue.append(w)
  return sorted(list(c) + [c[0]] for c in cycles)


def describe(cycles, imports) -> str:
  where = collections.defaultdict(list)
  for imp in imports:
    where[imp.src, imp.dst].append(f"{imp.path}:{imp.line}" + (" (in a function)" if imp.in_function else ""))
  lines = []
  for cycle in cycles:
    lines.append(" -> ".join(cycle))
    lines += [f"    {a} -> {b}: {', '.join(where[a, b])}" for a, b in zip(cycle, cycle[1:])]
  return "\n".join(lines)


def comment_lines(path: pathlib.Path) -> set[int]:
  tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
  return {tok.start[0] for tok in tokens if tok.type == tokenize.COMMENT}


def uncommented_function_imports(root: pathlib.Path, packages=PACKAGES) -> list[str]:
  """Function-level imports of our modules with no `#` comment on their lines or the line above."""
  offenders, comments = [], {}
  seen = set()
  for imp in collect_imports(root, packages):
    if not imp.in_function or (imp.path, imp.line) in seen:
      continue
    seen.add((imp.path, imp.line))
    if imp.path not in comments:
      comments[imp.path] = comment_lines(root / imp.path)
    if not comments[imp.path] & set(range(imp.line - 1, imp.end_line + 1)):
      source = (root / imp.path).read_text().splitlines()[imp.line - 1].strip()
      offenders.append(f"{imp.path}:{imp.line}: {source}")
  return offenders


def long_files(root: pathlib.Path, packages=PACKAGES, max_lines: int = MAX_LINES) -> list[str]:
  return [f"{path.relative_to(root)}: {n} lines" for path in module_files(root, packages).values()
          if (n := len(path.read_text().splitlines())) > max_lines]


# ------------------------------------------------------------------------------------------ the real tree

def test_no_import_cycles():
  imports = collect_imports(REPO)
  cycles = find_cycles(import_graph(imports))
  assert not cycles, f"{len(cycles)} import cycle(s) among our modules:\n{describe(cycles, imports)}"


def test_function_level_imports_say_why():
  offenders = uncommented_function_imports(REPO)
  print("\n".join(offenders))
  assert not offenders, ("function-level imports of our modules need a `#` comment saying why, on their line or "
                         "the line above:\n" + "\n".join(offenders))


def test_no_file_over_max_lines():
  offenders = long_files(REPO)
  assert not offenders, f"files over {MAX_LINES} lines:\n" + "\n".join(offenders)


def test_the_real_tree_is_seen():
  """Guards the checks above against passing vacuously (wrong root, nothing parsed)."""
  imports = collect_imports(REPO)
  modules = module_files(REPO)
  assert {"internvl_jax", "internvl_jax.model.pixel_shuffle", "kernels.gmm"} <= set(modules)
  assert ("internvl_jax.model.projector", "internvl_jax.model.pixel_shuffle") in {(i.src, i.dst) for i in imports}


# ------------------------------------------------------------------------------ the checker, on synthetic trees

def write_tree(root: pathlib.Path, files: dict[str, str]):
  for name, text in files.items():
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


BASE_TREE = {
    "pkg/__init__.py": "from pkg.sub.leaf import f\nfrom pkg import util\n",
    "pkg/util.py": "import os\n\ndef helper():\n  return 1\n",
    "pkg/sub/__init__.py": "from .leaf import f\n",
    "pkg/sub/leaf.py": "from pkg import util  # a submodule: an edge to pkg.util, not to pkg/__init__\n"
                       "from pkg.util import helper\n\ndef f():\n  return helper()\n",
    "pkg/sub/other.py": "from . import leaf\nfrom .. import util\nfrom ..sub.leaf import f\nimport pkg.sub.leaf as L\n",
    "lib/__init__.py": "",
    "lib/a.py": "import numpy\n",
}


def edges(root, packages=("pkg", "lib")):
  return {(i.src, i.dst) for i in collect_imports(root, packages)}


def test_resolution_of_absolute_relative_and_package_forms(tmp_path):
  write_tree(tmp_path, BASE_TREE)
  assert edges(tmp_path) == {
      ("pkg", "pkg.sub.leaf"), ("pkg", "pkg.util"),
      ("pkg.sub", "pkg.sub.leaf"),
      ("pkg.sub.leaf", "pkg.util"),
      ("pkg.sub.other", "pkg.sub.leaf"), ("pkg.sub.other", "pkg.util"),
  }
  assert find_cycles(import_graph(collect_imports(tmp_path, ("pkg", "lib")))) == []


def test_a_function_level_import_that_closes_a_cycle_is_found(tmp_path):
  tree = dict(BASE_TREE)
  tree["pkg/util.py"] += "\ndef late():\n  from pkg.sub import other\n  return other\n"
  write_tree(tmp_path, tree)
  imports = collect_imports(tmp_path, ("pkg", "lib"))
  cycles = find_cycles(import_graph(imports))
  assert cycles == [["pkg.sub.leaf", "pkg.util", "pkg.sub.other", "pkg.sub.leaf"],
                    ["pkg.sub.other", "pkg.util", "pkg.sub.other"]]
  message = describe(cycles, imports)
  assert "pkg/util.py:7 (in a function)" in message and "pkg/sub/other.py:2" in message
  with pytest.raises(AssertionError, match="pkg.sub.other -> pkg.util -> pkg.sub.other"):
    assert not cycles, describe(cycles, imports)


def test_importing_a_name_re_exported_by_the_package_is_a_cycle(tmp_path):
  """`from pkg import f` (f defined by pkg/__init__.py, not a submodule) really does load pkg/__init__."""
  tree = dict(BASE_TREE)
  tree["pkg/util.py"] = "from pkg import f\n"
  write_tree(tmp_path, tree)
  cycles = find_cycles(import_graph(collect_imports(tmp_path, ("pkg", "lib"))))
  assert cycles == [["pkg", "pkg.sub.leaf", "pkg.util", "pkg"], ["pkg", "pkg.util", "pkg"]]


def test_three_module_cycle_and_no_self_edges(tmp_path):
  write_tree(tmp_path, {"lib/__init__.py": "", "lib/a.py": "from lib import b\n", "lib/b.py": "import lib.c\n",
                        "lib/c.py": "def g():\n  from lib.a import x\n", "lib/d.py": "def h():\n  import lib.d\n"})
  cycles = find_cycles(import_graph(collect_imports(tmp_path, ("lib",))))
  assert cycles == [["lib.a", "lib.b", "lib.c", "lib.a"]]


def test_type_checking_imports_are_not_edges(tmp_path):
  write_tree(tmp_path, {"lib/__init__.py": "", "lib/a.py": "from lib import b\n",
                        "lib/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n  from lib import a\n"})
  assert find_cycles(import_graph(collect_imports(tmp_path, ("lib",)))) == []


def test_function_level_comment_rule(tmp_path):
  write_tree(tmp_path, {
      "lib/__init__.py": "",
      "lib/a.py": "x = 1\n",
      "lib/b.py": ("def ok1():\n  from lib import a  # avoids a cycle\n"
                   "def ok2():\n  # heavy: only when asked\n  from lib import a\n"
                   "def bad():\n  from lib import a\n"
                   "def external():\n  import json\n"),
  })
  assert uncommented_function_imports(tmp_path, ("lib",)) == ["lib/b.py:7: from lib import a"]


def test_long_file_rule(tmp_path):
  write_tree(tmp_path, {"lib/__init__.py": "", "lib/a.py": "x = 1\n" * 501, "lib/b.py": "x = 1\n" * 500})
  assert long_files(tmp_path, ("lib",)) == ["lib/a.py: 501 lines"]
