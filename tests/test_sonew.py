"""SONew against dense float64 references.

The reference for X is the clique-tree formula for the inverse of the
maximum-determinant completion of a banded S (cliques {i..i+b}, separators
{i+1..i+b}): X = sum_cliques pad(S_C^-1) - sum_separators pad(S_sep^-1),
independent of the L D L^T recursion under test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mkor_optax
from mkor_optax.sonew import apply_ldl, banded_factors, tridiagonal_factors


def completion_inverse(s, b):
  n = len(s)
  x = np.zeros((n, n))
  for i in range(max(n - b, 1)):
    c = slice(i, min(i + b + 1, n))
    x[c, c] += np.linalg.inv(s[c, c])
  for i in range(1, max(n - b, 1)):
    sep = slice(i, min(i + b, n))
    x[sep, sep] -= np.linalg.inv(s[sep, sep])
  return x


def band_of(s, b):
  n = len(s)
  d = np.diag(s).copy()
  e = np.zeros((n, b))
  for k in range(1, b + 1):
    e[:max(n - k, 0), k - 1] = np.diag(s, k)
  return d, e


def dense_ldl(psi, dinv):
  n, b = psi.shape
  l = np.eye(n)
  for i in range(n):
    for k in range(1, b + 1):
      if i + k < n:
        l[i + k, i] = -psi[i, k - 1]
  return l @ np.diag(dinv) @ l.T


def random_pd(rng, n):
  a = rng.normal(size=(n, n + 3))
  return a @ a.T / n + 0.1 * np.eye(n)


@pytest.mark.parametrize('b', [1, 2, 3])
def test_inverse_of_preconditioner_matches_statistics_on_the_band(b):
  rng = np.random.default_rng(b)
  with jax.enable_x64(True):
    for n in (2, 5, 9):
      s = random_pd(rng, n)
      d, e = band_of(s, b)
      if b == 1:
        psi, dinv = tridiagonal_factors(jnp.asarray(d), jnp.asarray(e[:, 0]))
        psi = psi[:, None]
      else:
        psi, dinv = banded_factors(jnp.asarray(d), jnp.asarray(e))
      x = dense_ldl(np.asarray(psi), np.asarray(dinv))
      np.testing.assert_allclose(x, completion_inverse(s, b), rtol=1e-8, atol=1e-10)
      xinv = np.linalg.inv(x)
      band = np.abs(np.subtract.outer(np.arange(n), np.arange(n))) <= b
      np.testing.assert_allclose(xinv[band], s[band], rtol=1e-8, atol=1e-10)
      m = rng.normal(size=n)
      np.testing.assert_allclose(apply_ldl(psi, dinv, jnp.asarray(m)), x @ m, rtol=1e-8, atol=1e-10)


def test_banded_with_band_1_equals_tridiagonal():
  rng = np.random.default_rng(0)
  d, e = band_of(random_pd(rng, 7), 1)
  p1, d1 = tridiagonal_factors(jnp.asarray(d, jnp.float32), jnp.asarray(e[:, 0], jnp.float32))
  p2, d2 = banded_factors(jnp.asarray(d, jnp.float32), jnp.asarray(e, jnp.float32))
  np.testing.assert_allclose(p1, p2[:, 0], rtol=1e-5)
  np.testing.assert_allclose(d1, d2, rtol=1e-5)


def test_non_positive_pivot_drops_the_edge():
  d = jnp.array([1.0, 1.0])
  e = jnp.array([2.0, 0.0])   # [[1, 2], [2, 1]] is indefinite
  psi, dinv = tridiagonal_factors(d, e)
  np.testing.assert_allclose(psi, [0.0, 0.0])
  np.testing.assert_allclose(dinv, [1.0, 1.0])


@pytest.mark.parametrize('band, graft, relative', [(1, 'adam', True), (2, 'sgd', False),
                                                   (1, 'momentum', False), (3, 'adam', True)])
def test_update_equals_dense_reference(band, graft, relative):
  # damping this large keeps the early, nearly rank-1 statistics well conditioned in float32
  b1, b2, damping, eps = 0.9, 0.99, (0.05 if relative else 1e-2), 1e-8
  tx = mkor_optax.scale_by_sonew(b1=b1, b2=b2, damping=damping, relative_damping=relative,
                                 band=band, graft=graft, graft_eps=eps)
  rng = np.random.default_rng(3)
  params = {'w': jnp.zeros((3, 4)), 'b': jnp.zeros((5,))}
  state = tx.init(params)
  ref = {k: (np.zeros(v.size), np.zeros((v.size, v.size))) for k, v in params.items()}
  for t in range(1, 5):
    grads = {k: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in params.items()}
    u, state = tx.update(grads, state)
    for k, g in grads.items():
      g = np.asarray(g, np.float64).reshape(-1)
      m, s = ref[k]
      m = b1 * m + (1 - b1) * g
      s = b2 * s + (1 - b2) * np.outer(g, g)
      ref[k] = (m, s)
      m_hat, s_raw = m / (1 - b1 ** t), s / (1 - b2 ** t)
      in_band = np.abs(np.subtract.outer(np.arange(len(g)), np.arange(len(g)))) <= band
      shift = damping * (np.abs(s_raw * in_band).sum(1).max() if relative else 1.0)
      s_hat = s_raw + shift * np.eye(len(g))
      x = completion_inverse(s_hat, band)
      want = x @ m_hat
      graft_dir = {'adam': m_hat / (np.sqrt(np.diag(s_raw)) + eps), 'sgd': g,
                   'momentum': m_hat}[graft]
      want *= np.linalg.norm(graft_dir) / np.linalg.norm(want)
      np.testing.assert_allclose(np.asarray(u[k]).reshape(-1), want, rtol=2e-3, atol=1e-5,
                                 err_msg=f'{k} step {t}')


def test_state_is_linear_in_n_and_bf16_gradients_work():
  params = {'w': jnp.zeros((64, 32), jnp.bfloat16)}
  for band in (1, 4):
    tx = mkor_optax.scale_by_sonew(band=band)
    state = tx.init(params)
    assert state.m['w'].shape == (2048,) and state.e['w'].shape == (2048, band)
    g = {'w': jax.random.normal(jax.random.PRNGKey(0), (64, 32)).astype(jnp.bfloat16)}
    u, state = jax.jit(tx.update)(g, state)
    assert u['w'].dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(u['w'].astype(jnp.float32))))


def test_tridiagonal_path_builds_no_n_by_n_matrix():
  n = 4096
  tx = mkor_optax.scale_by_sonew()
  params = {'w': jnp.zeros((n,))}
  jaxpr = jax.make_jaxpr(tx.update)(params, tx.init(params))
  shapes = [v.aval.shape for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars]
  assert all(int(np.prod(s)) <= 2 * n for s in shapes), max(shapes, key=lambda s: np.prod(s))


def test_sonew_trains():
  w_true = jax.random.normal(jax.random.PRNGKey(0), (8,))
  x = jax.random.normal(jax.random.PRNGKey(1), (64, 8))
  loss = lambda p: jnp.mean((x @ p['w'] - x @ w_true) ** 2)
  opt = mkor_optax.sonew(0.05)  # relative damping 1e-3 (default)
  params = {'w': jnp.zeros(8)}
  state = opt.init(params)
  for _ in range(200):
    updates, state = opt.update(jax.grad(loss)(params), state)
    params = optax.apply_updates(params, updates)
  assert float(loss(params)) < 1e-2 * float(loss({'w': jnp.zeros(8)}))


@pytest.mark.parametrize('kwargs, name', [(dict(band=0), 'band'), (dict(graft='lion'), 'graft'),
                                          (dict(damping=0.0), 'damping'), (dict(b2=1.0), 'b2')])
def test_invalid_hyperparameters(kwargs, name):
  with pytest.raises(ValueError, match=name):
    mkor_optax.sonew(1e-3, **kwargs)
