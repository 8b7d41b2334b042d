"""Captured a and g against hand computations for every supported layer kind.

References never use the capture: inputs are recomputed with numpy (explicit
im2col loops for convolutions), and output gradients come from perturbing a
hand-written forward pass (``y + delta``, gradient at ``delta = 0``).
"""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mkor_optax
from helpers import conv_pads, head, im2col

KEY = jax.random.PRNGKey(0)


def stats_of(model, x, variables=None):
  params = (variables or model.init(KEY, x))['params']
  w = jax.random.normal(jax.random.PRNGKey(7), model.apply({'params': params}, x).shape)
  loss = lambda p: head(model.apply({'params': p}, x), w)
  (val, grads, stats) = mkor_optax.value_and_grad(loss, kind=mkor_optax.RANK1)(params)
  ref_val, ref_grads = jax.value_and_grad(loss)(params)
  np.testing.assert_allclose(val, ref_val, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, ref_grads)
  return params, w, stats


def with_one(a, has_bias):
  return np.concatenate([a, [1.0]]) if has_bias else a


@pytest.mark.parametrize('use_bias', [True, False])
def test_dense_rows_over_batch_and_sequence(use_bias):
  x = jax.random.normal(KEY, (3, 5, 4))
  model = nn.Dense(6, use_bias=use_bias)
  params, w, stats = stats_of(model, x)
  kernel = np.asarray(params['kernel'])
  bias = np.asarray(params['bias']) if use_bias else 0.0
  rows = np.asarray(x).reshape(-1, 4)
  y = (rows @ kernel + bias).reshape(3, 5, 6)
  dy = jax.grad(lambda d: head(jnp.asarray(y) + d, w))(jnp.zeros_like(y))
  s = stats['']  # the top-level module has the empty path
  np.testing.assert_allclose(s['a'], with_one(rows.mean(0), use_bias), rtol=1e-5)
  np.testing.assert_allclose(s['g'], np.asarray(dy).reshape(-1, 6).sum(0), rtol=1e-4, atol=1e-7)


def test_g_equals_bias_gradient_for_mean_loss():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(nn.relu(nn.Dense(8)(x)))
  x = jax.random.normal(KEY, (16, 5))
  params = Net().init(KEY, x)['params']
  loss = lambda p: jnp.mean((Net().apply({'params': p}, x) - 1.0) ** 2)
  _, grads, stats = mkor_optax.value_and_grad(loss, kind=mkor_optax.RANK1)(params)
  for name in ('Dense_0', 'Dense_1'):
    np.testing.assert_allclose(stats[name]['g'], grads[name]['bias'], rtol=1e-5, atol=1e-8)


def _attention_reference(x, p, w, num_heads):
  """Hand-written multi-head self-attention with perturbable outputs."""
  def forward(deltas):
    proj = lambda name, inp: jnp.einsum('btd,dhk->bthk', inp, p[name]['kernel']) + p[name]['bias']
    q = proj('query', x) + deltas['query']
    k = proj('key', x) + deltas['key']
    v = proj('value', x) + deltas['value']
    logits = jnp.einsum('bqhk,bshk->bhqs', q / jnp.sqrt(q.shape[-1]), k)
    o = jnp.einsum('bhqs,bshk->bqhk', jax.nn.softmax(logits, -1), v)
    out = jnp.einsum('bthk,hkd->btd', o, p['out']['kernel']) + p['out']['bias'] + deltas['out']
    return head(out, w), o
  b, t, d = x.shape
  hd = p['query']['kernel'].shape[-1]
  zeros = {n: jnp.zeros((b, t, num_heads, hd)) for n in ('query', 'key', 'value')}
  zeros['out'] = jnp.zeros((b, t, d))
  dys, o = jax.grad(forward, has_aux=True)(zeros)
  return dys, o


