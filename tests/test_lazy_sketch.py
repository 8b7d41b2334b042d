"""Sketch(lazy=True): the layers' rows handed over, sketched by the transform
on its refresh steps (mkor_optax.sketch.sketch_rows)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mkor_optax
from mkor_optax import sketch, statistics
from helpers import assert_tree_close, batch, init_params, loss_fn
from test_sketch import K, N_DEV, assert_expectation, data_parallel_case

LAZY = mkor_optax.Sketch(4, lazy=True)


def plan_of(params):
  return mkor_optax.layout.plan_layers(params, layouts=None, excluded=lambda _: False,
                                       max_factor_dim=4096, who='test')


def test_the_rows_are_the_layer_inputs_and_output_gradients():
  params = init_params()
  x, y = batch(0, n=16)
  stats = mkor_optax.value_and_grad(loss_fn, kind=LAZY)(params, x, y)[2]

  # the reference: the same net written out, with perturbations on the two
  # layers' outputs whose gradients are dL/dy
  def manual(p, e_hidden, e_out):
    h = x @ p['hidden']['kernel'] + p['hidden']['bias'] + e_hidden
    n = nn.LayerNorm().apply({'params': p['norm']}, jnp.tanh(h))
    return jnp.mean((n @ p['out']['kernel'] + e_out - y) ** 2), n

  zeros = (jnp.zeros((16, 6)), jnp.zeros((16, 3)))
  (_, normed), (d_hidden, d_out) = jax.value_and_grad(manual, argnums=(1, 2), has_aux=True)(params, *zeros)
  np.testing.assert_allclose(stats['hidden']['x_rows'], x, rtol=1e-6)
  np.testing.assert_allclose(stats['out']['x_rows'], normed, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats['hidden']['dy_rows'], d_hidden, rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(stats['out']['dy_rows'], d_out, rtol=1e-5, atol=1e-8)
  for name in ('hidden', 'out'):  # per-example scale: N examples of a mean loss
    assert float(stats[name]['dy_scale']) == 16.0
    assert stats[name]['sketches'].shape == (4, 0)
    assert 'a_sketches' not in stats[name]


def signs_of(count, name, n, k=4):
  """The ``(k, n)`` signs sketch_rows uses, read back through it: rows that
  are the identity give ``S^T / sqrt(n)``."""
  eye = jnp.eye(n)[None]
  fields = {'x_rows': eye, 'dy_rows': eye, 'dy_scale': jnp.ones((1,)),
            'sketches': jnp.zeros((1, k, 0))}
  a, g = sketch.sketch_rows(fields, count, name, has_bias=False)
  return np.asarray(a[0], np.float64) * np.sqrt(n), np.asarray(g[0], np.float64) * np.sqrt(n)


def sketched_by_hand(stats, count):
  """Each layer's sketches from its rows, in float64: ``a = S^T [x, 1] /
  sqrt(N)`` (hidden has a bias), ``g = S'^T (N dy) / sqrt(N)``."""
  out = {}
  for name, fields in stats.items():
    x = np.asarray(fields['x_rows'], np.float64)
    n = x.shape[0]
    if name == 'hidden':
      x = np.hstack([x, np.ones((n, 1))])
    s_in, s_out = signs_of(count, name, n)
    assert set(np.unique(s_in)) == {-1.0, 1.0} and not np.array_equal(s_in, s_out)
    h = np.asarray(fields['dy_rows'], np.float64) * float(fields['dy_scale'])
    out[name] = {'a_sketches': s_in @ x / np.sqrt(n), 'g_sketches': s_out @ h / np.sqrt(n)}
  return out


@pytest.mark.parametrize('low_rank,damping', [(None, 1.0), (2, 1.0), (None, None)])
def test_mkor_from_rows_equals_mkor_from_the_same_sketches_formed_by_hand(low_rank, damping):
  """Three updates, each refreshing (inv_freq=1): the transform's sketches
  of the rows are those of the formula, with the signs of step ``count``
  (absolute factors, ``damping=None``, read their scale too)."""
  params = init_params()
  opt = mkor_optax.mkor(1e-2, inv_freq=1, low_rank=low_rank, low_rank_min_dim=0, damping=damping)
  s_lazy = s_eager = opt.init(params)
  grad_fn = jax.jit(mkor_optax.value_and_grad(loss_fn, kind=LAZY))
  for step in range(3):
    x, y = batch(step, n=16)
    _, grads, stats = grad_fn(params, x, y)
    u_lazy, s_lazy = opt.update(grads, s_lazy, params, stats=stats)
    by_hand = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), sketched_by_hand(stats, step))
    u_eager, s_eager = opt.update(grads, s_eager, params, stats=by_hand)
    assert_tree_close(u_lazy, u_eager, rtol=1e-5, atol=1e-7, msg=f'step {step}')
    if low_rank is None:  # (a low-rank basis is defined up to its columns' signs: the
      # next steps' updates compare the inverses it holds)
      assert_tree_close(s_lazy, s_eager, rtol=1e-5, atol=1e-7, msg=f'step {step}')
    params = optax.apply_updates(params, u_lazy)


