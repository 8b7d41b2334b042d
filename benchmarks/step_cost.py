"""What a step costs: default MKOR, MKOR on batch means, K-FAC and SONew
against LAMB, per step and per compile, on every task and across widths.

Every configuration's jitted train step (``value_and_grad`` with the
capture, ``update``, ``apply_updates``: what a user's loop runs) is built in
one process. Compile time is ``jit(...).lower(...).compile()``, once per
configuration, in rotating order over ``--compile-repeats`` fresh
compilations (median). Steps are timed in interleaved blocks of ``--steps``
calls (default: as many whole multiples of every timed configuration's
refresh period as make a block of LAMB's steps last 0.2 s), ``--repeats``
times (median block), so that a noisy neighbour slows every configuration
alike. ``--since REV`` also times default ``mkor`` as it was at git
revision ``REV`` (its package imported beside today's); ``--only`` picks
the configurations.

1. the compare.py tasks: the digits autoencoder, the CNN, the ResNet with
   BatchNorm, the masked-LM encoder and the small MLP autoencoder, and
   ``demo``, the model of ``make demo`` and the quickstart notebook
   (64-512-256-32-256-512-64, batch 256) (``--tasks``);
2. a d-d-d MLP (two d x d Dense layers, batch 256) for d in ``--widths``;
3. a cost model: MLPs of ``L`` Dense layers of width ``d`` (batch 128), the
   per-step overhead over LAMB in milliseconds against ``L`` and ``d``
   (``--depths``, ``--model-widths``), plotted to step_cost.png.

    python benchmarks/step_cost.py [--quick] [--out results/bench]

Writes results/bench/step_cost.{json,md,png}; the docs' cost numbers quote it.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'examples'))
import mkor_optax  # noqa: E402
from common import MIN_BLOCK_S, PERIOD, make_step, seconds_per_step  # noqa: E402
from compare import FACTOR_DIM, build  # noqa: E402
from demo import demo_case  # noqa: E402

WD = 0.0
KFAC_PERIOD = inspect.signature(mkor_optax.kfac).parameters['inv_freq'].default
OLD_PERIOD = 10  # 0.1.0's inv_freq
# Every timed block holds a whole number of every timed configuration's
# refresh period (block_period: PERIOD, default MKOR's inv_freq, and 10 where
# 0.1.0's settings or K-FAC are timed), so that each block holds the same
# number of each one's refresh steps, and lasts at least MIN_BLOCK_S of LAMB's
# steps (on a shared machine, blocks of a few milliseconds measure the
# scheduler more than the step): examples/common.py's rule, which make demo and
# the quickstart notebook time their steps by too (with PERIOD alone).


def package_at(rev: str):
  """The ``mkor_optax`` package as it was at git revision ``rev`` of this
  repository, imported beside today's as ``mkor_optax_at_<rev>`` (its files
  copied to a temporary folder, every ``mkor_optax`` in them renamed), for
  a comparison in one process."""
  import importlib
  import io
  import re
  import subprocess
  import tarfile
  import tempfile
  name = 'mkor_optax_at_' + re.sub(r'\W', '_', rev)
  root = tempfile.mkdtemp(prefix='step_cost_')
  repo = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
  archive = subprocess.run(['git', '-C', repo, 'archive', '--format=tar', rev, 'mkor_optax'],
                           check=True, capture_output=True).stdout
  with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
    tar.extractall(root, filter='data')
  os.rename(os.path.join(root, 'mkor_optax'), os.path.join(root, name))
  for folder, _, files in os.walk(os.path.join(root, name)):
    for f in files:
      if f.endswith('.py'):
        path = os.path.join(folder, f)
        with open(path) as fh:
          text = re.sub(r'\bmkor_optax\b', name, fh.read())
        with open(path, 'w') as fh:
          fh.write(text)
  sys.path.insert(0, root)
  return importlib.import_module(name)


SINCE = {}  # rev -> that revision's package (--since)


def configs(max_dim):
  """name -> (optimizer, statistic kind[, traced with mkor_optax.jit_warnings(True)
  [, the value_and_grad to capture with]]): LAMB first (the reference).
  Steps are traced with the library's default (no host checks) unless the
  third entry says so. With ``--since REV``, ``mkor at REV`` is that
  revision's default ``mkor`` with its own default capture."""
  since = {f'mkor at {rev}': (pkg.mkor(1e-2, weight_decay=WD, max_factor_dim=max_dim),
                              inspect.signature(pkg.value_and_grad).parameters['kind'].default,
                              False, pkg.value_and_grad)
           for rev, pkg in SINCE.items()}
  return {
      'lamb': (optax.lamb(1e-2, weight_decay=WD), None),
      'mkor': (mkor_optax.mkor(1e-2, weight_decay=WD, max_factor_dim=max_dim), mkor_optax.SKETCH),
      'mkor, jit warnings': (mkor_optax.mkor(1e-2, weight_decay=WD, max_factor_dim=max_dim),
                             mkor_optax.SKETCH, True),
      'mkor mean': (mkor_optax.mkor(1e-2, weight_decay=WD, max_factor_dim=max_dim), mkor_optax.RANK1),
      # the former default capture: every layer's sketches formed in the capture, every step
      'mkor Sketch(4)': (mkor_optax.mkor(1e-2, weight_decay=WD, max_factor_dim=max_dim),
                         mkor_optax.Sketch(4)),
      # 0.1.0's defaults (absolute factors, a refresh every 10 steps), for the
      # cost of today's scale-free factors and period
      'mkor 0.1.0': (mkor_optax.mkor(1e-2, weight_decay=WD, max_factor_dim=max_dim, damping=None,
                                     inv_freq=OLD_PERIOD), mkor_optax.SKETCH),
      'kfac': (mkor_optax.kfac(1e-2, weight_decay=WD, max_factor_dim=max_dim),
               mkor_optax.Covariance(max_dim=max_dim)),
      'sonew': (mkor_optax.sonew(1e-2), None),
      **since,
  }


