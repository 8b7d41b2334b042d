"""MKOR configurations over several seeds: steps to the same seed's LAMB
final loss on the compare.py tasks, each configuration at its best learning
rate of the task's grid (compare.GRIDS), per seed.

    python benchmarks/seeds.py --study low_rank [--tasks autoencoder,bert] [--seeds 0,1,2]

Studies (``STUDIES``): ``backend`` (each backend with and without MKOR, K-FAC under LAMB and SGD, Muon), ``defaults`` (MKOR's defaults against one change at
a time: inv_freq, gamma, zeta, epsilon, the refresh rule, the backend) and
``gamma`` (the factor EMA's
momentum, 0.95 to 0.999, the rest at the defaults), ``sketch`` (mean statistics
against k = 1, 2, 4, 8 random-sign sketches and the factor powers 1/2, 1/4,
beside K-FAC, Muon and AdamW) and ``low_rank`` (dense factors vs low-rank-plus-identity factors forced on every
side, ranks 4 ... 32). Steps are deterministic for a
seed; no timing here (see width_sweep.py and compare.py for seconds).
Writes results/seeds/<study>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, NamedTuple, Optional

import numpy as np
import optax

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'examples'))
import mkor_optax  # noqa: E402
from common import METHODS, Method, run_method  # noqa: E402
from compare import FACTOR_DIM, GRIDS, build, first_at_or_below, smooth  # noqa: E402


# Every study here was measured with MKOR refreshing every 10 steps (the
# default up to 0.2.0; 7 since), so a configuration runs at that period unless
# its name gives another: a rerun reproduces its table whatever the default.
STUDY_INV_FREQ = 10


def mkor_method(**kw):
  kw = {'inv_freq': STUDY_INV_FREQ, **kw}

  def make(lr, task):
    return mkor_optax.mkor(lr, weight_decay=0.0, max_factor_dim=FACTOR_DIM[task], **kw)
  return make


class Config(NamedTuple):
  """A configuration whose statistics or lr grid differ from MKOR's: ``make(lr,
  task)``, the statistics it needs (``None``: plain gradients) and its own lr
  grid per task (``None``: the task's grid)."""
  make: Callable
  kind: Any = mkor_optax.RANK1
  grids: Optional[dict] = None


def kfac_method(make_backend=None, **kw):
  def make(lr, task):
    return mkor_optax.kfac(lr, weight_decay=0.0, max_factor_dim=FACTOR_DIM[task],
                           backend=None if make_backend is None else make_backend(lr), **kw)
  return Config(make, lambda task: mkor_optax.Covariance(max_dim=FACTOR_DIM[task]))


# SGD-style backends take the raw gradient's norm (MKOR's rescale), not a
# trust ratio, so their grid is wider; Muon's reaches past compare.py's top.
SGD_GRIDS = {'autoencoder': (1e-2, 3e-2, 1e-1, 3e-1), 'bert': (1e-2, 3e-2, 1e-1, 3e-1)}
MUON_GRIDS = {'autoencoder': (1e-2, 3e-2, 1e-1), 'bert': (3e-3, 1e-2, 3e-2), 'cnn': (1e-2, 3e-2, 1e-1),
              'mlp64': (1e-2, 3e-2, 1e-1),
              'resnet': (1e-2, 3e-2, 1e-1)}


def sgd_momentum(lr):
  return optax.sgd(lr, momentum=0.9)


def backend_method(make_backend, **kw):
  kw = {'inv_freq': STUDY_INV_FREQ, **kw}

  def make(lr, task):
    return mkor_optax.mkor(lr, backend=make_backend(lr), max_factor_dim=FACTOR_DIM[task], **kw)
  return make


STUDIES = {
    'defaults': {
        'mkor (defaults)': mkor_method(),
        'inv_freq 1': mkor_method(inv_freq=1),
        'inv_freq 3': mkor_method(inv_freq=3),
        'inv_freq 30': mkor_method(inv_freq=30),
        'gamma 0.9 (zeta 0.85)': mkor_method(gamma=0.9, zeta=0.85),
        'gamma 0.99': mkor_method(gamma=0.99),
        'zeta 0.5': mkor_method(zeta=0.5),
        'epsilon 1.25': mkor_method(epsilon=1.25),
        'epsilon 8': mkor_method(epsilon=8.0),
        "refresh 'blend'": mkor_method(refresh='blend'),
        'gamma 0.99 + epsilon 8': mkor_method(gamma=0.99, epsilon=8.0),
        'backend adam': backend_method(optax.adam),
        'backend sgd + momentum 0.9': backend_method(sgd_momentum),
    },
    # gamma with everything else at the defaults, values spelled out so the
    # table does not move when the default does (0.95 is the paper's value)
    'gamma': {f'gamma {g:g}': mkor_method(gamma=g) for g in (0.95, 0.98, 0.99, 0.995, 0.999)},
    # What the preconditioner adds under each backend, and full covariances
    # (K-FAC) against MKOR's rank-1 statistics under the same backend
    'backend': {
        'mkor (LAMB)': mkor_method(),
        'kfac (LAMB)': kfac_method(),
        'muon': Config(lambda lr, task: optax.contrib.muon(lr), None, MUON_GRIDS),
        'mkor + muon': Config(backend_method(optax.contrib.muon), grids=MUON_GRIDS),
        'adam': Config(lambda lr, task: optax.adam(lr), None),
        'mkor + adam': backend_method(optax.adam),
        'sgd + momentum 0.9': Config(lambda lr, task: sgd_momentum(lr), None, SGD_GRIDS),
        'mkor + sgd momentum': Config(backend_method(sgd_momentum), grids=SGD_GRIDS),
        'kfac + sgd momentum': kfac_method(sgd_momentum)._replace(grids=SGD_GRIDS),
    },
    # MKOR's statistics: the batch mean (default) against k random-sign
    # sketches per refresh, the factor powers, beside K-FAC and Muon
    'sketch': {
        'mkor mean': mkor_method(),
        **{f'mkor sketch k={k}': Config(mkor_method(), mkor_optax.Sketch(k)) for k in (1, 2, 4, 8)},
        **{f'mkor sketch k=4 power {p:g}': Config(mkor_method(factor_power=p), mkor_optax.Sketch(4))
           for p in (0.5, 0.25)},
        'mkor mean power 0.5': mkor_method(factor_power=0.5),
        # the factor EMA tuned for sketches: more of them per step, faster
        # forgetting of the identity start, a looser stabiliser
        **{f'mkor sketch k=4 {name}': Config(mkor_method(**kw), mkor_optax.Sketch(4))
           for name, kw in (('inv_freq 1', dict(inv_freq=1)), ('inv_freq 3', dict(inv_freq=3)),
                            ('gamma 0.95', dict(gamma=0.95)), ('epsilon 8', dict(epsilon=8.0)))},
        'kfac (LAMB)': kfac_method(),
        'muon': Config(lambda lr, task: optax.contrib.muon(lr), None, MUON_GRIDS),
        'adamw': Config(lambda lr, task: optax.adamw(lr), None),
    },
    # Scale-free factors: MKOR's relative damping (None: the absolute form,
    # the default before 0.2), its EMA around the chosen value, the mean
    # statistic, and K-FAC's relative (pi-adjusted) damping against absolute
    'scale_free': {
        'mkor absolute (damping None)': Config(mkor_method(damping=None), mkor_optax.SKETCH),
        **{f'mkor damping {d:g}': Config(mkor_method(damping=d), mkor_optax.SKETCH)
           for d in (1.0, 0.5, 0.25, 0.0625, 0.015625)},
        'mkor mean damping 0.0625': mkor_method(damping=0.0625),
        'mkor mean damping 0.25': mkor_method(damping=0.25),
        'mkor damping 0.0625 gamma 0.95': Config(mkor_method(damping=0.0625, gamma=0.95),
                                                 mkor_optax.SKETCH),
        'mkor damping 0.0625 inv_freq 3': Config(mkor_method(damping=0.0625, inv_freq=3),
                                                 mkor_optax.SKETCH),
        'mkor damping 0.25 gamma 0.95': Config(mkor_method(damping=0.25, gamma=0.95),
                                               mkor_optax.SKETCH),
        **{f'mkor damping {d:g} inv_freq 3': Config(mkor_method(damping=d, inv_freq=3), mkor_optax.SKETCH)
           for d in (1.0, 0.5, 0.25)},
        **{f'mkor damping {d:g} inv_freq {f}': Config(mkor_method(damping=d, inv_freq=f), mkor_optax.SKETCH)
           for d in (2.0, 1.0, 0.5) for f in (5, 7)},
        'mkor damping 2': Config(mkor_method(damping=2.0), mkor_optax.SKETCH),
        # the default capture (the Dense layers' sketches formed on refresh
        # steps), and the former one (every layer sketched in the capture,
        # every step): the studies run before the change took it as SKETCH
        'mkor lazy sketches': Config(mkor_method(), mkor_optax.Sketch(4, lazy=True)),
        'mkor capture sketches': Config(mkor_method(), mkor_optax.Sketch(4)),
        'kfac absolute 1e-3': kfac_method(damping=1e-3, relative_damping=False),
        **{f'kfac relative {d:g}': kfac_method(damping=d, relative_damping=True)
           for d in (1e-1, 1e-2, 1e-3)},
        'muon': Config(lambda lr, task: optax.contrib.muon(lr), None, MUON_GRIDS),
        'adamw': Config(lambda lr, task: optax.adamw(lr), None),
    },
    'low_rank': {
        'mkor dense': mkor_method(low_rank=None),
        **{f'mkor rank {k}': mkor_method(low_rank=k, low_rank_min_dim=0) for k in (4, 8, 16, 32)},
    },
}


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument('--study', default='low_rank', choices=sorted(STUDIES))
  ap.add_argument('--tasks', default='autoencoder,bert')
  ap.add_argument('--seeds', default='0,1,2')
  ap.add_argument('--configs', default=None,
                  help="';'-separated subset of the study's configuration names (LAMB always runs)")
  ap.add_argument('--tag', default=None, help='suffix of the output name (several subset runs of one study)')
  ap.add_argument('--quick', action='store_true')
  ap.add_argument('--out', default='results/seeds')
  args = ap.parse_args(argv)
  seeds = [int(s) for s in args.seeds.split(',')]
  configs = STUDIES[args.study]
  if args.configs:
    unknown = set(args.configs.split(';')) - set(configs)
    if unknown:
      ap.error(f'unknown configurations {sorted(unknown)}; choose from {sorted(configs)}')
    configs = {k: v for k, v in configs.items() if k in args.configs.split(';')}
  configs = {k: v if isinstance(v, Config) else Config(v) for k, v in configs.items()}
  report = {}
  for task in args.tasks.split(','):
    # each configuration as compare.py's Method for this task, with its lr grid
    methods = {'lamb': (METHODS['lamb'], GRIDS[task])}
    for name, c in configs.items():
      kind = c.kind(task) if callable(c.kind) else c.kind
      methods[name] = (Method(lambda lr, make=c.make: make(lr, task), kind),
                       GRIDS[task] if c.grids is None else c.grids[task])
    rows = {name: {'steps': [], 'final': [], 'lr': [], 'grid': list(grid)}
            for name, (_, grid) in methods.items()}
    for seed in seeds:
      params0, make_iter, loss_fn, steps = build(task, args.quick, seed)
      curves = {}
      for name, (method, grid) in methods.items():
        best = None
        for lr in grid:
          _, losses, _ = run_method(name, params0, make_iter(), steps, loss_fn, lr,
                                    methods={name: method})
          final = float(np.mean(losses[-max(1, steps // 10):]))
          final = final if np.isfinite(final) else float('inf')
          if best is None or final < best[0]:
            best = (final, lr, smooth(losses))
        rows[name]['final'].append(best[0])
        rows[name]['lr'].append(best[1])
        curves[name] = best[2]
      target = curves['lamb'][-1]
      for name, curve in curves.items():
        hit = first_at_or_below(curve, target)
        rows[name]['steps'].append(None if hit is None else hit + 1)
      print(task, seed, {k: v['steps'][-1] for k, v in rows.items()}, flush=True)
    report[task] = rows
  lines = [f"Study '{args.study}', seeds {seeds}: steps to the same seed's LAMB final loss "
           '(EMA 0.9 of the training loss), each configuration at its best lr of the task grid '
           '(or of its own grid, listed).', '']
  for task, rows in report.items():
    lines += [f'### {task} (lr grid {list(GRIDS[task])})', '',
              '| configuration | steps per seed | mean steps | / first MKOR row | final loss (mean ± std) | best lr per seed |',
              '|---|---|---|---|---|---|']
    first = next(r for n, r in rows.items() if n != 'lamb')
    base = np.mean([s for s in first['steps'] if s is not None] or [np.nan])
    for name, r in rows.items():
      hit = [s for s in r['steps'] if s is not None]
      mean = np.mean(hit) if len(hit) == len(r['steps']) else float('nan')
      per = ' / '.join('-' if s is None else str(s) for s in r['steps'])
      own = '' if r['grid'] == list(GRIDS[task]) else f" (grid {r['grid']})"
      lines.append(f"| {name} | {per} | {mean:.1f} | {mean / base:.3f} | {np.mean(r['final']):.4f} ± "
                   f"{np.std(r['final']):.4f} | {' / '.join(f'{v:g}' for v in r['lr'])}{own} |")
    lines.append('')
  text = '\n'.join(lines)
  print(text)
  os.makedirs(args.out, exist_ok=True)
  # a run on a subset of tasks or configurations does not overwrite the full study
  subset = args.configs or args.tasks != ap.get_default('tasks')
  name = args.study + ('_' + '_'.join(args.tasks.split(',')) if subset else '') + (
      '_' + args.tag if args.tag else '')
  with open(os.path.join(args.out, f'{name}.json'), 'w') as f:
    json.dump({'seeds': seeds, 'report': report}, f, indent=1)
  with open(os.path.join(args.out, f'{name}.md'), 'w') as f:
    f.write(text + '\n')


if __name__ == '__main__':
  main()
