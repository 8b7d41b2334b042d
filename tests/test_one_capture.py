"""One capture for every method that reads sketches or means: the default
capture (``mkor_optax.SKETCH``) also returns the batch means of ``RANK1``,
computed alike, so Eva trains with the two-line change and gives the same
updates as with ``kind=mkor_optax.RANK1``; MKOR's default step does not
pay for the means it does not read."""

import re
import warnings
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import mkor_optax
from helpers import KEY, batch
from mkor_optax.numerics import NumericalWarning

# Some tests here check warnings from compiled steps, which need
# mkor_optax.jit_warnings(True) (off by default).
pytestmark = pytest.mark.usefixtures('jit_warnings_on')

DOCS = Path(__file__).resolve().parent.parent / 'docs'
MEANS = ('a', 'g', 'g_mass')


class ConvNet(nn.Module):
  """A Conv (g scaled by 1/positions), a Dense called twice (pooled calls),
  a Dense without bias."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(4, (3, 3), strides=2, padding='SAME', name='conv')(x))
    h = h.reshape(h.shape[0], -1)
    shared = nn.Dense(h.shape[-1], name='shared')
    h = nn.tanh(shared(nn.tanh(shared(h))))
    return nn.Dense(3, use_bias=False, name='head')(h)


CONV = ConvNet()


def conv_loss(params, x, y):
  return jnp.mean((CONV.apply({'params': params}, x) - y) ** 2)


def conv_data(t, n=16):
  k1, k2 = jax.random.split(jax.random.PRNGKey(t))
  return jax.random.normal(k1, (n, 6, 6, 2)), jax.random.normal(k2, (n, 3))


def conv_params():
  return CONV.init(KEY, conv_data(0)[0])['params']


def assert_close(got, want, tol=1e-6):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=tol, atol=tol), got, want)


def test_the_default_capture_returns_the_rank1_means_computed_alike():
  params, (x, y) = conv_params(), conv_data(0)
  _, _, sk = mkor_optax.value_and_grad(conv_loss, kind=mkor_optax.Sketch(4))(params, x, y)
  _, _, lazy = mkor_optax.value_and_grad(conv_loss)(params, x, y)  # the default: rows where it can
  _, _, mean = mkor_optax.value_and_grad(conv_loss, kind=mkor_optax.RANK1)(params, x, y)
  assert sorted(sk) == sorted(lazy) == sorted(mean) == ['conv', 'head', 'shared']
  rows = {'x_rows', 'dy_rows', 'dy_scale', 'sketches'}
  for name, fields in mean.items():
    assert set(sk[name]) == set(MEANS) | {'a_sketches', 'g_sketches'}
    assert set(lazy[name]) == set(MEANS) | (rows if name == 'head' else {'a_sketches', 'g_sketches'})
    assert set(fields) == set(MEANS)
    for k in MEANS:  # the same operations on the same values: equal
      np.testing.assert_array_equal(sk[name][k], fields[k], err_msg=f'{name}/{k}')
      np.testing.assert_array_equal(lazy[name][k], fields[k], err_msg=f'{name}/{k}')


def test_the_nnx_default_capture_returns_the_rank1_means_computed_alike():
  model = nnx.Sequential(nnx.Linear(4, 6, rngs=nnx.Rngs(0)), nnx.tanh,
                         nnx.Linear(6, 3, use_bias=False, rngs=nnx.Rngs(1)))
  x, y = batch(0)
  loss = lambda m, x, y: jnp.mean((m(x) - y) ** 2)
  sk = mkor_optax.nnx.value_and_grad(loss)(model, x, y)[2]
  mean = mkor_optax.nnx.value_and_grad(loss, kind=mkor_optax.RANK1)(model, x, y)[2]
  assert sorted(sk) == sorted(mean) and sk
  for name, fields in mean.items():
    for k in MEANS:
      np.testing.assert_array_equal(sk[name][k], fields[k], err_msg=f'{name}/{k}')


def _linen_run(make_opt, kind, steps=5, loss=conv_loss, params=None, data=conv_data):
  params = conv_params() if params is None else params
  opt = make_opt()
  kw = {} if kind is None else {'kind': kind}

  @jax.jit
  def step(params, state, x, y):
    value, grads, stats = mkor_optax.value_and_grad(loss, **kw)(params, x, y)
    updates, state = opt.update(grads, state, params, stats=stats)
    return optax.apply_updates(params, updates), state, value

  state, losses = opt.init(params), []
  for t in range(steps):
    params, state, value = step(params, state, *data(t))
    losses.append(float(value))
  return params, state, losses


@pytest.mark.parametrize('make', [lambda: mkor_optax.eva(3e-2),
                                  lambda: optax.chain(mkor_optax.scale_by_eva(damping=0.1),
                                                      optax.sgd(1e-2))],
                         ids=['eva', 'scale_by_eva'])
def test_eva_with_the_default_capture_equals_eva_with_rank1(make):
  want = _linen_run(make, mkor_optax.RANK1)
  got = _linen_run(make, None)
  assert_close(got, want)
  assert want[2][-1] < want[2][0]


def test_nnx_eva_with_the_default_capture_equals_eva_with_rank1():
  x, y = batch(0, n=16)

  def run(kind):
    model = nnx.Sequential(nnx.Linear(4, 6, rngs=nnx.Rngs(0)), nnx.tanh,
                           nnx.Linear(6, 3, use_bias=False, rngs=nnx.Rngs(1)))
    optimizer = nnx.Optimizer(model, mkor_optax.eva(3e-2), wrt=nnx.Param)
    kw = {} if kind is None else {'kind': kind}

    @nnx.jit
    def step(model, optimizer, x, y):
      loss, grads, stats = mkor_optax.value_and_grad(
          lambda m, x, y: jnp.mean((m(x) - y) ** 2), **kw)(model, x, y)
      optimizer.update(model, grads, stats=stats)
      return loss

    losses = [float(step(model, optimizer, x, y)) for _ in range(5)]
    return nnx.state(model, nnx.Param), nnx.state(optimizer), losses

  want, got = run(mkor_optax.RANK1), run(None)
  assert_close(got, want)
  assert want[2][-1] < want[2][0]


N_DEV = 4


@pytest.fixture(scope='module')
def eva_single_device():
  """Eva with RANK1 on the whole batch, on one device: the reference."""
  return _linen_run(lambda: mkor_optax.eva(3e-2), mkor_optax.RANK1, steps=3)[:2]


def test_eva_default_capture_under_shard_map_equals_one_device_rank1(eva_single_device):
  opt = mkor_optax.eva(3e-2, axis_name='batch')
  mesh = jax.make_mesh((N_DEV,), ('batch',))

  def body(params, state, x, y):
    global_loss = lambda p, x, y: jax.lax.pmean(conv_loss(p, x, y), 'batch')
    _, grads, stats = mkor_optax.value_and_grad(global_loss)(params, x, y)
    updates, state = opt.update(grads, state, params, stats=stats)
    return optax.apply_updates(params, updates), state

  step = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P('batch'), P('batch')),
                               out_specs=(P(), P())))
  sharded = NamedSharding(mesh, P('batch'))
  params = conv_params()
  state = opt.init(params)
  for t in range(3):
    x, y = conv_data(t)
    params, state = step(params, state, jax.device_put(x, sharded), jax.device_put(y, sharded))
  assert_close((params, state), eva_single_device, tol=1e-5)


def test_eva_default_capture_under_pmap_equals_one_device_rank1(eva_single_device):
  """The means do not depend on the sketches' signs, which pmap draws per
  device: Eva's run is the single-device one."""
  opt = mkor_optax.eva(3e-2, axis_name='batch')

  def body(params, state, x, y):
    _, grads, stats = mkor_optax.value_and_grad(conv_loss)(params, x, y)
    grads = jax.lax.pmean(grads, 'batch')
    updates, state = opt.update(grads, state, params, stats=stats)
    return optax.apply_updates(params, updates), state

  step = jax.pmap(body, axis_name='batch')
  replicate = lambda tree: jax.tree.map(lambda v: jnp.stack([v] * N_DEV), tree)
  shard = lambda v: v.reshape((N_DEV, -1) + v.shape[1:])
  params = conv_params()
  p, s = replicate(params), replicate(opt.init(params))
  for t in range(3):
    x, y = conv_data(t)
    p, s = step(p, s, shard(x), shard(y))
  assert_close(jax.tree.map(lambda v: v[0], (p, s)), eva_single_device, tol=1e-5)


