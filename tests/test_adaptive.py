"""The adaptive recipe (adaptive_mkor + adaptive_inputs): two steps against a
float64 hand computation (the natural-gradient direction from the dense MKOR
reference, step size and momentum from the 2x2 quadratic model with the
Gauss-Newton matrix formed explicitly), the sampled targets' gradient
covariance against the Gauss-Newton matrix, data parallel against one
device, and bad steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import mkor_optax
from helpers import Net, batch, init_params, loss_fn
from test_mkor import reference_run

HP = dict(gamma=0.9, zeta=0.8, epsilon=1.5, inv_freq=1, damping=0.0625)
STEP_DAMPING, DECAY, ADAPT_EVERY = 0.01, 0.95, 5


def recipe(**kw):
  return mkor_optax.adaptive_mkor(low_rank=None, step_damping=STEP_DAMPING, decay=DECAY,
                                  adapt_every=ADAPT_EVERY, **HP, **kw)


def inputs(params, t, fisher='squared_error', kind=mkor_optax.RANK1, x=None, y=None, lazy=True):
  if x is None:
    x, y = batch(t)
  return mkor_optax.adaptive_inputs(lambda p: Net().apply({'params': p}, x),
                                    lambda out: jnp.mean((out - y) ** 2), params,
                                    jax.random.PRNGKey(t), fisher=fisher, kind=kind, lazy=lazy)


def stepper(opt, fisher='squared_error', lazy=True):
  """The jitted training step a user writes: ``(loss, grads, stats, updates,
  state)`` for batch ``t`` (``stats``: those the step had, or would have had
  on a refresh)."""
  @jax.jit
  def step(params, state, x, y, t):
    loss, grads, extra = inputs(params, t, fisher, x=x, y=y, lazy=lazy)
    updates, state = opt.update(grads, state, params, **extra)
    stats = extra['stats'] if 'stats' in extra else extra['stats_fn']()
    return loss, grads, stats, updates, state
  return lambda params, state, t: step(params, state, *batch(t), t)


def gauss_newton_matrix(params, t, rows=None):
  """float64 ``J^T H J`` of the mean squared error: ``H = 2 / (N m) I``
  (on the batch's first ``rows`` rows, all by default)."""
  x = batch(t)[0][:rows]
  flat, unravel = ravel_pytree(params)
  out = lambda v: Net().apply({'params': unravel(v)}, x).reshape(-1)
  j = np.asarray(jax.jacfwd(out)(flat), np.float64)
  return 2.0 / j.shape[0] * j.T @ j


@pytest.mark.parametrize('fisher, rescale', [(None, False), ('squared_error', False),
                                             ('squared_error', True)])
def test_two_steps_equal_a_float64_hand_computation(fisher, rescale):
  params = init_params()
  opt = recipe(rescale=rescale)
  state = opt.init(params)
  flat = lambda tree: np.asarray(ravel_pytree(tree)[0], np.float64)
  lam, previous, history = STEP_DAMPING, None, []
  step = stepper(opt, fisher)
  for t in range(2):
    loss, grads, stats, updates, state = step(params, state, t)
    history.append((grads, stats))
    # by hand: D = -F_R^-1 G F_L^-1 (float64 MKOR reference; with rescale each
    # layer's D scaled to its gradient's norm), C formed in full
    direction = -flat(reference_run(history, rescale=rescale, **HP)[-1])
    g, c = flat(grads), gauss_newton_matrix(params, t)
    curv = lambda u, v: u @ c @ v + lam * (u @ v)
    if previous is None:
      alpha, mu = -(g @ direction) / curv(direction, direction), 0.0
    else:
      a = np.array([[curv(direction, direction), curv(direction, previous)],
                    [curv(previous, direction), curv(previous, previous)]])
      alpha, mu = np.linalg.solve(a, -np.array([g @ direction, g @ previous]))
    want = alpha * direction + (mu * previous if previous is not None else 0.0)
    np.testing.assert_allclose(flat(updates), want, rtol=2e-3, atol=1e-6 * np.abs(want).max())
    np.testing.assert_allclose(float(state[1].alpha), alpha, rtol=2e-3)
    np.testing.assert_allclose(float(state[1].mu), mu, rtol=2e-3, atol=1e-6)
    if t % ADAPT_EVERY == 0:  # Levenberg-Marquardt from the measured reduction ratio
      predicted = 0.5 * (alpha * (g @ direction) + (mu * (g @ previous) if previous is not None else 0.0))
      moved = optax.apply_updates(params, updates)
      rho = (float(loss_fn(moved, *batch(t))) - float(loss)) / predicted
      omega = DECAY ** ADAPT_EVERY
      lam = lam * omega if rho > 0.75 else (lam / omega if rho < 0.25 else lam)
      np.testing.assert_allclose(float(state[1].rho), rho, rtol=1e-3)
    np.testing.assert_allclose(float(state[1].damping), lam, rtol=1e-6)
    previous = flat(updates)
    params = optax.apply_updates(params, updates)
    assert float(loss_fn(params, *batch(t))) < float(loss)


def test_the_recipe_takes_the_losses_gradient_and_the_sampled_statistics():
  params = init_params()
  x, y = batch(0)
  loss, grads, extra = inputs(params, 0, lazy=False)
  want_loss, want_grads = jax.value_and_grad(loss_fn)(params, x, y)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, want_grads)
  # fisher=None: the statistics of the loss itself; with fisher: of the sampled loss
  _, _, own = mkor_optax.value_and_grad(loss_fn, kind=mkor_optax.RANK1)(params, x, y)
  jax.tree.map(np.testing.assert_array_equal, inputs(params, 0, fisher=None)[2]['stats'], own)
  sampled = lambda p: mkor_optax.sampled_loss('squared_error', Net().apply({'params': p}, x),
                                              jax.random.PRNGKey(0))
  _, _, fisher = mkor_optax.value_and_grad(sampled, kind=mkor_optax.RANK1)(params)
  jax.tree.map(np.testing.assert_array_equal, extra['stats'], fisher)
  jax.tree.map(np.testing.assert_array_equal, inputs(params, 0)[2]['stats_fn'](), fisher)  # lazy
  assert not np.allclose(extra['stats']['out']['g'], own['out']['g'])
  np.testing.assert_allclose(extra['value_fn'](params), loss, rtol=1e-6)


