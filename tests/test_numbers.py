"""One source for every number: the pages never type a measurement.

A measured number reaches a docs page as a table included from ``results/``
or as a ``{{ name }}`` substitution that the build reads from those files
(``docs/measured.py``); the README carries generated blocks. These tests fail
when a page types a measurement by hand, names a number that has no source,
or when the README's blocks differ from what the result files give now.
"""

import importlib.util
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / 'docs'

spec = importlib.util.spec_from_file_location('measured', DOCS / 'measured.py')
measured = importlib.util.module_from_spec(spec)
spec.loader.exec_module(measured)

PAGES = sorted(p for p in DOCS.rglob('*.md') if not p.relative_to(DOCS).parts[0].startswith('_'))
PAGES.append(ROOT / 'README.md')

# What a hand-typed measurement looks like in prose or in a table.
MEASUREMENT = [
    ('a ratio', re.compile(r'(?<![\w.])\d+(?:\.\d+)?(?:\s*[-–]\s*\d+(?:\.\d+)?)?x(?![\w])')),
    ('a time', re.compile(r'(?<![\w.])\d+(?:\.\d+)?(?:\s*[-–]\s*\d+(?:\.\d+)?)?\s?'
                          r'(?:ms|seconds?|minutes?|hours?)\b')),
    ('a percentage', re.compile(r'(?<![\w.])\d+(?:\.\d+)?%')),
    ('a step count', re.compile(r'\b(?:took|takes|take|taking|needs|needed)\s+(?:about\s+)?\d{2,}\s+steps\b')),
    ('a measured table cell', re.compile(r'^\|.*\|\s*\d+\.\d+\s*(?:\(|/|\|)', re.M)),
]

# Numbers that look like measurements but state a setting or a definition.
ALLOWED = {
    'benchmarks.md': ['10% of the steps',  # the definition of the best learning rate
                      'about ±15%'],  # how precisely to read timings, not a result
    'guides/hyperparameters.md': ['a measured table cell'],  # the table of default values
}


def prose(text):
  """The page without what may hold numbers legitimately: code, substitutions,
  included tables, HTML comments (the README's generated blocks included)."""
  text = re.sub(r'```.*?```', '', text, flags=re.S)
  text = re.sub(r':::.*?:::', '', text, flags=re.S)
  text = re.sub(r'<!--.*?-->.*?<!-- /numbers -->', '', text, flags=re.S)
  text = re.sub(r'<!--.*?-->', '', text, flags=re.S)
  text = re.sub(r'`[^`\n]*`', '', text)
  text = re.sub(r'\{\{[^}]*\}\}', 'N', text)
  text = re.sub(r'\$\$.*?\$\$|\$[^$\n]*\$', '', text, flags=re.S)
  return text


def page_id(path):
  return 'README.md' if path.parent == ROOT else str(path.relative_to(DOCS))


@pytest.mark.parametrize('page', PAGES, ids=page_id)
def test_a_page_types_no_measurement(page):
  text = prose(page.read_text())
  allowed = ALLOWED.get(page_id(page), [])
  for snippet in allowed:
    text = text.replace(snippet, '')
  found = []
  for kind, pattern in MEASUREMENT:
    if kind in allowed:
      continue
    for m in pattern.finditer(text):
      line = text[:m.start()].count('\n') + 1
      found.append(f'{kind} {m.group(0)!r} near: ...{text[max(0, m.start() - 50):m.end() + 20]!r}')
  assert not found, (f'{page_id(page)} types measured numbers by hand; take them from results/ '
                     'with {{ name }} (docs/measured.py) or include the table:\n' + '\n'.join(found))


@pytest.mark.parametrize('page', PAGES, ids=page_id)
def test_every_named_number_has_a_source(page):
  names = set(re.findall(r'\{\{\s*(\w+)\s*\}\}', page.read_text()))
  assert names <= set(measured.NUMBERS), f'undefined: {sorted(names - set(measured.NUMBERS))}'


def test_every_number_reads_from_its_result_file():
  values = measured.substitutions()
  assert values and all(re.fullmatch(r'[\d.]+(-[\d.]+)?|not reached|not run', v)
                        for v in values.values()), values


def test_readme_blocks_are_what_the_results_give():
  text = (ROOT / 'README.md').read_text()
  for name, make in measured.README_BLOCKS.items():
    m = measured.readme_block_pattern(name).search(text)
    assert m, f'README.md lost its generated block {name!r}'
    assert m.group(1) == make() + '\n', (f'README.md block {name!r} differs from the result files: '
                                  'run python docs/measured.py --readme')


def test_a_changed_source_changes_the_number(tmp_path, monkeypatch):
  """The numbers are read, not stored: a result file edited changes the page."""
  src = measured.RESULTS / measured.COST
  copy = tmp_path / measured.COST
  copy.parent.mkdir(parents=True)
  copy.write_text(re.sub(r'(\| autoencoder \| )[\d.]+', r'\g<1>9.99', src.read_text(), count=1))
  monkeypatch.setattr(measured, 'RESULTS', tmp_path)
  measured.tables.cache_clear()
  try:
    assert measured.value('cost_mkor_autoencoder') == '9.99'
  finally:
    measured.tables.cache_clear()


def test_the_scan_catches_a_typed_measurement():
  page = 'MKOR took 0.57x LAMB\'s steps and 1.3-1.7x its time, 12 ms a step, 40% fewer; it took 259 steps.'
  kinds = {kind for kind, pattern in MEASUREMENT if pattern.search(prose(page))}
  assert kinds == {'a ratio', 'a time', 'a percentage', 'a step count'}
  assert not any(p.search(prose('`mkor(1e-2)` at {{ cost_mkor_bert }}x LAMB')) for _, p in MEASUREMENT)


def public_docstrings():
  import inspect
  import mkor_optax
  names = [n for n in mkor_optax.__all__ if n != 'nnx']
  objs = [(n, getattr(mkor_optax, n)) for n in names]
  objs += [(f'nnx.{n}', getattr(mkor_optax.nnx, n)) for n in ('value_and_grad', 'layouts', 'Tap')]
  objs += [(f'sharding.{n}', getattr(mkor_optax.sharding, n)) for n in ('place_state', 'bytes_per_device')]
  return [(n, inspect.getdoc(o if not isinstance(o, mkor_optax.StatKind) else type(o)) or '')
          for n, o in objs]


@pytest.mark.parametrize('name,doc', public_docstrings(), ids=[n for n, _ in public_docstrings()])
def test_an_api_page_types_no_measurement(name, doc):
  """The API pages render the docstrings: they follow the same rule."""
  text = prose(doc).replace('Training BERT in 76 minutes', '')  # the LAMB paper's title
  found = [f'{kind} {m.group(0)!r}' for kind, pattern in MEASUREMENT for m in pattern.finditer(text)]
  assert not found, f'{name} docstring types measured numbers: {found}'