def test_eva_default_capture_with_a_sharded_batch_under_jit_equals_one_device(eva_single_device):
  mesh = jax.make_mesh((N_DEV,), ('batch',), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = NamedSharding(mesh, P('batch'))
  data = lambda t: tuple(jax.device_put(v, sharded) for v in conv_data(t))
  got = _linen_run(lambda: mkor_optax.eva(3e-2), None, steps=3, data=data)[:2]
  assert_close(got, eva_single_device, tol=1e-5)


def test_multisteps_of_eva_accumulates_the_means_of_the_default_capture():
  def run(kind):
    acc = mkor_optax.MultiSteps(mkor_optax.eva(3e-2), every_k_schedule=2, kind=kind)
    grad_fn = mkor_optax.value_and_grad(conv_loss, **({} if kind is None else {'kind': kind}))
    params = conv_params()
    state = acc.init(params)

    @jax.jit
    def micro(params, state, x, y):
      _, grads, stats = grad_fn(params, x, y)
      updates, state = acc.update(grads, state, params, stats=stats)
      return optax.apply_updates(params, updates), state

    for t in range(2):
      x, y = conv_data(t)
      for half in (slice(0, 8), slice(8, 16)):
        params, state = micro(params, state, x[half], y[half])
    assert int(state.inner.gradient_step) == 2
    return params, state.inner.inner_opt_state

  assert_close(run(None), run(mkor_optax.RANK1))
  # and one micro-batch step on the whole batch is the plain step (equal halves)
  whole = _linen_run(lambda: mkor_optax.eva(3e-2), None, steps=2)
  assert_close(run(None), whole[:2], tol=2e-5)


def test_eva_trains_with_the_two_line_change_of_getting_started():
  """The getting-started page's setup and its MKOR loop, with
  ``mkor_optax.eva(1e-2)`` as the changed line 1; the gradient call is the
  page's, the default capture."""
  blocks = re.findall(r'```python\n(.*?)```', (DOCS / 'getting_started.md').read_text(), re.S)
  setup = blocks[0]
  loop = next(b for b in blocks if 'opt = mkor_optax.mkor(1e-2)' in b and 'changed line 2' in b)
  assert 'mkor_optax.value_and_grad(loss_fn)(params, x, y)' in loop  # the default capture
  plain = next(b for b in blocks if 'def loss_fn' in b)
  scope: dict = {}
  exec(compile(setup, 'getting_started setup', 'exec'), scope)
  exec(compile(plain, 'getting_started plain loop', 'exec'), scope)
  first = float(scope['loss_fn'](scope['params'], scope['x'], scope['y']))
  loop = loop.replace('mkor_optax.mkor(1e-2)', 'mkor_optax.eva(1e-2)').replace('print(', 'str(')
  exec(compile(loop, 'getting_started loop with eva', 'exec'), scope)
  last = float(scope['loss_fn'](scope['params'], scope['x'], scope['y']))
  assert np.isfinite(last) and last < 0.5 * first, (first, last)


def test_eva_warns_of_cancelled_means_with_either_capture_and_mkor_with_sketches_does_not():
  """Behind a training-mode BatchNorm the mean output gradient cancels: Eva
  reads it from either capture and says so; MKOR reads the sketches."""

  class BatchNormNet(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.Dense(8, name='hidden')(x)
      h = nn.BatchNorm(use_running_average=False, name='bn')(h)
      return nn.Dense(3, name='out')(nn.tanh(h))

  model = BatchNormNet()
  x, y = batch(0, n=16)
  variables = model.init(KEY, x)

  def loss(params, x, y):
    out, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                         mutable=['batch_stats'])
    return jnp.mean((out - y) ** 2)

  def said(make, kind):
    kw = {} if kind is None else {'kind': kind}
    tx = make()
    params = variables['params']
    _, grads, stats = mkor_optax.value_and_grad(loss, **kw)(params, x, y)
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter('always')
      tx.update(grads, tx.init(params), params, stats=stats)
      jax.effects_barrier()
    return [str(w.message) for w in caught if issubclass(w.category, NumericalWarning)]

  for kind in (None, mkor_optax.RANK1):
    msgs = said(lambda: mkor_optax.eva(1e-2), kind)
    assert msgs and all("['hidden'] is numerically zero" in m and 'Eva' in m for m in msgs), msgs
  assert not said(lambda: mkor_optax.mkor(1e-2), None)


def _opcodes(compiled) -> list:
  """The sorted opcodes of a compiled program's instructions."""
  ops = re.findall(r'^\s*(?:ROOT )?%\S+ = \S+(?: \S+)*? ([a-z][a-z0-9\-]*)\(', compiled.as_text(), re.M)
  return sorted(ops)


def test_mkor_default_step_compiles_to_the_program_without_means():
  """The means that MKOR does not read are dropped by XLA when the capture
  and the update share one jit: the compiled step has the instructions of
  a capture without them."""
  params, (x, y) = conv_params(), conv_data(0)
  opt = mkor_optax.mkor(1e-2)
  state = opt.init(params)

  def compiled(kind):
    def step(params, state, x, y):
      _, grads, stats = mkor_optax.value_and_grad(conv_loss, kind=kind)(params, x, y)
      updates, state = opt.update(grads, state, params, stats=stats)
      return optax.apply_updates(params, updates), state
    return jax.jit(step).lower(params, state, x, y).compile()

  for means, no_means in ((mkor_optax.SKETCH, mkor_optax.Sketch(4, means=False, lazy=True)),
                          (mkor_optax.Sketch(4), mkor_optax.Sketch(4, means=False))):
    with_means, without = compiled(means), compiled(no_means)
    assert _opcodes(with_means) == _opcodes(without) and len(_opcodes(without)) > 100


def test_sketch_without_means_gives_the_same_sketches_and_mkor_steps():
  params, (x, y) = conv_params(), conv_data(0)
  kind = mkor_optax.Sketch(4, means=False)
  assert repr(kind) == 'Sketch(k=4, means=False)'
  _, _, sk = mkor_optax.value_and_grad(conv_loss, kind=mkor_optax.Sketch(4))(params, x, y)
  _, grads, only = mkor_optax.value_and_grad(conv_loss, kind=kind)(params, x, y)
  for name, fields in only.items():
    assert set(fields) == {'a_sketches', 'g_sketches'}
    for k, v in fields.items():
      np.testing.assert_array_equal(v, sk[name][k], err_msg=f'{name}/{k}')
  make = lambda: mkor_optax.mkor(1e-2, inv_freq=1)
  jax.tree.map(np.testing.assert_array_equal, _linen_run(make, kind, steps=3),
               _linen_run(make, mkor_optax.Sketch(4), steps=3))
  tx = mkor_optax.scale_by_eva()  # nothing for Eva to read: the error names the default
  with pytest.raises(ValueError, match=r'hold sketches, which scale_by_eva does not read.*'
                     r'value_and_grad\(loss_fn\) \(its default kind'):
    tx.update(grads, tx.init(params), params, stats=only)
  with pytest.raises(ValueError, match='means must be True or False'):
    mkor_optax.Sketch(4, means='no')
