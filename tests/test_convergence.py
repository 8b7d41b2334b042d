"""Seeded end-to-end: MKOR+LAMB reaches a loss LAMB does not reach in as many steps.

The deep autoencoder on digits (batch 256, 300 steps), each optimizer at the
best learning rate of the same grid, judged on the full training set.
Measured: LAMB 15.38, MKOR 15.20 (seed 0); seed 1: 15.32 vs 15.13
(``best_final_loss(method, seed)`` below gives them).
"""

import jax
import jax.numpy as jnp
import optax

from helpers import compiled_optimised
from common import METHODS, Autoencoder, autoencoder_loss, batches, load_digits, make_step

LR_GRID = (3e-3, 1e-2, 2e-2)
STEPS = 300


def best_final_loss(method, seed=0):
  """The examples' optimizer and step (``common.METHODS``, ``make_step``) over
  ``STEPS`` batches, the learning rate a hyperparameter of the state, so the
  whole run is one compiled ``lax.scan`` for every rate of the grid."""
  (x, y), _ = load_digits()
  model = Autoencoder()
  loss_fn = autoencoder_loss(model)
  params0 = model.init(jax.random.PRNGKey(seed), x[:2])['params']
  it = batches(x, y, 256, seed=seed)
  data = [next(it) for _ in range(STEPS)]
  stacked = tuple(jnp.stack(parts) for parts in zip(*data))
  m = METHODS[method]
  with_lr = optax.inject_hyperparams(lambda learning_rate: m.make(learning_rate))
  step = make_step(loss_fn, with_lr(learning_rate=LR_GRID[0]), m.kind, m.needs_value)

  def final(state):
    def body(carry, batch):
      params, state, _ = step(*carry, *batch)
      return (params, state), None

    (params, _), _ = jax.lax.scan(body, (params0, state), stacked)
    return loss_fn(params, x)

  states = {lr: with_lr(learning_rate=lr).init(params0) for lr in LR_GRID}
  final = compiled_optimised(final, states[LR_GRID[0]])
  finals = {lr: float(final(state)) for lr, state in states.items()}
  return min(finals.values()), finals


def test_mkor_reaches_a_loss_lamb_does_not():
  lamb, lamb_all = best_final_loss('lamb')   # both without weight decay
  mkor, mkor_all = best_final_loss('mkor')
  # MKOR's best is below LAMB's best by more than 0.5% (about 10x the seed-to-seed spread)
  assert mkor < 0.995 * lamb, (mkor_all, lamb_all)
