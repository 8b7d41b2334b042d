"""Batch-size sweep: steps to a fixed training loss against batch size for
LAMB, AdamW, Muon, MKOR (mean and Sketch(4) statistics) and K-FAC, the MLM and
the digits autoencoder (Zhang et al. 2019, "Which algorithmic choices matter at
which batch sizes?": curvature should extend the batch size up to which doubling
the batch halves the steps). Reproduce results/batch_sweep with

    python benchmarks/batch_sweep.py --tasks autoencoder,bert \
        --batches bert=8,16,32,64,128 --batches autoencoder=32,64,128,256,512,1024 --seeds 0

Per task the target is the same seed's LAMB final loss (EMA 0.9, last step) at
the task's standard batch and budget (compare.py's target, 32 x 300 MLM, 256 x
500 autoencoder). Step budget at batch b: the standard steps x standard/b below
the standard batch (the same examples), the standard steps up to twice it, and
LARGE_STEPS beyond (for time). Each method runs at its best lr of its seeds.py
grid per batch size (lowest mean loss over the last 10% of the budget). Steps
are deterministic for a seed; nothing is timed. Writes results/batch_sweep/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'examples'))
from common import METHODS, Method, run_method  # noqa: E402
from compare import GRIDS, STANDARD_BATCH, build, first_at_or_below, smooth  # noqa: E402
from seeds import STUDIES, Config  # noqa: E402

NAMES = ('lamb', 'adamw', 'muon', 'mkor mean', 'mkor sketch k=4', 'kfac (LAMB)')  # seeds.py 'sketch' names
BATCHES = {'bert': (8, 16, 32, 64, 128), 'autoencoder': (32, 64, 128, 256, 512, 1024)}
LARGE_STEPS = {'bert': 200}  # budget above twice the standard batch (the MLM at 128: ~0.35 s/step here)


def methods_for(task, quick):
  """{name: (Method, lr grid)}: LAMB from common.METHODS, the rest from seeds.py's 'sketch' study."""
  out = {'lamb': (METHODS['lamb'], GRIDS[task])}
  for name in NAMES[1:]:
    c = STUDIES['sketch'][name]
    c = c if isinstance(c, Config) else Config(c)
    kind = c.kind(task) if callable(c.kind) else c.kind
    grid = GRIDS[task] if c.grids is None else c.grids[task]
    out[name] = (Method(lambda lr, make=c.make: make(lr, task), kind), grid)
  # --quick: the middle lr of each grid only
  return {k: (m, g[len(g) // 2:len(g) // 2 + 1] if quick else g) for k, (m, g) in out.items()}


def budget(task, b, std_steps):
  std = STANDARD_BATCH[task]
  if b < std:
    return std_steps * std // b
  return std_steps if b <= 2 * std else LARGE_STEPS.get(task, std_steps)


def lr_runs(name, method, grid, params0, make_iter, steps, loss_fn):
  """{lr: (final loss: mean of the last 10% of steps, EMA-0.9 curve)} over the grid."""
  out = {}
  for lr in grid:
    _, losses, _ = run_method(name, params0, make_iter(), steps, loss_fn, lr, methods={name: method})
    final = float(np.mean(losses[-max(1, steps // 10):]))
    out[lr] = (final if np.isfinite(final) else float('inf'), smooth(losses))
    print(f'    {name} lr={lr:g}: final {final:.4f}', flush=True)
  return out


def record(row, runs, grid, target):
  """The best lr's steps to ``target`` (1-based, None: never) and, beside it, the fastest lr's."""
  hits = {lr: first_at_or_below(curve, target) for lr, (_, curve) in runs.items()}
  hits = {lr: None if h is None else h + 1 for lr, h in hits.items()}
  lr = min(runs, key=lambda v: runs[v][0])
  edge = '' if len(grid) < 2 else 'top' if lr == grid[-1] else 'bottom' if lr == grid[0] else ''
  fast = min((v for v in grid if hits[v] is not None), key=hits.get, default=None)
  for key, val in (('steps', hits[lr]), ('lr', lr), ('final', runs[lr][0]), ('edge', edge),
                   ('fastest', None if fast is None else [fast, hits[fast]]),
                   ('by_lr', {str(v): {'final': runs[v][0], 'steps': hits[v]} for v in grid})):
    row[key].append(val)


def sweep_task(task, batches, seeds, quick):
  """{'target': per seed, 'rows': {batch: {name: {...per-seed lists}}}}."""
  methods = methods_for(task, quick)
  std = STANDARD_BATCH[task]
  order = [std] + [b for b in batches if b != std]  # the standard batch first: it sets the target
  keys = ('steps', 'lr', 'final', 'edge', 'fastest', 'by_lr')
  rows, targets = {b: {n: {k: [] for k in keys} for n in methods} for b in order}, []
  for seed in seeds:
    for b in order:
      params0, make_iter, loss_fn, std_steps = build(task, quick, seed, batch=b)
      steps = budget(task, b, std_steps)
      print(f'{task} seed {seed} batch {b} ({steps} steps)', flush=True)
      for name, (method, grid) in methods.items():
        runs = lr_runs(name, method, grid, params0, make_iter, steps, loss_fn)
        if b == std and name == 'lamb':
          targets.append(float(min(runs.values(), key=lambda r: r[0])[1][-1]))
        record(rows[b][name], runs, grid, targets[-1])
        rows[b][name]['budget'] = steps
  for b in order:
    for row in rows[b].values():
      row['mean_steps'] = None if None in row['steps'] else float(np.mean(row['steps']))
      row['examples'] = None if row['mean_steps'] is None else row['mean_steps'] * b
  if std not in batches:
    del rows[std]
  return {'target': targets, 'standard_batch': std, 'rows': {b: rows[b] for b in sorted(rows)}}


def ratio(a, b):
  return None if a is None or b is None else a / b


def fmt(v, spec):
  return '-' if v is None else format(v, spec)


def markdown(report, seeds, machine):
  lines = [f"Batch-size sweep, seeds {seeds}, {machine}. Steps: first step at which the training loss "
           "(EMA 0.9) is at or below the target; '-': not within the budget. Examples = steps x batch. "
           "Gain = steps at half the batch / steps here (2.0 = perfect scaling). lr: best of the grid "
           "(lowest mean loss over the last 10% of the budget); ^ / v: at the top / bottom of the grid. "
           "Last column: the fewest steps to the target over the grid's lrs (a check on the lr rule).", '']
  for task, rep in report.items():
    lines += [f"### {task} (target {' / '.join(f'{t:.4f}' for t in rep['target'])}: LAMB's final loss "
              f"at batch {rep['standard_batch']} and its standard budget)", '',
              '| batch | budget | method | lr | final loss | steps to target | / LAMB | examples | gain vs b/2 '
              '| fastest lr: steps (lr) |', '|---|---|---|---|---|---|---|---|---|---|']
    prev = None
    for b, per in rep['rows'].items():
      for name, r in per.items():
        lr = ' / '.join(f"{v:g}{dict(top='^', bottom='v').get(e, '')}" for v, e in zip(r['lr'], r['edge']))
        steps = ' / '.join(fmt(s, 'd') for s in r['steps']) if len(seeds) > 1 else fmt(r['mean_steps'], '.0f')
        gain = ratio(prev[name]['mean_steps'], r['mean_steps']) if prev and 2 * prev_b == b else None
        lines.append(f"| {b} | {r['budget']} | {name} | {lr} | {np.mean(r['final']):.4f} | {steps} | "
                     f"{fmt(ratio(r['mean_steps'], per['lamb']['mean_steps']), '.2f')} | "
                     f"{fmt(r['examples'], '.0f')} | {fmt(gain, '.2f')} | "
                     + ' / '.join('-' if f is None else f'{f[1]} ({f[0]:g})' for f in r['fastest']) + ' |')
      prev, prev_b = per, b
    lines.append('')
  return '\n'.join(lines)


def plot(report, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(report), figsize=(5.5 * len(report), 4.2), squeeze=False)
  for ax, (task, rep) in zip(axes[0], report.items()):
    bs = list(rep['rows'])
    for name in NAMES:
      pts = [(b, rep['rows'][b][name]['mean_steps']) for b in bs if rep['rows'][b][name]['mean_steps']]
      if pts:
        ax.plot(*zip(*pts), 'o-', label=name)
      if pts and name == 'lamb':  # perfect scaling from LAMB's smallest batch: half the steps per doubling
        ax.plot(bs, [pts[0][1] * pts[0][0] / b for b in bs], 'k:', lw=1, label='perfect scaling (from LAMB)')
    ax.set_xscale('log', base=2)
    ax.set_yscale('log')
    ax.set_xticks(bs, [str(b) for b in bs])
    for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
      axis(matplotlib.ticker.FuncFormatter(lambda v, _: f'{v:g}'))
    ax.set(xlabel='batch size', ylabel='steps to target loss', title=f"{task}: target {np.mean(rep['target']):.3f}")
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--tasks', default=None, help='default autoencoder,bert (--quick: autoencoder)')
  ap.add_argument('--batches', action='append', default=[], help='task=b1,b2,... (repeatable)')
  ap.add_argument('--seeds', default='0')
  ap.add_argument('--quick', action='store_true', help='smoke run: quick budgets, middle lr, 2 batches')
  ap.add_argument('--out', default='results/batch_sweep')
  args = ap.parse_args(argv)
  tasks = (args.tasks or ('autoencoder' if args.quick else 'autoencoder,bert')).split(',')
  seeds = [int(s) for s in args.seeds.split(',')]
  batches = {t: (STANDARD_BATCH[t] // 2, STANDARD_BATCH[t]) if args.quick else BATCHES[t] for t in tasks}
  batches.update({s.split('=')[0]: tuple(int(b) for b in s.split('=')[1].split(',')) for s in args.batches})
  machine = f"{platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} ({jax.default_backend()})"
  report = {t: sweep_task(t, batches[t], seeds, args.quick) for t in tasks}
  os.makedirs(args.out, exist_ok=True)
  base = os.path.join(args.out, 'batch_sweep')
  with open(base + '.json', 'w') as f:
    json.dump({'machine': machine, 'seeds': seeds, 'quick': args.quick, 'argv': sys.argv[1:],
               'grids': {t: {n: list(g) for n, (_, g) in methods_for(t, args.quick).items()} for t in tasks},
               'report': report}, f, indent=1)
  text = markdown(report, seeds, machine)
  with open(base + '.md', 'w') as f:
    f.write(text + '\n')
  plot(report, base + '.png')
  print(text)


if __name__ == '__main__':
  main()
