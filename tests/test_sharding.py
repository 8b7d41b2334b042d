"""MKOR's factor state on a model-parallel mesh (mkor_optax.sharding): split
over the devices, not replicated, with the same updates as on one device."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import mkor_optax
from mkor_optax.lowrank import LowRankInverse
from mkor_optax.sharding import bytes_per_device


class Wide(nn.Module):
  """24 -> 320 -> 64, kernels partitioned over 'model' on their output axis."""

  @nn.compact
  def __call__(self, x):
    part = lambda: nn.with_partitioning(nn.initializers.lecun_normal(), (None, 'model'))
    h = nn.tanh(nn.Dense(320, kernel_init=part(), name='wide')(x))
    return nn.Dense(64, kernel_init=part(), name='head')(h)


X = jax.random.normal(jax.random.PRNGKey(0), (32, 24))
Y = jax.random.normal(jax.random.PRNGKey(1), (32, 64))
MODEL = Wide()
BOXED = MODEL.init(jax.random.PRNGKey(2), X)['params']


def loss_fn(params, x, y):
  return jnp.mean((MODEL.apply({'params': params}, x) - y) ** 2)


GRAD = mkor_optax.value_and_grad(loss_fn, kind=mkor_optax.RANK1)


def on_mesh(n_devices):
  """BOXED placed as its partitioning says on a ('model',) mesh of n devices."""
  mesh = jax.make_mesh((n_devices,), ('model',), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:n_devices])
  specs = nn.get_partition_spec(BOXED)
  return jax.tree.map(lambda box, spec: box.replace_boxed(
      jax.device_put(box.unbox(), NamedSharding(mesh, spec))) if isinstance(box, nn.Partitioned)
      else jax.device_put(box, NamedSharding(mesh, P())), BOXED, specs,
      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def train(params, tx, steps=3, grad=GRAD):
  @jax.jit
  def step(params, state):
    _, grads, stats = grad(params, X, Y)
    updates, state = tx.update(grads, state, params, stats=stats)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  initial = state
  for _ in range(steps):
    params, state = step(params, state)
  return params, initial, state


def factors(state):
  return state[0].input_side, state[0].output_side


def test_factors_split_over_devices_and_updates_equal_one_device():
  # 321- and 320-wide sides low-rank (default from width 256); SGD backend as in the K-FAC test
  tx = mkor_optax.mkor(1e-2, inv_freq=1, backend=optax.sgd(1.0))
  per_device, final = {}, {}
  for n in (1, 2, 4):
    params, initial, state = train(on_mesh(n), tx)
    sizes = bytes_per_device(factors(initial))
    assert len(sizes) == n
    per_device[n] = max(sizes.values())
    # still split after jitted steps: the low-rank Q over its rank axis
    q = state[0].output_side['wide'].q
    assert isinstance(state[0].output_side['wide'], LowRankInverse)
    if n > 1:
      assert not q.sharding.is_fully_replicated
      assert max(bytes_per_device(factors(state)).values()) <= per_device[n]
    final[n] = jax.tree.map(np.asarray, nn.unbox(params))
  assert per_device[4] < per_device[2] < per_device[1]
  assert per_device[4] < 0.4 * per_device[1]
  for n in (2, 4):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 final[n], final[1])


def test_replicated_params_and_opt_out_keep_factors_replicated():
  mesh = jax.make_mesh((4,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  replicated = jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, P())), nn.unbox(BOXED))
  for params, tx in ((replicated, mkor_optax.mkor(1e-2)),
                     (on_mesh(4), mkor_optax.mkor(1e-2, shard_factors=False))):
    state = tx.init(params)
    for leaf in jax.tree.leaves(factors(state)):
      assert getattr(leaf.sharding, 'is_fully_replicated', True)


def test_dense_factors_split_where_the_width_divides():
  tx = mkor_optax.mkor(1e-2, low_rank=None)
  state = tx.init(on_mesh(4))
  assert state[0].output_side['wide'].sharding.spec == P(None, ('model',), None)  # 320 = 4 x 80
  assert state[0].input_side['head'].sharding.is_fully_replicated  # 321: odd, not split


def test_kfac_covariances_and_inverses_split_too():
  # SGD after K-FAC: params move linearly with the preconditioned gradient, so
  # float32 summation-order noise is not amplified as LAMB/Adam amplify it on
  # entries whose gradient is near their epsilon (a CI run failed on 2 of 40,960
  # entries that way). 32 rows, 321-wide: damping 0.1 keeps it conditioned.
  tx = mkor_optax.kfac(1e-2, inv_freq=1, damping=0.1, backend=optax.sgd(1.0))
  grad = mkor_optax.value_and_grad(loss_fn, kind=mkor_optax.COVARIANCE)
  per_device, final = {}, {}
  for n in (1, 4):
    params, _, state = train(on_mesh(n), tx, grad=grad)
    kstate = state[0]
    arrays = (kstate.input_side, kstate.output_side)
    per_device[n] = max(bytes_per_device(arrays).values())
    final[n] = jax.tree.map(np.asarray, nn.unbox(params))
    if n == 4:  # the 320- and 64-wide factors are split, the odd 25 and 321 cannot be
      for leaf in jax.tree.leaves(arrays):
        assert leaf.sharding.is_fully_replicated == (leaf.shape[1] % 4 != 0), leaf.shape
  assert per_device[4] < per_device[1]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               final[4], final[1])


def test_explicit_mesh_axes_train_as_one_device():
  """jax.make_mesh's default axes are Explicit: the sharding is part of each
  array's type, and the capture must join and return its statistics with
  the placements the types ask for. Each method with its capture, on 4
  devices, ends where one device does."""
  mesh = jax.make_mesh((4,), ('model',), axis_types=(jax.sharding.AxisType.Explicit,))
  specs = nn.get_partition_spec(BOXED)
  raw = nn.unbox(BOXED)
  sgd = optax.sgd(1.0)  # as above: LAMB's trust ratio would amplify rounding
  cases = [(mkor_optax.mkor(1e-2, inv_freq=1, backend=sgd), mkor_optax.value_and_grad(loss_fn)),
           (mkor_optax.eva(1e-2, backend=sgd), mkor_optax.value_and_grad(loss_fn)),
           (mkor_optax.kfac(1e-2, inv_freq=1, backend=sgd),
            mkor_optax.value_and_grad(loss_fn, kind=mkor_optax.COVARIANCE))]
  for tx, grad in cases:
    single, _, _ = train(raw, tx, grad=grad)
    with jax.set_mesh(mesh):
      placed = jax.tree.map(lambda p, spec: jax.device_put(p, NamedSharding(mesh, spec)), raw,
                            nn.unbox(specs))
      split, _, _ = train(placed, tx, grad=grad)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                         rtol=1e-4, atol=1e-5), split, single)
