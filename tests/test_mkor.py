"""scale_by_mkor: full updates against a dense float64 reimplementation,
errors, NaN safety, jit, checkpointing, dtypes and layer selection."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mkor_optax
from mkor_optax.mkor import DAMPING as MKOR_DAMPING

from helpers import (KEY, assert_tree_close, aug_blocks, batch, from_blocks, init_params, loss_fn)

GRAD = mkor_optax.value_and_grad(loss_fn, kind=mkor_optax.RANK1)


def matrix_power(p, e):
  """float64 ``p^e`` of a symmetric positive definite ``p`` by ``eigh``."""
  lam, vec = np.linalg.eigh(p)
  return (vec * lam ** e) @ vec.T


def reference_run(grads_stats, gamma, zeta, epsilon, inv_freq, refresh='ema', power=1.0,
                  damping=None, rescale=True):
  """Dense float64 MKOR: explicit inverses of the factors, no Sherman-Morrison
  (with ``power``: the inverses raised to it before they precondition).

  ``damping``: the scale-free form. Each side's scale ``n`` is the EMA of
  ``|v|^2/d`` (from the first statistic); the inverse is held in units of
  ``damping * n``: moved to the new units (``P n_new / n_old``), then the
  same rule with ``v / sqrt(damping n_new)``. ``rescale=False``: the update
  is ``F_R^-p G F_L^-p`` with ``F = damping n P^-1`` (``P^p G L^p`` in the
  absolute form), not rescaled to the gradient's norm."""
  rinv = {'hidden': np.eye(5), 'out': np.eye(6)}
  linv = {'hidden': np.eye(6), 'out': np.eye(3)}
  scale = {}

  def refreshed(p, v, key):
    if damping is not None:
      m = v @ v / len(v)
      n = m if key not in scale else gamma * scale[key] + (1 - gamma) * m
      p = p if key not in scale else p * n / scale[key]
      scale[key] = n
      v = v / np.sqrt(damping * n)
    if np.abs(p).max() > epsilon:
      p = zeta * p + (1 - zeta) * np.eye(len(p))
    if refresh == 'ema':
      return np.linalg.inv(gamma * np.linalg.inv(p) + (1 - gamma) * np.outer(v, v))
    blended = gamma * p + (1 - gamma) * np.eye(len(p))
    return np.linalg.inv(np.linalg.inv(blended) + np.outer(v, v))

  outs = []
  for t, (grads, stats) in enumerate(grads_stats):
    grads = jax.tree.map(lambda a: np.asarray(a, np.float64), grads)
    if t % inv_freq == 0:
      for k in rinv:
        rinv[k] = refreshed(rinv[k], np.asarray(stats[k]['a'], np.float64), (k, 'a'))
        linv[k] = refreshed(linv[k], np.asarray(stats[k]['g'], np.float64), (k, 'g'))
    out = {}
    for k, g in aug_blocks(grads).items():
      u = matrix_power(rinv[k], power) @ g @ matrix_power(linv[k], power)
      if rescale:
        out[k] = u * np.linalg.norm(g) / np.linalg.norm(u)
      elif damping is None:
        out[k] = u
      else:
        out[k] = u / (damping * scale[(k, 'a')] * damping * scale[(k, 'g')]) ** power
    outs.append(from_blocks(out, grads))
  return outs


def assert_matches_reference(tx, hp, *, n_steps=7, jit=False, refresh='ema', power=1.0,
                             rtol=2e-4, atol=1e-6, lr=0.1):
  """Runs ``tx`` (an MKOR transform with hyperparameters ``hp``) on Net for
  ``n_steps`` steps and compares every update with :func:`reference_run`;
  returns the final state."""
  params = init_params()
  state = tx.init(params)
  update = lambda g, s, p, st: tx.update(g, s, p, stats=st)
  update = jax.jit(update) if jit else update
  steps, got = [], []
  for t in range(n_steps):
    _, grads, stats = GRAD(params, *batch(t))
    steps.append((grads, stats))
    u, state = update(grads, state, params, stats)
    got.append(u)
    params = optax.apply_updates(params, jax.tree.map(lambda x: -lr * x, u))
  want = reference_run(steps, refresh=refresh, power=power, **hp)
  for t, (g, w) in enumerate(zip(got, want)):
    assert_tree_close(g, w, rtol=rtol, atol=atol, msg=f'step {t}')
  return state


@pytest.mark.parametrize('damping', [None, 0.0625, 1.0])  # absolute, scale-free
@pytest.mark.parametrize('refresh', ['ema', 'blend'])
def test_full_update_equals_dense_float64_reference(refresh, damping):
  hp = dict(gamma=0.9, zeta=0.8, epsilon=1.5, inv_freq=2, damping=damping)
  state = assert_matches_reference(mkor_optax.scale_by_mkor(refresh=refresh, **hp), hp,
                                   refresh=refresh)
  assert int(state.count) == 7