def chosen(cfgs: dict, only) -> dict:
  """``cfgs`` restricted to the names in ``only`` (LAMB always kept), or all."""
  return cfgs if not only else {k: v for k, v in cfgs.items() if k == 'lamb' or k in only}


def block_period(names) -> int:
  """The steps a timed block is a whole multiple of: the least common
  multiple of the refresh periods of the configurations ``names`` (so every
  block holds the same number of each one's refreshes)."""
  periods = [PERIOD] + [OLD_PERIOD for n in names if n == 'mkor 0.1.0'] + [
      KFAC_PERIOD for n in names if n == 'kfac'] + [
      inspect.signature(SINCE[n[len('mkor at '):]].mkor).parameters['inv_freq'].default
      for n in names if n.startswith('mkor at ')]
  return int(np.lcm.reduce(periods))


def costs(params, batch, loss_fn, cfgs, n, repeats, compile_repeats) -> dict:
  """``{name: {'ms', 'per_step', 'compile_s', 'compile'}}``, ratios to ``'lamb'``;
  ``n`` steps per timed block (``None``: as many whole :func:`block_period`s
  as make LAMB's block last :data:`MIN_BLOCK_S`)."""
  steps, fns, carries = {}, {}, {}
  for name, (opt, kind, *rest) in cfgs.items():
    state = opt.init(params)
    loud, capture = (list(rest) + [False, None])[:2]
    steps[name] = (opt, kind, state, bool(loud), capture)
  compile_s = {name: [] for name in cfgs}
  for r in range(compile_repeats):
    names = list(cfgs)
    for name in names[r % len(names):] + names[:r % len(names)]:
      opt, kind, state, loud, capture = steps[name]
      step = make_step(loss_fn, opt, kind, capture=capture)  # a fresh jit: nothing cached
      with mkor_optax.jit_warnings(loud):
        t0 = time.perf_counter()
        step.lower(params, state, *batch).compile()
        compile_s[name].append(time.perf_counter() - t0)
  for name, (opt, kind, state, loud, capture) in steps.items():
    step = make_step(loss_fn, opt, kind, capture=capture)
    with mkor_optax.jit_warnings(loud):  # traced here, at the first call
      jax.block_until_ready(step(params, state, *batch))
    fns[name] = lambda c, step=step: step(c[0], c[1], *batch)[:2]
    carries[name] = (params, state)
  # (n None: blocks of at least MIN_BLOCK_S of LAMB's steps, the first config's)
  period = block_period(cfgs)
  med = seconds_per_step(fns, carries, repeats, n, period=period)
  comp = {k: float(np.median(v)) for k, v in compile_s.items()}
  return {name: {'ms': 1e3 * med[name], 'per_step': med[name] / med['lamb'],
                 'compile_s': comp[name], 'compile': comp[name] / comp['lamb'],
                 'block_period': period} for name in cfgs}


