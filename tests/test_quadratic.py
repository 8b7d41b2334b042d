"""The quadratic-model step against a dense Gauss-Newton matrix in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import mkor_optax
from helpers import Net, batch, init_params

MODEL = Net()


def outputs_fn(x):
  return lambda p: MODEL.apply({'params': p}, x)


def mse(y):
  return lambda out: jnp.mean((out - y) ** 2)


def loss_fn(p, x, y):
  return mse(y)(outputs_fn(x)(p))


def dense_gn(params, x, y):
  """float64 ``J^T H J`` from the explicit Jacobian (MSE: H = 2/(N*3) I)."""
  flat, unravel = ravel_pytree(params)
  jac = jax.jacfwd(lambda f: outputs_fn(x)(unravel(f)).reshape(-1))(flat)
  j = np.asarray(jac, np.float64)
  return j.T @ j * (2.0 / j.shape[0]), unravel


def reference_step(params, x, y, direction, prev, lam):
  """``(alpha, mu)`` minimising the damped model, by a float64 2x2 (or 1x1) solve."""
  c, _ = dense_gn(params, x, y)
  g = np.asarray(ravel_pytree(jax.grad(loss_fn)(params, x, y))[0], np.float64)
  d = -np.asarray(ravel_pytree(direction)[0], np.float64)
  d0 = np.asarray(ravel_pytree(prev)[0], np.float64)
  m = c + lam * np.eye(len(g))
  if not d0.any():
    return -(g @ d) / (d @ m @ d), 0.0
  a = np.array([[d @ m @ d, d @ m @ d0], [d0 @ m @ d, d0 @ m @ d0]])
  return tuple(np.linalg.solve(a, -np.array([g @ d, g @ d0])))


@pytest.mark.parametrize('precondition', ['identity', 'mkor'])
def test_alpha_and_mu_solve_the_damped_quadratic_model(precondition):
  params = init_params()
  lam = 0.05
  tx = mkor_optax.scale_by_quadratic_step(damping=lam, adapt_every=1000)
  pre = mkor_optax.scale_by_mkor(inv_freq=1) if precondition == 'mkor' else None
  state, pre_state = tx.init(params), (pre.init(params) if pre else None)
  for t in range(3):
    x, y = batch(t)
    _, grads, stats = mkor_optax.value_and_grad(loss_fn)(params, x, y)
    direction = grads
    if pre:
      direction, pre_state = pre.update(grads, pre_state, params, stats=stats)
    prev = state.previous
    gn = mkor_optax.gauss_newton(outputs_fn(x), mse(y))
    step, state = tx.update(direction, state, params, grad=grads, curvature=gn)
    alpha, mu = reference_step(params, x, y, direction, prev, lam)
    np.testing.assert_allclose([state.alpha, state.mu], [alpha, mu], rtol=2e-3, atol=1e-6)
    want = jax.tree.map(lambda d, d0: -alpha * d + mu * d0, direction, prev)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-7), step, want)
    assert t == 0 or abs(mu) > 0  # momentum is used from the second step on
    params = optax.apply_updates(params, step)


def test_damping_follows_the_reduction_ratio():
  params = init_params()
  x, y = batch(0)
  _, grads = jax.value_and_grad(loss_fn)(params, x, y)
  gn = mkor_optax.gauss_newton(outputs_fn(x), mse(y))
  value = loss_fn(params, x, y)
  tx = mkor_optax.scale_by_quadratic_step(damping=1.0, adapt_every=2, decay=0.9)
  state = tx.init(params)
  # a loss function that agrees with the model's prediction exactly: rho = 1 -> lambda shrinks
  predicted = {}

  def exact(moved):
    step = jax.tree.map(lambda a, b: a - b, moved, params)
    m = 0.5 * mkor_optax.quadratic._dot(grads, step)  # M(d) - M(0) at the minimiser
    predicted['m'] = m
    return value + m

  _, s1 = tx.update(grads, state, params, grad=grads, curvature=gn, value=value, value_fn=exact)
  np.testing.assert_allclose(s1.rho, 1.0, rtol=1e-4)
  np.testing.assert_allclose(s1.damping, 1.0 * 0.9 ** 2, rtol=1e-6)
  # step 1 is not an adaptation step: no evaluation, lambda kept
  _, s2 = tx.update(grads, s1, params, grad=grads, curvature=gn, value=value, value_fn=exact)
  assert np.isnan(s2.rho) and float(s2.damping) == float(s1.damping)
  # a loss that rises where the model predicts a fall: rho < 0 -> lambda grows
  _, s3 = tx.update(grads, s2, params, grad=grads, curvature=gn, value=value,
                    value_fn=lambda p: value + 1.0)
  assert float(s3.rho) < 0
  np.testing.assert_allclose(s3.damping, float(s2.damping) / 0.9 ** 2, rtol=1e-6)


def test_missing_curvature_is_a_clear_error():
  params = init_params()
  tx = mkor_optax.scale_by_quadratic_step()
  grads = jax.grad(loss_fn)(params, *batch(0))
  with pytest.raises(ValueError, match='curvature='):
    tx.update(grads, tx.init(params), params, grad=grads)


def test_mkor_with_the_quadratic_step_trains_under_jit():
  opt = optax.chain(mkor_optax.scale_by_mkor(), mkor_optax.scale_by_quadratic_step())
  params = init_params()
  state = opt.init(params)

  @jax.jit
  def step(params, state, x, y):
    loss, grads, stats = mkor_optax.value_and_grad(loss_fn)(params, x, y)
    updates, state = opt.update(
        grads, state, params, stats=stats, grad=grads, value=loss,
        value_fn=lambda p: loss_fn(p, x, y),
        curvature=mkor_optax.gauss_newton(outputs_fn(x), mse(y)))
    return optax.apply_updates(params, updates), state, loss

  x, y = batch(0, n=64)
  losses = []
  for _ in range(30):
    params, state, loss = step(params, state, x, y)
    losses.append(float(loss))
  assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0]