@pytest.mark.parametrize('power', [1.0, 0.5])
@pytest.mark.parametrize('damping', [None, 0.0625, 1.0])
def test_unrescaled_update_is_the_natural_gradient_in_float64(damping, power):
  """``rescale=False``: ``F_R^-p G F_L^-p`` in the statistics' own units,
  each layer at its own size (the direction for the quadratic step)."""
  hp = dict(gamma=0.9, zeta=0.8, epsilon=1.5, inv_freq=2, damping=damping)
  assert_matches_reference(mkor_optax.scale_by_mkor(rescale=False, factor_power=power, **hp),
                           dict(hp, rescale=False), power=power, lr=0.0,  # batches vary
                           rtol=2e-4 if power == 1.0 else 1e-3)  # a float32 eigh for p < 1


def test_rescale_must_be_a_bool():
  with pytest.raises(TypeError, match='rescale'):
    mkor_optax.scale_by_mkor(rescale='no')


@pytest.mark.parametrize('kwargs, period', [(dict(inv_freq=3), 3), ({}, 7)])  # {}: the documented default
def test_factor_inverses_refresh_only_every_inv_freq_steps(kwargs, period):
  params = init_params()
  tx = mkor_optax.scale_by_mkor(**kwargs)
  state = tx.init(params)
  history = []
  for t in range(2 * period + 1):
    _, grads, stats = GRAD(params, *batch(t))
    _, state = tx.update(grads, state, params, stats=stats)
    history.append(np.asarray(state.output_side['hidden']))
  changed = [not np.array_equal(history[t], history[t - 1]) for t in range(1, len(history))]
  assert not np.array_equal(history[0], np.eye(6)[None])
  assert changed == [t % period == 0 for t in range(1, len(history))]


@pytest.mark.parametrize('kwargs, name', [
    (dict(gamma=1.0), 'gamma'), (dict(gamma=0.0), 'gamma'), (dict(zeta=1.5), 'zeta'),
    (dict(epsilon=0.0), 'epsilon'), (dict(inv_freq=0), 'inv_freq'), (dict(inv_freq=2.5), 'inv_freq'),
    (dict(refresh='sm'), 'refresh'), (dict(max_factor_dim=0), 'max_factor_dim'),
    (dict(factor_dtype=jnp.int32), 'factor_dtype'), (dict(exclude=[3]), 'exclude'),
])
def test_invalid_hyperparameters_raise_naming_the_parameter(kwargs, name):
  with pytest.raises(ValueError, match=name):
    mkor_optax.scale_by_mkor(**kwargs)
  with pytest.raises(ValueError, match=name):
    mkor_optax.mkor(1e-3, **kwargs)


def test_missing_or_mismatched_stats_raise_naming_the_layer():
  params = init_params()
  tx = mkor_optax.scale_by_mkor()
  state = tx.init(params)
  _, grads, stats = GRAD(params, *batch(0))
  with pytest.raises(ValueError, match='stats='):
    tx.update(grads, state, params)
  # a planned layer without statistics passes through, with a warning naming it
  with pytest.warns(UserWarning, match=r"\['out'\].*pass through"):
    u, new = tx.update(grads, state, params, stats={'hidden': stats['hidden']})
  np.testing.assert_array_equal(u['out']['kernel'], grads['out']['kernel'])
  assert not np.allclose(u['hidden']['kernel'], grads['hidden']['kernel'])
  np.testing.assert_array_equal(new.output_side['out'], state.output_side['out'])
  bad = dict(stats, hidden={'a': stats['hidden']['a'][:3], 'g': stats['hidden']['g']})
  with pytest.raises(ValueError, match="'hidden'"):
    tx.update(grads, state, params, stats=bad)
  with pytest.raises(ValueError, match="'ghost'"):
    tx.update(grads, state, params, stats=dict(stats, ghost=stats['out']))
  with pytest.raises(ValueError, match='stats='):  # through the chain too
    mkor_optax.mkor(1e-3).update(grads, mkor_optax.mkor(1e-3).init(params), params)


@pytest.mark.parametrize('where', ['grads', 'stats'])
def test_non_finite_step_leaves_factor_inverses_unchanged(where):
  params = init_params()
  tx = mkor_optax.scale_by_mkor(inv_freq=1)
  state = tx.init(params)
  _, grads, stats = GRAD(params, *batch(0))
  _, state = tx.update(grads, state, params, stats=stats)
  before = state
  _, grads, stats = GRAD(params, *batch(1))
  if where == 'grads':
    grads = jax.tree.map(lambda x: x, grads)
    grads['hidden']['kernel'] = grads['hidden']['kernel'].at[0, 0].set(jnp.nan)
  else:
    stats = dict(stats, out={'a': stats['out']['a'].at[1].set(jnp.inf), 'g': stats['out']['g']})
  _, after = jax.jit(tx.update)(grads, state, params, stats=stats)
  for k in ('input_side', 'output_side'):
    jax.tree.map(np.testing.assert_array_equal, getattr(after, k), getattr(before, k))
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(after))
  assert int(after.count) == 1  # a non-finite step is not counted


