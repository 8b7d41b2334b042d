"""Numerical safety: bad inputs, extreme scales, 16-bit factors and long runs.

The rule every test here checks: a bad step leaves the state as it was, a
nonsensical setting is a ``ValueError`` naming the rule, and what the code
cannot prevent is detected and named (a warning or an error naming the
layer), never passed on silently. The full-length soaks are
``benchmarks/soak.py``; the runs here are shortened to the smallest size that
still reproduces each failure on the code before the fix.
"""

import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

import mkor_optax
from mkor_optax import lowrank
from mkor_optax.factors import refresh_relative
from mkor_optax.mkor import DAMPING as MKOR_DAMPING, GAMMA, refresh_inverse
from mkor_optax.numerics import NumericalWarning

from helpers import batch, compiled_optimised, init_params, loss_fn

# Some tests here check warnings from compiled steps, which need
# mkor_optax.jit_warnings(True) (off by default).
pytestmark = pytest.mark.usefixtures('jit_warnings_on')

GRAD = mkor_optax.value_and_grad(loss_fn, kind=mkor_optax.RANK1)
COV_GRAD = mkor_optax.value_and_grad(loss_fn, kind=mkor_optax.COVARIANCE)


def finite(tree) -> bool:
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


def min_eig(f) -> float:
  """Smallest eigenvalue (float64) of a dense or low-rank factor inverse
  stack; a low-rank one ``c I + Q diag(s) Q^T`` from its own form (``Q = Q_o
  R``: the eigenvalues are ``c`` and those of ``c I + R diag(s) R^T``)."""
  if isinstance(f, lowrank.LowRankInverse):
    q = np.asarray(jnp.asarray(f.q, jnp.float32), np.float64)
    c, s = np.asarray(f.c, np.float64), np.asarray(f.s, np.float64)
    r = np.linalg.qr(q)[1]
    core = np.einsum('sij,sj,skj->sik', r, s, r)
    return float(min(c.min(), (c[:, None] + np.linalg.eigvalsh(core)).min()))
  dense = np.asarray(jnp.asarray(f, jnp.float32), np.float64)
  return float(np.linalg.eigvalsh(0.5 * (dense + np.swapaxes(dense, -1, -2))).min())


def mkor_factors(state):
  is_mkor = lambda x: isinstance(x, mkor_optax.MKORState)
  for node in jax.tree.leaves(state, is_leaf=is_mkor):
    if is_mkor(node):
      yield from node.input_side.values()
      yield from node.output_side.values()


def nan_like(tree):
  return jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), tree)


# ------------------------------------------------------------ digits MLP soak

X_DIGITS, Y_DIGITS = load_digits(return_X_y=True)
X_DIGITS = jnp.asarray(X_DIGITS / 16.0, jnp.float32)
Y_DIGITS = jnp.asarray(Y_DIGITS)


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(10)(nn.tanh(nn.Dense(64)(nn.tanh(nn.Dense(64)(x)))))