def test_attention_dense_general_kernels():
  x = jax.random.normal(KEY, (2, 5, 8))
  model = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=6)
  params, w, stats = stats_of(model, x)
  dys, o = _attention_reference(x, params, w, 2)
  rows_x = np.asarray(x).reshape(-1, 8)
  for name in ('query', 'key', 'value'):
    np.testing.assert_allclose(stats[name]['a'], with_one(rows_x.mean(0), True), rtol=1e-5)
    np.testing.assert_allclose(stats[name]['g'], np.asarray(dys[name]).reshape(-1, 6).sum(0),
                               rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stats['out']['a'], with_one(np.asarray(o).reshape(-1, 6).mean(0), True),
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stats['out']['g'], np.asarray(dys['out']).reshape(-1, 8).sum(0),
                             rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('padding', ['SAME', 'VALID', ((1, 2), (0, 1))])
@pytest.mark.parametrize('use_bias', [True, False])
def test_strided_conv_im2col_means(padding, use_bias):
  x = jax.random.normal(KEY, (2, 7, 6, 3))
  model = nn.Conv(4, kernel_size=(3, 2), strides=(2, 1), padding=padding, use_bias=use_bias)
  params, w, stats = stats_of(model, x)
  patches = im2col(x, (3, 2), (2, 1), conv_pads(padding, (7, 6), (3, 2), (2, 1)))
  kernel = np.asarray(params['kernel']).reshape(-1, 4)
  y = patches @ kernel + (np.asarray(params['bias']) if use_bias else 0.0)
  dy = np.asarray(jax.grad(lambda d: head(jnp.asarray(y, jnp.float32) + d, w))(jnp.zeros(y.shape)))
  positions = y.shape[1] * y.shape[2]
  np.testing.assert_allclose(stats['']['a'], with_one(patches.reshape(-1, patches.shape[-1]).mean(0),
                                                      use_bias), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats['']['g'], dy.reshape(-1, 4).sum(0) / positions,
                             rtol=1e-4, atol=1e-7)


def test_shared_module_pools_rows_of_all_calls():
  class Shared(nn.Module):
    @nn.compact
    def __call__(self, x1, x2):
      dense = nn.Dense(3, name='shared')
      return dense(x1).sum(0) + dense(x2).sum(0)

  x1 = jax.random.normal(KEY, (4, 5))
  x2 = jax.random.normal(jax.random.PRNGKey(1), (7, 5))
  model = Shared()
  params = model.init(KEY, x1, x2)['params']
  wv = jnp.arange(3.0)
  loss = lambda p: jnp.sum(jnp.sin(model.apply({'params': p}, x1, x2)) * wv)
  _, grads, stats = mkor_optax.value_and_grad(loss, kind=mkor_optax.RANK1)(params)
  k, b = np.asarray(params['shared']['kernel']), np.asarray(params['shared']['bias'])
  out = (np.asarray(x1) @ k + b).sum(0) + (np.asarray(x2) @ k + b).sum(0)
  dout = np.cos(out) * np.arange(3.0)  # dL/dy for every row of both calls
  rows = np.concatenate([x1, x2])
  np.testing.assert_allclose(stats['shared']['a'], with_one(rows.mean(0), True), rtol=1e-5)
  np.testing.assert_allclose(stats['shared']['g'], dout * 11, rtol=1e-4)
  np.testing.assert_allclose(stats['shared']['g'], grads['shared']['bias'], rtol=1e-5)


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    return x + nn.tanh(nn.Dense(x.shape[-1], name='fc')(x))


def test_remat_gives_the_same_statistics():
  class Plain(nn.Module):
    @nn.compact
    def __call__(self, x):
      for i in range(2):
        x = Block(name=f'b{i}')(x)
      return nn.Dense(2, name='head')(x)

  class Remat(nn.Module):
    @nn.compact
    def __call__(self, x):
      for i in range(2):
        x = nn.remat(Block)(name=f'b{i}')(x)
      return nn.Dense(2, name='head')(x)

  x = jax.random.normal(KEY, (6, 4))
  params = Plain().init(KEY, x)['params']
  out = []
  for model in (Plain(), Remat()):
    loss = lambda p, m=model: jnp.mean(m.apply({'params': p}, x) ** 2)
    out.append(jax.jit(mkor_optax.value_and_grad(loss, kind=mkor_optax.RANK1))(params))
  assert set(out[1][2]) == {'b0/fc', 'b1/fc', 'head'}
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), out[0], out[1])


