"""The checkpointing and tuning guides run as printed: every ```python block
of each page, in order, in one namespace, as a reader pasting them would.
Orbax writes under pytest's tmp_path (the pages use ``tempfile.mkdtemp()``)."""

import contextlib
import io
import pathlib
import re
import tempfile

import jax
import numpy as np
import pytest

import mkor_optax

DOCS = pathlib.Path(__file__).resolve().parent.parent / 'docs'


def python_blocks(page):
  return re.findall(r'```python\n(.*?)```', (DOCS / page).read_text(), re.S)


def host(tree):
  return jax.tree.map(np.asarray, tree)


def assert_trees_equal(a, b, atol=0.0):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(jax.tree.leaves(host(a)), jax.tree.leaves(host(b))):
    np.testing.assert_allclose(u, v, rtol=0, atol=atol)


def test_checkpointing_guide_runs_as_printed(tmp_path, monkeypatch):
  pytest.importorskip('orbax.checkpoint')
  assert len(jax.devices()) >= 4  # tests/conftest.py: 4 fake CPU devices
  monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))
  scope, printed, saved = {}, io.StringIO(), None
  with contextlib.redirect_stdout(printed):
    for i, block in enumerate(python_blocks('guides/checkpointing.md')):
      exec(compile(block, f'docs/guides/checkpointing.md, block {i}', 'exec'), scope)
      if 'ckpt.save(path,' in block:  # what the first checkpoint holds
        saved = host({'params': scope['params'], 'opt_state': scope['opt_state']})
  lines = printed.getvalue().splitlines()
  assert saved is not None and any(tmp_path.iterdir())  # orbax wrote under tmp_path

  # the restore into opt.init(params) gives back what was saved, in its types
  restored = scope['restored']
  assert_trees_equal(restored, saved)
  assert isinstance(restored['opt_state'][0], mkor_optax.MKORState)
  assert lines[0] == '0.0'
  # training on from it is the uninterrupted run
  assert_trees_equal(scope['resumed'], scope['straight'], atol=1e-6)
  assert float(lines[1]) <= 1e-6
  # the manager kept the last two of every tenth step, with the release
  assert lines[2] == f"[30, 40] {{'mkor_optax': '{mkor_optax.__version__}'}}"
  # restore_state: the typed state, and an error that says what differs
  assert lines[3] == 'MKORState'
  assert_trees_equal(scope['opt_state'], saved['opt_state'])
  assert lines[4] == 'the checkpoint does not match opt.init(params):'
  assert 'another low_rank setting' in lines[5]
  # sharded: factors split over 4 devices, restored equal and split over 2,
  # and onto one device the run goes on as on four
  factor = scope['opt_state4'][0].output_side['Dense_0']
  assert len(factor.sharding.device_set) == 4 and not factor.sharding.is_fully_replicated
  again = scope['restored2']['opt_state'][0].output_side['Dense_0']
  assert len(again.sharding.device_set) == 2 and not again.sharding.is_fully_replicated
  assert_trees_equal(scope['restored2'], {'params': scope['params4'],
                                          'opt_state': scope['opt_state4']})
  assert len(jax.tree.leaves(scope['restored1'])[0].sharding.device_set) == 1
  assert_trees_equal(scope['on_four'], scope['on_one'], atol=1e-5)
  # place_state: the injected hyperparameters sit on all four devices
  learning_rate = scope['target4'].hyperparams['learning_rate']
  assert learning_rate.sharding.is_fully_replicated
  assert len(learning_rate.sharding.device_set) == 4
  assert lines[-1] == 'True' and lines.count('True') == 2


def test_tuning_guide_runs_as_printed():
  scope, printed = {}, io.StringIO()
  with contextlib.redirect_stdout(printed):
    for i, block in enumerate(python_blocks('guides/tuning.md')):
      exec(compile(block, f'docs/guides/tuning.md, block {i}', 'exec'), scope)
  lines = printed.getvalue().splitlines()
  runs = [re.match(r'(\w+) = (\S+) +loss (\S+) +(\S+) ms per step$', line) for line in lines]
  runs = [(m[1], float(m[2]), float(m[3]), float(m[4])) for m in runs if m]
  sweeps = [src.count('sweep(') for src in python_blocks('guides/tuning.md')]
  assert len(runs) == 3 * (sum(sweeps) - 1)  # three values each; one line defines sweep
  assert all(np.isfinite(loss) and loss > 0 and ms > 0 for _, _, loss, ms in runs)
  # the values written into state.hyperparams take effect: the learning rates
  # of one sweep, and the refresh periods, give different runs
  by_sweep = [runs[i:i + 3] for i in range(0, len(runs), 3)]
  for sweep in by_sweep:
    if sweep[0][0] in ('learning_rate', 'inv_freq'):
      assert len({loss for _, _, loss, _ in sweep}) == 3, sweep
  # every run improves on the loss at the start
  x, y = scope['x'], scope['y']
  first = float(scope['loss_fn'](scope['params'], x, y))
  assert max(loss for _, _, loss, _ in runs) < first
  # the warm-up schedule as printed, Eva's products, the constructor's check
  schedule = [eval(line) for line in lines if line.startswith('[0.0, ')]
  assert len(schedule) == 1 and schedule[0][2] == 0.01 and schedule[0][-1] < 1e-4
  assert any(line.startswith("{'Dense_0': ") for line in lines)
  assert lines[-1].startswith('zeta: must be < gamma')


def test_data_parallel_guides_adaptive_shard_map_step_runs_as_printed():
  """The adaptive recipe under ``shard_map`` as the data-parallel guide prints
  it (the page's other blocks are fragments of a loop): 4 devices take the
  step one device takes on the whole batch."""
  import flax.linen as nn
  import jax.numpy as jnp
  import optax
  from jax.sharding import NamedSharding, PartitionSpec as P
  block = [b for b in python_blocks('guides/data_parallel.md') if 'adaptive_mkor' in b]
  assert len(block) == 1
  model = nn.Sequential([nn.Dense(8), nn.tanh, nn.Dense(5)])
  mesh = jax.make_mesh((4,), ('batch',))
  scope = dict(jax=jax, optax=optax, mkor_optax=mkor_optax, P=P, model=model, mesh=mesh)
  exec(compile(block[0], 'docs/guides/data_parallel.md', 'exec'), scope)
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 3))
  y = (jax.random.uniform(jax.random.PRNGKey(1), (16, 5)) > 0.5).astype(jnp.float32)
  params = model.init(jax.random.PRNGKey(2), x)['params']
  opt = scope['opt']
  one = mkor_optax.adaptive_mkor()
  loss_of = lambda out: optax.sigmoid_binary_cross_entropy(out, y).sum(-1).mean()

  @jax.jit
  def single(params, state, key):
    loss, grads, extra = mkor_optax.adaptive_inputs(lambda p: model.apply({'params': p}, x), loss_of,
                                                    params, key, fisher='sigmoid_cross_entropy')
    updates, state = one.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state, loss

  sharded = NamedSharding(mesh, P('batch'))
  got = want = (params, opt.init(params))
  losses = []
  for t in range(4):
    key = jax.random.PRNGKey(t)
    *got, loss = scope['step'](*got, jax.device_put(x, sharded), jax.device_put(y, sharded), key)
    *want, _ = single(*want, key)
    losses.append(float(loss))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5), got, want)
  assert losses[-1] < losses[0]