@pytest.mark.parametrize('loss', mkor_optax.adaptive.FISHER_LOSSES)
def test_sampled_targets_gradient_has_the_gauss_newton_covariance(loss):
  """Per example, the covariance of d(sampled loss)/d(outputs) over draws is
  the Hessian of the loss in the outputs: diag(p(1-p)), diag(p) - p p^T, I
  (Monte Carlo over 20000 draws, batch of 1)."""
  z = jnp.array([[1.5, -0.5, 0.0, 2.0]])
  draws = 20000
  grad = jax.vmap(lambda k: jax.grad(lambda o: mkor_optax.sampled_loss(loss, o, k))(z)[0])(
      jax.random.split(jax.random.PRNGKey(0), draws))
  got = np.cov(np.asarray(grad, np.float64).T)
  p = np.asarray(jax.nn.sigmoid(z[0]) if loss == 'sigmoid_cross_entropy' else jax.nn.softmax(z[0]),
                 np.float64)
  want = {'sigmoid_cross_entropy': np.diag(p * (1 - p)),
          'softmax_cross_entropy': np.diag(p) - np.outer(p, p),
          'squared_error': np.eye(4)}[loss]
  np.testing.assert_allclose(got, want, atol=0.03 * np.abs(want).max())
  np.testing.assert_allclose(np.mean(np.asarray(grad), 0), 0.0, atol=0.03)  # unbiased at the model


def test_lazy_statistics_give_the_same_steps_and_skip_the_pass_between_refreshes():
  """``stats_fn`` (the default with ``fisher``) runs only where a refresh is
  due: the same updates as the statistics computed every step (to rounding)."""
  params = init_params()
  opt = mkor_optax.adaptive_mkor(low_rank=None, inv_freq=3)
  out = {}
  for lazy in (True, False):
    p, state, step = params, opt.init(params), stepper(opt, lazy=lazy)
    out[lazy] = []
    for t in range(5):
      _, _, _, updates, state = step(p, state, t)
      out[lazy].append(updates)
      p = optax.apply_updates(p, updates)
  # the same arithmetic in another program: equal to float32 rounding
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), out[True], out[False])
  # the pass sits in a cond: a stats_fn that would fail off-refresh is never run there
  calls = []
  _, grads, extra = inputs(params, 0)
  state = opt.init(params)
  fn = extra['stats_fn']
  extra['stats_fn'] = lambda: (calls.append(1), fn())[1]
  opt.update(grads, state, params, **extra)
  assert calls  # traced into the cond's refresh branch
  with pytest.raises(ValueError, match='stats= or stats_fn='):
    opt.update(grads, state, params, **dict(extra, stats=fn()))