def test_scan_over_layers_captures_each_layer():
  class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
      body = nn.scan(lambda m, c, _: (m(c), None), variable_axes={'params': 0},
                     split_rngs={'params': True}, length=3)
      x, _ = body(Block(name='layers'), x, None)
      return x

  class Unrolled(nn.Module):
    @nn.compact
    def __call__(self, x):
      for i in range(3):
        x = Block(name=f'l{i}')(x)
      return x

  x = jax.random.normal(KEY, (5, 4))
  scanned = Scanned().init(KEY, x)['params']
  unrolled = {f'l{i}': jax.tree.map(lambda t: t[i], scanned['layers']) for i in range(3)}
  loss_s = lambda p: jnp.mean(Scanned().apply({'params': p}, x) ** 3)
  loss_u = lambda p: jnp.mean(Unrolled().apply({'params': p}, x) ** 3)
  _, _, s = mkor_optax.value_and_grad(loss_s, kind=mkor_optax.RANK1)(scanned)
  _, _, u = mkor_optax.value_and_grad(loss_u, kind=mkor_optax.RANK1)(unrolled)
  assert s['layers/fc']['a'].shape == (3, 5) and s['layers/fc']['g'].shape == (3, 4)
  for i in range(3):
    np.testing.assert_allclose(s['layers/fc']['a'][i], u[f'l{i}/fc']['a'], rtol=1e-5)
    np.testing.assert_allclose(s['layers/fc']['g'][i], u[f'l{i}/fc']['g'], rtol=1e-4, atol=1e-7)


def test_has_aux_and_other_layers_pass_through():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, tokens):
      h = nn.Embed(11, 4)(tokens)
      h = nn.LayerNorm()(h)
      return nn.Dense(3)(h)
  tokens = jnp.array([[1, 2, 3], [4, 5, 6]])
  params = Net().init(KEY, tokens)['params']
  loss = lambda p: (jnp.mean(Net().apply({'params': p}, tokens) ** 2), {'n': 2})
  (val, aux), grads, stats = mkor_optax.value_and_grad(loss, has_aux=True, kind=mkor_optax.RANK1)(params)
  assert aux == {'n': 2} and set(stats) == {'Dense_0'}
  assert jax.tree.structure(grads) == jax.tree.structure(params)


def test_custom_layer_opts_in_with_register_layer():
  class Scaled(nn.Module):
    """y = 2 * (x @ kernel): a custom linear layer."""
    @nn.compact
    def __call__(self, x):
      kernel = self.param('kernel', nn.initializers.lecun_normal(), (x.shape[-1], 3))
      return 2.0 * x @ kernel

  def adapter(module, args, kwargs):
    rows = args[0].reshape(-1, args[0].shape[-1])
    def read(y):
      return mkor_optax.LayerCall(lambda: rows, rows.shape[0], 1, 1.0, False,
                                  tuple(module.get_variable('params', 'kernel').shape))
    return read

  x = jax.random.normal(KEY, (4, 5))
  params = Scaled().init(KEY, x)['params']
  loss = lambda p: jnp.mean(Scaled().apply({'params': p}, x) ** 2)
  assert mkor_optax.value_and_grad(loss, kind=mkor_optax.RANK1)(params)[2] == {}
  mkor_optax.register_layer(Scaled, adapter)
  try:
    _, _, stats = mkor_optax.value_and_grad(loss, kind=mkor_optax.RANK1)(params)
  finally:
    from mkor_optax import layers
    layers._REGISTRY.pop(Scaled)
  y = 2.0 * np.asarray(x) @ np.asarray(params['kernel'])
  np.testing.assert_allclose(stats['']['a'], np.asarray(x).mean(0), rtol=1e-5)
  np.testing.assert_allclose(stats['']['g'], (2 * y / y.size).sum(0), rtol=1e-5)  # mean over 12 entries


