"""A small model and batches shared by the optimizer tests."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

KEY = jax.random.PRNGKey(0)


class Net(nn.Module):
  """hidden: Dense 4->6 with bias; norm: LayerNorm; out: Dense 6->3 without bias."""

  @nn.compact
  def __call__(self, x):
    h = nn.tanh(nn.Dense(6, name='hidden')(x))
    h = nn.LayerNorm(name='norm')(h)
    return nn.Dense(3, use_bias=False, name='out')(h)


def batch(i, n=8):
  k1, k2 = jax.random.split(jax.random.PRNGKey(100 + i))
  return jax.random.normal(k1, (n, 4)), jax.random.normal(k2, (n, 3))


def loss_fn(params, x, y, model=Net()):
  return jnp.mean((model.apply({'params': params}, x) - y) ** 2)


def init_params(model=Net()):
  return model.init(KEY, batch(0)[0])['params']


def aug_blocks(grads):
  """float64 ``[kernel; bias]`` matrices of Net's two layers."""
  return {'hidden': np.vstack([grads['hidden']['kernel'], grads['hidden']['bias'][None]]).astype(np.float64),
          'out': np.asarray(grads['out']['kernel'], np.float64)}


def from_blocks(blocks, grads):
  """Net-shaped update from ``aug_blocks``-style matrices (norm passes through)."""
  return {'hidden': {'kernel': blocks['hidden'][:4], 'bias': blocks['hidden'][4]},
          'out': {'kernel': blocks['out']}, 'norm': grads['norm']}


def assert_tree_close(got, want, rtol=2e-4, atol=1e-6, msg=''):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=msg),
               got, want)
