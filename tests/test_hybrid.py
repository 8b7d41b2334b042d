"""MKOR-H's switching rule on scripted loss sequences, and what it does after."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mkor_optax
from helpers import batch, init_params, loss_fn

GRAD = mkor_optax.value_and_grad(loss_fn)


def predicted_switch(losses, window=50, threshold=0.1, patience=2, beta=0.9):
  """The README's rule in plain Python: the first first-order step, or None."""
  ema, start, peak, strikes = 0.0, losses[0], 0.0, 0
  for i, loss in enumerate(losses):
    t = i + 1
    ema = beta * ema + (1 - beta) * loss
    level = ema / (1 - beta ** t)
    if t % window == 0:
      rate = (start - level) / window
      peak = max(peak, rate)
      strikes = strikes + 1 if rate < threshold * peak else 0
      if strikes >= patience:
        return t
      start = level
  return None


def run_rule(losses, **kw):
  """Feeds the losses to scale_by_mkor_h (real grads and stats, jitted)."""
  params = init_params()
  tx = mkor_optax.scale_by_mkor_h(**kw)
  _, grads, stats = GRAD(params, *batch(0))
  upd = jax.jit(lambda s, v: tx.update(grads, s, params, stats=stats, value=v)[1])
  state = tx.init(params)
  for loss in losses:
    state = upd(state, jnp.float32(loss))
  return state


def test_scripted_loss_switches_at_the_predicted_step():
  t = np.arange(400)
  losses = np.where(t < 200, np.exp(-0.05 * t), np.exp(-0.05 * 200)).astype(np.float32)
  state = run_rule(losses)
  # Exponential decay until 200, then flat: the decrease per window shrinks
  # by e^-2.5 = 0.08 per window (the EMA lags the first one), so the windows
  # ending at 150 and 200 fall at less than 0.1 of the peak rate (strikes 1
  # and 2): step 200 is the first first-order step.
  assert predicted_switch(losses) == 200
  assert int(state.switch_step) == 200


@pytest.mark.parametrize('shift, scale', [(-10.0, 1.0), (0.0, 1e3), (-3.0, 1e-3)])
def test_rule_ignores_the_loss_offset_and_scale(shift, scale):
  """A log-likelihood can be negative: shifting or scaling the loss must not
  move the switch (the old relative rule switched where the loss crossed 0)."""
  t = np.arange(400)
  losses = np.where(t < 200, np.exp(-0.05 * t), np.exp(-0.05 * 200))
  moved = (losses * scale + shift).astype(np.float32)
  assert int(run_rule(moved).switch_step) == int(run_rule(losses.astype(np.float32)).switch_step) == 200
  # a loss falling steadily through zero (constant rate) never switches
  steady = np.linspace(5.0, -5.0, 400).astype(np.float32)
  assert int(run_rule(steady).switch_step) == -1


def test_vector_value_is_a_clear_error():
  params = init_params()
  tx = mkor_optax.scale_by_mkor_h()
  _, grads, stats = GRAD(params, *batch(0))
  with pytest.raises(ValueError, match='scalar loss'):
    tx.update(grads, tx.init(params), params, stats=stats, value=jnp.ones(3))


def test_noisy_but_falling_loss_does_not_switch():
  rng = np.random.default_rng(0)
  t = np.arange(1000)
  losses = (np.exp(-0.002 * t) * (1 + 0.1 * rng.normal(size=t.size))).astype(np.float32)
  assert predicted_switch(losses) is None
  assert int(run_rule(losses).switch_step) == -1


def test_switch_with_other_settings_matches_the_rule():
  rng = np.random.default_rng(1)
  t = np.arange(300)
  losses = (1.0 / (1 + 0.05 * t) * (1 + 0.02 * rng.normal(size=t.size))).astype(np.float32)
  kw = dict(window=20, threshold=0.3, patience=3, beta=0.8)
  want = predicted_switch(losses, **kw)
  assert want is not None
  assert int(run_rule(losses, **kw).switch_step) == want


def test_after_the_switch_gradients_pass_through_and_factors_freeze():
  params = init_params()
  opt = mkor_optax.scale_by_mkor_h(window=2, patience=1, threshold=0.5)

  @jax.jit
  def step(state, value, i):
    _, grads, stats = GRAD(params, *batch(i))
    updates, state = opt.update(grads, state, params, stats=stats, value=value)
    return updates, grads, state

  state = opt.init(params)
  values = [1.0, 0.5, 0.3, 0.29, 0.29, 0.29, 0.29, 0.29, 0.29, 0.29]  # fast, then flat
  history = []
  for i, v in enumerate(values):
    updates, grads, state = step(state, jnp.float32(v), i)
    history.append((updates, grads, state))
  switch = int(state.switch_step)
  assert switch == predicted_switch(values, window=2, threshold=0.5, patience=1)
  assert 0 < switch < len(values) - 1
  for i, (updates, grads, st) in enumerate(history):
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)))
    assert same == (i >= switch), f'step {i}'
  frozen = history[switch - 1][2].mkor
  jax.tree.map(np.testing.assert_array_equal, history[-1][2].mkor, frozen)


def test_missing_value_is_a_clear_error():
  params = init_params()
  _, grads, stats = GRAD(params, *batch(0))
  opt = mkor_optax.mkor_h(1e-3)
  with pytest.raises(ValueError, match='value='):
    opt.update(grads, opt.init(params), params, stats=stats)


@pytest.mark.parametrize('kwargs, name', [(dict(window=0), 'window'), (dict(threshold=1.5), 'threshold'),
                                          (dict(patience=0), 'patience'), (dict(beta=1.0), 'beta'),
                                          (dict(gamma=2.0), 'gamma')])
def test_invalid_hyperparameters(kwargs, name):
  with pytest.raises(ValueError, match=name):
    mkor_optax.mkor_h(1e-3, **kwargs)


def test_reset_backend_restarts_lamb_at_the_first_first_order_step():
  params = init_params()
  opt = mkor_optax.mkor_h(1e-2, window=1, patience=1, threshold=0.5, reset_backend=True)
  plain = mkor_optax.mkor_h(1e-2, window=1, patience=1, threshold=0.5, reset_backend=False)
  state, state_plain = opt.init(params), plain.init(params)
  assert jax.tree.structure(state) == jax.tree.structure(state_plain)
  # a loss that stops falling after step 2: the switch comes early
  losses = [1.0, 0.5, 0.5, 0.5, 0.5, 0.5]
  lamb_counts = []
  for t, loss in enumerate(losses):
    _, grads, stats = GRAD(params, *batch(t))
    _, state = opt.update(grads, state, params, stats=stats, value=jnp.float32(loss))
    _, state_plain = plain.update(grads, state_plain, params, stats=stats, value=jnp.float32(loss))
    lamb_counts.append((int(state[1][0].count), int(state_plain[1][0].count)))
  switch = int(state[0].switch_step)
  assert 0 < switch < len(losses) and switch == int(state_plain[0].switch_step)
  # LAMB's step counter restarts at the first first-order step (so its moments too)
  assert lamb_counts[switch][0] == 1 and lamb_counts[switch][1] == switch + 1
  assert lamb_counts[-1][0] == len(losses) - switch