def test_curvature_on_a_part_of_the_batch_is_that_parts_gauss_newton_matrix():
  params = init_params()
  x, y = batch(0)
  part = (lambda p: Net().apply({'params': p}, x[:3]), lambda out: jnp.mean((out - y[:3]) ** 2))
  loss, grads, extra = mkor_optax.adaptive_inputs(
      lambda p: Net().apply({'params': p}, x), lambda out: jnp.mean((out - y) ** 2), params,
      jax.random.PRNGKey(0), fisher='squared_error', curvature_on=part)
  vs = [jax.tree.map(lambda g, i=i: g * (i + 1.0) + 0.1 * i, grads) for i in range(2)]
  flat = lambda tree: np.asarray(ravel_pytree(tree)[0], np.float64)
  v = np.stack([flat(u) for u in vs])
  np.testing.assert_allclose(extra['curvature'](params, vs), v @ gauss_newton_matrix(params, 0, 3) @ v.T,
                             rtol=1e-4)
  assert not np.allclose(v @ gauss_newton_matrix(params, 0) @ v.T, v @ gauss_newton_matrix(params, 0, 3) @ v.T,
                         rtol=1e-2)
  # the gradient, the loss and value_fn stay the whole batch's
  want_loss, want_grads = jax.value_and_grad(loss_fn)(params, x, y)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, want_grads)
  np.testing.assert_allclose(extra['value_fn'](params), want_loss, rtol=1e-6)
  opt = recipe()
  updates, _ = opt.update(grads, opt.init(params), params, **extra)
  assert float(loss_fn(optax.apply_updates(params, updates), x, y)) < float(loss)


def test_bad_inputs_raise():
  params = init_params()
  with pytest.raises(ValueError, match='fisher'):
    inputs(params, 0, fisher='hinge')
  with pytest.raises(ValueError, match='key'):
    mkor_optax.adaptive_inputs(lambda p: Net().apply({'params': p}, batch(0)[0]), jnp.mean, params,
                               fisher='squared_error')
  with pytest.raises(ValueError, match='loss must be one of'):
    mkor_optax.sampled_loss('hinge', jnp.zeros((2, 3)), jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match='step_damping'):
    mkor_optax.adaptive_mkor(step_damping=0.0)
  with pytest.raises(ValueError, match='curvature_on'):
    inputs_fn = lambda p: Net().apply({'params': p}, batch(0)[0])
    mkor_optax.adaptive_inputs(inputs_fn, jnp.mean, params, curvature_on=inputs_fn)


def test_a_non_finite_gradient_leaves_the_state_as_it_was():
  params = init_params()
  opt = recipe()
  state = opt.init(params)
  _, _, _, _, state = stepper(opt)(params, state, 0)

  @jax.jit
  def bad_step(params, state, x, y):
    _, grads, extra = inputs(params, 1, x=x, y=y)
    bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads)
    return opt.update(bad, state, params, **dict(extra, grad=bad))

  updates, new = bad_step(params, state, *batch(1))
  assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
  jax.tree.map(np.testing.assert_array_equal, new, state)


@pytest.mark.parametrize('layout, fisher, part', [
    ('pmap', None, False), ('pmap', 'squared_error', False), ('shard_map', None, False),
    ('shard_map', 'squared_error', False), ('shard_map', 'squared_error', True)])
