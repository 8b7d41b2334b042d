"""The README's quickstart runs as printed (with a model and data supplied)."""

import pathlib
import re

import jax
import numpy as np

from common import MLP, load_digits

README = pathlib.Path(__file__).resolve().parent.parent / 'README.md'


def test_quickstart_runs_and_is_at_most_15_lines():
  text = README.read_text()
  section = text[text.index('## Quickstart'):]
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


def test_train_state_block_runs_as_printed():
  text = README.read_text()
  section = text[text.index('## Quickstart'):text.index('## What is preconditioned')]
  blocks = re.findall(r'```python\n(.*?)```', section, re.S)
  quick, train_state = blocks[0], blocks[1]
  (x, y), _ = load_digits()
  model = MLP((32,))
  params = model.init(jax.random.PRNGKey(0), x[:2])['params']
  scope = {'model': model, 'params': params}
  exec(compile(quick, str(README), 'exec'), scope)  # defines loss_fn
  exec(compile(train_state, str(README), 'exec'), scope)
  state, losses = scope['state'], []
  for _ in range(20):
    state, loss = scope['train_step'](state, x[:128], y[:128])
    losses.append(float(loss))
  assert np.isfinite(losses).all() and losses[-1] < losses[0]
  assert int(state.step) == 20


def test_nnx_block_runs_as_printed():
  from flax import nnx
  from quickstart_nnx import MLP as NNXMLP

  text = README.read_text()
  section = text[text.index('## Quickstart'):text.index('## What is preconditioned')]
  block = re.findall(r'```python\n(.*?)```', section, re.S)[2]
  assert 'nnx.Optimizer' in block and len(block.strip().splitlines()) <= 15
  (x, y), _ = load_digits()
  scope = {'model': NNXMLP(nnx.Rngs(0))}
  exec(compile('import jax, optax, mkor_optax\n', str(README), 'exec'), scope)
  exec(compile(block, str(README), 'exec'), scope)
  losses = [float(scope['train_step'](scope['model'], scope['optimizer'], x[:128], y[:128]))
            for _ in range(20)]
  assert np.isfinite(losses).all() and losses[-1] < losses[0]
  assert int(scope['optimizer'].step[...]) == 20


def test_split_step_block_runs_as_printed():
  text = README.read_text()
  section = text[text.index('## Quickstart'):text.index('## What is preconditioned')]
  block = re.findall(r'```python\n(.*?)```', section, re.S)[3]
  assert 'def compute_grads' in block and 'def apply_grads' in block
  import mkor_optax
  (x, y), _ = load_digits()
  model = MLP((32,))
  params = model.init(jax.random.PRNGKey(0), x[:2])['params']
  scope = {'model': model, 'params': params}
  exec(compile(re.findall(r'```python\n(.*?)```', section, re.S)[0], str(README), 'exec'), scope)
  exec(compile(block, str(README), 'exec'), scope)
  state = mkor_optax.TrainState.create(apply_fn=model.apply, params=params,
                                       tx=mkor_optax.mkor(1e-2))
  losses = []
  for _ in range(20):
    grads, stats, loss = scope['compute_grads'](state, x[:128], y[:128])
    state = scope['apply_grads'](state, grads, stats)
    losses.append(float(loss))
  assert np.isfinite(losses).all() and losses[-1] < losses[0]
  assert int(state.step) == 20