def digits_loss(params, x, y):
  logits = MLP().apply({'params': params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def train_digits(tx, steps, *, scale=1.0, stat_scale=1.0, kind=mkor_optax.RANK1, value=False):
  """``(losses, params, state)`` of ``steps`` full-batch-cycling steps of ``tx``."""
  params = MLP().init(jax.random.PRNGKey(0), X_DIGITS[:2])['params']
  state = tx.init(params)
  grad = (mkor_optax.value_and_grad(digits_loss, kind=kind) if kind is not None
          else lambda p, x, y: (*jax.value_and_grad(digits_loss)(p, x, y), None))

  def run(params, state):
    def body(carry, i):
      params, state = carry
      idx = (i * 64 + jnp.arange(64)) % X_DIGITS.shape[0]
      loss, g, stats = grad(params, X_DIGITS[idx] * scale, Y_DIGITS[idx])
      extra = {}
      if stats is not None:
        extra['stats'] = jax.tree.map(lambda s: s * stat_scale, stats)
      if value:
        extra['value'] = loss
      u, state = tx.update(g, state, params, **extra)
      return (optax.apply_updates(params, u), state), loss
    return jax.lax.scan(body, (params, state), jnp.arange(steps))

  # a long run is execution-bound: compiled at full optimisation (see helpers)
  run = compiled_optimised(run, params, state) if steps >= 1000 else jax.jit(run)
  (params, state), losses = run(params, state)
  return np.asarray(losses), params, state


# ------------------------------------------------------------------- SONew

class Unused(nn.Module):
  """A Dense layer, and a parameter the loss never uses."""

  @nn.compact
  def __call__(self, x):
    self.param('unused', nn.initializers.normal(1.0), (5, 3))
    return nn.Dense(3, kernel_init=nn.initializers.zeros, name='head')(nn.tanh(nn.Dense(6)(x)))


def unused_loss(params, x, y):
  return jnp.mean((Unused().apply({'params': params}, x) - y) ** 2)


def test_sonew_unused_tensor_and_zero_initialised_head_give_finite_updates():
  params = Unused().init(jax.random.PRNGKey(0), batch(0)[0])['params']
  tx = mkor_optax.sonew(1e-2)
  state = tx.init(params)
  for t in range(3):
    grads = jax.grad(unused_loss)(params, *batch(t))
    u, state = tx.update(grads, state, params)
    assert finite(u) and finite(state), f'step {t}'
    np.testing.assert_array_equal(u['unused'], 0.0)
    if t == 0:  # the layer behind the zero head has an all-zero gradient at step 0
      np.testing.assert_array_equal(u['Dense_0']['kernel'], 0.0)
    params = optax.apply_updates(params, u)
  assert finite(params)
  assert not np.allclose(params['head']['kernel'], 0.0)


@pytest.mark.parametrize('bad', [np.nan, np.inf])
def test_sonew_non_finite_gradient_keeps_the_state(bad):
  params = init_params()
  tx = mkor_optax.scale_by_sonew()
  state = tx.init(params)
  for t in range(2):
    state = tx.update(jax.grad(loss_fn)(params, *batch(t)), state, params)[1]
  grads = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(bad), jax.grad(loss_fn)(params, *batch(2)))
  with pytest.warns(NumericalWarning, match='non-finite gradients'):
    _, after = tx.update(grads, state, params)
    jax.block_until_ready(after)
  jax.tree.map(np.testing.assert_array_equal, after, state)
  u, later = tx.update(jax.grad(loss_fn)(params, *batch(3)), after, params)
  assert finite(u) and finite(later)


def test_sonew_nan_learning_rate_skips_the_step():
  params = init_params()
  schedule = lambda count: jnp.where(count == 1, jnp.nan, 1e-2)
  tx = mkor_optax.sonew(schedule)
  state = tx.init(params)
  for t in range(4):
    grads = jax.grad(loss_fn)(params, *batch(t))
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter('always')
      u, state = tx.update(grads, state, params)
      jax.block_until_ready(u)
    if t == 1:
      assert any('learning rate' in str(w.message) for w in caught)
      jax.tree.map(lambda x: np.testing.assert_array_equal(x, 0.0), u)
    params = optax.apply_updates(params, u)
    assert finite(params) and finite(state), f'step {t}'


# ------------------------------------------------------- accepted nonsense

NONSENSE = [
    (mkor_optax.mkor, dict(gamma=0.5), 'zeta: must be < gamma'),
    (mkor_optax.mkor, dict(gamma=0.9, zeta=0.9), 'zeta: must be < gamma'),
    (mkor_optax.scale_by_mkor, dict(gamma=1e-9), 'zeta: must be < gamma'),
    (mkor_optax.mkor_h, dict(gamma=0.5), 'zeta: must be < gamma'),
    (mkor_optax.mkor, dict(epsilon=float('inf')), 'epsilon: must be finite'),
    (mkor_optax.mkor, dict(inv_freq=2 ** 40), r'inv_freq: must be an integer in \[1, 2\*\*31 - 1\]'),
    (mkor_optax.mkor_h, dict(inv_freq=2 ** 40), 'inv_freq: must be an integer'),
    (mkor_optax.kfac, dict(inv_freq=2 ** 40), 'inv_freq: must be an integer'),
    (mkor_optax.kfac, dict(damping=float('inf')), 'damping: must be finite'),
    (mkor_optax.eva, dict(damping=float('inf')), 'damping: must be finite'),
    (mkor_optax.sonew, dict(damping=float('inf')), 'damping: must be finite'),
    (mkor_optax.sonew, dict(damping=float('nan')), 'damping: must be finite'),
]


@pytest.mark.parametrize('make,kwargs,message', NONSENSE,
                         ids=[f'{m.__name__}-{k}' for m, k, _ in NONSENSE])
def test_nonsensical_settings_are_refused_with_the_rule(make, kwargs, message):
  with pytest.raises(ValueError, match=message):
    if make is mkor_optax.scale_by_mkor:
      make(**kwargs)
    else:
      make(1e-2, **kwargs)


def test_zeta_below_gamma_is_what_keeps_unvisited_directions_bounded():
  """The rule's reason, measured: a direction the statistics never visit,
  refreshed 300 times, stays at the fixed point (1-zeta)/(gamma-zeta) when
  zeta < gamma and grows without bound otherwise."""
  v = jnp.zeros((1, 3)).at[0, 0].set(1.0)  # visits e_0 only
  for gamma, zeta, bounded in ((0.95, 0.9, True), (0.9, 0.9, False), (0.5, 0.9, False)):
    p = jnp.eye(3)[None]
    for _ in range(300):
      p = refresh_inverse(p, v, gamma=gamma, zeta=zeta, epsilon=2.0)
    unvisited = float(p[0, 2, 2])
    if bounded:
      assert unvisited < 1.01 * max(2.0 / gamma, (1 - zeta) / (gamma - zeta))
    else:
      assert not unvisited < 20.0, (gamma, zeta, unvisited)


# ------------------------------------------------------------ 16-bit factors

def test_bf16_dense_factors_are_refused_even_under_inject_hyperparams():
  with pytest.raises(ValueError, match='only for low-rank'):
    mkor_optax.mkor(1e-2, low_rank=None, factor_dtype='bfloat16')
  opt = optax.inject_hyperparams(mkor_optax.mkor)(learning_rate=1e-2, factor_dtype='bfloat16',
                                                 low_rank=2)
  with pytest.raises(ValueError, match='only for low-rank'):  # low_rank_min_dim is an array here
    opt.init(init_params())


def test_bf16_low_rank_factors_stay_orthonormal_positive_definite_and_train():
  kw = dict(inv_freq=1, low_rank=8, low_rank_min_dim=0)
  f32, _, _ = train_digits(mkor_optax.mkor(1e-2, **kw), 400)
  b16, params, state = train_digits(mkor_optax.mkor(1e-2, factor_dtype='bfloat16', **kw), 400)
  assert finite(params) and finite(state)
  for f in mkor_factors(state):
    assert min_eig(f) > 0
    if isinstance(f, lowrank.LowRankInverse):
      q = np.asarray(f.q, np.float64)
      gram = np.einsum('sik,sil->skl', q, q)
      assert np.abs(gram - np.eye(q.shape[-1])).max() < 0.05
  assert b16[-50:].mean() < 1.3 * f32[-50:].mean() + 0.02, (b16[-50:].mean(), f32[-50:].mean())


def test_bf16_low_rank_factors_at_large_input_scale():
  tx = mkor_optax.mkor(1e-2, inv_freq=1, low_rank=8, low_rank_min_dim=0, factor_dtype='bfloat16')
  losses, params, state = train_digits(tx, 300, scale=1000.0)
  lamb, _, _ = train_digits(optax.lamb(1e-2, weight_decay=0.01), 300, scale=1000.0, kind=None)
  assert finite(params) and min(min_eig(f) for f in mkor_factors(state)) > 0
  assert losses[-50:].mean() < max(2.0 * lamb[-50:].mean(), 1.0), (losses[-50:].mean(),
                                                                    lamb[-50:].mean())


# ------------------------------------------------------- statistics x 1e20

@pytest.mark.parametrize('name', ['mkor', 'mkor_h', 'eva'])
def test_statistics_scaled_1e20_keep_factors_and_updates_finite(name):
  make = {'mkor': lambda: mkor_optax.mkor(1e-2, inv_freq=1),
          'mkor_h': lambda: mkor_optax.mkor_h(1e-2, inv_freq=1),
          'eva': lambda: mkor_optax.eva(1e-2)}[name]
  losses, params, state = train_digits(make(), 60, stat_scale=1e20, value=name == 'mkor_h')
  assert finite(params) and finite(state)
  assert losses[-10:].mean() < losses[0]
  for f in mkor_factors(state):
    assert min_eig(f) > 0


# --------------------------------------------------- K-FAC at input scale

def test_kfac_at_input_scale_1000_ends_no_worse_than_lamb_alone():
  """Inputs x1000 saturate the first tanh layer: LAMB alone at lr 1e-2 stays
  near chance (ln 10 = 2.3). K-FAC with either damping must end finite and
  no worse than its own backend alone (the damping is not what breaks)."""
  lamb = train_digits(optax.lamb(1e-2, weight_decay=0.01), 300, scale=1000.0, kind=None)[0]
  for rel in (False, True):
    losses, params, _ = train_digits(mkor_optax.kfac(1e-2, relative_damping=rel), 300,
                                     scale=1000.0, kind=mkor_optax.COVARIANCE)
    assert finite(params)
    assert losses[-50:].mean() <= 1.05 * lamb[-50:].mean() + 0.02, (rel, losses[-50:].mean(),
                                                                    lamb[-50:].mean())


# ------------------------------------------------------------------ long run

def test_mkor_long_constant_lr_run_ends_no_worse_than_lamb():
  steps = 3000
  lamb, lamb_p, _ = train_digits(optax.lamb(1e-2, weight_decay=0.01), steps, kind=None)
  mk, mk_p, state = train_digits(mkor_optax.mkor(1e-2), steps)
  norm = lambda p: float(jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(p))))
  assert finite(mk_p) and finite(state)
  assert mk[-100:].mean() <= lamb[-100:].mean() * 1.05 + 0.01, (mk[-100:].mean(), lamb[-100:].mean())
  assert norm(mk_p) <= 1.5 * norm(lamb_p), (norm(mk_p), norm(lamb_p))


