"""MKOR-H at its switch: does resetting LAMB's moments (reset_backend=True)
remove the loss bump, and is MKOR-H then no worse than MKOR? Digits
autoencoder, the lr of the comparison (0.01), over seeds.

    python benchmarks/mkor_h_switch.py [--steps 500] [--seeds 0,1,2]

Writes results/mkor_h_switch/mkor_h_switch.md.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'examples'))
import mkor_optax  # noqa: E402
from common import Autoencoder, autoencoder_loss, batches, load_digits, make_step  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument('--steps', type=int, default=500)
  ap.add_argument('--seeds', default='0,1,2')
  ap.add_argument('--out', default=str(ROOT / 'results' / 'mkor_h_switch'))
  args = ap.parse_args(argv)
  (x, y), _ = load_digits()
  model = Autoencoder()
  loss_fn = autoencoder_loss(model)
  configs = {
      'mkor': (lambda: mkor_optax.mkor(1e-2, weight_decay=0.0), False),
      'mkor_h': (lambda: mkor_optax.mkor_h(1e-2, weight_decay=0.0), True),
      'mkor_h, reset_backend': (lambda: mkor_optax.mkor_h(1e-2, weight_decay=0.0,
                                                          reset_backend=True), True),
  }
  rows = {k: {'final': [], 'switch': []} for k in configs}
  for seed in (int(s) for s in args.seeds.split(',')):
    params = model.init(jax.random.PRNGKey(seed), x[:2])['params']
    for name, (make, needs_value) in configs.items():
      opt = make()
      step = make_step(loss_fn, opt, mkor_optax.RANK1, needs_value)
      p, state, data, losses = params, opt.init(params), batches(x, y, 256, seed=seed), []
      for _ in range(args.steps):
        p, state, loss = step(p, state, *next(data))
        losses.append(float(loss))
      rows[name]['final'].append(float(np.mean(losses[-50:])))
      rows[name]['switch'].append(int(state[0].switch_step) if needs_value else None)
  lines = [f'Digits autoencoder, lr 0.01, {args.steps} steps; final = mean training loss of the '
           'last 50 steps; switch = MKOR-H\'s first first-order step (-1: none).',
           '', '| optimizer | final loss per seed | mean ± std | switch per seed |',
           '|---|---|---|---|']
  for name, r in rows.items():
    f = r['final']
    sw = ' / '.join('-' if v is None else str(v) for v in r['switch'])
    lines.append(f'| {name} | ' + ' / '.join(f'{v:.3f}' for v in f)
                 + f' | {np.mean(f):.3f} ± {np.std(f):.3f} | {sw} |')
  text = '\n'.join(lines)
  print(text)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / 'mkor_h_switch.md').write_text(text + '\n')


if __name__ == '__main__':
  main()
