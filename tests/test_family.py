"""What every Kronecker-factored method promises alike: exclude, jit once,
checkpoint round trip, and the missing-stats error."""

import jax
import numpy as np
import optax
import pytest

import mkor_optax
from helpers import batch, init_params, loss_fn, orbax_round_trip

FAMILY = {
    'mkor': (mkor_optax.scale_by_mkor, mkor_optax.RANK1, {}),
    'mkor_h': (mkor_optax.scale_by_mkor_h, mkor_optax.RANK1, {'value': 1.0}),
    'kfac': (mkor_optax.scale_by_kfac, mkor_optax.COVARIANCE, {}),
    'eva': (mkor_optax.scale_by_eva, mkor_optax.RANK1, {}),
}


@pytest.mark.parametrize('name', sorted(FAMILY))
def test_exclude_passes_the_layer_through(name):
  make, kind, extra = FAMILY[name]
  params = init_params()
  _, grads, stats = mkor_optax.value_and_grad(loss_fn, kind=kind)(params, *batch(0))
  tx = make(exclude=['^out$'])
  u, _ = tx.update(grads, tx.init(params), params, stats=stats, **extra)
  np.testing.assert_array_equal(u['out']['kernel'], grads['out']['kernel'])
  assert not np.allclose(u['hidden']['kernel'], grads['hidden']['kernel'])


@pytest.mark.parametrize('name', sorted(FAMILY))
def test_jit_once_and_checkpoint_round_trip(name, tmp_path):
  make, kind, extra = FAMILY[name]
  # inverses refreshed before and after the restore (Eva has no inverse schedule)
  opt = optax.chain(make(**({} if name == 'eva' else {'inv_freq': 2})), optax.lamb(1e-2))
  grad_fn = mkor_optax.value_and_grad(loss_fn, kind=kind)
  traces = []

  @jax.jit
  def step(params, state, x, y):
    traces.append(1)
    loss, grads, stats = grad_fn(params, x, y)
    kw = {'value': loss} if 'value' in extra else {}
    updates, state = opt.update(grads, state, params, stats=stats, **kw)
    return optax.apply_updates(params, updates), state

  params = init_params()
  state = opt.init(params)
  for t in range(3):
    params, state = step(params, state, *batch(t))
  restored = orbax_round_trip({'p': params, 's': state}, tmp_path / 'c')
  a = (params, state)
  b = (restored['p'], restored['s'])
  for t in range(3, 6):
    a = step(*a, *batch(t))
    b = step(*b, *batch(t))
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert len(traces) == 1


@pytest.mark.parametrize('name', sorted(FAMILY))
def test_missing_stats_is_a_clear_error(name):
  make, _, extra = FAMILY[name]
  params = init_params()
  _, grads = jax.value_and_grad(loss_fn)(params, *batch(0))
  tx = make()
  with pytest.raises(ValueError, match='stats='):
    tx.update(grads, tx.init(params), params, **extra)