def test_the_documented_long_run_remedies_end_below_lamb_at_10000_steps():
  """Safety guide: past ~5,000 constant-lr steps under LAMB the default
  drifts (as LAMB alone does, later); a cosine schedule and an Adam backend
  do not."""
  steps = 10000
  lamb = train_digits(optax.lamb(1e-2, weight_decay=0.01), steps, kind=None)[0][-100:].mean()
  adam = train_digits(mkor_optax.mkor(1e-2, backend=optax.adamw(1e-3)), steps)[0][-100:].mean()
  assert adam < lamb, (adam, lamb)
  cosine = optax.cosine_decay_schedule(1e-2, steps)
  lamb_c = train_digits(optax.lamb(cosine, weight_decay=0.01), steps, kind=None)[0][-100:].mean()
  mk_c = train_digits(mkor_optax.mkor(cosine), steps)[0][-100:].mean()
  assert mk_c < lamb_c, (mk_c, lamb_c)


# ------------------------------------------------------ state lacks a layer

@pytest.mark.parametrize('name', ['mkor', 'kfac', 'eva'])
def test_a_state_without_a_layer_of_the_gradients_is_an_error_naming_it(name):
  params = init_params()
  make, grad = {'mkor': (mkor_optax.scale_by_mkor, GRAD), 'kfac': (mkor_optax.scale_by_kfac, COV_GRAD),
                'eva': (mkor_optax.scale_by_eva, GRAD)}[name]
  _, grads, stats = grad(params, *batch(0))
  state = make(exclude='out').init(params)  # a state built without 'out'
  with pytest.raises(ValueError, match=r"\['out'\].*holds no factors"):
    make().update(grads, state, params, stats=stats)


