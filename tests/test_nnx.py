"""Flax NNX: capture, layouts and the training loops people write.

References are independent of the capture: float64 sums of the layers' inputs
and of output gradients read from zero "delta" parameters added to the layer
outputs, explicit im2col loops, the linen path on the same weights, unrolled
copies of stacked layers, and single-device runs.
"""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import mkor_optax
from helpers import conv_pads, im2col

B = 8


def xent(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def data(n=B, seed=0, shape=(8, 8, 2), classes=4):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  return jax.random.normal(k1, (n,) + shape), jax.random.randint(k2, (n,), 0, classes)


# --------------------------------------------- statistics against references

class Probed(nnx.Module):
  """conv -> ReLU -> BatchNorm -> Dropout -> fc, with zero deltas on the conv and fc
  outputs (their gradients are dL/dy per row) and the fc input sown."""

  def __init__(self, rngs):
    self.conv = nnx.Conv(2, 3, (3, 3), strides=2, padding='SAME', rngs=rngs)
    self.bn = nnx.BatchNorm(3, rngs=rngs)
    self.drop = nnx.Dropout(0.3, rngs=rngs)
    self.fc = nnx.Linear(48, 4, rngs=rngs)
    self.d_conv = nnx.Param(jnp.zeros((B, 4, 4, 3)))
    self.d_fc = nnx.Param(jnp.zeros((B, 4)))
    self.fc_in = nnx.Intermediate(jnp.zeros((B, 48)))

  def __call__(self, x):
    h = self.conv(x) + self.d_conv[...]
    h = self.drop(self.bn(nnx.relu(h))).reshape(x.shape[0], -1)
    self.fc_in[...] = h
    return self.fc(h) + self.d_fc[...]


def test_stats_match_dense_references_with_batchnorm_and_dropout():
  model = Probed(nnx.Rngs(params=0, dropout=1))
  x, y = data()
  loss_fn = lambda m, x, y: xent(m(x), y)
  _, grads, stats = nnx.jit(mkor_optax.value_and_grad(loss_fn, kind=mkor_optax.RANK1))(model, x, y)
  assert sorted(stats) == ['conv', 'fc']
  # fc: a = mean of its input rows (with the bias 1), g = sum over rows of dL/dy
  fc_in = np.asarray(model.fc_in[...], np.float64)
  assert np.count_nonzero(fc_in == 0) > 0.2 * fc_in.size  # dropout (and the ReLU) zeroed some
  np.testing.assert_allclose(stats['fc']['a'], np.append(fc_in.mean(0), 1.0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats['fc']['g'], np.asarray(grads['d_fc'][...], np.float64).sum(0),
                             rtol=1e-5, atol=1e-7)
  # conv: im2col patch mean, and (1/P) * sum of dL/dy over batch and positions
  pads = conv_pads('SAME', (8, 8), (3, 3), (2, 2))
  patches = im2col(np.asarray(x, np.float64), (3, 3), (2, 2), pads).reshape(-1, 18)
  np.testing.assert_allclose(stats['conv']['a'], np.append(patches.mean(0), 1.0), rtol=1e-5, atol=1e-6)
  dy = np.asarray(grads['d_conv'][...], np.float64)
  assert np.abs(dy.sum((0, 1, 2))).max() > 1e-3
  np.testing.assert_allclose(stats['conv']['g'], dy.sum((0, 1, 2)) / 16, rtol=1e-5, atol=1e-7)
  # the gradients are nnx.value_and_grad's, without the capture's dummies
  _, want = nnx.value_and_grad(loss_fn)(nnx.clone(model), x, y)
  assert jax.tree.structure(grads) == jax.tree.structure(want)
  assert not any('_mkor_tap' in str(p) for p, _ in jax.tree_util.tree_flatten_with_path(grads)[0])
  assert not hasattr(model.fc, '_mkor_tap')


def test_covariance_and_shared_module_pools_its_calls():
  class Shared(nnx.Module):
    def __init__(self, rngs):
      self.fc = nnx.Linear(3, 2, rngs=rngs)
      self.d1 = nnx.Param(jnp.zeros((B, 2)))
      self.d2 = nnx.Param(jnp.zeros((B, 2)))

    def __call__(self, x1, x2):
      return jnp.sum(jnp.tanh(self.fc(x1) + self.d1[...]) * (self.fc(x2) + self.d2[...])) / B

  model = Shared(nnx.Rngs(0))
  x1, x2 = jax.random.normal(jax.random.PRNGKey(1), (2, B, 3))
  loss_fn = lambda m, a, b: m(a, b)
  _, grads, stats = mkor_optax.value_and_grad(loss_fn, kind=mkor_optax.RANK1)(model, x1, x2)
  rows = np.concatenate([np.asarray(x1, np.float64), np.asarray(x2, np.float64)])
  dy = np.concatenate([np.asarray(grads['d1'][...], np.float64), np.asarray(grads['d2'][...], np.float64)])
  np.testing.assert_allclose(stats['fc']['a'], np.append(rows.mean(0), 1.0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats['fc']['g'], dy.sum(0), rtol=1e-5, atol=1e-7)
  # K-FAC's covariances: A = mean x_aug x_aug^T, G = mean over calls of (1/R) sum h h^T, h = B dL/dy
  _, _, cov = mkor_optax.value_and_grad(loss_fn, kind=mkor_optax.COVARIANCE)(model, x1, x2)
  xa = np.hstack([rows, np.ones((2 * B, 1))])
  np.testing.assert_allclose(cov['fc']['A'], xa.T @ xa / (2 * B), rtol=1e-5, atol=1e-6)
  h = B * dy
  np.testing.assert_allclose(cov['fc']['G'], h.T @ h / (2 * B), rtol=1e-4, atol=1e-6)


# --------------------------------------------------- NNX vs linen, same weights

class NNXNet(nnx.Module):
  """Bias-free conv named 'stem' (its layout cannot be told from the name and
  shape), attention, a biased and a bias-free Linear."""

  def __init__(self, rngs):
    self.stem = nnx.Conv(2, 3, (3, 3), strides=2, use_bias=False, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(2, 3, qkv_features=4, out_features=3, decode=False,
                                       rngs=rngs)
    self.fc1 = nnx.Linear(3, 5, rngs=rngs)
    self.fc2 = nnx.Linear(5, 4, use_bias=False, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.stem(x))
    h = h.reshape(h.shape[0], -1, 3)
    h = (h + self.attn(h)).mean(1)
    return self.fc2(jnp.tanh(self.fc1(h)))


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(3, (3, 3), strides=2, use_bias=False, name='stem')(x))
    h = h.reshape(h.shape[0], -1, 3)
    h = (h + nn.MultiHeadDotProductAttention(2, qkv_features=4, out_features=3, name='attn')(h)).mean(1)
    return nn.Dense(4, use_bias=False, name='fc2')(jnp.tanh(nn.Dense(5, name='fc1')(h)))


def test_mkor_first_update_equals_linen_on_the_same_weights():
  model = NNXNet(nnx.Rngs(0))
  x, y = data()
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))  # the same tree as linen's
  linen = LinenNet()
  linen_loss = lambda p, x, y: xent(linen.apply({'params': p}, x), y)
  nnx_loss = lambda m, x, y: xent(m(x), y)
  tx_l = mkor_optax.mkor(1e-2, layouts=mkor_optax.layer_layouts(linen_loss, params, x, y))

  @jax.jit
  def linen_step(params, x, y):
    value, grads, stats = mkor_optax.value_and_grad(linen_loss, kind=mkor_optax.RANK1)(params, x, y)
    return value, stats, tx_l.update(grads, tx_l.init(params), params, stats=stats)[0]

  optimizer = nnx.Optimizer(model, mkor_optax.mkor(1e-2), wrt=nnx.Param)  # no layouts given

  @nnx.jit
  def nnx_step(model, optimizer, x, y):
    value, grads, stats = mkor_optax.value_and_grad(nnx_loss, kind=mkor_optax.RANK1)(model, x, y)
    return value, stats, optimizer.update(model, grads, stats=stats)

  lv, ls, want = linen_step(params, x, y)
  nv, ns, got = nnx_step(model, optimizer, x, y)
  np.testing.assert_allclose(nv, lv, rtol=1e-6)
  assert sorted(ns) == sorted(ls) == ['attn/key', 'attn/out', 'attn/query', 'attn/value',
                                       'fc1', 'fc2', 'stem']
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), ns, ls)
  assert max(float(jnp.max(jnp.abs(u))) for u in jax.tree.leaves(want)) > 1e-3
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6),
               nnx.to_pure_dict(got), want)
  # and the model moved by exactly that update
  new = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  jax.tree.map(lambda n, p, u: np.testing.assert_allclose(n, p + u, rtol=0, atol=1e-6),
               new, params, want)


