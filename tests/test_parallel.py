"""Data parallel on 4 fake CPU devices equals the single-device full batch.

Needs XLA_FLAGS=--xla_force_host_platform_device_count=4 before jax is
imported (tests/conftest.py sets it).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import mkor_optax

N_DEV = 4
STEPS = 4


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(4, (3, 3), strides=2, padding='SAME')(x))
    h = nn.tanh(nn.Dense(8)(h.reshape(h.shape[0], -1)))
    return nn.Dense(3, use_bias=False)(h)


MODEL = Net()


def loss_fn(params, x, y):
  return jnp.mean((MODEL.apply({'params': params}, x) - y) ** 2)


def data(t):
  k1, k2 = jax.random.split(jax.random.PRNGKey(t))
  return jax.random.normal(k1, (16, 6, 6, 2)), jax.random.normal(k2, (16, 3))


METHODS = {
    'mkor': (lambda ax: mkor_optax.mkor(3e-2, inv_freq=2, axis_name=ax), mkor_optax.RANK1),
    'kfac': (lambda ax: mkor_optax.kfac(3e-2, inv_freq=2, axis_name=ax), mkor_optax.COVARIANCE),
    'eva': (lambda ax: mkor_optax.eva(3e-2, axis_name=ax), mkor_optax.RANK1),
}


@pytest.fixture(scope='module', params=sorted(METHODS))
def method(request):
  return request.param


@pytest.fixture(scope='module')
def single_device_run(method):
  assert jax.device_count() >= N_DEV, 'conftest must set XLA_FLAGS before jax is imported'
  params = MODEL.init(jax.random.PRNGKey(0), data(0)[0])['params']
  make_opt, kind = METHODS[method]
  opt = make_opt(None)

  @jax.jit
  def step(params, state, x, y):
    _, grads, stats = mkor_optax.value_and_grad(loss_fn, kind=kind)(params, x, y)
    updates, state = opt.update(grads, state, params, stats=stats)
    return optax.apply_updates(params, updates), state

  p, s = params, opt.init(params)
  for t in range(STEPS):
    p, s = step(p, s, *data(t))
  return params, p, s, make_opt, kind


def assert_close(got, want, method='mkor'):
  # K-FAC's damped inverses (condition number ~ 1/sqrt(damping) = 30) amplify
  # float32 differences in the order of the cross-device sums: 1e-4 there.
  tol = 1e-4 if method == 'kfac' else 1e-5
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=tol, atol=tol), got, want)


def run_on_sharded_batches(step, params, opt, mesh):
  """STEPS steps with the batch split over the mesh's 'batch' axis."""
  sharded = NamedSharding(mesh, P('batch'))
  p, s = params, opt.init(params)
  for t in range(STEPS):
    x, y = data(t)
    p, s = step(p, s, jax.device_put(x, sharded), jax.device_put(y, sharded))
  return p, s


def test_pmap_equals_single_device_full_batch(single_device_run, method):
  params, want_p, want_s, make_opt, kind = single_device_run
  opt = make_opt('batch')

  def step(params, state, x, y):
    _, grads, stats = mkor_optax.value_and_grad(loss_fn, kind=kind)(params, x, y)
    grads = jax.lax.pmean(grads, 'batch')
    updates, state = opt.update(grads, state, params, stats=stats)
    return optax.apply_updates(params, updates), state

  step = jax.pmap(step, axis_name='batch')
  replicate = lambda tree: jax.tree.map(lambda x: jnp.stack([x] * N_DEV), tree)
  shard = lambda x: x.reshape((N_DEV, -1) + x.shape[1:])
  p, s = replicate(params), replicate(opt.init(params))
  for t in range(STEPS):
    x, y = data(t)
    p, s = step(p, s, shard(x), shard(y))
  assert_close(jax.tree.map(lambda x: x[0], (p, s)), (want_p, want_s), method)


def test_shard_map_equals_single_device_full_batch(single_device_run, method):
  params, want_p, want_s, make_opt, kind = single_device_run
  opt = make_opt('batch')
  mesh = jax.make_mesh((N_DEV,), ('batch',))

  def body(params, state, x, y):
    # the loss is the mean over all devices; gradients of the replicated
    # params (and of the capture's taps, which ride in params) are summed
    # over the axis by shard_map itself.
    global_loss = lambda p, x, y: jax.lax.pmean(loss_fn(p, x, y), 'batch')
    _, grads, stats = mkor_optax.value_and_grad(global_loss, kind=kind)(params, x, y)
    updates, state = opt.update(grads, state, params, stats=stats)
    return optax.apply_updates(params, updates), state

  step = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P('batch'), P('batch')),
                               out_specs=(P(), P())))
  assert_close(run_on_sharded_batches(step, params, opt, mesh), (want_p, want_s), method)


def test_jit_with_sharded_batch_needs_no_axis_name(single_device_run, method):
  params, want_p, want_s, make_opt, kind = single_device_run
  opt = make_opt(None)
  mesh = jax.make_mesh((N_DEV,), ('batch',), axis_types=(jax.sharding.AxisType.Auto,))

  @jax.jit
  def step(params, state, x, y):
    _, grads, stats = mkor_optax.value_and_grad(loss_fn, kind=kind)(params, x, y)
    updates, state = opt.update(grads, state, params, stats=stats)
    return optax.apply_updates(params, updates), state

  assert_close(run_on_sharded_batches(step, params, opt, mesh), (want_p, want_s), method)
