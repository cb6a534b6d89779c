"""The package's import structure: no cycles, and `cgl_jax.losses` stands alone.

The graph is read from the sources with `ast` (every `import cgl_jax...` and
`from cgl_jax... import ...`, also inside functions), so it covers lazy imports too.
"""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'cgl_jax'


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _import_graph() -> dict[str, set[str]]:
  """{module: the cgl_jax modules it imports}, for every module of the package."""
  modules = {_module_name(path): path for path in PACKAGE.rglob('*.py')}
  graph = {}
  for name, path in modules.items():
    imported = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        imported.update(alias.name for alias in node.names)
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        # `from cgl_jax.kernels import cpu` imports the module cgl_jax.kernels.cpu.
        imported.update(f'{node.module}.{alias.name}' if f'{node.module}.{alias.name}' in modules
                        else node.module for alias in node.names)
    graph[name] = {module for module in imported
                   if module in modules and module != name}
  return graph


def _cycle(graph):
  """A list of modules forming a cycle, or None."""
  state = {}  # 1: on the current path, 2: done

  def visit(node, path):
    state[node] = 1
    for successor in sorted(graph[node]):
      if state.get(successor) == 1:
        return path[path.index(successor):] + [successor]
      if successor not in state:
        found = visit(successor, path + [successor])
        if found:
          return found
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node, [node])
      if found:
        return found
  return None


def test_the_graph_reader_sees_known_edges_and_finds_a_cycle():
  graph = _import_graph()
  assert 'cgl_jax.losses' in graph['cgl_jax.kernels']
  assert 'cgl_jax.kernels.xla' in graph['cgl_jax.kernels.pallas']
  assert 'cgl_jax.kernels.cpu' in graph['cgl_jax.kernels']  # a lazy import
  assert _cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']


def test_the_package_has_no_import_cycle():
  assert _cycle(_import_graph()) is None


def test_losses_and_the_package_root_import_nothing_of_cgl_jax():
  graph = _import_graph()
  assert graph['cgl_jax.losses'] == set()
  assert graph['cgl_jax'] == set()
  assert graph['cgl_jax.kernels.xla'] == set()