# ------------------------------------------------------- shapes named

@pytest.mark.parametrize('name', ['mkor', 'kfac', 'eva'])
def test_a_state_built_for_other_shapes_names_the_layer_and_both_shapes(name):
  make, kind = {'mkor': (mkor_optax.scale_by_mkor, mkor_optax.RANK1),
                'kfac': (mkor_optax.scale_by_kfac, mkor_optax.COVARIANCE),
                'eva': (mkor_optax.scale_by_eva, mkor_optax.RANK1)}[name]

  class Wide(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
      return nn.Dense(3, name='out')(nn.tanh(nn.Dense(self.width, name='hidden')(x)))

  x, y = batch(0)
  small = Wide(6).init(jax.random.PRNGKey(0), x)['params']
  big = Wide(9).init(jax.random.PRNGKey(0), x)['params']
  loss = lambda p, x, y: jnp.mean((Wide(9).apply({'params': p}, x) - y) ** 2)
  _, grads, stats = mkor_optax.value_and_grad(loss, kind=kind)(big, x, y)
  tx = make()
  with pytest.raises(ValueError, match=r"changed shape since init: 'hidden'.*\(1, 9\).*\(1, 6\)"):
    tx.update(grads, tx.init(small), big, stats=stats)


def test_sonew_gradients_of_another_shape_name_the_leaf_and_both_shapes():
  params = init_params()
  tx = mkor_optax.scale_by_sonew()
  state = tx.init(params)
  grads = jax.grad(loss_fn)(params, *batch(0))
  grads = dict(grads, out={'kernel': jnp.zeros((6, 5))})
  with pytest.raises(ValueError, match=r"'out'.*'kernel'.*\(6, 5\) \(30 entries\), state 18"):
    tx.update(grads, state, params)


def test_nnx_layer_swapped_after_init_names_the_layer_and_both_shapes():
  from flax import nnx

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.a = nnx.Linear(4, 32, rngs=rngs)
      self.b = nnx.Linear(32, 3, rngs=rngs)

    def __call__(self, x):
      return self.b(nnx.tanh(self.a(x)))

  model = Model(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, mkor_optax.mkor(1e-2), wrt=nnx.Param)
  model.a = nnx.Linear(4, 48, rngs=nnx.Rngs(1))
  model.b = nnx.Linear(48, 3, rngs=nnx.Rngs(2))
  x, y = batch(0)
  loss = lambda m, x, y: jnp.mean((m(x) - y) ** 2)
  _, grads, stats = mkor_optax.nnx.value_and_grad(loss, kind=mkor_optax.RANK1)(model, x, y)
  with pytest.raises(ValueError, match=r"changed shape since init: 'a'.*\(1, 48\).*\(1, 32\)"):
    optimizer.update(model, grads, stats=stats)


# ------------------------------------------------------------- MultiSteps

class TwoHeads(nn.Module):
  """Two heads; the loss uses the second only when ``use_b``."""

  @nn.compact
  def __call__(self, x, use_b):
    h = nn.tanh(nn.Dense(6, name='trunk')(x))
    out = nn.Dense(3, name='head_a')(h)
    if use_b:
      out = out + nn.Dense(3, name='head_b')(h)
    return out


def two_heads_loss(params, x, y, use_b):
  return jnp.mean((TwoHeads().apply({'params': params}, x, use_b) - y) ** 2)


def test_multisteps_refreshes_a_layer_from_the_micro_batches_that_had_it():
  x, y = batch(0, n=16)
  params = TwoHeads().init(jax.random.PRNGKey(0), x, True)['params']
  grad = mkor_optax.value_and_grad(two_heads_loss, kind=mkor_optax.RANK1)
  acc = mkor_optax.MultiSteps(mkor_optax.mkor(1e-2, inv_freq=1), every_k_schedule=2,
                              kind=mkor_optax.RANK1)
  state = acc.init(params)
  _, g1, s1 = grad(params, x[:8], y[:8], True)
  _, g2, s2 = grad(params, x[8:], y[8:], False)  # head_b unused: no statistics for it
  _, state = acc.update(g1, state, params, stats=s1)
  with pytest.warns(UserWarning, match=r"no statistics for layer\(s\) \['head_b'\].*refreshed from "
                    r'the micro-batches of the accumulation that had'):
    _, state = acc.update(g2, state, params, stats=s2)
  mk = state.inner.inner_opt_state[0]
  # reference: head_b's factors refreshed once from micro-batch 1's statistic alone
  ref = mkor_optax.scale_by_mkor(inv_freq=1)
  rstate = ref.init(params)
  _, rstate = ref.update(g1, rstate, params, stats=s1)
  for side, stat in ((mk.input_side, 'a'), (mk.output_side, 'g')):
    want, _, _ = refresh_relative(
        jnp.eye(side['head_b'].shape[-1])[None], jnp.zeros((1,)), s1['head_b'][stat][None],
        damping=MKOR_DAMPING, gamma=GAMMA, zeta=0.9, epsilon=2.0, refresh='ema')
    np.testing.assert_allclose(side['head_b'], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(mk.input_side['head_b'], rstate.input_side['head_b'], rtol=1e-5, atol=1e-6)


def test_multisteps_layer_absent_from_every_micro_batch_keeps_its_factors():
  x, y = batch(0, n=16)
  params = TwoHeads().init(jax.random.PRNGKey(0), x, True)['params']
  grad = mkor_optax.value_and_grad(two_heads_loss, kind=mkor_optax.RANK1)
  acc = mkor_optax.MultiSteps(mkor_optax.mkor(1e-2, inv_freq=1), every_k_schedule=2,
                              kind=mkor_optax.RANK1)
  state = acc.init(params)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    for half in (slice(0, 8), slice(8, 16)):
      _, g, s = grad(params, x[half], y[half], False)
      u, state = acc.update(g, state, params, stats=s)
  mk = state.inner.inner_opt_state[0]
  np.testing.assert_array_equal(mk.input_side['head_b'], jnp.eye(7)[None])
  assert not np.allclose(mk.input_side['head_a'], jnp.eye(7)[None])
  assert finite(u)


@pytest.mark.parametrize('k', [0, -1, 2.5, 'two', True])
def test_multisteps_bad_every_k_schedule_is_refused(k):
  with pytest.raises(ValueError, match='every_k_schedule'):
    mkor_optax.MultiSteps(mkor_optax.mkor(1e-2), every_k_schedule=k)


# ---------------------------------------------------------- quadratic step

def quadratic_inputs(params, x, y):
  out = lambda p: init_model().apply({'params': p}, x)
  mse = lambda o: jnp.mean((o - y) ** 2)
  return dict(value_fn=lambda p: mse(out(p)), curvature=mkor_optax.gauss_newton(out, mse))


def init_model():
  from helpers import Net
  return Net()


def test_quadratic_step_nan_gradient_gives_a_zero_update_and_keeps_the_state():
  params = init_params()
  tx = mkor_optax.scale_by_quadratic_step()
  state = tx.init(params)
  x, y = batch(0)
  for t in range(2):
    loss, grads = jax.value_and_grad(loss_fn)(params, *batch(t))
    u, state = tx.update(grads, state, params, grad=grads, value=loss,
                         **quadratic_inputs(params, *batch(t)))
    params = optax.apply_updates(params, u)
  loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
  bad = nan_like(grads)
  with pytest.warns(NumericalWarning):
    u, after = tx.update(bad, state, params, grad=bad, value=loss, **quadratic_inputs(params, x, y))
    jax.block_until_ready(u)
  jax.tree.map(lambda a: np.testing.assert_array_equal(a, 0.0), u)
  jax.tree.map(np.testing.assert_array_equal, after, state)
  u, later = tx.update(grads, after, params, grad=grads, value=loss, **quadratic_inputs(params, x, y))
  assert finite(u) and finite(later._replace(rho=0.0))  # rho is NaN on steps that do not measure it


def test_quadratic_step_vector_value_is_a_clear_error():
  params = init_params()
  tx = mkor_optax.scale_by_quadratic_step()
  x, y = batch(0)
  grads = jax.grad(loss_fn)(params, x, y)
  inputs = quadratic_inputs(params, x, y)
  with pytest.raises(ValueError, match='value=.*scalar'):
    tx.update(grads, tx.init(params), params, grad=grads, value=jnp.ones(3), **inputs)
  scalar_fn = inputs['value_fn']
  inputs['value_fn'] = lambda p: jnp.ones(3) * scalar_fn(p)
  with pytest.raises(ValueError, match='value_fn.*scalar'):
    tx.update(grads, tx.init(params), params, grad=grads, value=jnp.float32(1.0), **inputs)


# ---------------------------------------------------------------- MKOR-H

def test_mkor_h_negative_loss_does_not_switch_while_it_falls():
  """A log-likelihood-style loss that crosses zero and keeps falling at a
  steady rate never looks like a plateau."""
  params = init_params()
  tx = mkor_optax.scale_by_mkor_h()
  state = tx.init(params)
  _, grads, stats = GRAD(params, *batch(0))
  update = jax.jit(lambda s, v: tx.update(grads, s, params, stats=stats, value=v)[1])
  for t in range(300):
    state = update(state, jnp.float32(5.0 - 0.05 * t))  # 5 -> -10, crossing 0 at step 100
  assert int(state.switch_step) == -1


# ----------------------------------------------- sharded state and orbax

def test_sharded_factor_state_restores_into_init_as_the_target(tmp_path):
  ocp = pytest.importorskip('orbax.checkpoint')
  from test_sharding import GRAD as SH_GRAD, X, Y, on_mesh
  params = on_mesh(4)
  tx = mkor_optax.mkor(1e-2, inv_freq=1)
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    _, grads, stats = SH_GRAD(params, X, Y)
    u, state = tx.update(grads, state, params, stats=stats)
    return optax.apply_updates(params, u), state

  params, state = step(params, state)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / 'state', state)
  ckpt.wait_until_finished()
  target = tx.init(on_mesh(4))  # the obvious restore target: a fresh init
  restored = ckpt.restore(tmp_path / 'state', target)
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
    assert a.sharding.is_equivalent_to(b.sharding, a.ndim)  # placed as init places them
  assert not restored[0].output_side['wide'].q.sharding.is_fully_replicated
  # the same values at the same placement continue the run bit for bit (the
  # stepped state is placed where jit's propagation put it, and a program
  # compiled for other input shardings may round differently)
  a1, _ = step(params, restored)
  a2, _ = step(params, jax.device_put(state, jax.tree.map(lambda a: a.sharding, restored)))
  jax.tree.map(np.testing.assert_array_equal, nn.unbox(a1), nn.unbox(a2))
  # a chain of the user's own (here inject_hyperparams, whose values sit on one
  # device): the README's one line places the target on the mesh
  opt = optax.inject_hyperparams(mkor_optax.mkor)(learning_rate=1e-2, inv_freq=1)
  state = opt.init(params)
  ckpt.save(tmp_path / 'injected', state)
  ckpt.wait_until_finished()
  target = mkor_optax.sharding.place_state(opt.init(params), params)
  restored = ckpt.restore(tmp_path / 'injected', target)
  _, grads, stats = SH_GRAD(params, X, Y)
  jax.jit(lambda g, s, p, st: opt.update(g, s, p, stats=st))(grads, restored, params, stats)


# ------------------------------------------------------- property-style

def random_case(seed):
  rng = np.random.default_rng(seed)
  gamma = float(rng.uniform(0.5, 0.999))
  zeta = float(rng.uniform(0.0, 0.99 * gamma))
  hp = dict(gamma=gamma, zeta=zeta, epsilon=float(10 ** rng.uniform(-0.5, 2)),
            refresh=str(rng.choice(['ema', 'blend'])), inv_freq=int(rng.integers(1, 3)),
            low_rank=int(rng.choice([2, 4])), low_rank_min_dim=int(rng.choice([0, 10 ** 6])),
            factor_dtype=str(rng.choice(['float32', 'bfloat16'])))
  if hp['factor_dtype'] == 'bfloat16':  # 16 bits: low-rank factors only
    hp['low_rank_min_dim'] = 0
  return rng, hp


@pytest.mark.parametrize('seed', range(12))
def test_property_random_scales_zero_rows_and_non_finite_entries(seed):
  """Over random hyperparameters and a stream of statistics at random scales
  (1e-30 .. 1e30), with zero statistics and NaN/Inf entries at random places:
  the state stays finite, every factor stays symmetric positive definite, and
  every update is finite or zero-passed (the incoming gradient unchanged
  where the step was non-finite)."""
  rng, hp = random_case(seed)
  params = init_params()
  tx = mkor_optax.scale_by_mkor(**hp)
  state = tx.init(params)
  update = jax.jit(lambda g, s, st: tx.update(g, s, params, stats=st))
  _, grads, stats = GRAD(params, *batch(seed))
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', NumericalWarning)
    for t in range(25):
      scale = 10.0 ** rng.uniform(-30, 30)
      st = jax.tree.map(lambda s: s * scale * rng.standard_normal(s.shape).astype(np.float32), stats)
      g = grads
      what = rng.choice(['ok', 'zero', 'nan', 'inf', 'grad_nan'], p=[0.6, 0.1, 0.1, 0.1, 0.1])
      layer = str(rng.choice(['hidden', 'out']))
      side = 'a' if rng.random() < 0.5 else 'g'
      if what == 'zero':
        st = dict(st, **{layer: dict(st[layer], **{side: jnp.zeros_like(st[layer][side])})})
      elif what in ('nan', 'inf'):
        arr = st[layer][side].at[int(rng.integers(st[layer][side].shape[-1]))].set(
            np.nan if what == 'nan' else np.inf)
        st = dict(st, **{layer: dict(st[layer], **{side: arr})})
      elif what == 'grad_nan':
        g = nan_like(grads)
      before = state
      u, state = update(g, state, st)
      assert finite(state), (seed, t, hp, what)
      if what in ('nan', 'inf', 'grad_nan'):
        jax.tree.map(np.testing.assert_array_equal, state.input_side, before.input_side)
        jax.tree.map(np.testing.assert_array_equal, state.output_side, before.output_side)
      else:
        assert finite(u), (seed, t, hp, what)
      for f in mkor_factors(state):
        dense = lowrank.to_dense(f) if isinstance(f, lowrank.LowRankInverse) else f
        dense = np.asarray(jnp.asarray(dense, jnp.float32), np.float64)
        np.testing.assert_allclose(dense, np.swapaxes(dense, -1, -2), atol=1e-6 * np.abs(dense).max())
        assert min_eig(f) > 0, (seed, t, hp, what)


# ------------------------------------------------ warnings from inside jit, at no cost
WARNING_TRANSFORMS = {
    'mkor': (lambda: mkor_optax.mkor(1e-2), mkor_optax.RANK1),
    'mkor sketched': (lambda: mkor_optax.mkor(1e-2), mkor_optax.Sketch(2)),
    'mkor_h': (lambda: mkor_optax.mkor_h(1e-2), mkor_optax.RANK1),
    'kfac': (lambda: mkor_optax.kfac(1e-2), mkor_optax.COVARIANCE),
    'eva': (lambda: mkor_optax.eva(1e-2), mkor_optax.RANK1),
    'sonew': (lambda: mkor_optax.sonew(1e-2), None),
}


@pytest.mark.parametrize('name', list(WARNING_TRANSFORMS))
def test_a_jitted_update_warns_of_non_finite_gradients_and_has_no_effects(name):
  """The checks run in the compiled step (a host call only on a bad step)
  and leave it effect-free: an effect such as ``jax.debug.callback`` takes
  every call of the user's jitted step off jit's C++ dispatch path."""
  make, kind = WARNING_TRANSFORMS[name]
  params = init_params()
  tx = make()
  state = tx.init(params)
  if kind is None:
    grads, stats = jax.grad(loss_fn)(params, *batch(0)), None
  else:
    _, grads, stats = mkor_optax.value_and_grad(loss_fn, kind=kind)(params, *batch(0))
  extra = {} if stats is None else {'stats': stats}
  if name == 'mkor_h':
    extra['value'] = jnp.float32(1.0)
  step = jax.jit(lambda g, s: tx.update(g, s, params, **extra))
  assert jax.make_jaxpr(step)(grads, state).effects == set()
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    u, state = step(grads, state)
    jax.block_until_ready(u)
  assert not [w for w in caught if issubclass(w.category, NumericalWarning)]
  with pytest.warns(NumericalWarning, match='non-finite'):
    jax.block_until_ready(step(nan_like(grads), state))


def test_a_jitted_quadratic_step_warns_of_a_non_finite_gradient():
  params = init_params()
  tx = mkor_optax.scale_by_quadratic_step()
  state = tx.init(params)
  x, y = batch(0)

  @jax.jit
  def step(grads, state, loss):
    return tx.update(grads, state, params, grad=grads, value=loss, **quadratic_inputs(params, x, y))

  loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
  assert jax.make_jaxpr(step)(grads, state, loss).effects == set()
  with pytest.warns(NumericalWarning, match='non-finite gradient'):
    jax.block_until_ready(step(nan_like(grads), state, loss))


def test_report_if_names_the_flagged_entries_under_jit_and_vmap():
  from mkor_optax.numerics import report_if
  msg = 'bad {}: {names}'

  def f(flags, value):
    return report_if(flags, msg, value, names=['a', 'b', 'c'])

  with pytest.warns(NumericalWarning, match=r"bad 2\.0: \['b', 'c'\]"):
    assert int(jax.jit(f)(jnp.array([False, True, True]), jnp.float32(2.0))) == 0
  with pytest.warns(NumericalWarning, match=r"bad 5\.0: \['a'\]"):  # the first member that holds
    out = jax.jit(jax.vmap(f))(jnp.array([[False] * 3, [True, False, False]]), jnp.array([4.0, 5.0]))
    np.testing.assert_array_equal(out, [0, 0])
  with warnings.catch_warnings():
    warnings.simplefilter('error', NumericalWarning)
    jax.block_until_ready(jax.jit(f)(jnp.zeros(3, bool), jnp.float32(1.0)))
