"""Seconds before a training loop runs at speed: this library's MKOR and its
adaptive recipe beside LAMB, AdamW, Muon and kfac-jax.

A user waits for the first steps of a loop: tracing, compiling, and, where
an optimizer's step has several compiled variants (kfac-jax's damping and
inverse updates), every variant. Each configuration runs in a fresh process
(nothing traced or compiled before it; no persistent compilation cache):
its first ``FIRST`` calls are timed, then ``STEADY`` more, and the wait is

    (seconds of the first FIRST calls) - FIRST * (mean seconds of a steady call).

``FIRST`` = 12 covers kfac-jax's variants (its updates every 5 steps) and
MKOR's refresh (step 0, then every 7). Processes run in a new random order
each round; medians over ``--repeats`` rounds. kfac-jax runs as
kfac_jax_compare.py runs it (adaptive learning rate, momentum, damping), so
this needs its environment for that column:

    make .venv-kfac/.installed
    .venv-kfac/bin/python benchmarks/compile_peers.py [--tasks autoencoder,cnn] [--repeats 3]

Writes results/bench/compile_peers.{json,md}. (benchmarks/step_cost.py times
``lower().compile()`` of one step, without tracing: its ratios are this
script's for a one-variant step, measured another way.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, '..', 'examples'))

FIRST = 12
STEADY = 21  # three of MKOR's refresh periods
CONFIGS = ('lamb', 'adamw', 'muon', 'mkor', 'adaptive_mkor', 'kfac-jax')
LR = 1e-2


def child(task: str, name: str) -> dict:
  """Times one configuration in this (fresh) process: ``{'first_s', 'steady_s', 'wait_s'}``."""
  import jax
  import jax.numpy as jnp
  import mkor_optax
  from adaptive_race import adaptive_step, kfac_loss, tasks
  from common import make_step
  from compare import TASK_METHODS, build

  params, make_iter, loss_fn, _ = build(task, False, 0)
  data = make_iter()
  batches = [tuple(jnp.asarray(v) for v in next(data)) for _ in range(FIRST + STEADY)]
  model, loss_of_outputs, fisher, register = tasks()[task]
  if name == 'kfac-jax':
    from kfac_jax_compare import kfac_jax_optimizer
    opt = kfac_jax_optimizer(kfac_loss(model, loss_of_outputs, register))
    rng = jax.random.PRNGKey(0)
    t0 = time.perf_counter()
    state = opt.init(params, rng, batches[0])

    def call(i, carry):
      p, s = carry
      p, s, _ = opt.step(p, s, rng, batch=batches[i], global_step_int=i)
      return p, s
  elif name == 'adaptive_mkor':
    opt = mkor_optax.adaptive_mkor()
    step = adaptive_step(model, opt, None, loss_of_outputs, fisher)
    keys = jax.random.split(jax.random.PRNGKey(1), FIRST + STEADY)
    t0 = time.perf_counter()
    state = opt.init(params)

    def call(i, carry):
      return step(*carry, *batches[i], keys[i])[:2]
  else:
    method = TASK_METHODS[task][name]
    opt = method.make(LR)
    step = make_step(loss_fn, opt, method.kind, method.needs_value)
    t0 = time.perf_counter()
    state = opt.init(params)

    def call(i, carry):
      return step(*carry, *batches[i])[:2]
  carry = (params, state)
  for i in range(FIRST):
    carry = call(i, carry)
  jax.block_until_ready(carry)
  first = time.perf_counter() - t0
  t1 = time.perf_counter()
  for i in range(FIRST, FIRST + STEADY):
    carry = call(i, carry)
  jax.block_until_ready(carry)
  steady = (time.perf_counter() - t1) / STEADY
  return {'first_s': first, 'steady_s': steady, 'wait_s': first - FIRST * steady}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--tasks', default='autoencoder,cnn')
  ap.add_argument('--repeats', type=int, default=3)
  ap.add_argument('--out', default='results/bench')
  ap.add_argument('--child', nargs=2, metavar=('TASK', 'NAME'), help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.child:
    print('RESULT ' + json.dumps(child(*args.child)), flush=True)
    return
  try:
    import kfac_jax  # noqa: F401
    names = list(CONFIGS)
  except ImportError:
    names = [n for n in CONFIGS if n != 'kfac-jax']
    print('kfac-jax is not installed here: skipped', flush=True)
  import jax
  env = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}
  rows = {}
  for task in args.tasks.split(','):
    got = {n: [] for n in names}
    order = np.random.default_rng(0)
    for _ in range(args.repeats):
      for name in order.permutation(names):
        run = subprocess.run([sys.executable, os.path.abspath(__file__), '--child', task, name],
                             env=env, capture_output=True, text=True)
        line = [x for x in run.stdout.splitlines() if x.startswith('RESULT ')]
        if run.returncode or not line:
          raise RuntimeError(f'{task} {name} failed:\n{run.stdout}\n{run.stderr[-3000:]}')
        got[name].append(json.loads(line[0][len('RESULT '):]))
        print(task, name, got[name][-1], flush=True)
    med = {n: {k: float(np.median([r[k] for r in got[n]])) for k in got[n][0]} for n in names}
    rows[task] = {n: dict(med[n], wait=med[n]['wait_s'] / med['lamb']['wait_s'],
                          per_step=med[n]['steady_s'] / med['lamb']['steady_s'], runs=got[n])
                  for n in names}
  head = (f'Seconds before the loop runs at speed (jax {jax.__version__}, {jax.default_backend()}, '
          f'{os.cpu_count()} cores); `python benchmarks/compile_peers.py --tasks {args.tasks} '
          f'--repeats {args.repeats}`: each configuration in a fresh process, its first {FIRST} '
          f'calls less {FIRST} steady calls (the mean of the next {STEADY}); medians over '
          f'{args.repeats} rounds. Ratios to LAMB; `mkor` is `mkor_optax.mkor` with the default '
          'capture, `adaptive_mkor` the recipe as printed (adaptive_inputs, Sketch(8) on refresh '
          'steps).')
  lines = [head, '', '| task | ' + ' | '.join(names) + ' | LAMB wait s |', '|---' * (len(names) + 2) + '|']
  for task, r in rows.items():
    lines.append(f'| {task} | ' + ' | '.join(f"{r[n]['wait']:.2f}" for n in names)
                 + f" | {r['lamb']['wait_s']:.2f} |")
  lines += ['', 'Steady per step, the same runs (ratio to LAMB):', '',
            '| task | ' + ' | '.join(names) + ' | LAMB ms/step |', '|---' * (len(names) + 2) + '|']
  for task, r in rows.items():
    lines.append(f'| {task} | ' + ' | '.join(f"{r[n]['per_step']:.2f}" for n in names)
                 + f" | {1e3 * r['lamb']['steady_s']:.2f} |")
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'compile_peers.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  with open(os.path.join(args.out, 'compile_peers.json'), 'w') as f:
    json.dump({'jax': jax.__version__, 'first': FIRST, 'steady': STEADY, 'rows': rows}, f, indent=1)
  print('\n'.join(lines))


if __name__ == '__main__':
  main()