def test_init_reads_layouts_from_the_modules():
  model = NNXNet(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  state = mkor_optax.scale_by_mkor().init(params)  # the model is in this frame
  assert state.input_side['stem'].shape == (1, 18, 18) and state.output_side['stem'].shape == (1, 3, 3)
  assert state.input_side['attn/out'].shape == (1, 5, 5)  # (heads * head_dim) + bias
  assert mkor_optax.nnx.layouts(model)['stem'] == mkor_optax.Layout(0, 1, False)
  # plain arrays of a layer never seen, without the modules: asks for layouts=
  fresh = {'other': {'kernel': jnp.zeros((3, 3, 2, 5))}}
  with pytest.raises(ValueError, match='layouts='):
    mkor_optax.scale_by_mkor().init(nnx.State(fresh))


# ----------------------------------------------------------- the five methods

class Small(nnx.Module):
  def __init__(self, rngs):
    self.fc1 = nnx.Linear(6, 16, rngs=rngs)
    self.bn = nnx.BatchNorm(16, momentum=0.5, rngs=rngs)
    self.drop = nnx.Dropout(0.1, rngs=rngs)
    self.fc2 = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.fc2(self.drop(self.bn(nnx.relu(self.fc1(x)))))


def small_data(seed=0, n=32):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  x = jax.random.normal(k1, (n, 6))
  w = jax.random.normal(k2, (6, 3))
  return x, jnp.argmax(x @ w, axis=1)


METHODS = {
    'mkor': (lambda: mkor_optax.mkor(2e-2), mkor_optax.RANK1, False),
    'mkor_h': (lambda: mkor_optax.mkor_h(2e-2), mkor_optax.RANK1, True),
    'kfac': (lambda: mkor_optax.kfac(2e-2), mkor_optax.COVARIANCE, False),
    'eva': (lambda: mkor_optax.eva(2e-2), mkor_optax.RANK1, False),
    'sonew': (lambda: mkor_optax.sonew(2e-2), None, False),
}


def small_loss(model, x, y):
  return xent(model(x), y)


@pytest.mark.parametrize('method', sorted(METHODS))
def test_every_method_trains_an_nnx_model_with_nnx_optimizer(method):
  make, kind, wants_value = METHODS[method]
  model = Small(nnx.Rngs(params=0, dropout=1))
  optimizer = nnx.Optimizer(model, make(), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, y):
    if kind is None:
      loss, grads = nnx.value_and_grad(small_loss)(model, x, y)
      optimizer.update(model, grads)
    else:
      loss, grads, stats = mkor_optax.value_and_grad(small_loss, kind=kind)(model, x, y)
      extra = {'value': loss} if wants_value else {}
      optimizer.update(model, grads, stats=stats, **extra)
    return loss

  x, y = small_data()
  losses = [float(step(model, optimizer, x, y)) for _ in range(25)]
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-3:]) < 0.6 * losses[0], losses
  assert int(optimizer.step[...]) == 25
  model.eval()  # the BatchNorm running statistics were updated through the capture
  assert not np.allclose(model.bn.mean[...], 0.0)
  assert float(small_loss(model, x, y)) < 0.6 * losses[0]