def test_layer_whose_params_lose_the_tap_is_an_error_naming_it():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(2, name='head')(nn.Dense(3, name='body')(x))

  x = jax.random.normal(KEY, (4, 5))
  params = Net().init(KEY, x)['params']
  keep = lambda d: {k: v for k, v in d.items() if k in ('kernel', 'bias')}
  # rebuilds the 'head' params from a whitelist of names: the capture's dummy is dropped
  loss = lambda p: jnp.mean(Net().apply({'params': {'body': p['body'], 'head': keep(p['head'])}}, x))
  with pytest.raises(ValueError, match="'head'"):
    mkor_optax.value_and_grad(loss, kind=mkor_optax.RANK1)(params)


def test_dropout_rngs_and_mutable_batch_stats_work():
  """A typical loop: dropout rngs and BatchNorm statistics returned as aux."""
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      h = nn.Dense(8, name='fc')(x)
      h = nn.BatchNorm(use_running_average=not train, name='bn')(h)
      h = nn.Dropout(0.5, deterministic=not train)(nn.relu(h))
      return nn.Dense(2, name='head')(h)

  x = jax.random.normal(KEY, (16, 5))
  variables = Net().init({'params': KEY, 'dropout': KEY}, x, train=False)

  def loss(params, batch_stats, x, key):
    y, updates = Net().apply({'params': params, 'batch_stats': batch_stats}, x, train=True,
                             rngs={'dropout': key}, mutable=['batch_stats'])
    return jnp.mean(y ** 2), updates['batch_stats']

  args = (variables['batch_stats'], x, jax.random.PRNGKey(3))
  (val, new_stats), grads, stats = jax.jit(mkor_optax.value_and_grad(loss, has_aux=True, kind=mkor_optax.RANK1))(
      variables['params'], *args)
  (ref_val, ref_stats), ref_grads = jax.value_and_grad(loss, has_aux=True)(variables['params'], *args)
  np.testing.assert_allclose(val, ref_val, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               (new_stats, grads), (ref_stats, ref_grads))
  assert set(stats) == {'fc', 'head'}
  np.testing.assert_allclose(stats['head']['g'], grads['head']['bias'], rtol=1e-5, atol=1e-7)


def test_frozen_dict_params_keep_their_type():
  from flax.core import freeze
  x = jax.random.normal(KEY, (4, 5))
  model = nn.Dense(3)
  params = freeze(model.init(KEY, x)['params'])
  loss = lambda p: jnp.mean(model.apply({'params': p}, x) ** 2)
  _, grads, stats = mkor_optax.value_and_grad(loss, kind=mkor_optax.RANK1)(params)
  _, ref = jax.value_and_grad(loss)(params)
  assert jax.tree.structure(grads) == jax.tree.structure(ref)
  tx = mkor_optax.mkor(1e-2)
  updates, _ = tx.update(grads, tx.init(params), params, stats=stats)
  assert jax.tree.structure(updates) == jax.tree.structure(params)


# ------------------------------------------------------------ recurrent cells

class _Seq(nn.Module):
  cell: type
  hidden: int = 6

  @nn.compact
  def __call__(self, x):
    return nn.RNN(self.cell(self.hidden, name='cell'))(x)


