"""The package's shape: no import circle, no module over 400 lines, no
function body over 60 lines (docstrings aside). Read from the source (ast),
so the checks cost nothing and see imports inside functions too."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'mkor_optax'
MODULES = sorted(p.stem for p in PACKAGE.glob('*.py'))


def imports_of(name: str) -> set:
  """The package modules that ``mkor_optax/<name>.py`` imports, anywhere in it."""
  tree = ast.parse((PACKAGE / f'{name}.py').read_text())
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module:
      if node.module == 'mkor_optax':
        out.update(a.name for a in node.names if a.name in MODULES)
      elif node.module.startswith('mkor_optax.'):
        out.add(node.module.split('.')[1])
    elif isinstance(node, ast.Import):
      out.update(a.name.split('.')[1] for a in node.names if a.name.startswith('mkor_optax.'))
  out.discard(name)
  return out


def test_no_import_circle():
  graph = {m: imports_of(m) - {'__init__'} for m in MODULES if m != '__init__'}
  state = {}

  def visit(m, trail):
    if state.get(m) == 'done':
      return
    if state.get(m) == 'open':
      cycle = trail[trail.index(m):] + [m]
      pytest.fail('import circle: ' + ' -> '.join(cycle))
    state[m] = 'open'
    for n in sorted(graph[m]):
      visit(n, trail + [m])
    state[m] = 'done'

  for m in graph:
    visit(m, [])
  assert 'kronecker' in graph['mkor'] and 'mkor' not in graph['kronecker']  # the test sees edges


@pytest.mark.parametrize('name', MODULES)
def test_module_and_function_sizes(name):
  source = (PACKAGE / f'{name}.py').read_text()
  assert len(source.splitlines()) <= 400, f'{name}.py has {len(source.splitlines())} lines'
  long = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      body = node.body
      if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], 'value', None),
                                                               ast.Constant):
        body = body[1:]  # the docstring
      if body:
        lines = body[-1].end_lineno - body[0].lineno + 1
        if lines > 60:
          long.append(f'{node.name} ({lines} lines)')
  assert not long, f'{name}.py: function bodies over 60 lines: {long}'
