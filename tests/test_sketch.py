"""Sketched statistics (mkor_optax.Sketch): their outer products average to
K-FAC's covariances, on every layer kind and data-parallel set-up, and MKOR's
refresh from k sketches equals a dense float64 inverse."""

import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import mkor_optax
from mkor_optax.accumulation import micro_batch_signs
from mkor_optax import factors, lowrank, statistics
from mkor_optax.numerics import NumericalWarning
from helpers import KEY, assert_tree_close, batch, head, init_params, loss_fn
from test_lowrank import dense_refresh

# Some tests here check warnings from compiled steps, which need
# mkor_optax.jit_warnings(True) (off by default).
pytestmark = pytest.mark.usefixtures('jit_warnings_on')

K = 4096  # sketches for the expectation tests: a standard error of ~1.6% per entry


def outer_mean(v):
  """``(1/k) sum_j v_j v_j^T`` in float64 over the sketch axis (second to last)."""
  v = np.asarray(v, np.float64)
  return np.einsum('...ki,...kj->...ij', v, v) / v.shape[-2]


def assert_expectation(sketches, cov, sigmas=6.0):
  """The mean outer product of ``k`` sketches equals ``cov`` within ``sigmas``
  standard errors: for sign sketches ``Var(v_p v_q) <= C_pp C_qq + C_pq^2``."""
  cov = np.asarray(cov, np.float64)
  k = np.shape(sketches)[-2]
  diag = np.einsum('...ii->...i', cov)
  bound = sigmas * np.sqrt((diag[..., :, None] * diag[..., None, :] + cov ** 2) / k)
  got = outer_mean(sketches)
  assert np.all(np.abs(got - cov) <= bound + 1e-7), np.max(np.abs(got - cov) - bound)


def both(loss, *args, kind=mkor_optax.Sketch(K), capture=mkor_optax.value_and_grad):
  """``(sketch stats, covariance stats)`` of one loss at the same arguments."""
  sk = jax.jit(capture(loss, kind=kind))(*args)[2]
  cov = jax.jit(capture(loss, kind=mkor_optax.COVARIANCE))(*args)[2]
  return sk, cov


def assert_layers_match(sk, cov):
  assert sorted(sk) == sorted(cov)
  for name in cov:
    assert_expectation(sk[name]['a_sketches'], cov[name]['A'])
    assert_expectation(sk[name]['g_sketches'], cov[name]['G'])


# ------------------------------------------------------------ exact cases

def test_one_row_gives_its_outer_products_exactly():
  """With one row a sketch is +-the row, so every outer product is exact."""
  params = init_params()
  x, y = batch(0, n=1)
  _, _, sk = mkor_optax.value_and_grad(loss_fn, kind=mkor_optax.Sketch(5))(params, x, y)
  x_aug = np.hstack([np.asarray(x, np.float64), np.ones((1, 1))])
  for a in np.asarray(sk['hidden']['a_sketches'], np.float64):
    np.testing.assert_allclose(np.outer(a, a), x_aug.T @ x_aug, rtol=1e-6, atol=1e-7)
  _, _, cov = mkor_optax.value_and_grad(loss_fn, kind=mkor_optax.COVARIANCE)(params, x, y)
  for name in ('hidden', 'out'):
    for g in np.asarray(sk[name]['g_sketches'], np.float64):
      np.testing.assert_allclose(np.outer(g, g), cov[name]['G'], rtol=1e-5, atol=1e-8)


def test_signs_come_from_the_step_and_reproduce():
  """No key argument: the same step sketches identically; another batch or
  other weights (the next step, on a repeated batch) sketch afresh."""
  params = init_params()
  grad = jax.jit(mkor_optax.value_and_grad(loss_fn, kind=mkor_optax.Sketch(3)))
  first = grad(params, *batch(0))[2]['hidden']['a_sketches']
  np.testing.assert_array_equal(first, grad(params, *batch(0))[2]['hidden']['a_sketches'])
  # (the signs read each output entry's leading bits, so that another
  # summation order does not change them: a move of a few percent does)
  moved = jax.tree.map(lambda p: p * 1.05, params)
  assert not np.allclose(first, grad(moved, *batch(0))[2]['hidden']['a_sketches'])
  other = grad(params, *batch(1))[2]['hidden']['a_sketches']
  assert other.shape == first.shape and not np.allclose(first, other)