def test_functional_split_merge_jax_jit_loop_equals_nnx_jit_loop():
  x, y = small_data()

  def nnx_loop(steps=3):
    model = Small(nnx.Rngs(params=0, dropout=1))
    optimizer = nnx.Optimizer(model, mkor_optax.mkor(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
      loss, grads, stats = mkor_optax.value_and_grad(small_loss, kind=mkor_optax.RANK1)(model, x, y)
      optimizer.update(model, grads, stats=stats)
      return loss

    losses = [step(model, optimizer, x, y) for _ in range(steps)]
    return losses, nnx.state(model, nnx.Param)

  def functional_loop(steps=3):
    model = Small(nnx.Rngs(params=0, dropout=1))
    optimizer = nnx.Optimizer(model, mkor_optax.mkor(1e-2), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))

    @jax.jit
    def step(state, x, y):
      model, optimizer = nnx.merge(graphdef, state)
      loss, grads, stats = mkor_optax.value_and_grad(small_loss, kind=mkor_optax.RANK1)(model, x, y)
      optimizer.update(model, grads, stats=stats)
      return loss, nnx.state((model, optimizer))

    losses = []
    for _ in range(steps):
      loss, state = step(state, x, y)
      losses.append(loss)
    model, _ = nnx.merge(graphdef, state)
    return losses, nnx.state(model, nnx.Param)

  def optax_loop(steps=3):  # plain optax on nnx.State, model merged in the step
    model = Small(nnx.Rngs(params=0, dropout=1))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = mkor_optax.mkor(1e-2)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, rest, opt_state, x, y):
      model = nnx.merge(graphdef, params, rest)
      loss, grads, stats = mkor_optax.value_and_grad(small_loss, kind=mkor_optax.RANK1)(model, x, y)
      updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
      params = optax.apply_updates(params, updates)
      return loss, params, nnx.state(model, nnx.Not(nnx.Param)), opt_state

    losses = []
    for _ in range(steps):
      loss, params, rest, opt_state = step(params, rest, opt_state, x, y)
      losses.append(loss)
    return losses, params

  want_losses, want = nnx_loop()
  for losses, got in (functional_loop(), optax_loop()):
    np.testing.assert_allclose(losses, want_losses, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 nnx.as_pure(got), nnx.as_pure(want))
  assert want_losses[-1] < want_losses[0]