def test_the_signs_change_with_the_step_and_the_layer():
  a0, _ = signs_of(0, 'hidden', 32)
  assert not np.array_equal(a0, signs_of(1, 'hidden', 32)[0])
  assert not np.array_equal(a0, signs_of(0, 'out', 32)[0])


def test_sketches_of_the_rows_sketch_the_covariance():
  params, x, y, cov = data_parallel_case()
  stats = mkor_optax.value_and_grad(loss_fn, kind=mkor_optax.Sketch(K, lazy=True))(params, x, y)[2]
  plan = plan_of(params)
  gathered = statistics.gather_stats(stats, plan, None, 'SKETCH')
  for name in cov:
    a, g = sketch.sketch_rows(gathered[name], 5, name, plan[name].dims.has_bias)
    assert_expectation(a[0], cov[name]['A'])
    assert_expectation(g[0], cov[name]['G'])


def test_pmap_rows_pool_to_the_sketches_of_the_whole_batch_on_one_device():
  """Each device sketches its rows with the signs of their global indices,
  so 4 devices and 1 agree (up to the order of summation)."""
  params, x, y, _ = data_parallel_case()
  plan = plan_of(params)
  grad = mkor_optax.value_and_grad(loss_fn, kind=LAZY)

  @functools.partial(jax.pmap, axis_name='i', in_axes=(None, 0, 0))
  def pooled(p, xb, yb):
    return statistics.gather_stats(grad(p, xb, yb)[2], plan, 'i', 'SKETCH', count=3)

  shard = lambda a: a.reshape((N_DEV, -1) + a.shape[1:])
  got = jax.tree.map(lambda a: a[0], pooled(params, shard(x), shard(y)))
  whole = statistics.gather_stats(grad(params, x, y)[2], plan, None, 'SKETCH')
  for name in plan:
    a, g = sketch.sketch_rows(whole[name], 3, name, plan[name].dims.has_bias)
    np.testing.assert_allclose(got[name]['a_sketches'], a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[name]['g_sketches'], g, rtol=1e-5, atol=1e-6)


