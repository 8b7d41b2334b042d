"""K-FAC on the shared capture: covariance statistics and updates against
dense float64 solves."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mkor_optax
from helpers import (KEY, assert_tree_close, aug_blocks, batch, conv_pads, from_blocks, head, im2col,
                     init_params, loss_fn)

GRAD = mkor_optax.value_and_grad(loss_fn, kind=mkor_optax.COVARIANCE)


def test_dense_covariances_equal_hand_computation():
  params = init_params()
  x, y = batch(0)
  _, grads, stats = GRAD(params, x, y)
  k, b = np.asarray(params['hidden']['kernel'], np.float64), np.asarray(params['hidden']['bias'])
  x_aug = np.hstack([np.asarray(x, np.float64), np.ones((8, 1))])
  np.testing.assert_allclose(stats['hidden']['A'], x_aug.T @ x_aug / 8, rtol=1e-5, atol=1e-6)
  # per-example output gradients h_n = d loss_n / d y_n, from a perturbed hand-written forward
  model_tail = lambda h: nn.Dense(3, use_bias=False).apply({'params': params['out']},
                                                           nn.LayerNorm().apply({'params': params['norm']}, jnp.tanh(h)))
  y_hidden = jnp.asarray(np.asarray(x) @ k + b, jnp.float32)
  # loss_fn is the mean over examples of loss_n = mean over the 3 outputs
  per_example = jax.vmap(jax.grad(lambda yy, tt: jnp.mean((model_tail(yy[None])[0] - tt) ** 2)))(y_hidden, y)
  h = np.asarray(per_example, np.float64)
  np.testing.assert_allclose(stats['hidden']['G'], h.T @ h / 8, rtol=1e-4, atol=1e-7)
  assert stats['out']['A'].shape == (6, 6) and stats['out']['G'].shape == (3, 3)


def test_conv_covariances_use_im2col_patches():
  x = jax.random.normal(KEY, (2, 7, 6, 3))
  model = nn.Conv(4, kernel_size=(3, 2), strides=(2, 1), padding='SAME')
  params = model.init(KEY, x)['params']
  w = jax.random.normal(jax.random.PRNGKey(7), model.apply({'params': params}, x).shape)
  loss = lambda p: head(model.apply({'params': p}, x), w)
  _, _, stats = mkor_optax.value_and_grad(loss, kind=mkor_optax.COVARIANCE)(params)
  patches = im2col(x, (3, 2), (2, 1), conv_pads('SAME', (7, 6), (3, 2), (2, 1)))
  rows = patches.reshape(-1, patches.shape[-1])
  rows = np.hstack([rows, np.ones((len(rows), 1))])
  np.testing.assert_allclose(stats['']['A'], rows.T @ rows / len(rows), rtol=1e-4, atol=1e-6)
  y = patches @ np.asarray(params['kernel']).reshape(-1, 4) + np.asarray(params['bias'])
  dy = np.asarray(jax.grad(lambda d: head(jnp.asarray(y, jnp.float32) + d, w))(jnp.zeros(y.shape)))
  h = dy.reshape(-1, 4) * 2  # per-example gradient: the loss is a mean over 2 examples
  np.testing.assert_allclose(stats['']['G'], h.T @ h / len(h), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize('relative', [True, False])  # pi-adjusted (default), absolute
def test_update_equals_damped_dense_solves(relative):
  params = init_params()
  damping, gamma, inv_freq = 1e-2, 0.9, 2
  tx = mkor_optax.scale_by_kfac(damping=damping, gamma=gamma, inv_freq=inv_freq,
                                relative_damping=relative)
  state = tx.init(params)
  ema = {}
  inv = {}
  for t in range(5):
    _, grads, stats = GRAD(params, *batch(t))
    u, state = tx.update(grads, state, params, stats=stats)
    want = {}
    for k, g in aug_blocks(grads).items():
      for side in ('A', 'G'):
        s = np.asarray(stats[k][side], np.float64)
        ema[k, side] = s if t == 0 else gamma * ema[k, side] + (1 - gamma) * s
        if t % inv_freq == 0:
          mean_eig = np.trace(ema[k, side]) / len(s) if relative else 1.0
          inv[k, side] = ema[k, side] + np.sqrt(damping) * mean_eig * np.eye(len(s))
      pre = np.linalg.solve(inv[k, 'A'], g)           # (A + sqrt(mu) I)^-1 G
      pre = np.linalg.solve(inv[k, 'G'], pre.T).T     # ... (G + sqrt(mu) I)^-1
      want[k] = pre * np.linalg.norm(g) / np.linalg.norm(pre)
    assert_tree_close(u, from_blocks(want, grads), rtol=1e-3, atol=1e-5, msg=f'step {t}')
    params = optax.apply_updates(params, jax.tree.map(lambda v: -0.1 * v, u))


def test_rank1_stats_are_refused_with_a_pointer_to_the_kind():
  params = init_params()
  _, grads, stats = mkor_optax.value_and_grad(loss_fn)(params, *batch(0))
  tx = mkor_optax.scale_by_kfac()
  with pytest.raises(ValueError, match='COVARIANCE'):
    tx.update(grads, tx.init(params), params, stats=stats)


def test_nan_leaves_factors_unchanged_and_exclude_and_one_sided():
  params = init_params()
  tx = mkor_optax.scale_by_kfac(inv_freq=1, exclude='out', max_factor_dim=5)
  state = tx.init(params)
  assert set(state.input_side) == {'hidden'} and set(state.output_side) == set()  # d_out 6 > 5
  _, grads, stats = GRAD(params, *batch(0))
  u, state = tx.update(grads, state, params, stats=stats)
  np.testing.assert_array_equal(u['out']['kernel'], grads['out']['kernel'])
  _, grads, stats = GRAD(params, *batch(1))
  grads['hidden']['bias'] = grads['hidden']['bias'].at[0].set(jnp.inf)
  _, after = tx.update(grads, state, params, stats=stats)
  jax.tree.map(np.testing.assert_array_equal, after[1:], state[1:])


@pytest.mark.parametrize('kwargs, name', [(dict(damping=0.0), 'damping'), (dict(gamma=1.0), 'gamma'),
                                          (dict(inv_freq=0), 'inv_freq')])
def test_invalid_hyperparameters(kwargs, name):
  with pytest.raises(ValueError, match=name):
    mkor_optax.kfac(1e-3, **kwargs)
