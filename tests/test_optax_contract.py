"""What optax's own tests hold every optimizer to, for every method here:
extra arguments, inject_hyperparams, dtype preservation, gradient
accumulation, stable state under jit, a donated state, and the safe step
counter."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import mkor_optax
from helpers import assert_tree_close, batch, init_params, loss_fn

# name -> (alias, scale_by_*, statistic kind or None, needs the loss as value=)
METHODS = {
    'mkor': (mkor_optax.mkor, mkor_optax.scale_by_mkor, mkor_optax.RANK1, False),
    'mkor_h': (mkor_optax.mkor_h, mkor_optax.scale_by_mkor_h, mkor_optax.RANK1, True),
    'kfac': (mkor_optax.kfac, mkor_optax.scale_by_kfac, mkor_optax.COVARIANCE, False),
    'eva': (mkor_optax.eva, mkor_optax.scale_by_eva, mkor_optax.RANK1, False),
    'sonew': (mkor_optax.sonew, mkor_optax.scale_by_sonew, None, False),
}
NAMES = sorted(METHODS)


def grads_and_extra(name, params, x, y):
  """``(loss, grads, extra update kwargs)`` as a training loop gets them."""
  _, _, kind, needs_value = METHODS[name]
  if kind is None:
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    return loss, grads, {}
  loss, grads, stats = mkor_optax.value_and_grad(loss_fn, kind=kind)(params, x, y)
  extra = {'stats': stats}
  if needs_value:
    extra['value'] = loss
  return loss, grads, extra


def train_step(opt, name):
  """``(params, state, x, y) -> (params, state)``, not jitted."""
  def step(params, state, x, y):
    _, grads, extra = grads_and_extra(name, params, x, y)
    updates, state = opt.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state

  return step


def run(opt, name, steps=3, params=None, jit=True):
  params = init_params() if params is None else params
  state = opt.init(params)
  step = jax.jit(train_step(opt, name)) if jit else train_step(opt, name)
  for t in range(steps):
    params, state = step(params, state, *batch(t))
  return params, state


@pytest.mark.parametrize('name', NAMES)
def test_inject_hyperparams_alias_equals_the_plain_alias(name):
  alias = METHODS[name][0]
  plain, _ = run(alias(1e-2), name)
  injected_opt = optax.inject_hyperparams(alias)(learning_rate=1e-2)
  injected, state = run(injected_opt, name)
  assert_tree_close(injected, plain, rtol=1e-5, atol=1e-6)
  assert float(state.hyperparams['learning_rate']) == pytest.approx(1e-2)


@pytest.mark.parametrize('name', NAMES)
def test_inject_hyperparams_schedules_and_changes_take_effect(name):
  alias = METHODS[name][0]
  opt = optax.inject_hyperparams(alias)(learning_rate=optax.linear_schedule(1e-2, 0.0, 4))
  params = init_params()
  state = opt.init(params)
  _, grads, extra = grads_and_extra(name, params, *batch(0))
  updates, state = jax.jit(lambda g, s, p, e: opt.update(g, s, p, **e))(grads, state, params, extra)
  assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))
  # a learning rate of zero, set by hand in the state, gives a zero update
  opt0 = optax.inject_hyperparams(alias)(learning_rate=1e-2)
  state0 = opt0.init(params)
  state0.hyperparams['learning_rate'] = jnp.zeros([])
  zero, _ = opt0.update(grads, state0, params, **extra)
  assert all(np.all(u == 0) for u in jax.tree.leaves(zero))


@pytest.mark.parametrize('name', NAMES)
def test_inject_hyperparams_on_the_preconditioner(name):
  scale_by = METHODS[name][1]
  numeric = {'mkor': dict(gamma=0.9, zeta=0.8, inv_freq=2),
             'mkor_h': dict(gamma=0.9, zeta=0.8, window=5),
             'kfac': dict(damping=1e-2, inv_freq=2), 'eva': dict(damping=0.1),
             'sonew': dict(b1=0.8, band=2)}[name]
  plain, _ = run(optax.chain(scale_by(**numeric), optax.sgd(1e-2)), name)
  injected, state = run(optax.chain(optax.inject_hyperparams(scale_by)(**numeric),
                                    optax.sgd(1e-2)), name)
  assert_tree_close(injected, plain, rtol=1e-5, atol=1e-6)
  hp = state[0].hyperparams
  assert set(numeric) <= set(hp)


def test_inject_hyperparams_takes_dtype_names_and_static_predicates():
  opt = optax.inject_hyperparams(mkor_optax.mkor, static_args=('exclude',))(
      learning_rate=1e-2, factor_dtype='bfloat16', low_rank=3, low_rank_min_dim=0,
      exclude=lambda path: path == 'out')
  params, state = run(opt, 'mkor')
  mkor_state = state.inner_state[0]
  assert mkor_state.input_side['hidden'].q.dtype == jnp.bfloat16
  assert 'out' not in mkor_state.output_side


@pytest.mark.parametrize('name', NAMES)
def test_unknown_extra_args_are_ignored(name):
  alias = METHODS[name][0]
  opt = alias(1e-2)
  params = init_params()
  _, grads, extra = grads_and_extra(name, params, *batch(0))
  u1, _ = opt.update(grads, opt.init(params), params, **extra)
  u2, _ = opt.update(grads, opt.init(params), params, something_else=3.0, **extra)
  jax.tree.map(np.testing.assert_array_equal, u1, u2)


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_updates_keep_the_parameter_dtype(name, dtype):
  alias = METHODS[name][0]
  params = jax.tree.map(lambda p: p.astype(dtype), init_params())
  opt = alias(1e-2)
  state = opt.init(params)
  _, grads, extra = grads_and_extra(name, params, *batch(0))
  updates, _ = jax.jit(lambda g, s, p, e: opt.update(g, s, p, **e))(grads, state, params, extra)
  assert jax.tree.map(lambda u: u.dtype, updates) == jax.tree.map(lambda p: p.dtype, params)


@pytest.mark.parametrize('name', NAMES)
def test_state_shapes_dtypes_and_shardings_are_stable_under_jit(name):
  alias = METHODS[name][0]
  mesh = jax.make_mesh((4,), ('d',), axis_types=(jax.sharding.AxisType.Auto,))
  replicated = NamedSharding(mesh, P())
  params = jax.device_put(init_params(), replicated)
  opt = alias(1e-2)
  state0 = jax.device_put(opt.init(params), replicated)
  _, state = run(opt, name, steps=2, params=params)
  spec = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), t)
  assert jax.tree.structure(state) == jax.tree.structure(state0)
  assert spec(state) == spec(state0)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(state0)):
    assert a.sharding.is_equivalent_to(b.sharding, a.ndim)


@pytest.mark.parametrize('name', NAMES)
def test_a_donated_state_trains_as_an_undonated_one(name):
  """``jit(step, donate_argnums=(0, 1))`` (state updated in place, as the
  docs advise for the factors that move only every few steps): the same
  parameters and state over steps with and without a refresh (to rounding:
  the aliased program is fused differently), and the donated buffers
  really are given up."""
  alias = METHODS[name][0]
  takes = 'inv_freq' in inspect.signature(alias).parameters  # (Eva refreshes every step)
  opt = alias(1e-2, inv_freq=2) if takes else alias(1e-2)
  step = train_step(opt, name)
  plain, donated = jax.jit(step), jax.jit(step, donate_argnums=(0, 1))
  params, state = init_params(), opt.init(init_params())
  d_params, d_state = jax.tree.map(jnp.copy, (params, state))
  first = jax.tree.leaves(d_state)[0]
  for t in range(5):
    params, state = plain(params, state, *batch(t))
    d_params, d_state = donated(d_params, d_state, *batch(t))
  assert first.is_deleted()
  assert_tree_close((d_params, d_state), (params, state), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', NAMES)
def test_step_counter_saturates_instead_of_overflowing(name):
  scale_by = METHODS[name][1]
  tx = scale_by()
  params = init_params()
  state = tx.init(params)
  top = jnp.asarray(np.iinfo(np.int32).max, jnp.int32)
  state = state._replace(count=top)
  _, grads, extra = grads_and_extra(name, params, *batch(0))
  _, new = tx.update(grads, state, params, **extra)
  assert int(new.count) == int(top)


# ------------------------------------------------------- gradient accumulation

ACCUMULATED = ['mkor', 'mkor_h', 'kfac', 'eva']


def halves(t):
  x, y = batch(t, n=16)
  return (x[:8], y[:8]), (x[8:], y[8:]), (x, y)


@pytest.mark.parametrize('name', ACCUMULATED)
def test_accumulating_micro_batches_equals_one_full_batch_step(name):
  alias = METHODS[name][0]
  kw = {'inv_freq': 1} if name != 'eva' else {}
  params = init_params()
  full = alias(1e-2, **kw)
  acc = mkor_optax.MultiSteps(alias(1e-2, **kw), every_k_schedule=2, kind=mkor_optax.RANK1)
  s_full, s_acc = full.init(params), acc.init(params)
  p_full, p_acc = params, params
  full_update = jax.jit(lambda g, s, p, extra: full.update(g, s, p, **extra))
  acc_update = jax.jit(lambda g, s, p, extra: acc.update(g, s, p, **extra))
  for t in range(3):
    first, second, whole = halves(t)
    _, g, extra = grads_and_extra(name, p_full, *whole)
    u, s_full = full_update(g, s_full, p_full, extra)
    p_full = optax.apply_updates(p_full, u)
    for i, micro in enumerate((first, second)):
      loss, g, extra = grads_and_extra(name, p_acc, *micro)
      if 'value' in extra:  # MKOR-H's loss rule: hand it the full batch's loss
        extra['value'] = grads_and_extra(name, p_acc, *whole)[0]
      u, s_acc = acc_update(g, s_acc, p_acc, extra)
      if i == 0:
        assert all(np.all(x == 0) for x in jax.tree.leaves(u))
      p_acc = optax.apply_updates(p_acc, u)
    assert_tree_close(p_acc, p_full, rtol=1e-4, atol=1e-6, msg=f'step {t}')
  # the factors too
  assert_tree_close(s_acc.inner.inner_opt_state[0], s_full[0], rtol=1e-4, atol=1e-6)


def test_optax_multisteps_with_stats_is_a_clear_error():
  opt = optax.MultiSteps(mkor_optax.mkor(1e-2), every_k_schedule=2)
  params = init_params()
  _, grads, stats = mkor_optax.value_and_grad(loss_fn, kind=mkor_optax.RANK1)(params, *batch(0))
  with pytest.raises(ValueError, match='mkor_optax.MultiSteps'):
    opt.update(grads, opt.init(params), params, stats=stats)


def test_multisteps_under_jit_compiles_once():
  acc = mkor_optax.MultiSteps(mkor_optax.mkor(1e-2), every_k_schedule=3)
  traces = []

  @jax.jit
  def step(params, state, x, y):
    traces.append(1)
    _, grads, stats = mkor_optax.value_and_grad(loss_fn)(params, x, y)
    updates, state = acc.update(grads, state, params, stats=stats)
    return optax.apply_updates(params, updates), state

  params = init_params()
  state = acc.init(params)
  for t in range(6):
    params, state = step(params, state, *batch(t))
  assert len(traces) == 1
  assert int(state.inner.gradient_step) == 2
  assert bool(acc.has_updated(state))


@pytest.mark.parametrize('name', NAMES)
def test_an_unjitted_loop_compiles_nothing_after_its_first_steps(name):
  """Eager use (flax's VAE example does not jit its step): once the first
  steps have compiled, further steps lower no new XLA computation."""
  alias = METHODS[name][0]
  opt = alias(1e-2)
  params = init_params()
  state = opt.init(params)
  lowered = []
  listener = lambda event, duration, **kw: (
      lowered.append(event) if event == '/jax/core/compile/jaxpr_to_mlir_module_duration' else None)

  def step(i, params, state):
    x, y = batch(i)
    _, grads, extra = grads_and_extra(name, params, x, y)
    u, state = opt.update(grads, state, params, **extra)
    return optax.apply_updates(params, u), state

  for i in range(2):
    params, state = step(i, params, state)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    for i in range(2, 5):
      params, state = step(i, params, state)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert lowered == []
  assert all(np.all(np.isfinite(l)) for l in jax.tree.leaves(params))