def test_data_parallel_equals_one_device_on_the_whole_batch(layout, fisher, part):
  """4 devices, a quarter of the batch each, ``axis_name`` on both the
  transform and the inputs, under ``pmap`` or ``shard_map``: the same updates
  and states as one device on the whole batch, over 3 steps (the first
  refreshes), with the labels' Fisher and with targets sampled from the model
  (drawn for the whole batch, each device taking its rows). Mean statistics:
  a pmap capture sketches its rows with signs of its own. With ``part``, the
  curvature products on the first 2 of each device's 4 rows
  (``curvature_on``) equal one device's on the union of those rows."""
  from jax.sharding import PartitionSpec as P
  n = 4
  opt = lambda axis_name=None: mkor_optax.adaptive_mkor(low_rank=None, inv_freq=2, axis_name=axis_name)

  def step(p, s, x, y, t, axis_name=None):
    rows = (np.arange(2) if axis_name else np.array([0, 1, 4, 5, 8, 9, 12, 13]))
    curvature_on = ((lambda q: Net().apply({'params': q}, x[rows]),
                     lambda out: jnp.mean((out - y[rows]) ** 2)) if part else None)
    _, g, extra = mkor_optax.adaptive_inputs(lambda q: Net().apply({'params': q}, x),
                                             lambda out: jnp.mean((out - y) ** 2), p,
                                             jax.random.PRNGKey(t), fisher=fisher,
                                             kind=mkor_optax.RANK1, axis_name=axis_name,
                                             curvature_on=curvature_on)
    u, s = opt(axis_name).update(g, s, p, **extra)
    return optax.apply_updates(p, u), s

  rep = lambda tree: jax.tree.map(lambda v: jnp.stack([v] * n), tree)
  split = lambda v: v.reshape((n, -1) + v.shape[1:])
  if layout == 'pmap':
    parallel = jax.pmap(lambda p, s, x, y, t: step(p, s, x, y, t, 'batch'), axis_name='batch',
                        in_axes=(0, 0, 0, 0, None))
    wrap, unwrap = (lambda p, s: (rep(p), rep(s))), (lambda tree: jax.tree.map(lambda v: v[0], tree))
    shard = split
  else:
    mesh = jax.make_mesh((n,), ('batch',))
    parallel = jax.jit(jax.shard_map(lambda p, s, x, y, t: step(p, s, x, y, t, 'batch'), mesh=mesh,
                                     in_specs=(P(), P(), P('batch'), P('batch'), P()),
                                     out_specs=(P(), P())))
    sharded = jax.sharding.NamedSharding(mesh, P('batch'))
    wrap, unwrap, shard = (lambda p, s: (p, s)), (lambda tree: tree), (lambda v: jax.device_put(v, sharded))
  single = jax.jit(step)
  params = init_params()
  want = (params, opt().init(params))
  got = wrap(*want)
  for t in range(3):
    x, y = batch(t, n=16)
    want = single(*want, x, y, t)
    got = parallel(*got, shard(x), shard(y), t)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), unwrap(got),
                 want)
  assert int(unwrap(got)[1][0].count) == 3  # every step counted: none was taken for a bad one


def test_sampled_targets_split_over_devices_are_the_whole_batch_draw():
  """``sampled_loss(..., axis_name=)``: each device's targets are its rows of
  the one-device draw for the whole batch (checked through the gradient of
  the loss in the outputs, which is the residual ``y - t`` per row)."""
  n = 4
  out = jax.random.normal(jax.random.PRNGKey(5), (16, 3))
  key = jax.random.PRNGKey(7)
  for loss in mkor_optax.adaptive.FISHER_LOSSES:
    whole = jax.grad(lambda o: mkor_optax.sampled_loss(loss, o, key))(out)
    per_device = jax.pmap(jax.grad(lambda o: mkor_optax.sampled_loss(loss, o, key, axis_name='d')),
                          axis_name='d')(out.reshape(n, 4, 3))
    # each device's loss is its own mean (1/4 of the rows): its gradient is 4x the whole one's
    np.testing.assert_allclose(per_device.reshape(16, 3), 4 * whole, rtol=1e-5, atol=1e-6,
                               err_msg=loss)


def test_nnx_model_through_nnx_optimizer():
  """An NNX model and ``nnx.Optimizer``: ``adaptive_inputs`` takes the module
  (statistics captured from it, the rest from its ``nnx.Param`` state); the
  lazy statistics give the steps of the eager ones, and the loss falls."""
  from flax import nnx
  x, y = batch(0, n=32)
  losses = {}
  for lazy in (True, False):
    net = nnx.Sequential(nnx.Linear(4, 16, rngs=nnx.Rngs(0)), nnx.tanh, nnx.Linear(16, 3, rngs=nnx.Rngs(1)))
    optimizer = nnx.Optimizer(net, mkor_optax.adaptive_mkor(inv_freq=2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, key):
      loss, grads, extra = mkor_optax.adaptive_inputs(
          lambda m: m(x), lambda out: jnp.mean((out - y) ** 2), model, key, fisher='squared_error',
          lazy=lazy)
      optimizer.update(model, grads, **extra)
      return loss

    losses[lazy] = [float(step(net, optimizer, jax.random.PRNGKey(t))) for t in range(15)]
    # the sampled pass reached the factors: every side moved off its identity start
    mkor_state = optimizer.opt_state[0]
    for side in (mkor_state.input_side, mkor_state.output_side):
      assert sorted(side) == ['layers/0', 'layers/2']
      for p in side.values():
        assert not np.allclose(np.asarray(p), np.eye(p.shape[-1])), 'a factor stayed at I'
  np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4)
  assert losses[True][-1] < 0.5 * losses[True][0]


