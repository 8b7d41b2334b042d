"""What a user is told and what a bad step leaves: counters held on
non-finite steps, warnings that a step dropping its state still gives,
counted and attributed to the user's line, validated alias settings, and
error messages that say what to pass."""

import math
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mkor_optax
from mkor_optax.numerics import NumericalWarning

from helpers import as_restored, batch, init_params, loss_fn
from test_safety import WARNING_TRANSFORMS, nan_like

# These tests check the warnings, which a compiled step gives only under
# mkor_optax.jit_warnings(True) (off by default).
pytestmark = pytest.mark.usefixtures('jit_warnings_on')


def stats_for(kind, params, t=0):
  if kind is None:
    return jax.grad(loss_fn)(params, *batch(t)), None
  _, grads, stats = mkor_optax.value_and_grad(loss_fn, kind=kind)(params, *batch(t))
  return grads, stats


def counters(state):
  """Every int32 scalar ``count`` of our own states (MKOR-H's and its MKOR's)."""
  out = []
  is_ours = lambda x: hasattr(x, '_fields') and 'count' in x._fields and type(x).__module__.startswith('mkor_optax')
  for node in jax.tree.leaves(state, is_leaf=is_ours):
    if is_ours(node):
      out.append(int(node.count))
      out += [int(c) for c in counters(tuple(getattr(node, f) for f in node._fields if f != 'count'))]
  return out


@pytest.mark.parametrize('name', list(WARNING_TRANSFORMS))
def test_a_non_finite_step_leaves_every_counter_as_it_was(name):
  make, kind = WARNING_TRANSFORMS[name]
  params = init_params()
  tx = make()
  state = tx.init(params)
  extra = lambda stats: dict({} if stats is None else {'stats': stats},
                             **({'value': jnp.float32(1.0)} if name == 'mkor_h' else {}))
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', NumericalWarning)
    for t in range(3):
      grads, stats = stats_for(kind, params, t)
      state = tx.update(grads, state, params, **extra(stats))[1]
    before = counters(state)
    assert before and all(c == 3 for c in before), before
    grads, stats = stats_for(kind, params, 3)
    after = tx.update(nan_like(grads), state, params, **extra(stats))[1]
  assert counters(after) == before


@pytest.mark.parametrize('make,kind,field', [
    (lambda: mkor_optax.scale_by_kfac(gamma=0.95), mkor_optax.COVARIANCE, 'cov'),
    (lambda: mkor_optax.scale_by_eva(gamma=0.95), mkor_optax.RANK1, None),
])
def test_a_bad_first_step_does_not_change_the_emas_start(make, kind, field):
  """After a NaN first step the EMA starts at the statistic itself (1x), not
  at 0.05x of it."""
  params = init_params()
  tx = make()
  state = tx.init(params)
  grads, stats = stats_for(kind, params, 0)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', NumericalWarning)
    state = tx.update(nan_like(grads), state, params, stats=stats)[1]
  state = tx.update(grads, state, params, stats=stats)[1]
  side = state.input_side['hidden']
  got = side.cov if field else side
  name = 'A' if field else 'a'
  np.testing.assert_allclose(np.asarray(got)[0], np.asarray(stats['hidden'][name]), rtol=1e-6)


def test_a_step_that_drops_its_state_still_warns_counted_at_the_users_line():
  params = init_params()
  opt = mkor_optax.mkor(1e-2)
  state = opt.init(params)

  @jax.jit
  def step(params, state, x, y):  # returns the updates only
    _, grads, stats = mkor_optax.value_and_grad(loss_fn)(params, x, y)
    return opt.update(nan_like(grads), state, params, stats=stats)[0]

  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('default')  # Python's own: once per message and place
    for _ in range(3):
      jax.block_until_ready(step(params, state, *batch(0)))
  said = [w for w in caught if issubclass(w.category, NumericalWarning)]
  assert len(said) == 3, [str(w.message) for w in said]
  assert 'such steps so far' in str(said[-1].message)
  assert all(w.filename == __file__ for w in said), [w.filename for w in said]


ALIASES = {
    'mkor': mkor_optax.mkor, 'mkor_h': mkor_optax.mkor_h, 'kfac': mkor_optax.kfac,
    'eva': mkor_optax.eva, 'sonew': mkor_optax.sonew,
}