# ------------------------------------------------ scan/vmap stacks and remat

L, D = 3, 4


class Block(nnx.Module):
  def __init__(self, rngs):
    self.lin = nnx.Linear(D, D, use_bias=False, rngs=rngs)

  def __call__(self, x):
    return jnp.tanh(self.lin(x))


class Scanned(nnx.Module):
  def __init__(self, rngs):
    @nnx.split_rngs(splits=L)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return Block(rngs)

    self.blocks = create(rngs)
    self.head = nnx.Linear(D, 2, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    @nnx.remat
    def forward(x, block):
      return block(x)

    return self.head(forward(x, self.blocks))


class Unrolled(nnx.Module):
  def __init__(self, scanned):
    kernels = scanned.blocks.lin.kernel[...]
    self.layers = nnx.List([Block(nnx.Rngs(0)) for _ in range(L)])
    for i, layer in enumerate(self.layers):
      layer.lin.kernel[...] = kernels[i]
    self.head = nnx.clone(scanned.head)

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    return self.head(x)


def test_scan_vmap_stacked_and_rematted_layers_get_their_own_statistics():
  model = Scanned(nnx.Rngs(0))
  ref = Unrolled(model)
  x = jax.random.normal(jax.random.PRNGKey(3), (B, 5, D))
  y = jax.random.randint(jax.random.PRNGKey(4), (B, 5), 0, 2)
  loss_fn = lambda m, x, y: xent(m(x), y)
  v, grads, stats = nnx.jit(mkor_optax.value_and_grad(loss_fn, kind=mkor_optax.RANK1))(model, x, y)
  rv, rgrads, rstats = nnx.jit(mkor_optax.value_and_grad(loss_fn, kind=mkor_optax.RANK1))(ref, x, y)
  np.testing.assert_allclose(v, rv, rtol=1e-6)
  assert stats['blocks/lin']['a'].shape == (L, D) and stats['blocks/lin']['g'].shape == (L, D)
  for i in range(L):
    for k in 'ag':
      np.testing.assert_allclose(stats['blocks/lin'][k][i], rstats[f'layers/{i}/lin'][k],
                                 rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(grads['blocks']['lin']['kernel'][...][1],
                             rgrads['layers'][1]['lin']['kernel'][...], rtol=1e-5, atol=1e-7)
  # the bias-free (L, D, D) kernel: one stacking axis, known from the module at init
  optimizer = nnx.Optimizer(model, mkor_optax.mkor(1e-2), wrt=nnx.Param)
  assert optimizer.opt_state[0].input_side['blocks/lin'].shape == (L, D, D)
  optimizer.update(model, grads, stats=stats)
  assert np.all(np.isfinite(model.blocks.lin.kernel[...]))


def test_conv_transpose_and_a_linear_subclass_match_linen():
  class Twice(nnx.Linear):  # a subclass calling super().__call__: captured once
    def __call__(self, x):
      return 2.0 * super().__call__(x)

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.up = nnx.ConvTranspose(2, 3, (3, 3), strides=(2, 2), rngs=rngs)
      self.fc = Twice(3, 4, rngs=rngs)

    def __call__(self, x):
      return self.fc(jnp.tanh(self.up(x))).mean((1, 2))

  class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = jnp.tanh(nn.ConvTranspose(3, (3, 3), strides=(2, 2), name='up')(x))
      return (2.0 * nn.Dense(4, name='fc')(h)).mean((1, 2))

  model = Net(nnx.Rngs(0))
  x, y = data(shape=(4, 4, 2))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  lv, _, ls = mkor_optax.value_and_grad(
      lambda p, x, y: xent(LinenNet().apply({'params': p}, x), y), kind=mkor_optax.RANK1)(params, x, y)
  nv, _, ns = mkor_optax.value_and_grad(lambda m, x, y: xent(m(x), y), kind=mkor_optax.RANK1)(model, x, y)
  np.testing.assert_allclose(nv, lv, rtol=1e-6)
  assert sorted(ns) == ['fc', 'up']
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), ns, ls)


