"""Per-step and compile time of MKOR's statistics (the batch mean against k
random-sign sketches) beside LAMB on the compare.py tasks.

The competitors run side by side in one process. Steps are timed in
interleaved blocks and the medians are reported, because this machine is
shared and noisy. Compile time is timed once per step function, with
``jax.jit(...).lower(...).compile()``.

    python benchmarks/sketch_cost.py [--tasks autoencoder,resnet,bert,cnn] [--repeats 7]

Writes results/bench/sketch_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'examples'))
import mkor_optax  # noqa: E402
from common import METHODS  # noqa: E402
from compare import FACTOR_DIM, build  # noqa: E402
from step_cost import costs  # noqa: E402

CONFIGS = {
    'lamb': (lambda task: METHODS['lamb'].make(1e-2), None),
    'mkor mean': (lambda task: mkor_optax.mkor(1e-2, max_factor_dim=FACTOR_DIM[task]),
                  mkor_optax.RANK1),
    **{f'mkor sketch k={k}': (lambda task: mkor_optax.mkor(1e-2, max_factor_dim=FACTOR_DIM[task]),
                              mkor_optax.Sketch(k)) for k in (1, 4, 8)},
}


def task_costs(task, n, repeats):
  params, make_iter, loss_fn, _ = build(task, quick=True, seed=0)
  batch = next(make_iter())
  got = costs(params, batch, loss_fn, {name: (make(task), kind) for name, (make, kind) in CONFIGS.items()},
              n, repeats, compile_repeats=1)
  return {name: {'ms': r['ms'], 'per_step_vs_lamb': r['per_step'], 'compile_s': r['compile_s'],
                 'compile_vs_lamb': r['compile']} for name, r in got.items()}


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument('--tasks', default='autoencoder,resnet,bert,cnn')
  ap.add_argument('--steps', type=int, default=20, help='steps per timed block')
  ap.add_argument('--repeats', type=int, default=7)
  ap.add_argument('--out', default='results/bench')
  args = ap.parse_args(argv)
  report = {task: task_costs(task, args.steps, args.repeats) for task in args.tasks.split(',')}
  lines = ['Per-step time (median of interleaved blocks, inv_freq=10, refresh steps included) '
           'and compile time, against LAMB in the same process.', '',
           '| task | configuration | ms/step | / LAMB | compile s | / LAMB |', '|---|---|---|---|---|---|']
  for task, rows in report.items():
    for name, r in rows.items():
      lines.append(f"| {task} | {name} | {r['ms']:.2f} | {r['per_step_vs_lamb']:.2f} | "
                   f"{r['compile_s']:.2f} | {r['compile_vs_lamb']:.2f} |")
  text = '\n'.join(lines)
  print(text)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'sketch_cost.json'), 'w') as f:
    json.dump({'devices': str(jax.devices()), 'report': report}, f, indent=1)
  with open(os.path.join(args.out, 'sketch_cost.md'), 'w') as f:
    f.write(text + '\n')


if __name__ == '__main__':
  main()