@pytest.mark.parametrize('value', [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize('name', sorted(ALIASES))
def test_every_alias_refuses_a_non_finite_learning_rate_or_weight_decay(name, value):
  alias = ALIASES[name]
  with pytest.raises(ValueError, match='learning_rate'):
    alias(value)
  if name != 'sonew':  # sonew has no weight decay
    with pytest.raises(ValueError, match='weight_decay'):
      alias(1e-2, weight_decay=value)


@pytest.mark.parametrize('name', sorted(set(ALIASES) - {'sonew'}))
def test_every_alias_refuses_a_negative_weight_decay(name):
  with pytest.raises(ValueError, match='weight_decay: must be >= 0'):
    ALIASES[name](1e-2, weight_decay=-0.01)
  ALIASES[name](optax.constant_schedule(1e-2), weight_decay=0.0)  # schedules and 0 are fine


def test_every_numeric_argument_of_every_alias_refuses_nan():
  """Each alias's float arguments (its signature's float defaults) are checked."""
  import inspect
  for name, alias in ALIASES.items():
    for arg, p in inspect.signature(alias).parameters.items():
      if isinstance(p.default, float) and not isinstance(p.default, bool):
        with pytest.raises(ValueError, match=arg):
          alias(1e-2, **{arg: math.nan})


def test_a_missing_stats_names_the_default_capture_and_the_train_state():
  params = init_params()
  grads = jax.grad(loss_fn)(params, *batch(0))
  for tx, want in ((mkor_optax.mkor(1e-2), 'value_and_grad(loss_fn) (its default kind'),
                   (mkor_optax.kfac(1e-2), 'kind=mkor_optax.COVARIANCE'),
                   (mkor_optax.eva(1e-2), 'value_and_grad(loss_fn) (its default kind')):
    with pytest.raises(ValueError) as err:
      tx.update(grads, tx.init(params), params)
    assert want in str(err.value) and 'mkor_optax.TrainState' in str(err.value), str(err.value)


@pytest.mark.parametrize('make,want', [(mkor_optax.kfac, 'COVARIANCE')])
def test_multisteps_of_a_method_without_sketches_names_its_own_kind(make, want):
  # (Eva reads the means that the sketches come with: tests/test_one_capture.py)
  params = init_params()
  acc = mkor_optax.MultiSteps(make(1e-2), every_k_schedule=2)
  state = acc.init(params)
  _, grads, stats = mkor_optax.value_and_grad(loss_fn)(params, *batch(0))  # sketches
  with pytest.raises(ValueError) as err:
    acc.update(grads, state, params, stats=stats)
  assert f'kind=mkor_optax.{want}' in str(err.value) and 'Sketch(' not in str(err.value)


def test_multisteps_with_an_empty_micro_batch_says_so():
  params = init_params()
  acc = mkor_optax.MultiSteps(mkor_optax.mkor(1e-2), every_k_schedule=2)
  state = acc.init(params)
  grads = jax.grad(loss_fn)(params, *batch(0))
  with pytest.warns(UserWarning, match='no statistics for layer'):
    acc.update(grads, state, params, stats={})


def test_a_state_restored_without_a_target_is_a_clear_error():
  params = init_params()
  tx = mkor_optax.scale_by_mkor()
  state = tx.init(params)
  raw = {'count': state.count, 'input_side': dict(state.input_side),
         'output_side': dict(state.output_side)}  # what a restore without a target gives
  _, grads, stats = mkor_optax.value_and_grad(loss_fn)(params, *batch(0))
  with pytest.raises(ValueError, match='restore it into opt.init'):
    tx.update(grads, raw, params, stats=stats)


def test_no_cancelled_mean_warning_at_a_least_squares_optimum():
  """A Dense layer with a bias, trained to the optimum of a least-squares
  fit: its rows cancel there (the bias gradient, which is g, is zero), which
  is no BatchNorm. The warning is for what cancels from the first steps."""
  import flax.linen as nn
  model = nn.Dense(2)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 3)), jnp.float32)
  y = x @ jnp.asarray(rng.normal(size=(3, 2)), jnp.float32) + 0.5 + jnp.asarray(rng.normal(size=(64, 2)), jnp.float32)
  # start at the least-squares solution and stay near it (small SGD steps)
  x1 = np.hstack([np.asarray(x, np.float64), np.ones((64, 1))])
  w = np.linalg.lstsq(x1, np.asarray(y, np.float64), rcond=None)[0]
  params = {'kernel': jnp.asarray(w[:3], jnp.float32), 'bias': jnp.asarray(w[3], jnp.float32)}
  loss = lambda p, x, y: jnp.mean((model.apply({'params': p}, x) - y) ** 2)
  tx = mkor_optax.mkor(1e-3, backend=optax.sgd(1e-3))
  state = tx.init(params)
  grad = mkor_optax.value_and_grad(loss, kind=mkor_optax.RANK1)

  @jax.jit
  def step(params, state):
    _, g, s = grad(params, x, y)
    u, state = tx.update(g, state, params, stats=s)
    return optax.apply_updates(params, u), state, s

  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    for _ in range(30):
      params, state, s = step(params, state)
    jax.effects_barrier()
  ratio = float(jnp.linalg.norm(s['']['g']) / s['']['g_mass'])
  said = [str(w.message) for w in caught if 'numerically zero' in str(w.message)]
  assert ratio < 1e-5  # the rows cancel: the old rule warned at every step
  assert len(said) <= 10, len(said)  # only the first steps, where it cannot tell