class Mixed(nn.Module):
  """A convolution, a Dense layer called twice and one called once."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(4, (3,), name='conv')(x)).reshape(x.shape[0], -1)
    shared = nn.Dense(h.shape[-1], name='shared')
    return nn.Dense(2, name='head')(jnp.tanh(shared(jnp.tanh(shared(h)))))


def test_convolutions_and_shared_layers_are_sketched_in_the_capture():
  model = Mixed()
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 5, 3))
  y = jax.random.normal(jax.random.PRNGKey(1), (8, 2))
  params = model.init(jax.random.PRNGKey(2), x)['params']
  f = lambda p, x, y: jnp.mean((model.apply({'params': p}, x) - y) ** 2)
  stats = mkor_optax.value_and_grad(f, kind=LAZY)(params, x, y)[2]
  assert 'x_rows' in stats['head'] and 'a_sketches' not in stats['head']
  for name in ('conv', 'shared'):  # rows of several calls (or patches) are not handed over
    assert stats[name]['a_sketches'].shape[0] == 4 and 'x_rows' not in stats[name]
  for opt in (mkor_optax.mkor(1e-2), mkor_optax.mkor_h(1e-2)):  # mixed statistics: one update
    update = jax.jit(functools.partial(opt.update, stats=stats, value=f(params, x, y)))
    updates, _ = update(params, opt.init(params), params)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


def test_multisteps_sketches_each_micro_batch_of_rows():
  """Under MultiSteps rows are sketched per micro-batch: two micro-batches
  of 8 rows give the update of the same accumulation fed their sketches."""
  params = init_params()
  grad_fn = mkor_optax.value_and_grad(loss_fn, kind=LAZY)
  results = []
  for convert in (False, True):
    opt = mkor_optax.MultiSteps(mkor_optax.mkor(1e-2), 2, kind=LAZY)
    state = opt.init(params)
    for i in range(2):
      _, grads, stats = grad_fn(params, *batch(i))
      if convert:  # what MultiSteps does with them, by hand
        stats = opt._rows_sketched(stats, state.acc_stats, state.inner)
        assert all('x_rows' not in f and f['a_sketches'].shape[-2] == 4 for f in stats.values())
      updates, state = opt.update(grads, state, params, stats=stats)
    results.append(updates)
  assert_tree_close(results[0], results[1], rtol=1e-6, atol=1e-8)
  assert not np.allclose(results[0]['hidden']['kernel'], 0.0)
  # each micro-batch's sketches sketch its covariance (K of them)
  opt = mkor_optax.MultiSteps(mkor_optax.mkor(1e-2), 2, kind=mkor_optax.Sketch(K, lazy=True))
  state = opt.init(params)
  x, y = batch(3, n=16)
  rows = mkor_optax.value_and_grad(loss_fn, kind=mkor_optax.Sketch(K, lazy=True))(params, x, y)[2]
  cov = mkor_optax.value_and_grad(loss_fn, kind=mkor_optax.COVARIANCE)(params, x, y)[2]
  sketched = opt._rows_sketched(rows, state.acc_stats, state.inner)
  for name in cov:
    assert_expectation(sketched[name]['a_sketches'][0], cov[name]['A'])
    assert_expectation(sketched[name]['g_sketches'][0], cov[name]['G'])


def test_lazy_takes_no_seed_and_says_so():
  with pytest.raises(ValueError, match='seed'):
    mkor_optax.Sketch(4, seed=1, lazy=True)
  with pytest.raises(ValueError, match='lazy'):
    mkor_optax.Sketch(4, lazy='yes')
  assert repr(LAZY) == 'Sketch(k=4, lazy=True)'


def test_a_batch_sharded_under_jit_hands_over_its_global_rows():
  params, x, y, _ = data_parallel_case()
  mesh = jax.make_mesh((N_DEV,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  put = lambda a: jax.device_put(a, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data')))
  grad = jax.jit(mkor_optax.value_and_grad(loss_fn, kind=LAZY))
  sharded, whole = grad(params, put(x), put(y))[2], grad(params, x, y)[2]
  for name in whole:
    for field in ('x_rows', 'dy_rows', 'dy_scale'):
      np.testing.assert_allclose(sharded[name][field], whole[name][field], rtol=1e-5, atol=1e-7)


def test_nnx_layers_are_sketched_in_the_capture():
  """The NNX capture hands over no rows: its layers are sketched as with lazy=False."""
  from flax import nnx
  model = nnx.Sequential(nnx.Linear(4, 6, rngs=nnx.Rngs(0)), jnp.tanh, nnx.Linear(6, 3, rngs=nnx.Rngs(1)))
  x, y = batch(0, n=16)
  loss = lambda m: jnp.mean((m(x) - y) ** 2)
  stats = mkor_optax.nnx.value_and_grad(loss, kind=LAZY)(model)[2]
  assert stats and all(f['a_sketches'].shape[-2] == 4 and 'x_rows' not in f for f in stats.values())


def test_mkor_over_a_pmap_axis_takes_the_steps_of_one_device():
  """Three refreshing steps with the rows sketched per device (global row
  indices) equal one device's on the whole batch."""
  params = init_params()
  x, y = batch(0, n=16)
  grad = mkor_optax.value_and_grad(loss_fn, kind=LAZY)
  out = {}
  for axis in (None, 'i'):
    opt = mkor_optax.mkor(1e-2, inv_freq=1, axis_name=axis)

    def step(p, s, xb, yb, opt=opt, axis=axis):
      _, g, stats = grad(p, xb, yb)
      g = g if axis is None else jax.lax.pmean(g, axis)
      u, s = opt.update(g, s, p, stats=stats)
      return optax.apply_updates(p, u), s

    run = (jax.jit(step) if axis is None else
           jax.pmap(step, axis_name=axis, in_axes=(None, None, 0, 0), out_axes=None))
    shard = (lambda a: a) if axis is None else (lambda a: a.reshape((N_DEV, -1) + a.shape[1:]))
    p, s = params, opt.init(params)
    for _ in range(3):
      p, s = run(p, s, shard(x), shard(y))
    out[axis] = p
  assert_tree_close(out['i'], out[None], rtol=1e-5, atol=1e-7)


