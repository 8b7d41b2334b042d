"""Flax code as people write it: TrainState, bias-free attention, boxed
(partitioned) parameters, teacher trees, whole-variables losses, penalties
that zip params with another tree, argnums, and the capture's blind spots."""

import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import mkor_optax
from helpers import KEY, Net, assert_tree_close, batch, init_params, loss_fn

GRAD = mkor_optax.value_and_grad(loss_fn, kind=mkor_optax.RANK1)


def train(opt, params, steps=3, grad_fn=GRAD, n=8):
  state = opt.init(params)

  @jax.jit
  def step(params, state, x, y):
    _, grads, stats = grad_fn(params, x, y)
    updates, state = opt.update(grads, state, params, stats=stats)
    return optax.apply_updates(params, updates), state

  for t in range(steps):
    params, state = step(params, state, *batch(t, n))
  return params, state


# -------------------------------------------------------------------- TrainState

class StateWithBN(mkor_optax.TrainState):
  batch_stats: Any = None


def test_train_state_is_a_two_line_change():
  params = init_params()
  want, _ = train(mkor_optax.mkor(1e-2), params)
  state = StateWithBN.create(apply_fn=Net().apply, params=params, tx=mkor_optax.mkor(1e-2))

  @jax.jit
  def step(state, x, y):
    _, grads, stats = mkor_optax.value_and_grad(loss_fn, kind=mkor_optax.RANK1)(state.params, x, y)
    return state.apply_gradients(grads=grads, stats=stats, batch_stats=jnp.float32(state.step))

  for t in range(3):
    state = step(state, *batch(t))
  assert_tree_close(state.params, want, rtol=1e-6, atol=1e-7)
  assert int(state.step) == 3 and float(state.batch_stats) == 2.0


def test_train_state_forwards_the_loss_to_mkor_h():
  params = init_params()
  state = mkor_optax.TrainState.create(apply_fn=Net().apply, params=params,
                                       tx=mkor_optax.mkor_h(1e-2, window=1, patience=1))
  for t in range(3):
    loss, grads, stats = GRAD(state.params, *batch(t))
    state = state.apply_gradients(grads=grads, stats=stats, value=loss)
  assert int(state.opt_state[0].finite_count) == 3


# --------------------------------------------------- layouts known at init time

class BiasFreeTransformer(nn.Module):
  """lm1b/wmt style: bias-free attention and MLP, scanned bias-free blocks."""

  @nn.compact
  def __call__(self, x):
    x = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, use_bias=False)(x)

    class Block(nn.Module):
      @nn.compact
      def __call__(self, h, _):
        return h + nn.Dense(h.shape[-1], use_bias=False)(nn.tanh(h)), None

    x, _ = nn.scan(Block, variable_axes={'params': 0}, split_rngs={'params': True},
                   length=2)()(x, None)
    return nn.Dense(3, use_bias=False)(x.mean(1))


def seq_batch(t, n=4):
  k1, k2 = jax.random.split(jax.random.PRNGKey(t))
  return jax.random.normal(k1, (n, 5, 6)), jax.random.normal(k2, (n, 3))


def transformer_loss(params, x, y, model=BiasFreeTransformer()):
  return jnp.mean((model.apply({'params': params}, x) - y) ** 2)


def test_bias_free_attention_and_scanned_layers_need_no_layouts():
  model = BiasFreeTransformer()
  x, y = seq_batch(0)
  params = model.init(KEY, x)['params']
  exact = mkor_optax.layer_layouts(transformer_loss, params, x, y)
  assert exact['MultiHeadDotProductAttention_0/query'] == mkor_optax.Layout(0, 2, False)
  assert exact['ScanBlock_0/Dense_0'] == mkor_optax.Layout(1, 1, False)
  opt = mkor_optax.mkor(1e-2)                        # no layouts=
  with_layouts = mkor_optax.mkor(1e-2, layouts=exact)
  s1, s2 = opt.init(params), with_layouts.init(params)
  assert jax.tree.map(jnp.shape, s1) == jax.tree.map(jnp.shape, s2)
  grad_fn = mkor_optax.value_and_grad(transformer_loss, kind=mkor_optax.RANK1)
  _, grads, stats = grad_fn(params, x, y)
  u1, _ = opt.update(grads, s1, params, stats=stats)
  u2, _ = with_layouts.update(grads, s2, params, stats=stats)
  jax.tree.map(np.testing.assert_array_equal, u1, u2)