def test_optimized_lstm_cell_gates_against_a_hand_unrolled_lstm():
  """flax's OptimizedLSTMCell multiplies one concatenated kernel: every gate
  kernel still gets its own a and g, those of a hand-written LSTM."""
  B, T, D, H = 3, 4, 5, 6
  x = jax.random.normal(KEY, (B, T, D))
  params, w, stats = stats_of(_Seq(nn.OptimizedLSTMCell, H), x)
  cell = jax.tree.map(np.asarray, params['cell'])
  sig = jax.nn.sigmoid

  def unrolled(deltas):
    c = h = jnp.zeros((B, H))
    hs, prev = [], []
    for t in range(T):
      prev.append(h)
      z = {k: x[:, t] @ cell['i' + k]['kernel'] + h @ cell['h' + k]['kernel']
              + cell['h' + k]['bias'] + deltas[k][t] for k in 'ifgo'}
      c = sig(z['f']) * c + sig(z['i']) * jnp.tanh(z['g'])
      h = sig(z['o']) * jnp.tanh(c)
      hs.append(h)
    return head(jnp.stack(hs, 1), w), jnp.stack(prev)

  zeros = {k: jnp.zeros((T, B, H)) for k in 'ifgo'}
  dz = jax.grad(lambda d: unrolled(d)[0])(zeros)
  prev = np.asarray(unrolled(zeros)[1]).reshape(-1, H)
  assert len(stats) == 8
  for k in 'ifgo':
    g = np.asarray(dz[k]).sum((0, 1))
    s_i, s_h = stats[f'cell/i{k}'], stats[f'cell/h{k}']
    np.testing.assert_allclose(s_i['a'], np.asarray(x).reshape(-1, D).mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s_h['a'], with_one(prev.mean(0), True), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s_i['g'], g, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(s_h['g'], g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('cell', [nn.OptimizedLSTMCell, nn.LSTMCell, nn.GRUCell, nn.MGUCell,
                                  nn.SimpleCell])
def test_every_layer_init_gives_factors_receives_statistics(cell):
  x = jax.random.normal(KEY, (2, 3, 4))
  model = _Seq(cell)
  params = model.init(KEY, x)['params']
  loss = lambda p: jnp.mean(model.apply({'params': p}, x) ** 2)
  tx = mkor_optax.scale_by_mkor(inv_freq=1)
  state = tx.init(params)
  _, grads, stats = mkor_optax.value_and_grad(loss, kind=mkor_optax.RANK1)(params)
  assert set(state.input_side) == set(state.output_side) == set(stats)
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # no "no statistics for layer(s)" warning
    u, state = tx.update(grads, state, params, stats=stats)
  assert all(not np.allclose(u['cell'][n]['kernel'], grads['cell'][n]['kernel'])
             for n in stats_names(stats))


def stats_names(stats):
  return [k.split('/')[-1] for k in stats]


# ------------------------------------------------------------------ eager use

def test_eager_capture_traces_the_model_once_per_argument_shapes(monkeypatch):
  from mkor_optax import capture
  calls = []
  real = capture.discover
  monkeypatch.setattr(capture, 'discover', lambda *a, **k: calls.append(1) or real(*a, **k))
  model = nn.Dense(3)
  loss = lambda p, x: jnp.mean(model.apply({'params': p}, x) ** 2)
  x = jax.random.normal(KEY, (4, 5))
  params = model.init(KEY, x)['params']
  grad_fn = mkor_optax.value_and_grad(loss, kind=mkor_optax.RANK1)
  first = grad_fn(params, x)
  for i in range(3):
    again = mkor_optax.value_and_grad(loss, kind=mkor_optax.RANK1)(params, x)  # a new wrapper, the same loss
  assert len(calls) == 1
  jax.tree.map(np.testing.assert_array_equal, again, first)
  grad_fn(params, jnp.ones((7, 5)))  # another batch shape: traced again
  assert len(calls) == 2
  jax.jit(grad_fn)(params, x)  # under jit nothing is cached
  assert len(calls) == 3