def _shard_map_run(make_opt, axis_name, steps=3, kind=LAZY, value=False):
  """``steps`` steps of ``make_opt(axis_name)`` under ``shard_map`` over 4
  devices (``axis_name=None``: the transform is not told the axis) and of
  ``make_opt(None)`` on one device, on the same 16-row batches."""
  params = init_params()
  mesh = jax.make_mesh((N_DEV,), ('batch',), axis_types=(jax.sharding.AxisType.Explicit,))
  spec = jax.sharding.PartitionSpec

  def step(p, s, x, y, opt, pmean):
    loss = (lambda p, x, y: jax.lax.pmean(loss_fn(p, x, y), 'batch')) if pmean else loss_fn
    v, g, stats = mkor_optax.value_and_grad(loss, kind=kind)(p, x, y)
    u, s = opt.update(g, s, p, stats=stats, **({'value': v} if value else {}))
    return optax.apply_updates(p, u), s

  out = []
  for split in (False, True):
    opt = make_opt(axis_name if split else None)
    run = jax.jit(functools.partial(step, opt=opt, pmean=split))
    if split:
      run = jax.jit(jax.shard_map(functools.partial(step, opt=opt, pmean=True), mesh=mesh,
                                  in_specs=(spec(), spec(), spec('batch'), spec('batch')),
                                  out_specs=(spec(), spec())))
    put = ((lambda a: jax.device_put(a, jax.sharding.NamedSharding(mesh, spec('batch')))) if split
           else (lambda a: a))
    p, s = params, opt.init(params)
    for t in range(steps):
      p, s = run(p, s, *map(put, batch(t, n=16)))
    out.append(p)
  assert not np.allclose(out[0]['hidden']['kernel'], params['hidden']['kernel'])
  return out


@pytest.mark.parametrize('axis_name', [None, 'batch'])
def test_shard_map_hands_over_each_devices_rows_and_takes_one_devices_steps(axis_name):
  """Under ``shard_map`` the rows' dummies vary over the axis, so each
  device keeps its own rows (a replicated dummy's would be summed over the
  devices); the transform numbers them from the device's offset and sums
  the devices' sketches, told the axis or not: the sketches, and MKOR's 3
  refreshing steps, on 4 devices equal one device's on the whole batch."""
  params = init_params()
  mesh = jax.make_mesh((N_DEV,), ('batch',), axis_types=(jax.sharding.AxisType.Explicit,))
  spec = jax.sharding.PartitionSpec
  grad = mkor_optax.value_and_grad(lambda p, x, y: jax.lax.pmean(loss_fn(p, x, y), 'batch'), kind=LAZY)
  x, y = batch(0, n=16)
  rows = jax.jit(jax.shard_map(lambda p, x, y: grad(p, x, y)[2]['hidden']['x_rows'], mesh=mesh,
                               in_specs=(spec(), spec('batch'), spec('batch')),
                               out_specs=spec('batch')))(params, *[
      jax.device_put(a, jax.sharding.NamedSharding(mesh, spec('batch'))) for a in (x, y)])
  np.testing.assert_array_equal(rows, x)  # each device's own rows, not their sum
  plan = plan_of(params)

  def sketched(p, x, y):  # the transform's sketches of the (pooled) rows, at step 3
    whole = statistics.gather_stats(grad(p, x, y)[2], plan, axis_name, 'SKETCH', count=3)
    if axis_name is None:
      whole = {k: dict(zip(('a_sketches', 'g_sketches'), sketch.sketch_rows(
          f, 3, k, plan[k].dims.has_bias))) for k, f in whole.items()}
    return whole

  four = jax.jit(jax.shard_map(sketched, mesh=mesh, in_specs=(spec(), spec('batch'), spec('batch')),
                               out_specs=spec()))(params, *[
      jax.device_put(a, jax.sharding.NamedSharding(mesh, spec('batch'))) for a in (x, y)])
  one = mkor_optax.value_and_grad(loss_fn, kind=LAZY)(params, x, y)[2]
  one = statistics.gather_stats(one, plan, None, 'SKETCH')
  for name in plan:
    a, g = sketch.sketch_rows(one[name], 3, name, plan[name].dims.has_bias)
    np.testing.assert_allclose(four[name]['a_sketches'], a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(four[name]['g_sketches'], g, rtol=1e-5, atol=1e-6)
  one, four = _shard_map_run(lambda axis: mkor_optax.mkor(1e-2, inv_freq=1, axis_name=axis), axis_name)
  assert_tree_close(four, one, rtol=1e-5, atol=1e-7)


def test_shard_map_rows_serve_mkor_h_and_multisteps_as_on_one_device():
  one, four = _shard_map_run(lambda axis: mkor_optax.mkor_h(1e-2, inv_freq=1, axis_name=axis), None,
                             value=True)
  assert_tree_close(four, one, rtol=1e-5, atol=1e-7)
  one, four = _shard_map_run(lambda axis: mkor_optax.MultiSteps(
      mkor_optax.mkor(1e-2, inv_freq=1, axis_name=axis), 2, kind=LAZY), None, steps=4)
  assert_tree_close(four, one, rtol=1e-5, atol=1e-7)
