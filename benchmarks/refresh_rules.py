"""MKOR's two refresh rules side by side (exact EMA vs the authors' blend).

The digits autoencoder and MLP, each optimizer at its best learning rate of
one grid, over several seeds; final full-training-set loss after a fixed
number of steps. LAMB alone is the reference.

    python benchmarks/refresh_rules.py [--seeds 0,1,2] [--out results/bench]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'examples'))
import mkor_optax  # noqa: E402
from common import (METHODS, MLP, Autoencoder, Method, autoencoder_loss, batches,  # noqa: E402
                    classification_loss, load_digits, train)
from mkor_optax import RANK1  # noqa: E402

OPTIMIZERS = {
    'lamb': METHODS['lamb'],
    'mkor (ema)': Method(lambda lr: mkor_optax.mkor(lr, weight_decay=0.0, refresh='ema'), RANK1),
    'mkor (blend)': Method(lambda lr: mkor_optax.mkor(lr, weight_decay=0.0, refresh='blend'), RANK1),
}
TASKS = {
    'autoencoder, batch 256, 300 steps': (Autoencoder, autoencoder_loss, 256, 300),
    'MLP 64-64, batch 64, 300 steps': (lambda: MLP((64, 64)), classification_loss, 64, 300),
}


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument('--seeds', default='0,1,2')
  ap.add_argument('--lrs', default='0.003,0.01,0.02')
  ap.add_argument('--out', default='results/bench')
  args = ap.parse_args(argv)
  seeds = [int(s) for s in args.seeds.split(',')]
  lrs = [float(s) for s in args.lrs.split(',')]
  (x, y), _ = load_digits()
  results = {}
  for task, (make_model, make_loss, bs, steps) in TASKS.items():
    model = make_model()
    loss_fn = make_loss(model)
    full = jax.jit(loss_fn)
    results[task] = {}
    for name, method in OPTIMIZERS.items():
      best = []
      for seed in seeds:
        params0 = model.init(jax.random.PRNGKey(seed), x[:2])['params']
        finals = []
        for lr in lrs:
          params, _, _ = train(params0, method.make(lr), batches(x, y, bs, seed), steps, loss_fn,
                               method.kind, method.needs_value)
          finals.append(float(full(params, x, y)))
        best.append(min(finals))
      results[task][name] = best
      print(f'{task} | {name}: best final loss per seed {np.round(best, 4).tolist()}', flush=True)
  lines = ['| task | ' + ' | '.join(OPTIMIZERS) + ' |', '|---' * (len(OPTIMIZERS) + 1) + '|']
  for task, row in results.items():
    cells = [f'{np.mean(v):.4f} ± {np.std(v):.4f}' for v in row.values()]
    lines.append(f'| {task} | ' + ' | '.join(cells) + ' |')
  table = '\n'.join(lines)
  print(f'\nmean ± std over seeds {seeds} of the best final training loss (lr grid {lrs})\n')
  print(table)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'refresh_rules.json'), 'w') as f:
    json.dump({'seeds': seeds, 'lrs': lrs, 'results': results}, f, indent=2)
  with open(os.path.join(args.out, 'refresh_rules.md'), 'w') as f:
    f.write(f'Best final training loss, mean ± std over seeds {seeds}, lr grid {lrs}\n\n{table}\n')


if __name__ == '__main__':
  main()