class MLP(nn.Module):
  """``depth`` Dense layers of width ``width`` (tanh between them)."""
  depth: int
  width: int

  @nn.compact
  def __call__(self, x):
    for i in range(self.depth):
      x = nn.Dense(self.width)(x)
      if i < self.depth - 1:
        x = nn.tanh(x)
    return x


def mlp_case(depth, width, batch):
  model = MLP(depth, width)
  x = jax.random.normal(jax.random.PRNGKey(0), (batch, width))
  y = jax.random.normal(jax.random.PRNGKey(1), (batch, width))
  params = model.init(jax.random.PRNGKey(2), x)['params']
  loss_fn = lambda p, x, y: jnp.mean((model.apply({'params': p}, x) - y) ** 2)
  return params, (x, y), loss_fn


def case(task: str):
  """``(params, one batch, loss_fn)`` of a task: a compare.py task (its first
  quick batch, seed 0), ``'demo'`` (the model of ``make demo``), or a width
  (a d-d-d MLP, batch 256: the widths below)."""
  if task == 'demo':
    return demo_case()
  if task.isdigit():
    return mlp_case(2, int(task), 256)
  params, make_iter, loss_fn, _ = build(task, quick=True, seed=0)
  return params, next(make_iter()), loss_fn


def table(rows: dict, first: str, what: str) -> list:
  """One markdown table: ``what`` ('per_step' or 'compile') of each
  configuration over LAMB's, and LAMB's own time, a row per task or width."""
  names = [n for n in next(iter(rows.values())) if n != 'lamb']
  lamb_col, lamb_key, lamb_fmt = (('LAMB ms/step', 'ms', '.2f') if what == 'per_step'
                                  else ('LAMB compile s', 'compile_s', '.2f'))
  lines = [f'| {first} | ' + ' | '.join(names) + f' | {lamb_col} |', '|---' * (len(names) + 2) + '|']
  for key, r in rows.items():
    lines.append(f'| {key} | ' + ' | '.join(f"{r[n][what]:.2f}" for n in names)
                 + f" | {r['lamb'][lamb_key]:{lamb_fmt}} |")
  return lines


