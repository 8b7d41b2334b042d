"""Long runs and extreme inputs: what the numerical guards have to hold.

    python benchmarks/soak.py [--steps 10000] [--only bf16,long,kfac_scale,scale1e20]

On a digits MLP (64 -> 64 -> 10, tanh, softmax cross-entropy, batches of 64
in a fixed order), each case trains side by side (MKOR and MKOR-H on the default
sketched statistics unless a row says otherwise) in one process and reports
the loss (mean of the last 100 steps), the parameter norm and, for MKOR, the
smallest eigenvalue of every factor inverse (positive definite or not):

* ``bf16``: MKOR with float32, bfloat16-dense (refused: the error is shown)
  and bfloat16 low-rank factors (refresh every step), inputs x1 and x1000,
  under a cosine decay of the learning rate (so that the ``long`` case's
  constant-lr drift does not hide what the factor dtype does);
* ``long``: ``mkor(1e-2)`` against LAMB alone at a constant learning rate,
  with and without weight decay, with a lower stabiliser threshold, beside
  our K-FAC under the same LAMB, with an AdamW backend against AdamW alone,
  and with a cosine decay to 0; 3 initialisation seeds, median and range;
* ``kfac_scale``: K-FAC (absolute and relative damping) against LAMB alone
  with inputs x1000;
* ``scale1e20``: MKOR, MKOR-H and Eva fed statistics x1e20.

Writes results/soak.md (docs/guides/safety.md quotes it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mkor_optax  # noqa: E402
from mkor_optax import lowrank  # noqa: E402

X_ALL, Y_ALL = load_digits(return_X_y=True)
X_ALL = jnp.asarray(X_ALL / 16.0, jnp.float32)
Y_ALL = jnp.asarray(Y_ALL)
BATCH = 64


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(10)(nn.tanh(nn.Dense(64)(nn.tanh(nn.Dense(64)(x)))))


MODEL = MLP()


def loss_fn(params, x, y):
  logits = MODEL.apply({'params': params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def min_eigenvalue(state) -> float:
  """Smallest eigenvalue over every MKOR factor inverse in ``state``."""
  out = np.inf
  is_mkor = lambda x: isinstance(x, mkor_optax.MKORState)
  for node in jax.tree.leaves(state, is_leaf=is_mkor):
    if not is_mkor(node):
      continue
    for side in (node.input_side, node.output_side):
      for f in side.values():
        dense = lowrank.to_dense(f) if isinstance(f, lowrank.LowRankInverse) else f
        dense = np.asarray(jnp.asarray(dense, jnp.float32), np.float64)
        out = min(out, float(np.linalg.eigvalsh(0.5 * (dense + np.swapaxes(dense, -1, -2))).min()))
  return out


def train(tx, steps, *, kind=mkor_optax.SKETCH, scale=1.0, stat_scale=1.0, value=False, seed=0):
  """Losses, final params and state of ``steps`` steps of ``tx``."""
  params = MODEL.init(jax.random.PRNGKey(seed), X_ALL[:2])['params']
  state = tx.init(params)
  grad = (mkor_optax.value_and_grad(loss_fn, kind=kind) if kind is not None
          else lambda p, x, y: (*jax.value_and_grad(loss_fn)(p, x, y), None))

  @jax.jit
  def step(params, state, i):
    idx = (i * BATCH + jnp.arange(BATCH)) % X_ALL.shape[0]
    loss, g, stats = grad(params, X_ALL[idx] * scale, Y_ALL[idx])
    extra = {}
    if stats is not None:
      extra['stats'] = jax.tree.map(lambda s: s * stat_scale, stats)
    if value:
      extra['value'] = loss
    u, state = tx.update(g, state, params, **extra)
    return optax.apply_updates(params, u), state, loss

  losses = np.zeros(steps)
  for i in range(steps):
    params, state, loss = step(params, state, i)
    losses[i] = float(loss)
  return losses, params, state


def describe(losses, params, state=None) -> dict:
  norm = float(jnp.sqrt(sum(jnp.sum(jnp.square(p)) for p in jax.tree.leaves(params))))
  finite = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((params, state)))
  out = {'final loss': float(np.mean(losses[-100:])), 'best loss (100-step mean)':
         float(np.min(np.convolve(losses, np.ones(100) / 100, mode='valid'))),
         'param norm': norm, 'all finite': finite}
  if state is not None:
    out['min eig of factor inverses'] = min_eigenvalue(state)
  return out


def case_bf16(steps):
  rows = {}
  for scale in (1.0, 1000.0):
    for name, kw in [('float32 dense', dict(low_rank=None)),
                     ('bfloat16 dense', dict(low_rank=None, factor_dtype='bfloat16')),
                     ('float32 low-rank 8', dict(low_rank=8, low_rank_min_dim=0)),
                     ('bfloat16 low-rank 8', dict(low_rank=8, low_rank_min_dim=0,
                                                  factor_dtype='bfloat16'))]:
      label = f'{name}, inputs x{scale:g}'
      try:
        tx = mkor_optax.mkor(optax.cosine_decay_schedule(1e-2, steps), inv_freq=1, **kw)
        rows[label] = describe(*train(tx, steps, scale=scale))
      except ValueError as e:
        rows[label] = {'refused': str(e)[:160] + '...'}
  return rows


SEEDS = (0, 1, 2)


def over_seeds(run) -> dict:
  """``describe`` of ``run(seed)`` for each of :data:`SEEDS`: medians, and
  the final loss of every seed."""
  rows = [describe(*run(seed)[:2]) for seed in SEEDS]
  out = {k: float(np.median([r[k] for r in rows])) for k in ('final loss', 'best loss (100-step mean)',
                                                              'param norm')}
  out['all finite'] = all(r['all finite'] for r in rows)
  out['final loss per seed'] = ', '.join(f"{r['final loss']:.3g}" for r in rows)
  return out


def case_long(steps):
  rows = {}
  cosine = optax.cosine_decay_schedule(1e-2, steps)
  lamb = lambda lr, wd=0.01: optax.lamb(lr, weight_decay=wd)
  for wd in (0.01, 0.0):
    rows[f'LAMB, lr 1e-2 constant, wd {wd}'] = over_seeds(
        lambda s: train(lamb(1e-2, wd), steps, kind=None, seed=s))
    rows[f'MKOR, lr 1e-2 constant, wd {wd}'] = over_seeds(
        lambda s: train(mkor_optax.mkor(1e-2, weight_decay=wd), steps, seed=s))
  for eps in (1.5, 1.2):
    rows[f'MKOR, lr 1e-2 constant, wd 0.01, epsilon {eps}'] = over_seeds(
        lambda s: train(mkor_optax.mkor(1e-2, epsilon=eps), steps, seed=s))
  rows['MKOR, mean statistics (RANK1), lr 1e-2 constant, wd 0.01'] = over_seeds(
      lambda s: train(mkor_optax.mkor(1e-2), steps, kind=mkor_optax.RANK1, seed=s))
  rows['K-FAC, lr 1e-2 constant, wd 0.01'] = over_seeds(
      lambda s: train(mkor_optax.kfac(1e-2), steps, kind=mkor_optax.COVARIANCE, seed=s))
  rows['AdamW alone, lr 1e-3 constant, wd 0.01'] = over_seeds(
      lambda s: train(optax.adamw(1e-3, weight_decay=0.01), steps, kind=None, seed=s))
  rows['MKOR + AdamW, lr 1e-3 constant, wd 0.01'] = over_seeds(lambda s: train(
      mkor_optax.mkor(1e-3, backend=optax.adamw(1e-3, weight_decay=0.01)), steps, seed=s))
  rows['LAMB, cosine 1e-2 -> 0, wd 0.01'] = over_seeds(
      lambda s: train(lamb(cosine), steps, kind=None, seed=s))
  rows['MKOR, cosine 1e-2 -> 0, wd 0.01'] = over_seeds(
      lambda s: train(mkor_optax.mkor(cosine), steps, seed=s))
  return rows


def case_kfac_scale(steps):
  rows = {}
  for lr in (1e-3, 1e-2, 3e-2):
    rows[f'LAMB, lr {lr:g}, inputs x1000'] = describe(
        *train(optax.lamb(lr, weight_decay=0.01), steps, kind=None, scale=1000.0)[:2])
    for rel in (False, True):
      rows[f'K-FAC ({"relative" if rel else "absolute"} damping), lr {lr:g}, inputs x1000'] = describe(
          *train(mkor_optax.kfac(lr, relative_damping=rel), steps, kind=mkor_optax.COVARIANCE,
                 scale=1000.0)[:2])
  return rows


def case_scale1e20(steps):
  rows = {}
  for name, tx, value, kind in [
      ('MKOR', mkor_optax.mkor(1e-2, inv_freq=1), False, mkor_optax.SKETCH),
      ('MKOR, mean statistics', mkor_optax.mkor(1e-2, inv_freq=1), False, mkor_optax.RANK1),
      ('MKOR-H', mkor_optax.mkor_h(1e-2, inv_freq=1), True, mkor_optax.SKETCH),
      ('Eva', mkor_optax.eva(1e-2), False, mkor_optax.RANK1)]:
    for stat_scale in (1.0, 1e20):
      rows[f'{name}, statistics x{stat_scale:g}'] = describe(
          *train(tx, steps, stat_scale=stat_scale, value=value, kind=kind))
  return rows


CASES = {'bf16': case_bf16, 'long': case_long, 'kfac_scale': case_kfac_scale,
         'scale1e20': case_scale1e20}


COLUMNS = ['refused', 'final loss', 'final loss per seed', 'best loss (100-step mean)', 'param norm',
           'min eig of factor inverses', 'all finite']


def table(rows: dict) -> str:
  cols = sorted({k for r in rows.values() for k in r}, key=COLUMNS.index)
  fmt = lambda v: f'{v:.4g}' if isinstance(v, float) else str(v)
  lines = ['| run | ' + ' | '.join(cols) + ' |', '|---' * (len(cols) + 1) + '|']
  for name, r in rows.items():
    lines.append(f'| {name} | ' + ' | '.join(fmt(r.get(c, '')) for c in cols) + ' |')
  return '\n'.join(lines)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--steps', type=int, default=10000)
  ap.add_argument('--only', default=','.join(CASES))
  ap.add_argument('--out', default=os.path.join(os.path.dirname(__file__), '..', 'results', 'soak.md'))
  args = ap.parse_args()
  parts = [f'# Soak runs ({args.steps} steps each; `python benchmarks/soak.py --steps {args.steps}`)\n']
  for name in args.only.split(','):
    t0 = time.time()
    rows = CASES[name](args.steps if name != 'scale1e20' else min(args.steps, 300))
    parts.append(f'## {name}\n\n{table(rows)}\n')
    print(parts[-1], f'({time.time() - t0:.0f} s)', flush=True)
  if args.out:
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, 'w') as f:
      f.write('\n'.join(parts))


if __name__ == '__main__':
  main()