class _ConstantOutput(nn.Module):
  """A layer whose output is the same at every step (its kernel multiplies
  zeros), ahead of an ordinary head."""

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(6, name='constant')(jnp.zeros_like(x))
    return nn.Dense(2, name='head')(x) + jnp.sum(h, axis=-1, keepdims=True)


def test_a_step_seed_gives_a_constant_output_layer_new_signs_each_step():
  """The digest of a constant output is constant; a ``seed`` that changes
  every step (the step counter, traced under jit) changes every sign."""
  model = _ConstantOutput()
  x, y = jax.random.normal(KEY, (16, 3)), jax.random.normal(jax.random.PRNGKey(1), (16, 2))
  params = model.init(KEY, x)['params']
  loss = lambda p, x, y: jnp.mean((model.apply({'params': p}, x) - y) ** 2)

  @jax.jit
  def sketch(params, step):
    kind = mkor_optax.Sketch(4) if step is None else mkor_optax.Sketch(4, seed=step)
    stats = mkor_optax.value_and_grad(loss, kind=kind)(params, x, y)[2]
    return stats['constant']['g_sketches']

  unseeded = {np.asarray(sketch(params, None)).tobytes() for _ in range(3)}
  assert len(unseeded) == 1  # the limitation the seed lifts
  seeded = [np.asarray(sketch(params, jnp.asarray(t))) for t in range(10)]
  assert len({s.tobytes() for s in seeded}) == 10
  np.testing.assert_array_equal(seeded[3], np.asarray(sketch(params, jnp.asarray(3))))  # reproducible
  # every step's sketches still average to the covariance: one row has |g| fixed, signs +-1
  cov = jax.jit(mkor_optax.value_and_grad(loss, kind=mkor_optax.COVARIANCE))(params, x, y)[2]
  many = jax.jit(lambda t: mkor_optax.value_and_grad(loss, kind=mkor_optax.Sketch(K, seed=t))(
      params, x, y)[2])(jnp.asarray(7))
  assert_expectation(many['constant']['g_sketches'], cov['constant']['G'])


def test_sketch_seed_is_checked():
  for bad in (1.5, True, 'step', jnp.zeros(3, jnp.int32), jnp.asarray(1.0)):
    with pytest.raises(TypeError, match='seed must be an integer'):
      mkor_optax.Sketch(4, seed=bad)
  assert repr(mkor_optax.Sketch(4, seed=3)) == 'Sketch(k=4, seed=...)'
  assert repr(mkor_optax.Sketch(4)) == 'Sketch(k=4)'


def test_sketch_count_is_checked():
  for bad in (0, -1, 2.0, True):
    with pytest.raises(ValueError, match='k must be an integer'):
      mkor_optax.Sketch(bad)


# ------------------------------------------- expectation = the covariance

def test_dense_expectation_equals_the_float64_covariance():
  params = init_params()
  x, y = batch(0)
  sk, cov = both(loss_fn, params, x, y)
  x_aug = np.hstack([np.asarray(x, np.float64), np.ones((8, 1))])
  assert_expectation(sk['hidden']['a_sketches'], x_aug.T @ x_aug / 8)
  assert_layers_match(sk, cov)


class Conv(nn.Module):
  transpose: bool = False

  @nn.compact
  def __call__(self, x):
    layer = nn.ConvTranspose if self.transpose else nn.Conv
    h = layer(4, kernel_size=(3, 2), strides=(2, 1), padding='SAME', name='conv')(x)
    return nn.Dense(2, name='head')(jnp.tanh(h).reshape(x.shape[0], -1))


class Scanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    step = nn.scan(lambda m, c, _: (jnp.tanh(m(c)), None), variable_broadcast=False,
                   variable_axes={'params': 0}, split_rngs={'params': True}, length=3)
    h, _ = step(nn.Dense(5, name='cell'), x, None)
    return nn.Dense(2, name='head')(h)


class Shared(nn.Module):
  @nn.compact
  def __call__(self, x):
    layer = nn.Dense(5, name='shared')
    return nn.Dense(2, name='head')(jnp.tanh(layer(jnp.tanh(layer(x)))))


class Attention(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4, name='attn')(x)
    return nn.DenseGeneral(2, axis=(-2, -1), name='head')(h)


MODELS = {
    'conv': (Conv(), (2, 7, 6, 3)),
    'conv_transpose': (Conv(transpose=True), (2, 4, 3, 3)),
    'scan': (Scanned(), (6, 5)),
    'shared': (Shared(), (6, 5)),
    'attention': (Attention(), (2, 3, 4)),
}


@pytest.mark.parametrize('name', sorted(MODELS))
def test_every_layer_kind_sketches_its_covariances(name):
  model, shape = MODELS[name]
  x = jax.random.normal(KEY, shape)
  params = model.init(KEY, x)['params']
  w = jax.random.normal(jax.random.PRNGKey(3), model.apply({'params': params}, x).shape)
  loss = lambda p: head(model.apply({'params': p}, x), w)
  sk, cov = both(loss, params)
  assert_layers_match(sk, cov)
  if name == 'scan':
    assert sk['cell']['a_sketches'].shape == (3, K, 6)


def test_nnx_layers_sketch_their_covariances():
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(3, 4, kernel_size=(3, 3), strides=2, rngs=rngs)
      self.norm = nnx.BatchNorm(4, rngs=rngs)
      self.head = nnx.Linear(4 * 4 * 4, 2, rngs=rngs)

    def __call__(self, x):
      h = jnp.tanh(self.norm(self.conv(x)))
      return self.head(h.reshape(x.shape[0], -1))

  model = Net(nnx.Rngs(0))
  x = jax.random.normal(KEY, (3, 8, 8, 3))
  w = jax.random.normal(jax.random.PRNGKey(3), (3, 2))
  loss = lambda m: head(m(x), w)
  sk = mkor_optax.nnx.value_and_grad(loss, kind=mkor_optax.Sketch(K))(model)[2]
  cov = mkor_optax.nnx.value_and_grad(loss, kind=mkor_optax.COVARIANCE)(model)[2]
  assert_layers_match(sk, cov)
  # behind a training-mode BatchNorm the mean output gradient is zero; a sketch's is not
  g_mean = mkor_optax.nnx.value_and_grad(loss, kind=mkor_optax.RANK1)(model)[2]['conv']['g']
  assert np.max(np.abs(g_mean)) < 1e-5 * np.max(np.abs(sk['conv']['g_sketches']))


# ----------------------------------------------------------- data parallel

N_DEV = 4


def data_parallel_case():
  params = init_params()
  x, y = batch(0, n=16)
  cov = jax.jit(mkor_optax.value_and_grad(loss_fn, kind=mkor_optax.COVARIANCE))(params, x, y)[2]
  return params, x, y, cov


def test_shard_map_sketches_sum_to_the_global_covariance():
  """Each device sketches its rows with its own signs; the tap's summed
  cotangents over the global row count sketch the global covariance."""
  params, x, y, cov = data_parallel_case()
  mesh = jax.make_mesh((N_DEV,), ('data',), axis_types=(jax.sharding.AxisType.Explicit,))
  grad = mkor_optax.value_and_grad(
      lambda p, xb, yb: jax.lax.pmean(loss_fn(p, xb, yb), 'data'), kind=mkor_optax.Sketch(K))
  run = jax.jit(jax.shard_map(lambda p, xb, yb: grad(p, xb, yb)[2], mesh=mesh,
                              in_specs=(P(), P('data'), P('data')), out_specs=P()))
  put = lambda a: jax.device_put(a, NamedSharding(mesh, P('data')))
  assert_layers_match(run(params, put(x), put(y)), cov)


