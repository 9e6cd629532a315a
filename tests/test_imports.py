"""The package's import graph has no circle: every `spdfq_jax` import of every module, those
inside functions included, read from the source (ast), so a circle that only closes at run
time is found too."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "spdfq_jax"


def _modules() -> dict[str, str]:
  """Dotted module name -> path of every module of the package (a package: its __init__)."""
  out = {}
  for dirpath, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].split(os.sep)
        out[".".join(rel[:-1] if rel[-1] == "__init__" else rel)] = os.path.join(dirpath, f)
  return out


def import_graph() -> dict[str, set[str]]:
  """Module -> the package's modules it imports. `from a.b import c` counts as an import of
  a.b.c when that is a module, else of a.b; the parent packages Python also runs on an
  import are left out (an __init__ that re-exports is a facade, not a dependency)."""
  modules = _modules()
  graph = {}
  for name, path in modules.items():
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    deps = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        deps.update(a.name for a in node.names if a.name in modules)
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        for a in node.names:
          full = f"{node.module}.{a.name}"
          if full in modules:
            deps.add(full)
          elif node.module in modules:
            deps.add(node.module)
    deps.discard(name)
    graph[name] = deps
  return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_the_checker_finds_a_circle():
  assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  assert circles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_lazy_imports():
  graph = import_graph()
  assert "spdfq_jax.synth.plots" in graph["spdfq_jax.synth.generate"]  # imported in a function
  assert "spdfq_jax.synth.objective" in graph["spdfq_jax.synth.plots"]


def test_no_import_circle_in_the_package():
  assert circles(import_graph()) == []
