"""The adaptive step's initial damping: steps to LAMB's loss, per seed.

``adaptive_mkor(step_damping=...)`` with the recipe's statistics
(``adaptive_inputs``, ``fisher=`` the task's likelihood, ``Sketch(8)``), as
benchmarks/adaptive_race.py runs it, for each value of ``--dampings``;
LAMB at its learning rate of that task's race (read from the race's json
in results/adaptive_step, ``RACES``) gives each seed's target, its final
loss (EMA 0.9).
Steps only, no timing (a damping does not change a step's cost).

    python benchmarks/step_damping.py --task bert --dampings 1e-3,1e-2

Writes results/adaptive_step/step_damping_<task>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'examples'))
import mkor_optax  # noqa: E402
from adaptive_race import FISHER_WEIGHTS, tasks, train_adaptive  # noqa: E402
from common import run_method  # noqa: E402
from compare import TASK_METHODS, build, first_at_or_below, smooth  # noqa: E402

RACES = {'autoencoder': 'adaptive_race_autoencoder', 'cnn': 'adaptive_race_cnn_sketch8',
         'bert': 'adaptive_race_bert_seeds3', 'resnet': 'adaptive_race_resnet_sketch8'}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--task', default='autoencoder', choices=sorted(RACES))
  ap.add_argument('--seeds', default='0,1,2')
  ap.add_argument('--dampings', default='1e-3,1e-2,1e-1')
  ap.add_argument('--out', default='results/adaptive_step')
  args = ap.parse_args(argv)
  seeds = [int(s) for s in args.seeds.split(',')]
  dampings = [float(d) for d in args.dampings.split(',')]
  race = os.path.join(os.path.dirname(__file__), '..', 'results', 'adaptive_step', RACES[args.task] + '.json')
  with open(race) as f:
    race_rows = json.load(f)
  race_seeds = [int(s) for s in str(race_rows['seeds']).split(',')]
  lamb_lr = dict(zip(race_seeds, race_rows['rows']['lamb']['lr']))
  # the ResNet's recipe rescales each layer's direction (adaptive_mkor(rescale=True))
  rescale = args.task == 'resnet'
  model, loss_of_outputs, fisher, _ = tasks()[args.task]
  rows = {'lamb': {'steps': [], 'final': []}, **{d: {'steps': [], 'final': []} for d in dampings}}
  for seed in seeds:
    params0, make_iter, loss_fn, steps = build(args.task, False, seed)
    _, lamb, _ = run_method('lamb', params0, make_iter(), steps, loss_fn, lamb_lr[seed],
                            methods=TASK_METHODS[args.task])
    target = float(smooth(lamb)[-1])
    curves = {'lamb': lamb}
    for d in dampings:
      make = lambda d=d: mkor_optax.adaptive_mkor(step_damping=d, rescale=rescale)
      curves[d], _ = train_adaptive(model, params0, make_iter, steps, make, mkor_optax.Sketch(8),
                                    loss_of_outputs, fisher, seed, FISHER_WEIGHTS.get(args.task))
    for name, losses in curves.items():
      hit = first_at_or_below(smooth(losses), target)
      rows[name]['steps'].append(None if hit is None else hit + 1)
      final = float(np.mean(losses[-max(1, steps // 10):]))
      rows[name]['final'].append(final if np.isfinite(final) else float('inf'))
    print(args.task, seed, {str(k): v['steps'][-1] for k, v in rows.items()}, flush=True)
  lines = [f'jax {jax.__version__}, {args.task}, seeds {seeds}: steps to the same seed\'s LAMB final loss '
           f'(EMA 0.9; LAMB at its lr of {RACES[args.task]}), `adaptive_mkor(step_damping=...'
           f"{', rescale=True' if rescale else ''})` with the recipe's `Sketch(8)`; "
           '`python benchmarks/step_damping.py '
           f'--task {args.task} --seeds {args.seeds} --dampings {args.dampings}`. "-": not reached.',
           '', '| optimizer | steps per seed | final loss per seed |', '|---|---|---|']
  for name, r in rows.items():
    label = 'LAMB' if name == 'lamb' else f'step_damping {name:g}'
    lines.append(f'| {label} | ' + ' / '.join('-' if s is None else str(s) for s in r['steps'])
                 + ' | ' + ' / '.join(f'{v:.4g}' for v in r['final']) + ' |')
  os.makedirs(args.out, exist_ok=True)
  base = os.path.join(args.out, f'step_damping_{args.task}')
  with open(base + '.md', 'w') as f:
    f.write('\n'.join(lines) + '\n')
  with open(base + '.json', 'w') as f:
    json.dump({'jax': jax.__version__, 'seeds': seeds,
               'rows': {str(k): v for k, v in rows.items()}}, f, indent=1)
  print('\n'.join(lines))


if __name__ == '__main__':
  main()