def test_bfloat16_dense_factors_are_refused_with_the_reason():
  params = init_params()
  for kw in (dict(), dict(low_rank=None), dict(low_rank=3, low_rank_min_dim=4)):
    with pytest.raises(ValueError, match='factor_dtype: bfloat16 is only for low-rank.*positive '
                       'definite'):
      mkor_optax.scale_by_mkor(factor_dtype=jnp.bfloat16, **kw)
  # the low-rank form takes it: bases in bfloat16, sides no wider than the rank dense float32
  state = mkor_optax.scale_by_mkor(factor_dtype='bfloat16', low_rank=3, low_rank_min_dim=0).init(params)
  assert state.input_side['hidden'].q.dtype == jnp.bfloat16 and state.output_side['out'].dtype == jnp.float32


def test_max_factor_dim_makes_large_sides_identity():
  params = init_params()
  tx = mkor_optax.scale_by_mkor(max_factor_dim=5, inv_freq=1, gamma=0.9, zeta=0.8)
  state = tx.init(params)
  assert set(state.input_side) == {'hidden'} and set(state.output_side) == {'out'}
  _, grads, stats = GRAD(params, *batch(0))
  u, state = tx.update(grads, state, params, stats=stats)
  g = np.vstack([grads['hidden']['kernel'], grads['hidden']['bias'][None]]).astype(np.float64)
  a = np.asarray(stats['hidden']['a'], np.float64)
  w = a / np.sqrt(MKOR_DAMPING * (a @ a) / 5)  # the scale-free statistic
  p = np.linalg.inv(0.9 * np.eye(5) + 0.1 * np.outer(w, w))
  want = p @ g
  want *= np.linalg.norm(g) / np.linalg.norm(want)
  np.testing.assert_allclose(u['hidden']['kernel'], want[:4], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(u['hidden']['bias'], want[4], rtol=1e-4, atol=1e-6)


def test_exclude_passes_layers_through_unchanged():
  params = init_params()
  for exclude in (['^out$'], 'out', lambda path: path == 'out'):
    tx = mkor_optax.scale_by_mkor(exclude=exclude)
    state = tx.init(params)
    assert set(state.input_side) == {'hidden'}
    _, grads, stats = GRAD(params, *batch(0))
    u, _ = tx.update(grads, state, params, stats=stats)
    np.testing.assert_array_equal(u['out']['kernel'], grads['out']['kernel'])
    np.testing.assert_array_equal(u['norm']['scale'], grads['norm']['scale'])
    assert not np.allclose(u['hidden']['kernel'], grads['hidden']['kernel'])


def test_mkor_alias_masks_weight_decay_off_biases_and_norms():
  params = init_params()
  zero = jax.tree.map(jnp.zeros_like, params)
  opt = mkor_optax.mkor(1.0, weight_decay=0.5)
  _, _, stats = GRAD(params, *batch(0))
  u, _ = opt.update(zero, opt.init(params), params, stats=stats)
  assert np.all(np.asarray(u['hidden']['bias']) == 0) and np.all(np.asarray(u['norm']['scale']) == 0)
  assert np.any(np.asarray(u['hidden']['kernel']) != 0)


class ScanNet(nn.Module):
  use_bias: bool = False

  @nn.compact
  def __call__(self, x):
    block = lambda: nn.Dense(4, use_bias=self.use_bias, name='fc')
    body = nn.scan(lambda m, c, _: (jnp.tanh(m(c)), None), variable_axes={'params': 0},
                   split_rngs={'params': True}, length=3)
    x, _ = body(block(), x, None)
    return x


@pytest.mark.parametrize('use_bias', [True, False])
def test_scanned_layers_are_preconditioned_per_layer(use_bias):
  model = ScanNet(use_bias)
  x, y = jax.random.normal(KEY, (6, 4)), jax.random.normal(jax.random.PRNGKey(3), (6, 4))
  params = model.init(KEY, x)['params']
  loss = lambda p: jnp.mean((model.apply({'params': p}, x) - y) ** 2)
  _, grads, stats = mkor_optax.value_and_grad(loss, kind=mkor_optax.RANK1)(params)
  if not use_bias:  # a bias-free stacked kernel (3, 4, 4) cannot be told apart by shape
    tx = mkor_optax.scale_by_mkor()
    with pytest.raises(ValueError, match='layer_layouts'):
      tx.update(grads, tx.init(params), params, stats=stats)
  layouts = mkor_optax.layer_layouts(loss, params)
  assert layouts == {'fc': mkor_optax.Layout(1, 1, use_bias)}
  tx = mkor_optax.scale_by_mkor(layouts=layouts)
  u, state = tx.update(grads, tx.init(params), params, stats=stats)
  assert state.output_side['fc'].shape == (3, 4, 4)
  for i in range(3):  # each layer on its own, through the unstacked 2-D path
    one = jax.tree.map(lambda t: t[i], params['fc'])
    one_stats = {'': jax.tree.map(lambda t: t[i], stats['fc'])}
    one_grads = jax.tree.map(lambda t: t[i], grads['fc'])
    tx1 = mkor_optax.scale_by_mkor()
    u1, _ = tx1.update(one_grads, tx1.init(one), one, stats=one_stats)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-7),
                 u['fc'], u1)
