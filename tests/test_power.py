"""The factor power (scale_by_mkor(factor_power=...)): each side's inverse
raised to 1, 1/2 or 1/4 before it preconditions, against float64 matrix powers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mkor_optax
from mkor_optax import factors, lowrank
from test_lowrank import refreshed
from test_mkor import assert_matches_reference, matrix_power


@pytest.mark.parametrize('e', [1.0, 0.5, 0.25])
def test_power_of_low_rank_and_dense_inverses_equals_float64(e):
  low = refreshed(12, 4, 2, seed=3, dtype=jnp.float32)  # c I + Q diag(s) Q^T, 2 stack entries
  dense = lowrank.to_dense(low)
  want = np.stack([matrix_power(np.asarray(p, np.float64), e) for p in dense])
  np.testing.assert_allclose(lowrank.to_dense(factors.power(low, e)), want, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(factors.power(dense, e), want, rtol=1e-4, atol=1e-5)
  traced = jax.jit(factors.power)(low, jnp.asarray(e))  # as under optax.inject_hyperparams
  np.testing.assert_allclose(lowrank.to_dense(traced), want, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(jax.jit(factors.power)(dense, jnp.asarray(e)), want, rtol=1e-4,
                             atol=1e-5)


def test_power_one_under_inject_hyperparams_keeps_the_inverse_exactly():
  low = refreshed(12, 4, 2, seed=3, dtype=jnp.float32)
  same = jax.jit(factors.power)(low, jnp.asarray(1.0))
  jax.tree.map(np.testing.assert_array_equal, same, low)
  dense = lowrank.to_dense(low)
  np.testing.assert_array_equal(jax.jit(factors.power)(dense, jnp.asarray(1.0)), dense)


@pytest.mark.parametrize('power', [0.5, 0.25])
@pytest.mark.parametrize('low_rank_min_dim', [256, 0])  # dense sides / low-rank sides (exact)
def test_mkor_update_with_a_factor_power_equals_float64(power, low_rank_min_dim):
  hp = dict(gamma=0.9, zeta=0.8, epsilon=1.5, inv_freq=2, damping=0.0625)
  tx = mkor_optax.scale_by_mkor(factor_power=power, low_rank=4,
                                low_rank_min_dim=low_rank_min_dim, **hp)
  assert_matches_reference(tx, hp, n_steps=5, jit=True, power=power, rtol=5e-4, atol=2e-6)


def test_factor_power_is_validated():
  for bad in (0.0, -0.5, 1.5):
    with pytest.raises(ValueError, match='factor_power'):
      mkor_optax.mkor(1e-2, factor_power=bad)