def test_restore_state_round_trips_and_names_what_differs():
  params = init_params()
  opt = mkor_optax.mkor(1e-2)
  state = opt.init(params)
  _, grads, stats = mkor_optax.value_and_grad(loss_fn)(params, *batch(0))
  state = opt.update(grads, state, params, stats=stats)[1]
  back = mkor_optax.restore_state(as_restored(state), opt.init(params))
  jax.tree.map(np.testing.assert_array_equal, back, state)
  assert jax.tree.structure(back) == jax.tree.structure(state)
  # a state saved by 0.1.0: no scales
  old = as_restored(state)
  for f in ('input_scale', 'output_scale'):
    del old[0][f]
  with pytest.raises(ValueError, match=r"0/input_scale/hidden: missing .*added in 0.2"):
    mkor_optax.restore_state(old, opt.init(params))
  # another low_rank setting: dense against low-rank inverses
  low = mkor_optax.mkor(1e-2, low_rank=2, low_rank_min_dim=0)
  with pytest.raises(ValueError, match='another low_rank setting'):
    mkor_optax.restore_state(as_restored(state), low.init(params))
  # MultiSteps built for another statistic kind
  acc_mean = mkor_optax.MultiSteps(opt, 2, kind=mkor_optax.RANK1)
  acc_sketch = mkor_optax.MultiSteps(opt, 2)
  with pytest.raises(ValueError, match='another kind='):
    mkor_optax.restore_state(as_restored(acc_mean.init(params)), acc_sketch.init(params))


def test_restore_state_takes_what_orbax_restores_without_a_target(tmp_path):
  ocp = pytest.importorskip('orbax.checkpoint')
  params = init_params()
  opt = mkor_optax.mkor(1e-2)
  state = opt.init(params)
  _, grads, stats = mkor_optax.value_and_grad(loss_fn)(params, *batch(0))
  state = opt.update(grads, state, params, stats=stats)[1]
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / 'c', state)
  ckpt.wait_until_finished()
  back = mkor_optax.restore_state(ckpt.restore(tmp_path / 'c'), opt.init(params))
  jax.tree.map(np.testing.assert_array_equal, back, state)
  u1 = opt.update(grads, back, params, stats=stats)[0]
  u2 = opt.update(grads, state, params, stats=stats)[0]
  jax.tree.map(np.testing.assert_array_equal, u1, u2)


@pytest.mark.parametrize('name', list(WARNING_TRANSFORMS))
def test_jit_warnings_are_off_by_default_and_a_bad_step_is_still_guarded(name):
  """By default (``jit_warnings(False)``) a compiled step holds no host
  callback (it would slow the whole step on a CPU) and a NaN step warns of
  nothing, yet is guarded: the counters hold. ``jit_warnings(True)`` puts the
  checks in the steps traced under it, and leaving the context restores the
  default."""
  make, kind = WARNING_TRANSFORMS[name]
  params = init_params()
  grads, stats = stats_for(kind, params)
  tx = make()
  state = tx.init(params)
  extra = {} if stats is None else {'stats': stats}
  if name == 'mkor_h':
    extra['value'] = jnp.asarray(1.0)
  assert mkor_optax.jit_warnings.enabled  # this module's fixture turned them on
  with mkor_optax.jit_warnings(False):  # the default
    assert not mkor_optax.jit_warnings.enabled
    step = jax.jit(lambda g, s: tx.update(g, s, params, **extra))
    text = step.lower(grads, state).as_text()
    with warnings.catch_warnings():
      warnings.simplefilter('error', NumericalWarning)
      _, after = jax.block_until_ready(step(nan_like(grads), state))
  assert mkor_optax.jit_warnings.enabled  # the previous setting is back
  assert 'callback' not in text
  assert counters(after) == counters(state)
  with mkor_optax.jit_warnings(True):
    loud = jax.jit(lambda g, s: tx.update(g, s, params, **extra)).lower(grads, state).as_text()
  assert 'callback' in loud


def test_jit_warnings_default_is_off_in_a_fresh_process():
  """A user's process starts without the checks in its compiled steps."""
  out = subprocess.run([sys.executable, '-c', 'import mkor_optax; print(mkor_optax.jit_warnings.enabled)'],
                       capture_output=True, text=True, check=True)
  assert out.stdout.strip() == 'False'


def test_jit_warnings_takes_a_bool():
  for bad in (0, 'no', None):
    with pytest.raises(TypeError, match='True or False'):
      mkor_optax.jit_warnings(bad)
  assert mkor_optax.jit_warnings.enabled  # this module's fixture turned them on
