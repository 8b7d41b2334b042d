"""Steps and seconds to LAMB's final loss over several seeds: the default
``mkor(lr)`` (sketched statistics) beside the paper's mean statistics, our
K-FAC, AdamW and Muon, on the compare.py tasks.

Per task and seed, every optimizer runs at its best learning rate of the
task's grid (compare.GRIDS) for that seed; its best run is then timed
``--timing-repeats`` times and the per-step clock is the median of those
runs (compile excluded: each step function is compiled before the clock
starts). The target is that seed's LAMB final loss (compare.run_task). All
optimizers of a task run in one process, one after the other, so the ratios
to LAMB compare runs on the same machine state.

    python benchmarks/time_to_target.py [--tasks autoencoder,cnn,resnet,bert] [--seeds 0,1,2]

Writes results/time_to_target/time_to_target.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from compare import run_task  # noqa: E402

METHODS = ('lamb', 'adamw', 'muon', 'mkor', 'mkor_mean', 'kfac')
LABELS = {'mkor': 'MKOR (default: Sketch(4))', 'mkor_mean': 'MKOR, mean statistics (RANK1)',
          'kfac': 'our K-FAC', 'lamb': 'LAMB', 'adamw': 'AdamW', 'muon': 'Muon'}


def summarise(per_seed: list) -> dict:
  """Per method: steps and seconds to target and their ratios to LAMB, per
  seed, with their medians (None where a seed never reached the target)."""
  out = {}
  for name in per_seed[0]['runs']:
    rows = [r['runs'][name] for r in per_seed]
    entry = {k: [x[k] for x in rows] for k in ('lr', 'steps_to_target', 'seconds_to_target',
                                               'steps_ratio', 'seconds_ratio', 'step_time_ratio',
                                               'ms_per_step')}
    for k in ('steps_to_target', 'seconds_to_target', 'steps_ratio', 'seconds_ratio',
              'step_time_ratio', 'ms_per_step'):
      vals = entry[k]
      entry[f'median_{k}'] = (None if any(v is None for v in vals) else float(np.median(vals)))
    out[name] = entry
  return out


def fmt(v, spec):
  return 'never' if v is None else format(v, spec)


def markdown(report: dict, seeds: list) -> str:
  lines = [f'Seeds {seeds}; steps and seconds to the same seed\'s LAMB final loss, each optimizer '
           'at its best lr of the grid for that seed; seconds are the median of repeated timed '
           'runs (compile excluded). Ratios are to LAMB; medians over seeds.', '']
  for task, summary in report.items():
    lines += [f'### {task}', '',
              '| optimizer | lr per seed | steps per seed | median steps (/ LAMB) | seconds per seed '
              '| median seconds (/ LAMB) | ms/step (/ LAMB) |', '|---|---|---|---|---|---|---|']
    for name, e in summary.items():
      lines.append(
          f"| {LABELS.get(name, name)} | {' / '.join(f'{v:g}' for v in e['lr'])} "
          f"| {' / '.join(fmt(v, 'd') for v in e['steps_to_target'])} "
          f"| {fmt(e['median_steps_to_target'], '.0f')} ({fmt(e['median_steps_ratio'], '.2f')}) "
          f"| {' / '.join(fmt(v, '.2f') for v in e['seconds_to_target'])} "
          f"| {fmt(e['median_seconds_to_target'], '.2f')} ({fmt(e['median_seconds_ratio'], '.2f')}) "
          f"| {e['median_ms_per_step']:.2f} ({e['median_step_time_ratio']:.2f}) |")
    lines.append('')
  return '\n'.join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--tasks', default='autoencoder,cnn,resnet,bert')
  ap.add_argument('--seeds', default='0,1,2')
  ap.add_argument('--optimizers', default=','.join(METHODS))
  ap.add_argument('--timing-repeats', type=int, default=3)
  ap.add_argument('--quick', action='store_true', help='fewer steps (a smoke run)')
  ap.add_argument('--out', default='results/time_to_target')
  args = ap.parse_args(argv)
  seeds = [int(s) for s in args.seeds.split(',')]
  methods = args.optimizers.split(',')
  if 'lamb' not in methods:
    methods = ['lamb'] + methods
  os.makedirs(args.out, exist_ok=True)
  report, raw = {}, {}
  for task in args.tasks.split(','):
    per_seed = []
    for seed in seeds:
      print(f'{task} seed {seed} ...', flush=True)
      per_seed.append(run_task(task, methods, args.quick, args.timing_repeats, seed=seed))
    raw[task] = per_seed
    report[task] = summarise(per_seed)
    text = markdown(report, seeds)  # written after every task: nothing lost to a stop
    with open(os.path.join(args.out, 'time_to_target.md'), 'w') as f:
      f.write(text + '\n')
    with open(os.path.join(args.out, 'time_to_target.json'), 'w') as f:
      json.dump({'seeds': seeds, 'summary': report, 'runs': raw}, f)
  print(markdown(report, seeds))


if __name__ == '__main__':
  main()
