"""The import graph of ``vit_jax``, read from the source with ``ast`` (nothing imported).

Every import counts, those inside functions too: a cycle there is a layering knot
even when it happens to run. ``from a import b`` is an edge to the module ``a.b`` when
there is one, else to ``a``.
"""

import ast
import functools
import os

from helpers import REPO

PACKAGE = os.path.join(REPO, "vit_jax")
# Edges known to break a rule, each with the change that removes it. An entry whose
# edge is gone fails the test: delete it then.
# Edges a cycle may keep for now, each with the reason.
ALLOWED = {
    # timm's API, models.create(name, pretrained=True): the models package hands the
    # download and conversion to the weights package, which builds models. The import
    # is inside create/load_pretrained/list_pretrained, so importing either package
    # alone never needs the other first; breaking it would mean moving create().
    ("vit_jax.models", "vit_jax.weights.pretrained"),
}
# Modules that read PyTorch weights: TensorFlow must not load with them (the two
# abort when imported into one process).
TORCH_READERS = ("vit_jax.weights", "vit_jax.models")


@functools.lru_cache(maxsize=None)
def _modules() -> dict[str, str]:
  """Module name -> file, for every module under vit_jax/."""
  found = {}
  for root, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(root, name)
        parts = os.path.relpath(path, REPO)[:-3].split(os.sep)
        if parts[-1] == "__init__":
          parts.pop()
        found[".".join(parts)] = path
  return found


@functools.lru_cache(maxsize=None)
def _parse(path: str) -> ast.Module:
  with open(path, encoding="utf-8") as f:
    return ast.parse(f.read(), path)


def _imports(module: str, path: str, modules, *, top_level_only: bool = False):
  """(vit_jax modules, other top-level packages) that ``module`` imports."""
  tree = _parse(path)
  package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
  nodes = (tree.body if top_level_only else ast.walk(tree))
  inner, outer = set(), set()

  def target(name: str) -> None:
    while name and name not in modules:
      name = name.rpartition(".")[0]
    if name and name != module:
      inner.add(name)

  for node in nodes:
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.split(".")[0] == "vit_jax":
          target(alias.name)
        else:
          outer.add(alias.name.split(".")[0])
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                        + ([base] if base else []))
      if base.split(".")[0] != "vit_jax":
        outer.add(base.split(".")[0])
        continue
      for alias in node.names:
        full = f"{base}.{alias.name}"
        target(full if full in modules else base)
  return inner, outer


def _graph(**kwargs) -> dict[str, set[str]]:
  modules = _modules()
  return {m: _imports(m, path, modules, **kwargs)[0] for m, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[tuple[list[str], list[str]]]:
  """Per knot of mutually importing modules: a cycle through it (a path back to its
  start) and all its modules."""
  index, low, stack, on_stack, knots = {}, {}, [], set(), []

  def connect(v):  # Tarjan's algorithm
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        connect(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      knot = set()
      while True:
        w = stack.pop()
        on_stack.discard(w)
        knot.add(w)
        if w == v:
          break
      if len(knot) > 1:
        knots.append(knot)

  for v in sorted(graph):
    if v not in index:
      connect(v)
  cycles = []
  for knot in knots:  # shortest way round from the knot's first module
    start = min(knot)
    paths = {start: [start]}
    frontier = [start]
    while frontier and "found" not in paths:
      nxt = []
      for v in frontier:
        for w in sorted(graph[v] & knot):
          if w == start:
            paths["found"] = paths[v] + [start]
            break
          if w not in paths:
            paths[w] = paths[v] + [w]
            nxt.append(w)
      frontier = nxt
    cycles.append((paths["found"], sorted(knot)))
  return cycles


def test_no_import_cycles_and_kernels_stay_below_models():
  graph = _graph()
  for a, b in ALLOWED:
    assert b in graph[a], f"{a} no longer imports {b}: delete it from ALLOWED"
    graph[a].discard(b)
  cycles = _cycles(graph)
  assert not cycles, "import cycles:\n" + "\n".join(
      f"{' -> '.join(path)} (in one knot: {', '.join(knot)})"
      for path, knot in cycles)
  upward = sorted((a, b) for a, targets in graph.items() for b in targets
                  if a.startswith("vit_jax.kernels") and b.startswith("vit_jax.models"))
  assert not upward, f"vit_jax.kernels imports vit_jax.models: {upward}"


def test_the_cycle_finder_reports_the_path():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e", "d"}}
  assert _cycles(graph) == [(["a", "b", "c", "a"], ["a", "b", "c"])]


def test_reading_pytorch_weights_never_loads_tensorflow():
  modules = _modules()
  imports = {m: _imports(m, p, modules, top_level_only=True) for m, p in modules.items()}
  for start in sorted(m for m in modules if m.startswith(TORCH_READERS)):
    seen, todo = {start}, [[start]]
    while todo:
      path = todo.pop()
      inner, outer = imports[path[-1]]
      assert not outer & {"tensorflow", "tensorflow_datasets"}, (
          " -> ".join(path) + " imports TensorFlow at import time")
      for m in inner - seen:
        seen.add(m)
        todo.append(path + [m])
