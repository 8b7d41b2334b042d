"""The README is a landing page: short, its quickstart runs as printed (with a
model and data supplied), and its links lead to pages that exist."""

import pathlib
import re

import jax
import numpy as np

from common import MLP, load_digits

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / 'README.md'


def test_readme_is_a_landing_page():
  text = README.read_text()
  assert len(text.splitlines()) <= 150
  for word in ('issue', 'SPEC', 'session'):  # nothing about how the project is organised
    assert not re.search(rf'\b{word}', text, re.I), word
  links = re.findall(r'\]\(((?!https?:)[^)#]+)', text)
  assert 'docs/getting_started.md' in links and 'docs/api.md' in links
  for link in links:
    assert (ROOT / link).exists(), link


def test_quickstart_runs_and_is_at_most_15_lines():
  text = README.read_text()
  section = text[text.index('## The two-line change'):]
  code = re.search(r'```python\n(.*?)```', section, re.S).group(1)
  assert len(code.strip().splitlines()) <= 15
  (x, y), _ = load_digits()
  model = MLP((32,))
  params = model.init(jax.random.PRNGKey(0), x[:2])['params']
  scope = {'model': model, 'params': params}
  exec(compile(code, str(README), 'exec'), scope)
  params, opt_state = scope['params'], scope['opt_state']
  losses = []
  for i in range(20):
    params, opt_state, loss = scope['step'](params, opt_state, x[:128], y[:128])
    losses.append(float(loss))
  assert np.isfinite(losses).all() and losses[-1] < losses[0]