def test_pmap_axis_name_gathers_sketches_of_the_global_covariance():
  """Per-device sketches averaged over ``axis_name`` by the transforms'
  gather: the pmean times sqrt(devices) sketches the pooled rows."""
  params, x, y, cov = data_parallel_case()
  plan = mkor_optax.layout.plan_layers(params, layouts=None, excluded=lambda _: False,
                                       max_factor_dim=4096, who='test')
  grad = mkor_optax.value_and_grad(loss_fn, kind=mkor_optax.Sketch(K))

  @functools.partial(jax.pmap, axis_name='i', in_axes=(None, 0, 0))
  def gathered(p, xb, yb):
    return statistics.gather_stats(grad(p, xb, yb)[2], plan, 'i', 'SKETCH')

  shard = lambda a: a.reshape((N_DEV, -1) + a.shape[1:])
  out = jax.tree.map(lambda a: a[0], gathered(params, shard(x), shard(y)))
  for name in cov:  # gathered stats are (S, k, d) with S = 1 here
    assert_expectation(out[name]['a_sketches'][0], cov[name]['A'])
    assert_expectation(out[name]['g_sketches'][0], cov[name]['G'])


def test_jit_sharded_batch_sketches_the_same_covariance():
  params, x, y, cov = data_parallel_case()
  mesh = jax.make_mesh((N_DEV,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  put = lambda a: jax.device_put(a, NamedSharding(mesh, P('data')))
  sk = jax.jit(mkor_optax.value_and_grad(loss_fn, kind=mkor_optax.Sketch(K)))(params, put(x),
                                                                            put(y))[2]
  assert_layers_match(sk, cov)


# ------------------------------------------------- the refresh from sketches

@pytest.mark.parametrize('refresh', ['ema', 'blend'])
@pytest.mark.parametrize('epsilon', [0.5, 100.0])  # the stabiliser fires / does not
def test_dense_refresh_from_k_sketches_equals_the_float64_inverse(refresh, epsilon):
  rng = np.random.default_rng(0)
  d, k = 6, 3
  m = rng.normal(size=(d, d))
  p0 = np.linalg.inv(m @ m.T / d + 0.5 * np.eye(d))
  vs = rng.normal(size=(k, d))
  kw = dict(gamma=0.9, zeta=0.8, epsilon=epsilon, refresh=refresh)
  got, reset = factors.refresh_checked(jnp.asarray(p0[None], jnp.float32),
                                       jnp.asarray(vs[None], jnp.float32), **kw)
  assert not np.any(reset)
  np.testing.assert_allclose(got[0], dense_refresh(p0, vs, **kw), rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize('refresh', ['ema', 'blend'])
def test_dense_k_sketch_refresh_is_exact_symmetric_and_safe(refresh):
  """The Woodbury refresh from k sketches: exact in float64 against the dense
  inverse, exactly symmetric in float32, a zero sketch adds nothing, an
  indefinite or non-finite inverse is reset to I first (flagged)."""
  rng = np.random.default_rng(3)
  d, k = 9, 4
  kw = dict(gamma=0.95, zeta=0.8, epsilon=100.0, refresh=refresh)
  m = rng.normal(size=(d, d))
  p0 = np.linalg.inv(m @ m.T / d + 0.3 * np.eye(d))
  vs = rng.normal(size=(k, d))
  with jax.enable_x64(True):
    got, reset = factors.refresh_checked(jnp.asarray(p0[None]), jnp.asarray(vs[None]), **kw)
    assert got.dtype == jnp.float64 and not np.any(reset)
    np.testing.assert_allclose(got[0], dense_refresh(p0, vs, **kw), rtol=1e-10, atol=1e-12)
  got32, _ = factors.refresh_checked(jnp.asarray(p0[None], jnp.float32), jnp.asarray(vs[None], jnp.float32), **kw)
  np.testing.assert_array_equal(got32, jnp.swapaxes(got32, -1, -2))
  # a zero sketch adds no term (the others keep their 1/k weight)
  with_zero = vs.copy()
  with_zero[1] = 0.0
  z, _ = factors.refresh_checked(jnp.asarray(p0[None], jnp.float32), jnp.asarray(with_zero[None], jnp.float32), **kw)
  expect = dense_refresh(p0, with_zero, **kw)
  np.testing.assert_allclose(z[0], expect, rtol=2e-4, atol=2e-5 * np.abs(expect).max())
  # indefinite: reset to I, then refreshed
  bad = -np.eye(d)
  r, flag = factors.refresh_checked(jnp.asarray(bad[None], jnp.float32), jnp.asarray(vs[None], jnp.float32), **kw)
  assert np.all(flag)
  expect = dense_refresh(np.eye(d), vs, **kw)
  np.testing.assert_allclose(r[0], expect, rtol=2e-4, atol=2e-5 * np.abs(expect).max())
  # a non-finite inverse: reset to I, then refreshed, flagged
  nan = p0.copy()
  nan[2, 0] = np.nan
  r, flag = factors.refresh_checked(jnp.asarray(nan[None], jnp.float32), jnp.asarray(vs[None], jnp.float32), **kw)
  assert np.all(flag)
  np.testing.assert_allclose(r[0], expect, rtol=2e-4, atol=2e-5 * np.abs(expect).max())


@pytest.mark.parametrize('refresh', ['ema', 'blend'])
def test_low_rank_refresh_from_k_sketches_is_exact_within_its_rank(refresh):
  """From the identity, ``t`` refreshes of ``k`` sketches have rank ``t k``:
  a rank-8 factor holds two refreshes of 4 sketches exactly."""
  rng = np.random.default_rng(1)
  d, k = 40, 4
  kw = dict(gamma=0.9, zeta=0.8, epsilon=100.0, refresh=refresh)
  p, dense = lowrank.identity(d, 8, 1, jnp.float32), np.eye(d)
  for _ in range(2):
    vs = rng.normal(size=(k, d)) / np.sqrt(d)
    p, reset = factors.refresh_checked(p, jnp.asarray(vs[None], jnp.float32), **kw)
    dense = dense_refresh(dense, vs, **kw)
    assert not np.any(reset)
  np.testing.assert_allclose(lowrank.to_dense(p)[0], dense, rtol=2e-4, atol=2e-5)


def test_one_sketch_refreshes_as_the_mean_statistic_does():
  rng = np.random.default_rng(2)
  p0 = jnp.asarray(np.eye(5)[None], jnp.float32)
  v = jnp.asarray(rng.normal(size=(1, 5)), jnp.float32)
  kw = dict(gamma=0.9, zeta=0.8, epsilon=2.0, refresh='ema')
  np.testing.assert_array_equal(factors.refresh_checked(p0, v[:, None], **kw)[0],
                                factors.refresh_checked(p0, v, **kw)[0])


# ---------------------------------------------------------------- MKOR

class BatchNormNet(nn.Module):
  @nn.compact
  def __call__(self, x, train=True):
    h = nn.Dense(8, name='hidden')(x)
    h = nn.BatchNorm(use_running_average=not train, name='bn')(h)
    return nn.Dense(3, name='out')(jnp.tanh(h))


@pytest.mark.parametrize('low_rank_min_dim', [256, 0])  # dense / low-rank factors
def test_mkor_behind_batchnorm_moves_the_output_side_only_with_sketches(low_rank_min_dim):
  model = BatchNormNet()
  x, y = batch(0, n=16)
  variables = model.init(KEY, x)

  def loss(params, stats, x, y):
    out, new = model.apply({'params': params, 'batch_stats': stats}, x, mutable=['batch_stats'])
    return jnp.mean((out - y) ** 2), new['batch_stats']

  def run(kind):
    tx = mkor_optax.mkor(1e-2, inv_freq=1, low_rank=4, low_rank_min_dim=low_rank_min_dim)
    params, bstats = variables['params'], variables['batch_stats']
    state = tx.init(params)

    @jax.jit
    def step(params, bstats, state, x, y):
      (l, bstats), g, st = mkor_optax.value_and_grad(loss, has_aux=True, kind=kind)(
          params, bstats, x, y)
      u, state = tx.update(g, state, params, stats=st)
      return optax.apply_updates(params, u), bstats, state, l

    losses = []
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter('always')
      for t in range(4):
        params, bstats, state, l = step(params, bstats, state, *batch(t, n=16))
        losses.append(float(l))
      jax.effects_barrier()
    said = [str(w.message) for w in caught if issubclass(w.category, NumericalWarning)]
    side = state[0].output_side['hidden']
    dense = lowrank.to_dense(side) if isinstance(side, lowrank.LowRankInverse) else side
    dense = np.asarray(dense[0], np.float64)
    return losses, np.max(np.abs(dense - np.mean(np.diag(dense)) * np.eye(8))), said

  _, off_identity_mean, said = run(mkor_optax.RANK1)
  assert off_identity_mean < 1e-6  # the mean statistic is zero behind the BatchNorm
  assert said and all("['hidden'] is numerically zero" in m and 'kind=mkor_optax.SKETCH' in m
                      for m in said), said  # the layer is named, and the fix
  losses, off_identity_sketch, said = run(mkor_optax.Sketch(2))
  assert off_identity_sketch > 1e-3 and not said
  assert np.all(np.isfinite(losses))


def test_ordinary_layers_do_not_warn_of_cancelled_means():
  """|g| / g_mass is about 1/sqrt(rows) for rows that do not cancel."""
  params = init_params()
  tx = mkor_optax.mkor(1e-2, inv_freq=1)
  state = tx.init(params)
  with warnings.catch_warnings():
    warnings.simplefilter('error', NumericalWarning)
    for t in range(3):
      _, grads, stats = mkor_optax.value_and_grad(loss_fn, kind=mkor_optax.RANK1)(params, *batch(t, n=256))
      state = tx.update(grads, state, params, stats=stats)[1]
  ratio = np.linalg.norm(stats['out']['g']) / float(stats['out']['g_mass'])
  assert 1e-3 < ratio < 1.0, ratio


def test_kfac_and_multisteps_say_what_to_pass_for_sketches():
  params = init_params()
  x, y = batch(0)
  _, grads, sk = mkor_optax.value_and_grad(loss_fn, kind=mkor_optax.SKETCH)(params, x, y)
  _, _, mean = mkor_optax.value_and_grad(loss_fn, kind=mkor_optax.RANK1)(params, x, y)
  tx = mkor_optax.scale_by_kfac()  # (Eva reads the sketches' means: tests/test_one_capture.py)
  with pytest.raises(ValueError, match=r'hold sketches, which scale_by_kfac does not read.*kind=mkor_optax.COVARIANCE'):
    tx.update(grads, tx.init(params), params, stats=sk)
  acc = mkor_optax.MultiSteps(mkor_optax.mkor(1e-2), 2)  # value_and_grad's default: SKETCH
  acc.update(grads, acc.init(params), params, stats=sk)
  with pytest.raises(ValueError, match=r'kind=mkor_optax.RANK1'):
    acc.update(grads, acc.init(params), params, stats=mean)
  acc = mkor_optax.MultiSteps(mkor_optax.mkor(1e-2), 2, kind=mkor_optax.RANK1)
  with pytest.raises(ValueError, match=r'kind=mkor_optax.Sketch\(4\)'):
    acc.update(grads, acc.init(params), params, stats=sk)
  acc = mkor_optax.MultiSteps(mkor_optax.mkor(1e-2), 2, kind=mkor_optax.Sketch(2))
  for stats, got in ((sk, '4 sketches'), (mean, 'mean')):
    with pytest.raises(ValueError, match=got):
      acc.update(grads, acc.init(params), params, stats=stats)


def test_multisteps_hands_on_the_sum_of_the_micro_batch_sketches_over_sqrt_m():
  """Two micro-batches of sketches accumulated = one MKOR step given
  ``(s_1 + s_2) / sqrt(2)`` and the mean gradient (a hand computation of the
  rule: the sum over sqrt(M) is a sketch of the whole batch)."""
  params = init_params()
  kind = mkor_optax.Sketch(3)
  grad_fn = mkor_optax.value_and_grad(loss_fn, kind=kind)
  x, y = batch(0, n=16)
  (_, g1, s1), (_, g2, s2) = grad_fn(params, x[:8], y[:8]), grad_fn(params, x[8:], y[8:])
  acc = mkor_optax.MultiSteps(mkor_optax.mkor(1e-2, inv_freq=1), 2, kind=kind)
  state = acc.init(params)
  u1, state = acc.update(g1, state, params, stats=s1)
  assert all(np.all(v == 0) for v in jax.tree.leaves(u1))
  u2, state = acc.update(g2, state, params, stats=s2)
  ref = mkor_optax.mkor(1e-2, inv_freq=1)
  mean = lambda a, b: (a + b) / 2
  # each micro-batch's sketch j of each side enters with its own sign
  signs = lambda m, side: np.asarray(micro_batch_signs(m, side, 3))[:, None]
  # (the sketches only: MKOR does not accumulate the means that come with them)
  sketches = lambda f: sorted((n, v) for n, v in f.items() if n.endswith('_sketches'))
  summed = {k: {n: (v * signs(0, i) + s2[k][n] * signs(1, i)) / np.sqrt(2.0)
                for i, (n, v) in enumerate(sketches(f))} for k, f in s1.items()}
  u_ref, s_ref = ref.update(jax.tree.map(mean, g1, g2), ref.init(params), params, stats=summed)
  assert_tree_close(u2, u_ref, rtol=1e-5, atol=1e-7)
  assert_tree_close(state.inner.inner_opt_state[0], s_ref[0], rtol=1e-5, atol=1e-7)


def test_multisteps_does_not_count_a_repeated_micro_batch_twice():
  """The same micro-batch twice (parameters unchanged): its sketches enter
  with independent signs per micro-batch, so what is handed on (the sum over
  sqrt(2)) has one micro-batch's energy in expectation, where it had exactly
  twice that."""
  params = init_params()
  kind = mkor_optax.Sketch(64)
  _, g, s = mkor_optax.value_and_grad(loss_fn, kind=kind)(params, *batch(0))
  acc = mkor_optax.MultiSteps(mkor_optax.mkor(1e-2), 3, kind=kind)  # not emitted after two
  state = acc.init(params)
  for _ in range(2):
    state = acc.update(g, state, params, stats=s)[1]
  energy = lambda tree: sum(float(jnp.sum(jnp.square(v))) for v in jax.tree.leaves(tree))
  ratio = energy(state.acc_stats) / 2.0 / energy(s)
  assert 0.7 < ratio < 1.3, ratio


def test_mkor_h_takes_sketches_and_refreshes_from_them():
  params = init_params()
  tx = mkor_optax.mkor_h(1e-2, inv_freq=1)
  state = tx.init(params)
  grad = mkor_optax.value_and_grad(loss_fn, kind=mkor_optax.Sketch(3))

  @jax.jit
  def step(params, state, x, y):
    loss, grads, stats = grad(params, x, y)
    u, state = tx.update(grads, state, params, stats=stats, value=loss)
    return optax.apply_updates(params, u), state, loss

  losses = []
  for t in range(6):
    params, state, loss = step(params, state, *batch(t))
    losses.append(float(loss))
  inverses = [x for x in jax.tree.leaves(state) if np.ndim(x) == 3 and x.shape[-1] == x.shape[-2]]
  assert inverses and all(np.max(np.abs(p[0] - np.eye(p.shape[-1]))) > 1e-4 for p in inverses)
  assert np.all(np.isfinite(losses))