class Ambiguous(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.DenseGeneral((2, 3), use_bias=False, name='proj')(x)
    h = nn.DenseGeneral(4, axis=(-2, -1), use_bias=False, name='mix')(h)
    return nn.Dense(3)(h)


def test_remaining_ambiguity_is_an_init_error_naming_every_layer():
  x, y = batch(0)
  model = Ambiguous()
  params = model.init(KEY, x)['params']
  loss = lambda p, x, y: jnp.mean((model.apply({'params': p}, x) - y) ** 2)
  for make in (mkor_optax.mkor, mkor_optax.kfac, mkor_optax.eva, mkor_optax.mkor_h):
    with pytest.raises(ValueError, match=r"\['mix', 'proj'\].*layer_layouts"):
      make(1e-2).init(params)
  layouts = mkor_optax.layer_layouts(loss, params, x, y)
  opt = mkor_optax.mkor(1e-2, layouts=layouts)
  _, grads, stats = mkor_optax.value_and_grad(loss, kind=mkor_optax.RANK1)(params, x, y)
  opt.update(grads, opt.init(params), params, stats=stats)


# ------------------------------------------------------------- boxed parameters

class Sharded(nn.Module):
  logical: bool = False

  @nn.compact
  def __call__(self, x):
    part = nn.with_logical_partitioning if self.logical else nn.with_partitioning
    lecun = nn.initializers.lecun_normal()
    h = nn.Dense(8, kernel_init=part(lecun, (None, 'model')),
                 bias_init=part(nn.initializers.zeros_init(), ('model',)))(x)
    h = nn.tanh(h)
    return nn.Dense(3, kernel_init=part(lecun, ('model', None)))(h)


def sharded_loss(params, x, y, model=Sharded()):
  return jnp.mean((model.apply({'params': params}, x) - y) ** 2)


@pytest.mark.parametrize('logical', [False, True])
def test_boxed_params_train_like_unboxed_ones(logical):
  model = Sharded(logical)
  loss = lambda p, x, y: jnp.mean((model.apply({'params': p}, x) - y) ** 2)
  boxed = model.init(KEY, batch(0)[0])['params']
  assert isinstance(boxed['Dense_0']['kernel'], nn.Partitioned)
  opt = mkor_optax.mkor(1e-2)
  state = opt.init(boxed)  # lm1b's flow: the optimizer is created on boxed params
  assert set(state[0].input_side) == {'Dense_0', 'Dense_1'}
  grad_fn = mkor_optax.value_and_grad(loss, kind=mkor_optax.RANK1)
  got, _ = train(opt, boxed, grad_fn=grad_fn)
  want, _ = train(opt, nn.unbox(boxed), grad_fn=grad_fn)
  assert isinstance(got['Dense_0']['kernel'], nn.Partitioned)
  assert_tree_close(nn.unbox(got), want, rtol=1e-6, atol=1e-7)
  lamb, _ = train(optax.lamb(1e-2), nn.unbox(boxed), grad_fn=grad_fn)
  assert not np.allclose(want['Dense_0']['kernel'], lamb['Dense_0']['kernel'])


def test_jit_over_a_mesh_with_sharded_params_equals_one_device():
  mesh = jax.make_mesh((4,), ('model',), axis_types=(jax.sharding.AxisType.Auto,))
  boxed = Sharded().init(KEY, batch(0)[0])['params']
  specs = nn.get_partition_spec(boxed)
  params = nn.unbox(boxed)
  sharded = jax.tree.map(lambda p, s: jax.device_put(p, NamedSharding(mesh, s)), params, specs)
  assert sharded['Dense_0']['kernel'].sharding.spec == P(None, 'model')
  opt = mkor_optax.mkor(1e-2, inv_freq=1)
  grad_fn = mkor_optax.value_and_grad(sharded_loss, kind=mkor_optax.RANK1)
  got, state = train(opt, sharded, steps=4, grad_fn=grad_fn)
  want, _ = train(opt, params, steps=4, grad_fn=grad_fn)
  assert_tree_close(got, want, rtol=1e-5, atol=1e-6)
  assert got['Dense_0']['kernel'].sharding.is_equivalent_to(
      NamedSharding(mesh, P(None, 'model')), 2)


# ----------------------------------------------------- several parameter trees

def test_teacher_and_frozen_copy_calls_are_not_captured():
  params = init_params()
  teacher = jax.tree.map(lambda p: p * 0.5 + 0.1, params)
  x, y = batch(0)
  model = Net()

  def distill(p, x, y):
    t = jax.lax.stop_gradient(model.apply({'params': teacher}, x))
    frozen = model.apply({'params': jax.lax.stop_gradient(p)}, 2 * x)
    return jnp.mean((model.apply({'params': p}, x) - t) ** 2) + 0.1 * jnp.mean(frozen ** 2) \
        + jnp.mean(y)

  def reference(p, x, y):  # the teacher's and the frozen copy's outputs as constants
    t = model.apply({'params': teacher}, x)
    frozen = model.apply({'params': params}, 2 * x)
    return jnp.mean((model.apply({'params': p}, x) - t) ** 2) + 0.1 * jnp.mean(frozen ** 2) \
        + jnp.mean(y)

  v1, g1, s1 = mkor_optax.value_and_grad(distill, kind=mkor_optax.RANK1)(params, x, y)
  v2, g2, s2 = mkor_optax.value_and_grad(reference, kind=mkor_optax.RANK1)(params, x, y)
  np.testing.assert_allclose(v1, v2, rtol=1e-6)
  assert_tree_close(g1, g2, rtol=1e-6, atol=1e-7)
  assert_tree_close(s1, s2, rtol=1e-6, atol=1e-7)
  # and the teacher's different inputs really would have changed `a`
  _, _, s3 = mkor_optax.value_and_grad(loss_fn, kind=mkor_optax.RANK1)(params, 2 * x, y)
  assert not np.allclose(s1['hidden']['a'], s3['hidden']['a'])


def test_loss_of_the_whole_variables_dict():
  params = init_params()
  variables = {'params': params}
  x, y = batch(0)
  loss_vars = lambda v, x, y: jnp.mean((Net().apply(v, x) - y) ** 2)
  _, grads_v, stats_v = mkor_optax.value_and_grad(loss_vars, kind=mkor_optax.RANK1)(variables, x, y)
  _, grads, stats = GRAD(params, x, y)
  assert set(stats_v) == {'params/hidden', 'params/out'}
  assert_tree_close(stats_v['params/hidden'], stats['hidden'])
  opt = mkor_optax.mkor(1e-2)
  u_v, _ = opt.update(grads_v, opt.init(variables), variables, stats=stats_v)
  u, _ = opt.update(grads, opt.init(params), params, stats=stats)
  assert_tree_close(u_v['params'], u, rtol=1e-6, atol=1e-7)


def test_penalties_that_zip_params_with_another_tree():
  params = init_params()
  anchor = jax.tree.map(jnp.zeros_like, params)

  def l2sp(p, x, y, strip=lambda t: t):
    penalty = sum(jax.tree.leaves(jax.tree.map(lambda a, b: jnp.sum((a - b) ** 2), strip(p),
                                                anchor)))
    return loss_fn(p, x, y) + 1e-2 * penalty

  with pytest.raises(ValueError, match='mkor_optax.untapped'):
    mkor_optax.value_and_grad(l2sp, kind=mkor_optax.RANK1)(params, *batch(0))
  fixed = lambda p, x, y: l2sp(p, x, y, strip=mkor_optax.untapped)
  v, g, stats = mkor_optax.value_and_grad(fixed, kind=mkor_optax.RANK1)(params, *batch(0))
  v_ref, g_ref = jax.value_and_grad(l2sp)(params, *batch(0))
  np.testing.assert_allclose(v, v_ref, rtol=1e-6)
  assert_tree_close(g, g_ref, rtol=1e-6, atol=1e-7)
  assert set(stats) == {'hidden', 'out'}


def test_argnums_selects_the_parameter_argument():
  params = init_params()
  x, y = batch(0)
  swapped = lambda x, p, y: loss_fn(p, x, y)
  v, g, s = mkor_optax.value_and_grad(swapped, argnums=1, kind=mkor_optax.RANK1)(x, params, y)
  v_ref, g_ref, s_ref = GRAD(params, x, y)
  np.testing.assert_allclose(v, v_ref)
  assert_tree_close(g, g_ref, rtol=0, atol=0)
  assert_tree_close(s, s_ref, rtol=0, atol=0)
  with pytest.raises(TypeError, match='argnums'):
    mkor_optax.value_and_grad(swapped, argnums=(0, 1), kind=mkor_optax.RANK1)


def test_uncaptured_layers_are_all_named_in_one_error():
  def lost(p, x, y):  # the taps are stripped before apply: no layer gets one
    return jnp.mean((Net().apply({'params': mkor_optax.untapped(p)}, x) - y) ** 2)

  with pytest.raises(ValueError, match=r"\['hidden', 'out'\]"):
    mkor_optax.value_and_grad(lost, kind=mkor_optax.RANK1)(init_params(), *batch(0))


# --------------------------------------------------------- capture blind spots

@pytest.mark.parametrize('axis', [(1, 2), (2, 1), (-2, -3), (-3, 2)])
def test_dense_general_statistics_for_every_axis_order(axis):
  x = jax.random.normal(KEY, (2, 3, 4, 5)) + jnp.arange(5.0)
  layer = nn.DenseGeneral(6, axis=axis)
  params = layer.init(KEY, x)['params']
  w = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 6))
  loss = lambda p, x: jnp.sum(jnp.tanh(layer.apply({'params': p}, x)) * w) / 2
  _, grads, stats = mkor_optax.value_and_grad(loss, kind=mkor_optax.RANK1)(params, x)
  # Flax contracts axes 1 and 2 in that order (it sorts them): rows are (batch, axis 3)
  rows = np.asarray(x).transpose(0, 3, 1, 2).reshape(-1, 12)
  (s,) = stats.values()
  np.testing.assert_allclose(s['a'], np.append(rows.mean(0), 1.0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(s['g'], grads['bias'], rtol=1e-5, atol=1e-7)


def test_dense_subclass_calling_super_is_captured_once():
  class Scaled(nn.Dense):
    def __call__(self, x):
      return 2.0 * super().__call__(x)

  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      return Scaled(3, name='scaled')(x)

  x, y = batch(0)
  params = M().init(KEY, x)['params']
  loss = lambda p, x, y: jnp.mean((M().apply({'params': p}, x) - y) ** 2)
  _, grads, stats = mkor_optax.value_and_grad(loss, kind=mkor_optax.RANK1)(params, x, y)
  # g is taken at the matrix product's output (nn.Dense's, inside the subclass), where the
  # sum over rows of dL/dy is the bias gradient: neither doubled nor halved
  g = stats['scaled']['g']
  np.testing.assert_allclose(g, grads['scaled']['bias'], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(stats['scaled']['a'], np.append(np.mean(x, 0), 1.0), rtol=1e-5)


def test_conv_transpose_is_captured():
  class Up(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.ConvTranspose(24, (3, 3), strides=(2, 2), padding='SAME', name='up')(x)

  x = jax.random.normal(KEY, (2, 5, 5, 2)) + 1.0
  params = Up().init(KEY, x)['params']
  w = jax.random.normal(jax.random.PRNGKey(3), Up().apply({'params': params}, x).shape)
  loss = lambda p, x: jnp.sum(jnp.tanh(Up().apply({'params': p}, x)) * w) / 2
  _, grads, stats = mkor_optax.value_and_grad(loss, kind=mkor_optax.RANK1)(params, x)
  s = stats['up']
  y = Up().apply({'params': params}, x)
  positions = y.shape[1] * y.shape[2]
  k = np.asarray(params['up']['kernel']).reshape(-1, 24)   # (3*3*2, 24): 24 equations in 18 unknowns
  # y = patches @ K + b at every position, so mean(y) = a @ K + b
  np.testing.assert_allclose(np.asarray(y).mean((0, 1, 2)), s['a'][:-1] @ k + params['up']['bias'],
                             rtol=1e-4, atol=1e-5)
  assert np.linalg.matrix_rank(k) == 18
  np.testing.assert_allclose(s['g'], grads['up']['bias'] / positions, rtol=1e-5, atol=1e-7)
  opt = mkor_optax.mkor(1e-2)
  opt.update(grads, opt.init(params), params, stats=stats)


def test_grouped_conv_and_einsum_pass_through_with_a_warning():
  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.Conv(4, (3, 3), feature_group_count=2, name='grouped')(x)
      h = h.reshape(h.shape[0], -1)
      h = nn.Einsum((h.shape[-1], 5), 'bi,ij->bj', name='Einsum_0')(h)
      return nn.Dense(3, name='head')(jnp.tanh(h))

  x = jax.random.normal(KEY, (2, 4, 4, 2))
  y = jnp.ones((2, 3))
  params = M().init(KEY, x)['params']
  loss = lambda p, x, y: jnp.mean((M().apply({'params': p}, x) - y) ** 2)
  opt = mkor_optax.mkor(1e-2)
  with pytest.warns(UserWarning, match=r"\['Einsum_0'\].*pass through"):
    state = opt.init(params)
  _, grads, stats = mkor_optax.value_and_grad(loss, kind=mkor_optax.RANK1)(params, x, y)
  assert set(stats) == {'head'}
  with pytest.warns(UserWarning, match=r"\['grouped'\].*pass through"):
    opt.update(grads, state, params, stats=stats)  # the whole chain runs
  tx = mkor_optax.scale_by_mkor()
  with pytest.warns(UserWarning):
    u, _ = tx.update(grads, tx.init(params), params, stats=stats)
  for name in ('grouped', 'Einsum_0'):  # unpreconditioned
    jax.tree.map(np.testing.assert_array_equal, u[name], grads[name])
  assert not np.allclose(u['head']['kernel'], grads['head']['kernel'])


# ------------------------------------------------------------ numeric hazards

def test_kfac_bfloat16_factors_with_large_mean_inputs_stay_finite():
  params = init_params()
  grad_fn = mkor_optax.value_and_grad(loss_fn, kind=mkor_optax.COVARIANCE)
  opt = mkor_optax.kfac(1e-2, factor_dtype=jnp.bfloat16, inv_freq=1)
  state = opt.init(params)
  for t in range(3):
    x, y = batch(t)
    _, grads, stats = grad_fn(params, x + 300.0, y)
    u, state = opt.update(grads, state, params, stats=stats)
    assert all(np.all(np.isfinite(np.asarray(l, np.float32))) for l in jax.tree.leaves(u))
    params = optax.apply_updates(params, u)
  assert state[0].input_side['hidden'].cov.dtype == jnp.float32
  assert state[0].input_side['hidden'].inv.dtype == jnp.bfloat16


def test_mkor_h_skips_a_non_finite_first_loss():
  params = init_params()
  tx = mkor_optax.scale_by_mkor_h(window=5, patience=1)
  _, grads, stats = GRAD(params, *batch(0))
  upd = jax.jit(lambda s, v: tx.update(grads, s, params, stats=stats, value=v)[1])
  t = np.arange(60)
  falling = np.exp(-0.05 * t).astype(np.float32)  # constant relative rate: never a strike
  state = tx.init(params)
  for loss in np.concatenate([[np.nan, np.inf], falling]):
    state = upd(state, jnp.float32(loss))
  assert int(state.switch_step) == -1
  assert int(state.finite_count) == 60
  ref = tx.init(params)
  for loss in falling:
    ref = upd(ref, jnp.float32(loss))
  np.testing.assert_allclose(state.loss_ema, ref.loss_ema, rtol=1e-6)


# ------------------------------------------------------ data-parallel mistakes

def test_shard_map_with_a_per_device_loss_is_an_error():
  mesh = jax.make_mesh((4,), ('batch',), axis_types=(jax.sharding.AxisType.Auto,))
  params = init_params()
  x, y = batch(0, n=16)

  def local(p, x, y):
    return mkor_optax.value_and_grad(loss_fn, kind=mkor_optax.RANK1)(p, x, y)[0]

  f = jax.shard_map(local, mesh=mesh, in_specs=(P(), P('batch'), P('batch')), out_specs=P())
  with pytest.raises(ValueError, match='lax.pmean'):
    jax.jit(f)(params, x, y)


def test_pmap_without_axis_name_warns():
  params = init_params()
  x, y = batch(0, n=16)
  opt = mkor_optax.mkor(1e-2)
  state = opt.init(params)
  rep = lambda t: jax.tree.map(lambda a: jnp.broadcast_to(a, (4,) + a.shape), t)

  def step(p, s, x, y):
    _, grads, stats = GRAD(p, x, y)
    grads = jax.lax.pmean(grads, 'batch')
    return opt.update(grads, s, p, stats=stats)[0]

  with pytest.warns(UserWarning, match="axis_name='batch'"):
    jax.pmap(step, axis_name='batch')(rep(params), rep(state), x.reshape(4, 4, -1),
                                      y.reshape(4, 4, -1))
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    ok = mkor_optax.mkor(1e-2, axis_name='batch')

    def good(p, s, x, y):
      _, grads, stats = GRAD(p, x, y)
      return ok.update(jax.lax.pmean(grads, 'batch'), s, p, stats=stats)[0]

    jax.pmap(good, axis_name='batch')(rep(params), rep(ok.init(params)), x.reshape(4, 4, -1),
                                      y.reshape(4, 4, -1))
