"""Eva against the explicit inverse of (a a^T (x) g g^T + lambda I) in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mkor_optax
from helpers import assert_tree_close, aug_blocks, batch, from_blocks, init_params, loss_fn

GRAD = mkor_optax.value_and_grad(loss_fn, kind=mkor_optax.RANK1)


def explicit(g, a, gv, damping):
  """vec(G) in row-major (d_in, d_out) order: a (x) g is the Kronecker of a and g."""
  ka = np.outer(a, a) if a is not None else np.eye(g.shape[0])
  kg = np.outer(gv, gv) if gv is not None else np.eye(g.shape[1])
  m = np.kron(ka, kg) + damping * np.eye(g.size)
  return np.linalg.solve(m, g.reshape(-1)).reshape(g.shape)


@pytest.mark.parametrize('max_factor_dim', [4096, 5])
def test_update_equals_explicit_kronecker_vector_inverse(max_factor_dim):
  params = init_params()
  damping, gamma = 0.03, 0.9
  tx = mkor_optax.scale_by_eva(damping=damping, gamma=gamma, max_factor_dim=max_factor_dim)
  state = tx.init(params)
  ema = {}
  for t in range(4):
    _, grads, stats = GRAD(params, *batch(t))
    u, state = tx.update(grads, state, params, stats=stats)
    pre, raw = {}, 0.0
    for k, g in aug_blocks(grads).items():
      for v in ('a', 'g'):
        s = np.asarray(stats[k][v], np.float64)
        ema[k, v] = s if t == 0 else gamma * ema[k, v] + (1 - gamma) * s
      a = ema[k, 'a'] if len(ema[k, 'a']) <= max_factor_dim else None
      gv = ema[k, 'g'] if len(ema[k, 'g']) <= max_factor_dim else None
      pre[k] = explicit(g, a, gv, damping)
      raw += np.sum(g ** 2)
    scale = np.sqrt(raw / sum(np.sum(p ** 2) for p in pre.values()))  # one global rescale
    want = from_blocks({k: p * scale for k, p in pre.items()}, grads)
    assert_tree_close(u, want, rtol=1e-4, atol=1e-6, msg=f'step {t}')
    params = optax.apply_updates(params, jax.tree.map(lambda v: -0.1 * v, u))


def test_nan_leaves_state_unchanged():
  params = init_params()
  tx = mkor_optax.scale_by_eva()
  _, grads, stats = GRAD(params, *batch(0))
  _, state = tx.update(grads, tx.init(params), params, stats=stats)
  _, grads, stats = GRAD(params, *batch(1))
  stats['hidden'] = {'a': stats['hidden']['a'].at[0].set(jnp.nan), 'g': stats['hidden']['g']}
  _, after = tx.update(grads, state, params, stats=stats)
  jax.tree.map(np.testing.assert_array_equal, (after.input_side, after.output_side), (state.input_side, state.output_side))


def test_eva_trains_through_the_alias():
  params = init_params()
  opt = mkor_optax.eva(3e-2)
  state = opt.init(params)
  step = jax.jit(lambda p, s, x, y: _step(opt, p, s, x, y))
  losses = []
  for t in range(30):
    params, state, loss = step(params, state, *batch(t % 2))
    losses.append(float(loss))
  assert losses[-1] < 0.7 * losses[0]


def _step(opt, params, state, x, y):
  loss, grads, stats = GRAD(params, x, y)
  updates, state = opt.update(grads, state, params, stats=stats)
  return optax.apply_updates(params, updates), state, loss