# ------------------------------------------------ register_layer, Einsum

class Scaled(nnx.Module):
  """A custom layer: y = 2 x W + b."""

  def __init__(self, d_in, d_out, rngs):
    self.kernel = nnx.Param(jax.random.normal(rngs.params(), (d_in, d_out)))
    self.bias = nnx.Param(jnp.zeros((d_out,)))

  def __call__(self, x):
    return 2.0 * x @ self.kernel[...] + self.bias[...]


def scaled_adapter(module, args, kwargs):
  x = args[0]
  rows = x.reshape(-1, x.shape[-1])

  def read(y):
    del y
    return mkor_optax.LayerCall(lambda: rows, rows.shape[0], 1, 1.0, True, module.kernel.shape)

  return read


def test_register_layer_accepts_nnx_modules():
  with pytest.raises(TypeError, match='linen.Module or flax.nnx.Module'):
    mkor_optax.register_layer(object, scaled_adapter)
  mkor_optax.register_layer(Scaled, scaled_adapter)

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.custom = Scaled(3, 2, rngs)
      self.d = nnx.Param(jnp.zeros((B, 2)))

    def __call__(self, x):
      return self.custom(x) + self.d[...]

  model = Net(nnx.Rngs(0))
  x, y = jax.random.normal(jax.random.PRNGKey(5), (B, 3)), jnp.arange(B) % 2
  _, grads, stats = mkor_optax.value_and_grad(lambda m, x, y: xent(m(x), y), kind=mkor_optax.RANK1)(model, x, y)
  np.testing.assert_allclose(stats['custom']['a'], np.append(np.asarray(x).mean(0), 1.0), rtol=1e-5)
  np.testing.assert_allclose(stats['custom']['g'], np.asarray(grads['d'][...]).sum(0),
                             rtol=1e-5, atol=1e-7)


def test_einsum_matrix_layer_is_captured_and_a_batched_one_passes_through():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.mat = nnx.Einsum('bti,io->bto', (3, 4), (4,), rngs=rngs)
      self.lin = nnx.Linear(3, 4, rngs=rngs)
      self.heads = nnx.Einsum('bhi,hio->bho', (2, 4, 2), rngs=rngs)

    def __call__(self, x):
      h = self.mat(x) + self.lin(x)
      return self.heads(h.reshape(h.shape[0], 2, -1)).sum(-1)

  model = Net(nnx.Rngs(0))
  model.lin.kernel[...] = model.mat.kernel[...]
  x = jax.random.normal(jax.random.PRNGKey(6), (B, 2, 3))
  y = jnp.arange(B) % 2
  _, _, stats = mkor_optax.value_and_grad(lambda m, x, y: xent(m(x), y), kind=mkor_optax.RANK1)(model, x, y)
  assert sorted(stats) == ['lin', 'mat']
  for k in 'ag':  # same weights and the same output gradient: the same statistics
    np.testing.assert_allclose(stats['mat'][k], stats['lin'][k], rtol=1e-6)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    state = mkor_optax.scale_by_mkor().init(nnx.state(model, nnx.Param))
  assert any("['heads']" in str(w.message) for w in caught)
  assert 'mat' in state.input_side and 'heads' not in state.input_side