def plot(model_rows: dict, path: str):
  try:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
  except ImportError:
    return
  fig, ax = plt.subplots(1, 2, figsize=(10, 4))
  depths = sorted({d for d, _ in model_rows})
  widths = sorted({w for _, w in model_rows})
  for name in ('mkor', 'mkor mean', 'kfac'):
    for w in widths:
      ax[0].plot(depths, [model_rows[(d, w)][name]['ms'] - model_rows[(d, w)]['lamb']['ms'] for d in depths],
                 marker='o', label=f'{name}, width {w}')
  ax[0].set_xlabel('Dense layers L')
  ax[0].set_ylabel('ms per step over LAMB')
  ax[0].set_title('overhead against depth')
  ax[0].legend(fontsize=7)
  for name in ('mkor', 'mkor mean', 'kfac'):
    d = depths[-1]
    ax[1].plot(widths, [model_rows[(d, w)][name]['per_step'] for w in widths], marker='o', label=name)
  ax[1].axhline(1.0, color='k', lw=0.5)
  ax[1].set_xscale('log', base=2)
  ax[1].set_xlabel(f'width d ({depths[-1]} layers)')
  ax[1].set_ylabel('time per step / LAMB')
  ax[1].set_title('ratio against width')
  ax[1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument('--tasks', default='autoencoder,cnn,resnet,bert,mlp64,demo')
  ap.add_argument('--widths', default='256,1024,4096')
  ap.add_argument('--depths', default='2,4,8')
  ap.add_argument('--model-widths', default='64,256')
  ap.add_argument('--steps', type=int, default=None,
                  help=f'steps per timed block (default: whole refresh periods lasting {MIN_BLOCK_S} s of LAMB)')
  ap.add_argument('--repeats', type=int, default=7)
  ap.add_argument('--compile-repeats', type=int, default=3)
  ap.add_argument('--quick', action='store_true', help='fewer blocks (a smoke run)')
  ap.add_argument('--out', default='results/bench')
  ap.add_argument('--since', default=None,
                  help="also time default mkor as it was at these git revisions, comma-separated ('mkor at REV')")
  ap.add_argument('--only', default=None,
                  help="the configurations to time beside LAMB, comma-separated (default: all)")
  ap.add_argument('--from-json', default=None,
                  help='render step_cost.md and .png again from this saved step_cost.json; measures nothing')
  args = ap.parse_args(argv)
  if args.quick:
    args.repeats, args.compile_repeats, args.steps = 3, 1, int(np.lcm(PERIOD, OLD_PERIOD))
  if args.steps is not None and args.steps % PERIOD:
    ap.error(f'--steps must be a multiple of {PERIOD} (the refresh period)')
  if args.from_json:
    rewrite(args.from_json)
    return
  split = lambda s: [x for x in s.split(',') if x]
  args.lcm_blocks = True
  for rev in split(args.since or ''):
    SINCE[rev] = package_at(rev)
  only = split(args.only) if args.only else None
  unknown = sorted(set(only or ()) - set(configs(4096)))
  if unknown:
    ap.error(f'--only: unknown configuration(s) {unknown}; choose from {sorted(configs(4096))}')
  report = {'tasks': {}, 'widths': {}, 'model': {}}
  t0 = time.time()
  for task in split(args.tasks):  # (demo: its factors on every side, max_factor_dim 4096)
    params, batch, loss_fn = case(task)
    report['tasks'][task] = costs(params, batch, loss_fn, chosen(configs(FACTOR_DIM.get(task, 4096)), only),
                                  args.steps, args.repeats, args.compile_repeats)
    print(task, {k: round(v['per_step'], 3) for k, v in report['tasks'][task].items()},
          f'{time.time() - t0:.0f} s', flush=True)
  for w in map(int, split(args.widths)):
    params, batch, loss_fn = case(str(w))
    report['widths'][w] = costs(params, batch, loss_fn, chosen(configs(4096), only), args.steps, args.repeats,
                                args.compile_repeats)
    print('width', w, {k: round(v['per_step'], 3) for k, v in report['widths'][w].items()},
          f'{time.time() - t0:.0f} s', flush=True)
  model_cfgs = lambda: {k: v for k, v in configs(4096).items()
                        if k not in ('sonew', 'mkor 0.1.0', 'mkor, jit warnings')}
  for depth in map(int, split(args.depths)):
    for w in map(int, split(args.model_widths)):
      params, batch, loss_fn = mlp_case(depth, w, 128)
      report['model'][(depth, w)] = costs(params, batch, loss_fn, model_cfgs(), args.steps, args.repeats, 1)
      print('model', depth, w, {k: round(v['ms'], 3) for k, v in report['model'][(depth, w)].items()},
            f'{time.time() - t0:.0f} s', flush=True)

  write(report, machine(), args)


def machine() -> str:
  """The jax version, the backend, the cores and the CPU, as the tables name them."""
  from trajectories import cpu_model
  return f'jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} cores ({cpu_model()})'


def write(report, machine, args):
  """step_cost.md (two tables per group: per step, per compile), .json, .png."""
  if getattr(args, 'lcm_blocks', False):  # runs since the --since option
    # (runs before 'block_period' was recorded timed 0.1.0's period and revisions' of 10)
    lcm = {r[n].get('block_period', int(np.lcm(PERIOD, OLD_PERIOD)))
           for group in ('tasks', 'widths') for r in report[group].values() for n in r}
    blocks = (f'each a whole multiple of every timed configuration\'s refresh period ('
              + ' or '.join(f'{p} steps' for p in sorted(lcm)) + f', default MKOR\'s being {PERIOD}) '
              f'lasting at least {MIN_BLOCK_S} s of LAMB\'s steps')
    kfac_note = ''
  else:
    blocks = (f'whole refresh periods, inv_freq {PERIOD}, lasting at least {MIN_BLOCK_S} s of '
              'LAMB\'s steps')
    kfac_note = (f'K-FAC inverts every {KFAC_PERIOD} steps, so a block holds a whole number of its '
                 'periods only roughly. ')
  revs = [r for r in (getattr(args, 'since', None) or '').split(',') if r]
  since = (f"`mkor at REV` is default `mkor` as it was at commit REV ({', '.join(revs)}), with its "
           'own default capture, imported beside today\'s package. ' if revs else '')
  # a partial run (--since, --only) names its whole command
  partial = {k: v for k, v in (('since', getattr(args, 'since', None)),
                               ('only', getattr(args, 'only', None))) if v}
  if partial:
    partial.update(tasks=args.tasks, widths=args.widths, depths=args.depths)
  flags = ''.join(f' --{k} "{v}"' for k, v in partial.items() if v is not None)
  lines = [f'Cost per step and per compile against LAMB in the same process ({machine}); '
           f'`python benchmarks/step_cost.py{flags}`. Per step: median of {args.repeats} interleaved blocks '
           f'({blocks}); compile: median of '
           f'{args.compile_repeats} compilations. Default `mkor` captures Sketch(4, lazy=True) (the Dense '
           'layers\' sketches formed on refresh steps only); `mkor Sketch(4)` the former default (every '
           'layer\'s sketches formed in the capture, every step); `mkor mean` RANK1; '
           f'`mkor 0.1.0` is 0.1.0\'s defaults (absolute factors, inv_freq {OLD_PERIOD}). {since}{kfac_note}'
           'Ratios to LAMB.', '']
  for key, title in (('tasks', 'Tasks'), ('widths', 'Widths (d-d-d MLP, batch 256)')):
    if report[key]:
      first = 'task' if key == 'tasks' else 'width'
      lines += [f'**{title}, per step**', ''] + table(report[key], first, 'per_step') + ['']
      lines += [f'**{title}, compile**', ''] + table(report[key], first, 'compile') + ['']
  if report['model']:
    lines += ['**Cost model** (L Dense layers of width d, batch 128): ms per step over LAMB', '',
              '| L | d | LAMB ms | mkor | mkor mean | kfac |', '|---|---|---|---|---|---|']
    for (depth, w), r in report['model'].items():
      lines.append(f"| {depth} | {w} | {r['lamb']['ms']:.3f} | "
                   + ' | '.join(f"{r[k]['ms'] - r['lamb']['ms']:+.3f}" for k in ('mkor', 'mkor mean', 'kfac'))
                   + ' |')
  text = '\n'.join(lines)
  print(text)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'step_cost.json'), 'w') as f:
    json.dump({'machine': machine, 'args': vars(args),
               'report': {k: {str(kk): vv for kk, vv in v.items()} for k, v in report.items()}}, f, indent=1)
  with open(os.path.join(args.out, 'step_cost.md'), 'w') as f:
    f.write(text + '\n')
  if report['model']:
    plot(report['model'], os.path.join(args.out, 'step_cost.png'))


def rewrite(path):
  """Renders step_cost.md (and the plot) again from a saved step_cost.json,
  without measuring anything."""
  with open(path) as f:
    saved = json.load(f)
  args = argparse.Namespace(**saved['args'])
  args.out = os.path.dirname(path)
  report = saved['report']
  report['model'] = {tuple(int(v) for v in k.strip('()').split(',')): r
                     for k, r in report.get('model', {}).items()}
  write(report, saved['machine'], args)

if __name__ == '__main__':
  main()
