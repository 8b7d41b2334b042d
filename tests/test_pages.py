"""The pages speak to users: no internal names in their prose.

A user reads the docs and the README without the repository's test suite or
its source layout in mind: a test's name, a test file, a module's file name
or what the project's CI does mean nothing to them. Commands a user can run
(``python examples/...``, ``python benchmarks/...``) are fine, and so is
anything inside a code block.
"""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / 'docs'
PAGES = sorted(p for p in DOCS.rglob('*.md') if not p.relative_to(DOCS).parts[0].startswith('_'))
PAGES.append(ROOT / 'README.md')

INTERNAL = [
    ('a test name', re.compile(r'\btest_[a-z0-9_]+')),
    ('a test file', re.compile(r'\btests/[\w/.]*')),
    ('a module file', re.compile(r'\bmkor_optax/[\w/]+\.py\b|(?<![/\w])(?:' + '|'.join(
        p.stem for p in (ROOT / 'mkor_optax').glob('*.py') if p.stem != '__init__') + r')\.py\b')),
    ('the project\'s CI', re.compile(r'\bCI\b')),
]


def page_id(path):
  return 'README.md' if path.parent == ROOT else str(path.relative_to(DOCS))


def prose(text):
  """The page without its fenced code blocks (a program may name anything)."""
  return re.sub(r'```.*?```', '', text, flags=re.S)


@pytest.mark.parametrize('page', PAGES, ids=page_id)
def test_a_page_names_nothing_internal(page):
  text = prose(page.read_text())
  found = [f'{kind}: {m.group(0)!r} near ...{text[max(0, m.start() - 40):m.end() + 20]!r}'
           for kind, pattern in INTERNAL for m in pattern.finditer(text)]
  assert not found, f'{page_id(page)} names internals a user cannot use:\n' + '\n'.join(found)


def test_the_scan_sees_internal_names():
  text = 'See tests/test_sketch.py (test_a_step_seed) and mkor_optax/tap.py; CI runs it.'
  assert {kind for kind, p in INTERNAL if p.search(prose(text))} == {k for k, _ in INTERNAL}
  assert not any(p.search(prose('Run `python examples/demo.py` or `python benchmarks/soak.py`.'))
                 for _, p in INTERNAL)
