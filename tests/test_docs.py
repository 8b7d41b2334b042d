"""The documentation runs as printed: every public name has an API entry and a
docstring example that runs (doctest), and every code block of the Getting
started page runs, one after the other, as a reader would paste them."""

import contextlib
import doctest
import inspect
import io
import pathlib
import re

import numpy as np
import pytest

import mkor_optax

DOCS = pathlib.Path(__file__).resolve().parent.parent / 'docs'


def python_blocks(page):
  return re.findall(r'```python\n(.*?)```', (DOCS / page).read_text(), re.S)


def public_objects():
  """Every name of ``mkor_optax.__all__`` (the ``nnx`` module by its public
  names), and the functions of ``mkor_optax.sharding`` that the guides tell
  users to call, as ``(dotted name, object)``."""
  names = [n for n in mkor_optax.__all__ if n != 'nnx']
  names += [f'nnx.{n}' for n in ('value_and_grad', 'layouts', 'Tap')]
  names += [f'sharding.{n}' for n in ('place_state', 'bytes_per_device')]
  out = []
  for name in names:
    obj = mkor_optax
    for part in name.split('.'):
      obj = getattr(obj, part)
    out.append((name, obj))
  return out


def is_state(obj):
  return inspect.isclass(obj) and obj.__name__.endswith('State') and hasattr(obj, '_fields')


def test_api_page_lists_every_public_name():
  listed = set(re.findall(r'^   ([\w.]+)$', (DOCS / 'api.md').read_text(), re.M))
  assert listed == {name for name, _ in public_objects()}


DOCUMENTED = public_objects()


@pytest.mark.parametrize('name,obj', DOCUMENTED, ids=[name for name, _ in DOCUMENTED])
def test_public_docstring_has_a_running_example(name, obj):
  doc = inspect.getdoc(obj if not isinstance(obj, mkor_optax.StatKind) else type(obj))
  assert doc and '>>>' in doc, f'{name}: no example in its docstring'
  if inspect.isfunction(obj) and inspect.signature(obj).parameters:
    assert 'Args:' in doc and 'Returns:' in doc, f'{name}: Args:/Returns: missing'
  scope = {}
  exec(compile(python_blocks('api.md')[0], 'docs/api.md', 'exec'), scope)
  test = doctest.DocTestParser().get_doctest(doc, scope, name, None, 0)
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  out = io.StringIO()
  runner.run(test, out=out.write)
  assert runner.failures == 0, out.getvalue()


def test_state_docstrings_name_their_fields():
  for name, obj in public_objects():
    if is_state(obj):
      doc = inspect.getdoc(obj)
      missing = [f for f in obj._fields if f not in doc]
      assert not missing, f'{name}: fields {missing} are not described'


def test_getting_started_blocks_run_as_printed():
  blocks = python_blocks('getting_started.md')
  scope, printed = {}, io.StringIO()
  with contextlib.redirect_stdout(printed):
    for i, block in enumerate(blocks):
      exec(compile(block, f'docs/getting_started.md, block {i}', 'exec'), scope)
      if i == 0:  # the set-up: the initial loss, to compare the loops' ends with
        first = float(scope['optax'].softmax_cross_entropy_with_integer_labels(
            scope['model'].apply({'params': scope['params']}, scope['x']), scope['y']).mean())
  lines = printed.getvalue().splitlines()
  assert len(lines) == 4, lines  # the plain loop, the TrainState loop, the NNX loop, the adaptive one
  losses = [float(re.findall(r'[\d.]+$', line)[0]) for line in lines]
  assert np.isfinite(losses).all() and max(losses) < 0.5 * first, (first, lines)
  assert int(scope['state'].step) == 120  # 100 TrainState steps, then 20 split steps
  assert int(scope['optimizer'].step[...]) == 100
