"""Low-rank-plus-identity factor inverses (mkor_optax.lowrank) against dense
float64 inverses: exact for the first k refreshes, the best rank-k truncation
after, and the full MKOR update with them."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mkor_optax
from mkor_optax import lowrank
from mkor_optax.lowrank import LowRankInverse

from helpers import batch, init_params, loss_fn, orbax_round_trip
from test_mkor import GRAD, assert_matches_reference

RULE = dict(gamma=0.9, zeta=0.8, epsilon=1.5)
REFRESH = jax.jit(lowrank.refresh, static_argnames=('gamma', 'zeta', 'epsilon', 'refresh'))
JGRAD = jax.jit(GRAD)


def jitted_update(tx):
  return jax.jit(lambda g, s, p, st: tx.update(g, s, p, stats=st))


def dense_refresh(p, v, gamma, zeta, epsilon, refresh):
  """float64: stabiliser, then the exact inverse of the refreshed factor.

  ``v`` is one statistic ``(d,)`` or ``k`` sketches ``(k, d)``, whose term is
  their average outer product: ``F = gamma F' + (1-gamma) T`` (ema) or
  ``F = inv(gamma P' + (1-gamma) I) + T`` (blend)."""
  p = np.asarray(p, np.float64)
  eye = np.eye(len(p))
  if np.abs(p).max() > epsilon:
    p = zeta * p + (1 - zeta) * eye
  vs = np.atleast_2d(np.asarray(v, np.float64))
  term = vs.T @ vs / len(vs)
  if refresh == 'ema':
    return np.linalg.inv(gamma * np.linalg.inv(p) + (1 - gamma) * term)
  return np.linalg.inv(np.linalg.inv(gamma * p + (1 - gamma) * eye) + term)


def stats_stream(d, n, seed, scale=0.6):
  """Correlated statistics like a layer's mean inputs: a drifting mean plus noise."""
  rng = np.random.default_rng(seed)
  base = rng.normal(size=d)
  return [scale * (base + 0.5 * rng.normal(size=d)) for _ in range(n)]


def as_dense(p):
  return np.asarray(lowrank.to_dense(p), np.float64)[0]


@pytest.mark.parametrize('refresh', ['ema', 'blend'])
def test_first_k_refreshes_equal_dense_float64_inverse(refresh):
  d, k = 30, 6
  p = lowrank.identity(d, k, 1, jnp.float32)
  want = np.eye(d)
  fired = 0
  for t, v in enumerate(stats_stream(d, k, seed=1)):
    fired += np.abs(want).max() > RULE['epsilon']
    want = dense_refresh(want, v, refresh=refresh, **RULE)
    p = REFRESH(p, jnp.asarray(v[None], jnp.float32), refresh=refresh, **RULE)
    np.testing.assert_allclose(as_dense(p), want, rtol=1e-5, atol=1e-5 * np.abs(want).max(),
                               err_msg=f'refresh {t}')
  assert refresh == 'blend' or fired > 0  # the stabiliser took part
  q = np.asarray(p.q[0], np.float64)
  np.testing.assert_allclose(q.T @ q, np.eye(k), atol=1e-5)


@pytest.mark.parametrize('refresh', ['ema', 'blend'])
def test_refresh_past_rank_is_best_rank_k_truncation_of_exact_refresh(refresh):
  """From any truncated state, one refresh gives c I + (the best rank-k
  approximation of the exact refreshed P minus c I): Eckart-Young in float64."""
  d, k = 24, 4
  p = lowrank.identity(d, k, 1, jnp.float32)
  errors = []
  for t, v in enumerate(stats_stream(d, 12, seed=2)):
    exact = dense_refresh(as_dense(p), v, refresh=refresh, **RULE)
    p = REFRESH(p, jnp.asarray(v[None], jnp.float32), refresh=refresh, **RULE)
    c = float(p.c[0])
    evals, evecs = np.linalg.eigh(exact - c * np.eye(d))
    top = np.argsort(-np.abs(evals))[:k]
    best = c * np.eye(d) + (evecs[:, top] * evals[top]) @ evecs[:, top].T
    np.testing.assert_allclose(as_dense(p), best, atol=2e-5 * np.abs(exact).max(), err_msg=f'{t}')
    dropped = np.sort(np.abs(evals))[::-1][k]
    errors.append(np.linalg.norm(as_dense(p) - exact, 2) / max(dropped, 1e-30))
  # past k refreshes something is dropped, and the error is exactly what was dropped
  assert max(np.abs(np.array(errors[k:]) - 1.0)) < 1e-2


def test_stays_spd_orthonormal_over_many_refreshes_and_degenerate_statistics():
  d, k = 20, 5
  p = lowrank.identity(d, k, 2, jnp.float32)
  vs = stats_stream(d, 200, seed=3, scale=1.5)
  for t, v in enumerate(vs):
    v = np.stack([v, vs[0] if t % 2 else np.zeros(d)])  # a repeated and a zero statistic
    p = REFRESH(p, jnp.asarray(v, jnp.float32), refresh='ema', **RULE)
  dense = np.asarray(lowrank.to_dense(p), np.float64)
  q = np.asarray(p.q, np.float64)
  for s in range(2):
    np.testing.assert_allclose(q[s].T @ q[s], np.eye(k), atol=1e-4)
    assert np.linalg.eigvalsh(dense[s]).min() > 0
    np.testing.assert_allclose(float(lowrank.max_abs(p)[s]), np.abs(dense[s]).max(), rtol=1e-5)
  # the stabiliser bounds the growth (gamma^-200 without it): the rank-1 term
  # only lowers P, so max|P| <= max(eps, zeta x + 1 - zeta) / gamma each refresh,
  # whose bound is max(eps / gamma, (1 - zeta) / (gamma - zeta)) = 2
  g, z, e = RULE['gamma'], RULE['zeta'], RULE['epsilon']
  assert np.abs(dense).max() <= max(e / g, (1 - z) / (g - z)) + 1e-4


def refreshed(d, k, n_stack, seed, dtype=jnp.float32):
  p = lowrank.identity(d, k, n_stack, dtype)
  for v in stats_stream(d, k + 3, seed=seed):
    v = np.stack([v * (1 + i) for i in range(n_stack)])
    p = REFRESH(p, jnp.asarray(v, jnp.float32), refresh='ema', **RULE)
  return p


@pytest.mark.parametrize('sides', ['both', 'left', 'right', 'dense+low', 'bf16'])
def test_preconditioning_equals_dense_float64_products_rescaled(sides):
  """factors.precondition_rescaled with low-rank sides: the norm of R G L comes from
  k-sized products (the Gram of Q included, so bf16 factors are exact too)."""
  from mkor_optax import factors as kr
  m, n = 14, 11
  dtype = jnp.bfloat16 if sides == 'bf16' else jnp.float32
  r, l = refreshed(m, 4, 2, seed=6, dtype=dtype), refreshed(n, 3, 2, seed=7, dtype=dtype)
  if sides == 'left':
    l = None
  elif sides == 'right':
    r = None
  elif sides == 'dense+low':
    r = lowrank.to_dense(r)
  g = np.random.default_rng(8).normal(size=(2, m, n)).astype(np.float32)
  dense = lambda p, d: np.eye(d) if p is None else np.asarray(
      p if not isinstance(p, LowRankInverse) else lowrank.to_dense(p), np.float64)
  want = dense(r, m) @ g.astype(np.float64) @ dense(l, n)
  want *= (np.linalg.norm(g, axis=(1, 2)) / np.linalg.norm(want, axis=(1, 2)))[:, None, None]
  got = kr.precondition_rescaled(jnp.asarray(g), r, l)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  if sides != 'dense+low':  # kernel rows and bias row kept apart
    kernel, bias = kr.precondition_rescaled(jnp.asarray(g), r, l, (g[:, :-1], g[:, -1:]))
    np.testing.assert_allclose(np.concatenate([kernel, bias], axis=1), want, rtol=2e-5, atol=2e-5)
  zero = kr.precondition_rescaled(jnp.zeros_like(jnp.asarray(g)), r, l)
  assert np.all(np.asarray(zero) == 0)
  # rescale=False: R G L itself
  plain = dense(r, m) @ g.astype(np.float64) @ dense(l, n)
  np.testing.assert_allclose(kr.precondition_rescaled(jnp.asarray(g), r, l, rescale=False), plain,
                             rtol=2e-5, atol=2e-5 * np.abs(plain).max())
  if sides != 'dense+low':
    kernel, bias = kr.precondition_rescaled(jnp.asarray(g), r, l, (g[:, :-1], g[:, -1:]), rescale=False)
    np.testing.assert_allclose(np.concatenate([kernel, bias], axis=1), plain, rtol=2e-5,
                               atol=2e-5 * np.abs(plain).max())


@pytest.mark.parametrize('refresh', ['ema', 'blend'])
def test_mkor_update_with_low_rank_factors_equals_dense_float64_reference(refresh):
  """Net's sides of 5 and 6 held at rank 4, 4 refreshes: exact, so the whole
  update equals the dense float64 MKOR of test_mkor."""
  params = init_params()
  hp = dict(gamma=0.9, zeta=0.8, epsilon=1.5, inv_freq=2, damping=0.0625)
  tx = mkor_optax.scale_by_mkor(refresh=refresh, low_rank=4, low_rank_min_dim=0, **hp)
  state = tx.init(params)
  assert isinstance(state.input_side['hidden'], LowRankInverse)
  assert isinstance(state.output_side['hidden'], LowRankInverse)
  assert not isinstance(state.output_side['out'], LowRankInverse)  # 3 <= rank: dense
  assert_matches_reference(tx, hp, jit=True, refresh=refresh)
  # the natural gradient (no rescale) from the same low-rank sides
  tx = mkor_optax.scale_by_mkor(refresh=refresh, low_rank=4, low_rank_min_dim=0, rescale=False, **hp)
  assert_matches_reference(tx, dict(hp, rescale=False), jit=True, refresh=refresh, lr=0.0,
                           rtol=1e-3)  # entries up to ~5e3: float32 cancellation in the small ones


def test_low_rank_is_chosen_by_width_and_costs_d_times_k_memory():
  import flax.linen as nn

  class Wide(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(8, name='head')(nn.Dense(600, name='wide')(x))

  params = Wide().init(jax.random.PRNGKey(0), jnp.ones((2, 40)))['params']
  state = mkor_optax.scale_by_mkor().init(params)  # defaults: rank 8 from width 256
  wide = state.output_side['wide']
  assert isinstance(wide, LowRankInverse) and wide.q.shape == (1, 600, 8)
  assert wide.shape == (1, 600, 600)
  assert not isinstance(state.input_side['wide'], LowRankInverse)  # d_in + 1 = 41
  assert isinstance(state.input_side['head'], LowRankInverse)  # 601
  dense_state = mkor_optax.scale_by_mkor(low_rank=None).init(params)
  nbytes = lambda t: sum(x.nbytes for x in jax.tree.leaves(t))
  assert nbytes(state) < 0.1 * nbytes(dense_state)
  with pytest.raises(ValueError, match='low_rank'):
    mkor_optax.scale_by_mkor(low_rank=0)
  with pytest.raises(ValueError, match='low_rank_min_dim'):
    mkor_optax.scale_by_mkor(low_rank_min_dim=-1)


def test_low_rank_state_jits_once_checkpoints_and_accumulates(tmp_path):
  params = init_params()
  tx = mkor_optax.mkor(1e-2, low_rank=3, low_rank_min_dim=0, inv_freq=1)
  traces = []

  @jax.jit
  def step(params, state, x, y):
    traces.append(1)
    _, grads, stats = GRAD(params, x, y)
    u, state = tx.update(grads, state, params, stats=stats)
    return optax.apply_updates(params, u), state

  state = tx.init(params)
  for t in range(3):
    params, state = step(params, state, *batch(t))
  restored = orbax_round_trip(state, tmp_path / 'ckpt')
  a = step(params, state, *batch(3))
  b = step(params, restored, *batch(3))
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert len(traces) == 1
  # accumulation of two half batches equals one full batch
  acc = mkor_optax.MultiSteps(tx, 2, kind=mkor_optax.RANK1)
  p1, p2 = init_params(), init_params()
  s1, s2 = acc.init(p1), tx.init(p2)
  x, y = batch(0, n=8)
  acc_update = jax.jit(lambda g, s, p, st: acc.update(g, s, p, stats=st))
  for half in (slice(0, 4), slice(4, 8)):
    _, g, st = JGRAD(p1, x[half], y[half])
    u, s1 = acc_update(g, s1, p1, st)
    p1 = optax.apply_updates(p1, u)
  _, g, st = JGRAD(p2, x, y)
  u, s2 = jitted_update(tx)(g, s2, p2, st)
  p2 = optax.apply_updates(p2, u)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p1, p2)


def test_bfloat16_low_rank_factors_stay_close_to_float32():
  params = init_params()
  outs = {}
  for dtype in (None, 'bfloat16'):
    tx = mkor_optax.scale_by_mkor(low_rank=3, low_rank_min_dim=0, factor_dtype=dtype, inv_freq=1)
    state = tx.init(params)
    update = jitted_update(tx)
    for t in range(6):
      _, grads, stats = JGRAD(params, *batch(t))
      u, state = update(grads, state, params, stats)
    outs[dtype] = u
    if dtype:
      assert state.input_side['hidden'].q.dtype == jnp.bfloat16
  # Scale-free factors carry both sides' curvature (condition numbers of
  # 10-100 here), and a bfloat16 basis rounds each entry to 8 bits: measured
  # 0.6-5.9% of the update's norm (0.04% when the factors were nearly I).
  for a, b in zip(jax.tree.leaves(outs['bfloat16']), jax.tree.leaves(outs[None])):
    assert np.linalg.norm(a - b) <= 0.1 * np.linalg.norm(b)
