"""Seeded end-to-end: MKOR+LAMB reaches a loss LAMB does not reach in as many steps.

The deep autoencoder on digits (batch 256, 300 steps), each optimizer at the
best learning rate of the same grid, judged on the full training set.
Measured when written: LAMB 15.38, MKOR 15.20 (seed 0); seed 1: 15.40 vs 15.18.
"""

import jax

from common import Autoencoder, autoencoder_loss, batches, load_digits, run_method

LR_GRID = (3e-3, 1e-2, 2e-2)
STEPS = 300


def best_final_loss(method, seed=0):
  (x, y), _ = load_digits()
  model = Autoencoder()
  loss_fn = autoencoder_loss(model)
  params0 = model.init(jax.random.PRNGKey(seed), x[:2])['params']
  finals = {}
  for lr in LR_GRID:
    params, _, _ = run_method(method, params0, batches(x, y, 256, seed=seed), STEPS, loss_fn, lr)
    finals[lr] = float(jax.jit(loss_fn)(params, x))
  return min(finals.values()), finals


def test_mkor_reaches_a_loss_lamb_does_not():
  lamb, lamb_all = best_final_loss('lamb')   # both without weight decay
  mkor, mkor_all = best_final_loss('mkor')
  # MKOR's best is below LAMB's best by more than 0.5% (about 10x the seed-to-seed spread)
  assert mkor < 0.995 * lamb, (mkor_all, lamb_all)