def test_a_step_the_model_predicts_no_decrease_is_a_zero_update_and_raises_the_damping():
  """A curvature under which the quadratic model predicts no decrease (here a
  negative one): no move, and the step's damping goes up by 1 / decay^adapt_every."""
  params = init_params()
  opt = recipe()
  state = opt.init(params)
  _, grads, extra = inputs(params, 0)
  extra = dict(extra, curvature=lambda p, vs: -1e15 * jnp.ones((len(vs), len(vs))), value_fn=None)
  updates, new = opt.update(grads, state, params, **extra)
  assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
  np.testing.assert_allclose(float(new[1].damping), STEP_DAMPING / DECAY ** ADAPT_EVERY, rtol=1e-6)


def test_multisteps_takes_the_mean_gradient_and_statistics_and_the_last_micro_batchs_curvature():
  """``mkor_optax.MultiSteps(adaptive_mkor(), 2)`` on two halves of a batch:
  one update, equal to ``adaptive_mkor``'s on the whole batch's mean
  gradient and statistics with the second half's curvature and loss (what
  the docstring says); ``stats_fn`` (lazy statistics) is refused there."""
  params = init_params()
  x, y = batch(0, n=16)
  halves = [(x[:8], y[:8]), (x[8:], y[8:])]
  apply = lambda xb: (lambda p: Net().apply({'params': p}, xb))
  mse = lambda yb: (lambda out: jnp.mean((out - yb) ** 2))
  inputs = lambda p, xb, yb, lazy=False: mkor_optax.adaptive_inputs(
      apply(xb), mse(yb), p, kind=mkor_optax.RANK1, lazy=lazy)
  multi = mkor_optax.MultiSteps(recipe(), 2, kind=mkor_optax.RANK1)
  state = multi.init(params)
  for xb, yb in halves:
    _, grads, extra = inputs(params, xb, yb)
    updates, state = multi.update(grads, state, params, **extra)
  assert bool(multi.has_updated(state))
  # the reference: the whole batch's gradient and statistics, the second half's curvature and loss
  _, whole_grads, whole = inputs(params, x, y)
  _, _, last = inputs(params, *halves[1])
  want, want_state = recipe().update(whole_grads, recipe().init(params), params,
                                     **dict(last, stats=whole['stats'], grad=whole_grads))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), updates, want)
  np.testing.assert_allclose(state.inner.inner_opt_state[1].alpha, want_state[1].alpha, rtol=1e-4)
  # the gradient of the last micro-batch alone would give another step
  other, _ = recipe().update(whole_grads, recipe().init(params), params,
                             **dict(last, stats=whole['stats']))
  assert not np.allclose(ravel_pytree(other)[0], ravel_pytree(want)[0], rtol=1e-3)
  _, grads, extra = mkor_optax.adaptive_inputs(apply(x[:8]), mse(y[:8]), params, jax.random.PRNGKey(0),
                                               fisher='squared_error', kind=mkor_optax.RANK1)
  assert 'stats_fn' in extra
  with pytest.raises(ValueError, match='lazy=False'):
    multi.update(grads, multi.init(params), params, **extra)


@pytest.mark.parametrize('loss', mkor_optax.adaptive.FISHER_LOSSES)
def test_weighted_sampled_loss_weights_each_positions_gradient(loss):
  """``weights`` (a masked LM's mask, a padding mask): each position's
  gradient in the outputs is its weight times the unweighted one (the same
  draw), so a position of weight 0 adds nothing; a weight of the wrong shape
  is refused."""
  out = jax.random.normal(jax.random.PRNGKey(2), (3, 5, 4))  # (batch, length, features)
  w = jnp.array([[1.0, 0.0, 2.0, 0.0, 1.0]] * 3)
  key = jax.random.PRNGKey(4)
  plain = jax.grad(lambda o: mkor_optax.sampled_loss(loss, o, key))(out)
  weighted = jax.grad(lambda o: mkor_optax.sampled_loss(loss, o, key, weights=w))(out)
  np.testing.assert_allclose(weighted, w[..., None] * plain, rtol=1e-6, atol=1e-7)
  assert np.all(np.asarray(weighted)[:, 1] == 0) and np.any(np.asarray(weighted)[:, 2] != 0)
  with pytest.raises(ValueError, match='shape of outputs without its last axis'):
    mkor_optax.sampled_loss(loss, out, key, weights=w[:, :, None])


