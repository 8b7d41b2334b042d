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


def head(y, w):
  """A nonlinear loss head, mean over the leading (example) axis."""
  return jnp.sum(jnp.tanh(y) * w) / y.shape[0]


def conv_pads(padding, x_hw, k_hw, strides):
  if padding == 'VALID':
    return [(0, 0), (0, 0)]
  if padding == 'SAME':
    out = []
    for n, k, s in zip(x_hw, k_hw, strides):
      o = -(-n // s)
      total = max((o - 1) * s + k - n, 0)
      out.append((total // 2, total - total // 2))
    return out
  return list(padding)


def im2col(x, k_hw, strides, pads):
  """Explicit loops: patches (B, OH, OW, kh*kw*c) ordered like the kernel."""
  x = np.pad(np.asarray(x), [(0, 0), pads[0], pads[1], (0, 0)])
  b, h, w, c = x.shape
  kh, kw = k_hw
  oh, ow = (h - kh) // strides[0] + 1, (w - kw) // strides[1] + 1
  out = np.zeros((b, oh, ow, kh * kw * c))
  for i in range(oh):
    for j in range(ow):
      win = x[:, i * strides[0]:i * strides[0] + kh, j * strides[1]:j * strides[1] + kw, :]
      out[:, i, j] = win.reshape(b, -1)
  return out


def orbax_round_trip(tree, directory):
  """Saves ``tree`` with orbax and restores it against its own shapes."""
  import pytest
  ocp = pytest.importorskip('orbax.checkpoint')
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(directory, tree)
  ckpt.wait_until_finished()
  return ckpt.restore(directory, jax.tree.map(ocp.utils.to_shape_dtype_struct, tree))


def compiled_optimised(fun, *args):
  """``jax.jit(fun)`` compiled for ``args`` as XLA compiles a user's program.

  The suite compiles with LLVM at level 0 and XLA's older loop emitters
  (conftest: its programs are tiny, so compiling is their cost); a long
  training run inside one program is the exception, and is compiled with
  XLA's defaults (full optimisation, fusion emitters)."""
  options = {'xla_backend_optimization_level': 2, 'xla_cpu_use_fusion_emitters': True}
  return jax.jit(fun).lower(*args).compile(compiler_options=options)


def as_restored(tree):
  """A state as a checkpointer gives it back without a target: NamedTuples
  become dicts, tuples lists, leaves numpy arrays."""
  if isinstance(tree, tuple) and hasattr(tree, '_fields'):
    return {f: as_restored(getattr(tree, f)) for f in tree._fields}
  if isinstance(tree, (tuple, list)):
    return [as_restored(v) for v in tree]
  if isinstance(tree, dict):
    return {k: as_restored(v) for k, v in tree.items()}
  return np.asarray(tree)
