"""Where a train step's compile time goes: the LLVM modules XLA:CPU builds
for it, default MKOR beside LAMB.

XLA:CPU emits each distinct kernel (a fusion, a dot, a slice, a
reduce-window, ...) as its own LLVM module and compiles it on its own;
kernels of identical HLO are emitted once. Its log (``TF_CPP_VMODULE=
ir_compiler=2``) gives each module's name and LLVM time. This script
compiles each configuration's jitted train step (as ``step_cost.py`` builds
it) in a child process with that log on, and sums the modules per kind:
their count and milliseconds, and the compile's wall time.

    python benchmarks/compile_profile.py [--tasks autoencoder,demo] [--out results/bench/compile_profile.md]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MARK = '--- compile starts ---'
MODULE = re.compile(r'Compiled LLVM module: __compute_module_(\S+?)_kernel_module time: ([0-9.]+) (ms|us|s)\b')
UNITS = {'ms': 1.0, 'us': 1e-3, 's': 1e3}


def child(task: str, method: str):
  """Compiles one train step (the log goes to stderr after MARK)."""
  sys.path.insert(0, HERE)
  sys.path.insert(0, os.path.join(HERE, '..', 'examples'))
  import optax
  import mkor_optax
  from common import make_step
  from compare import FACTOR_DIM
  from step_cost import case
  params, batch, loss_fn = case(task)
  if method == 'lamb':
    opt, kind = optax.lamb(1e-2), None
  else:
    opt, kind = mkor_optax.mkor(1e-2, max_factor_dim=FACTOR_DIM.get(task, 4096)), mkor_optax.SKETCH
  lowered = make_step(loss_fn, opt, kind).lower(params, opt.init(params), *batch)
  print(MARK, file=sys.stderr, flush=True)
  t0 = time.perf_counter()
  lowered.compile()
  print(f'wall {time.perf_counter() - t0:.3f}', flush=True)


def kind_of(name: str) -> str:
  """A module's kind, from its name (``multiply_add_fusion.3`` -> ``fusion``)."""
  name = re.sub(r'\.\d+', '', name)
  for kind in ('reduce-window', 'slice', 'pad', 'concatenate', 'dot', 'sort', 'fusion'):
    if kind in name:
      return kind
  return name


def profile(task: str, method: str) -> dict:
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='0', TF_CPP_VMODULE='ir_compiler=2')
  run = subprocess.run([sys.executable, __file__, '--child', task, method], env=env,
                       capture_output=True, text=True, check=True)
  log = run.stderr.split(MARK, 1)[1]
  ms, count = collections.Counter(), collections.Counter()
  for name, t, unit in MODULE.findall(log):
    kind = kind_of(name)
    ms[kind] += float(t) * UNITS[unit]
    count[kind] += 1
  wall = float(re.search(r'wall ([0-9.]+)', run.stdout).group(1))
  return {'wall_s': wall, 'ms': dict(ms), 'count': dict(count)}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--tasks', default='autoencoder,demo', help='compare.py tasks, demo, or widths')
  ap.add_argument('--out', default=None, help='write the markdown tables to this file')
  ap.add_argument('--child', nargs=2, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.child:
    return child(*args.child)
  import jax
  lines = [f'Compile of the train step, LLVM modules by kind (jax {jax.__version__}, '
           f'{os.cpu_count()} cores); `python benchmarks/compile_profile.py --tasks {args.tasks}`.', '']
  for task in args.tasks.split(','):
    res = {m: profile(task, m) for m in ('lamb', 'mkor')}
    kinds = sorted(set(res['lamb']['count']) | set(res['mkor']['count']),
                   key=lambda k: -res['mkor']['ms'].get(k, 0.0))
    lines += [f'**{task}**: compile {res["lamb"]["wall_s"]:.2f} s (LAMB), {res["mkor"]["wall_s"]:.2f} s '
              f'(MKOR, {res["mkor"]["wall_s"] / res["lamb"]["wall_s"]:.2f}x)', '',
              '| module kind | LAMB modules | LAMB LLVM ms | MKOR modules | MKOR LLVM ms |',
              '|---|---|---|---|---|']
    for k in kinds + ['all']:
      get = (lambda m, f: sum(res[m][f].values())) if k == 'all' else (lambda m, f: res[m][f].get(k, 0))
      lines.append(f'| {k} | {get("lamb", "count")} | {get("lamb", "ms"):.0f} | '
                   f'{get("mkor", "count")} | {get("mkor", "ms"):.0f} |')
    lines.append('')
    print('\n'.join(lines[-len(kinds) - 6:]), flush=True)
  if args.out:
    with open(args.out, 'w') as f:
      f.write('\n'.join(lines))


if __name__ == '__main__':
  main()