def test_adaptive_inputs_pass_the_weights_to_the_sampled_pass():
  """Zero weights: the sampled loss is zero, so are the output-side statistics;
  weights of one: the statistics of no weights."""
  params = init_params()
  x, y = batch(0)
  run = lambda w: mkor_optax.adaptive_inputs(
      lambda p: Net().apply({'params': p}, x), lambda out: jnp.mean((out - y) ** 2), params,
      jax.random.PRNGKey(0), fisher='squared_error', weights=w, kind=mkor_optax.RANK1,
      lazy=False)[2]['stats']
  ones, zeros, none = run(jnp.ones(x.shape[0])), run(jnp.zeros(x.shape[0])), run(None)
  for layer in none:
    np.testing.assert_allclose(ones[layer]['g'], none[layer]['g'], rtol=1e-6)
    assert np.all(np.asarray(zeros[layer]['g']) == 0) and np.any(np.asarray(none[layer]['g']) != 0)
  with pytest.raises(ValueError, match='fisher'):
    mkor_optax.adaptive_inputs(lambda p: Net().apply({'params': p}, x), lambda out: jnp.mean(out),
                               params, weights=jnp.ones(x.shape[0]))


def test_has_aux_carries_a_batchnorm_models_new_statistics_through_the_step():
  """A linen model with BatchNorm in training mode (``mutable=['batch_stats']``):
  ``has_aux=True`` returns ``(loss, new batch statistics)``, the statistics
  those of the model's own call, and the step is the one of the same outputs
  without the aux; the loss falls over a few steps."""
  import flax.linen as nn

  class BNNet(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.BatchNorm(use_running_average=False)(nn.Dense(8)(x))
      return nn.Dense(3)(jnp.tanh(h))

  model = BNNet()
  x, y = batch(0, n=16)
  variables = model.init(jax.random.PRNGKey(0), x)
  params, bn = variables['params'], variables['batch_stats']
  mse = lambda out: jnp.mean((out - y) ** 2)
  opt = mkor_optax.adaptive_mkor(inv_freq=2)

  @jax.jit
  def step(params, bn, state, key):
    outputs = lambda p: model.apply({'params': p, 'batch_stats': bn}, x, mutable=['batch_stats'])
    (loss, new), grads, extra = mkor_optax.adaptive_inputs(outputs, mse, params, key,
                                                           fisher='squared_error', has_aux=True)
    # the same step from the outputs alone
    _, grads2, extra2 = mkor_optax.adaptive_inputs(lambda p: outputs(p)[0], mse, params, key,
                                                   fisher='squared_error')
    updates2, _ = opt.update(grads2, state, params, **extra2)
    updates, state = opt.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), new['batch_stats'], state, loss, updates, updates2

  state = opt.init(params)
  losses = []
  for t in range(6):
    want_bn = model.apply({'params': params, 'batch_stats': bn}, x, mutable=['batch_stats'])[1]
    params, bn, state, loss, updates, updates2 = step(params, bn, state, jax.random.PRNGKey(t))
    jax.tree.map(np.testing.assert_allclose, bn, want_bn['batch_stats'])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8), updates, updates2)
    losses.append(float(loss))
  assert losses[-1] < losses[0]


def test_the_sampled_pass_takes_8_sketches_by_default_and_the_gradient_pass_the_default_capture():
  """With ``fisher`` and no ``kind``, the statistics the transform is handed
  (``stats_fn``'s, or ``stats`` with ``lazy=False``) are 8 sketches per
  side (``Sketch(8)``, measured to take fewer steps than 4 at the same cost
  per step); without ``fisher`` they are the default capture's (SKETCH: a
  Dense layer's rows)."""
  params, (x, y) = init_params(), batch(0)
  apply = lambda p: Net().apply({'params': p}, x)
  mse = lambda out: jnp.mean((out - y) ** 2)
  _, _, extra = mkor_optax.adaptive_inputs(apply, mse, params, jax.random.PRNGKey(0),
                                           fisher='squared_error')
  stats = extra['stats_fn']()
  _, _, eager = mkor_optax.adaptive_inputs(apply, mse, params, jax.random.PRNGKey(0),
                                           fisher='squared_error', lazy=False)
  for s in (stats, eager['stats']):
    for layer in s.values():
      assert layer['a_sketches'].shape[0] == 8 and layer['g_sketches'].shape[0] == 8
  _, _, own = mkor_optax.adaptive_inputs(apply, mse, params)
  for layer in own['stats'].values():
    assert mkor_optax.sketch.ROWS in layer and 'a_sketches' not in layer
