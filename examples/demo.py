"""`make demo`: LAMB vs MKOR+LAMB side by side on scikit-learn's digits.

Trains the same MLP from the same initialisation on the same batches with
each optimizer, shows a progress bar, prints steps and seconds to a target
training loss and the final test accuracy, and writes a loss-curve PNG.

    python examples/demo.py [--steps 400] [--lr 0.01] [--target 0.15] [--out results/demo]
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import MLP, batches, classification_loss, load_digits, run_method  # noqa: E402


def smooth(losses, beta=0.9):
  out, m = [], losses[0]
  for v in losses:
    m = beta * m + (1 - beta) * v
    out.append(m)
  return np.array(out)


def first_below(curve, target):
  idx = np.nonzero(curve <= target)[0]
  return int(idx[0]) if len(idx) else None


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--steps', type=int, default=400)
  ap.add_argument('--lr', type=float, default=1e-2)
  ap.add_argument('--batch', type=int, default=64)
  ap.add_argument('--target', type=float, default=0.15, help='target smoothed training loss')
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--out', default='results/demo')
  ap.add_argument('--no-plot', action='store_true')
  args = ap.parse_args(argv)

  (x, y), (x_test, y_test) = load_digits(seed=args.seed)
  model = MLP((128, 128))
  params0 = model.init(jax.random.PRNGKey(args.seed), x[:2])['params']
  runs = {'LAMB': 'lamb', 'MKOR+LAMB': 'mkor'}
  rows, curves = [], {}
  for name, method in runs.items():
    params, losses, times = run_method(method, params0, batches(x, y, args.batch, args.seed),
                                       args.steps, classification_loss(model), args.lr,
                                       progress=True, desc=name)
    curve = smooth(losses)
    hit = first_below(curve, args.target)
    logits = model.apply({'params': params}, x_test)
    acc = float(jnp.mean(jnp.argmax(logits, -1) == y_test))
    rows.append((name, hit, None if hit is None else times[hit], curve[-1], acc,
                 1e3 * np.median(np.diff(times))))
    curves[name] = (curve, times)

  print(f'\nMLP 64-128-128-10 on digits, batch {args.batch}, lr {args.lr}, {args.steps} steps, '
        f'target smoothed train loss {args.target}')
  print('| optimizer | steps to target | seconds to target | final train loss | test accuracy | ms/step |')
  print('|---|---|---|---|---|---|')
  for name, hit, sec, final, acc, ms in rows:
    hit_s = '-' if hit is None else str(hit + 1)
    sec_s = '-' if sec is None else f'{sec:.2f}'
    print(f'| {name} | {hit_s} | {sec_s} | {final:.4f} | {acc:.3f} | {ms:.2f} |')

  if not args.no_plot:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    os.makedirs(args.out, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, (curve, times) in curves.items():
      axes[0].plot(np.arange(1, len(curve) + 1), curve, label=name)
      axes[1].plot(times, curve, label=name)
    for ax, xlabel in zip(axes, ('step', 'seconds')):
      ax.set_yscale('log')
      ax.axhline(args.target, color='gray', ls=':', lw=1)
      ax.set_xlabel(xlabel)
      ax.set_ylabel('training loss (smoothed)')
      ax.legend()
    fig.suptitle('digits MLP: LAMB vs MKOR+LAMB')
    fig.tight_layout()
    path = os.path.join(args.out, 'loss.png')
    fig.savefig(path, dpi=100)
    print(f'\nwrote {path}')


if __name__ == '__main__':
  main()