# ------------------------------------------------------------- data parallel

def test_sharded_batch_under_nnx_jit_equals_one_device():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.fc1 = nnx.Linear(6, 8, rngs=rngs)
      self.bn = nnx.BatchNorm(8, rngs=rngs)
      self.fc2 = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
      return self.fc2(self.bn(nnx.relu(self.fc1(x))))

  def run(x, y):
    model = Net(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, mkor_optax.mkor(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
      loss, grads, stats = mkor_optax.value_and_grad(small_loss, kind=mkor_optax.RANK1)(model, x, y)
      optimizer.update(model, grads, stats=stats)
      return loss

    losses = [step(model, optimizer, x, y) for _ in range(2)]
    return losses, nnx.as_pure(nnx.state(model))

  assert jax.device_count() == 4
  x, y = small_data()
  want_losses, want = run(x, y)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('batch',))
  sharded = NamedSharding(mesh, P('batch'))
  got_losses, got = run(jax.device_put(x, sharded), jax.device_put(y, sharded))
  np.testing.assert_allclose(got_losses, want_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got, want)


class _StackedLinear(nnx.Module):
  """'layer': L bias-free Linear(D, D) stacked on axis 0, kernel (L, D, D)."""

  def __init__(self, rngs):
    @nnx.split_rngs(splits=L)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return nnx.Linear(D, D, use_bias=False, rngs=rngs)

    self.layer = create(rngs)
    self.head = nnx.Linear(D, 2, rngs=rngs)

  def __call__(self, x):  # x: (B, L, D), slice i through layer i
    @nnx.vmap(in_axes=(0, 1), out_axes=1)
    def each(layer, x):
      return layer(x)

    return self.head(jnp.tanh(each(self.layer, x)).mean(1))


class _GeneralLinear(nnx.Module):
  """'layer': one LinearGeneral (L, D) -> D, the same path and kernel shape (L, D, D)."""

  def __init__(self, rngs):
    self.layer = nnx.LinearGeneral((L, D), D, axis=(-2, -1), use_bias=False, rngs=rngs)
    self.head = nnx.Linear(D, 2, rngs=rngs)

  def __call__(self, x):
    return self.head(jnp.tanh(self.layer(x)))


def test_two_models_with_one_path_and_kernel_shape_keep_their_own_layouts():
  """Nothing is remembered across models: each one's optimizer preconditions
  it as an optimizer given its exact layouts= does, whatever was built before."""
  x = jax.random.normal(jax.random.PRNGKey(3), (B, L, D))
  y = jax.random.randint(jax.random.PRNGKey(4), (B,), 0, 2)
  loss_fn = lambda m, x, y: xent(m(x), y)
  models = {cls: cls(nnx.Rngs(0)) for cls in (_StackedLinear, _GeneralLinear)}
  optimizers = {cls: nnx.Optimizer(m, mkor_optax.mkor(1e-2), wrt=nnx.Param)
                for cls, m in models.items()}  # both built before either steps
  shapes = {cls: o.opt_state[0].input_side['layer'].shape for cls, o in optimizers.items()}
  assert shapes == {_StackedLinear: (L, D, D), _GeneralLinear: (1, L * D, L * D)}
  for cls, model in models.items():
    ref_model = cls(nnx.Rngs(0))
    ref = nnx.Optimizer(ref_model, mkor_optax.mkor(1e-2, layouts=mkor_optax.nnx.layouts(ref_model)),
                        wrt=nnx.Param)
    for m, o in ((model, optimizers[cls]), (ref_model, ref)):
      for _ in range(3):
        _, grads, stats = nnx.jit(mkor_optax.value_and_grad(loss_fn, kind=mkor_optax.RANK1))(m, x, y)
        o.update(m, grads, stats=stats)
    np.testing.assert_allclose(model.layer.kernel[...], ref_model.layer.kernel[...], rtol=1e-6)
    factor = np.asarray(optimizers[cls].opt_state[0].input_side['layer'])
    assert not np.allclose(factor, np.eye(factor.shape[-1]))  # refreshed, not left alone
