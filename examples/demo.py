"""`make demo`: LAMB against MKOR+LAMB, side by side, on scikit-learn's digits.

A deep autoencoder (64-512-256-32-256-512-64, tanh) reconstructs the 8x8
digits: a small model with the long, ill-conditioned valleys that curvature
is for. Both optimizers train the same initialisation on the same batches at
the same learning rate, stepping in turn so that both see the same machine. The
demo prints, as measured in this run, the steps
and seconds each took to reach LAMB's final training loss, the time per step
and the test loss, then says in plain words whether MKOR paid off here.

Two times per step: the run's own (its seconds over its steps; the loop reads
every step's loss, so each step waits for the one before), and the cost per
step as benchmarks/step_cost.py times it (its ``demo`` task is this model):
blocks of whole refresh periods lasting at least 0.2 s, the two optimizers
taking turns, median of 7 blocks, with nothing read between steps.

    python examples/demo.py [--steps 400] [--lr 0.01] [--out runs/demo]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import (METHODS, Autoencoder, autoencoder_loss, batches, load_digits, make_step,  # noqa: E402
                    seconds_per_step)

WIDTHS = (512, 256, 32, 256, 512)
RUNS = {'LAMB': 'lamb', 'MKOR+LAMB': 'mkor'}
BATCH = 256
BLOCK_REPEATS = 7


def demo_case(batch: int = BATCH, seed: int = 0):
  """``(params, (x, y) of one batch, loss_fn)`` of the demo's model, for
  benchmarks/step_cost.py's ``demo`` task."""
  (x, y), _ = load_digits(seed=seed)
  model = Autoencoder(WIDTHS)
  params = model.init(jax.random.PRNGKey(seed), x[:2])['params']
  return params, (x[:batch], y[:batch]), autoencoder_loss(model)


def smooth(losses, beta=0.9):
  """The exponential moving average of the per-step loss (what the target is
  measured on: one noisy batch does not count as reaching it)."""
  out, m = [], losses[0]
  for v in losses:
    m = beta * m + (1 - beta) * v
    out.append(m)
  return np.array(out)


def first_at_or_below(curve, target):
  idx = np.nonzero(curve <= target)[0]
  return int(idx[0]) if len(idx) else None


def jitted_steps(loss_fn, lr) -> dict:
  """``{name: (jitted train step, optimizer)}`` of both optimizers, compiled
  once for the run and the block timing."""
  out = {}
  for name, method in RUNS.items():
    m = METHODS[method]
    opt = m.make(lr)
    out[name] = (make_step(loss_fn, opt, m.kind, m.needs_value), opt)
  return out


def train_side_by_side(steps, params0, x, y, args):
  """Both optimizers step in turn on the same batches, so a machine that
  slows down or speeds up mid-run slows both alike. Returns, per optimizer,
  (final params, per-step losses, seconds spent in its own steps so far)."""
  runs = {}
  for name, (step, opt) in steps.items():
    state = opt.init(params0)
    jax.block_until_ready(step(params0, state, x[:args.batch], y[:args.batch]))  # compile
    runs[name] = [step, params0, state, [], [], 0.0]
  data = batches(x, y, args.batch, args.seed)
  progress = range(args.steps)
  try:
    from tqdm.auto import tqdm
    progress = tqdm(progress, desc='LAMB and MKOR+LAMB, in turn', leave=False, disable=None)
  except ImportError:
    pass
  for _ in progress:
    batch = next(data)
    for run in runs.values():
      step, params, state, losses, times, clock = run
      t0 = time.perf_counter()
      params, state, loss = step(params, state, *batch)
      losses.append(float(loss))  # waits for the step
      clock += time.perf_counter() - t0
      times.append(clock)
      run[1], run[2], run[5] = params, state, clock
  return {name: (r[1], np.array(r[3]), np.array(r[4])) for name, r in runs.items()}


def block_timed_ms(steps, params0, batch):
  """ms per step of each optimizer as benchmarks/step_cost.py times it."""
  fns, carries = {}, {}
  for name, (step, opt) in steps.items():
    fns[name] = lambda c, step=step: step(c[0], c[1], *batch)[:2]
    carries[name] = (params0, opt.init(params0))
  return {k: 1e3 * v for k, v in seconds_per_step(fns, carries, BLOCK_REPEATS).items()}


def verdict(rows):
  """Plain words on what the run measured."""
  lamb, mkor = rows['LAMB'], rows['MKOR+LAMB']
  per_step = mkor['ms_per_step'] / lamb['ms_per_step']
  blocks = mkor['ms_per_step_blocks'] / lamb['ms_per_step_blocks']
  cost = (f'Timed in blocks as benchmarks/step_cost.py times it, a MKOR+LAMB step costs '
          f'{blocks:.2f}x a LAMB step.')
  if mkor['steps'] is None:
    return (f'MKOR+LAMB did not reach LAMB\'s final loss within {lamb["steps"]} steps here: '
            f'on this run curvature did not pay. {cost}')
  steps = mkor['steps'] / lamb['steps']
  seconds = mkor['seconds'] / lamb['seconds']
  text = (f'MKOR+LAMB reached LAMB\'s final loss in {steps:.2f}x LAMB\'s steps. '
          f'In this run, which waits for every step\'s loss, each of its steps took '
          f'{per_step:.2f}x a LAMB step, so it got there in {seconds:.2f}x LAMB\'s seconds')
  if seconds < 1:
    return text + f': it paid off in wall-clock time too. {cost}'
  return (text + ': on this machine the cheaper steps of LAMB won in seconds. The saving '
          'in steps pays where a step is expensive: larger layers, larger batches, a slow '
          f'input pipeline, or many devices. {cost}')


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--steps', type=int, default=400)
  ap.add_argument('--lr', type=float, default=1e-2)
  ap.add_argument('--batch', type=int, default=BATCH)
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--out', default='runs/demo')  # git-ignored; results/demo is the committed run
  ap.add_argument('--no-plot', action='store_true')
  args = ap.parse_args(argv)

  (x, y), (x_test, _) = load_digits(seed=args.seed)
  params0, _, loss_fn = demo_case(args.batch, args.seed)
  test_loss = jax.jit(lambda p: loss_fn(p, x_test))
  steps = jitted_steps(loss_fn, args.lr)
  curves, finals = {}, {}
  for name, (params, losses, times) in train_side_by_side(steps, params0, x, y, args).items():
    curves[name] = (smooth(losses), times)
    finals[name] = float(test_loss(params))
  blocks_ms = block_timed_ms(steps, params0, (x[:args.batch], y[:args.batch]))

  target = curves['LAMB'][0][-1]
  rows = {}
  for name, (curve, times) in curves.items():
    hit = first_at_or_below(curve, target)
    rows[name] = {
        'steps': None if hit is None else hit + 1,
        'seconds': None if hit is None else float(times[hit]),
        'ms_per_step': float(1e3 * times[-1] / len(times)),  # the mean over the whole run
        'ms_per_step_blocks': blocks_ms[name],  # as benchmarks/step_cost.py times it
        'final_train_loss': float(curve[-1]),
        'test_loss': finals[name],
    }

  title = (f'Deep autoencoder 64-{"-".join(map(str, WIDTHS))}-64 on digits, batch {args.batch}, '
           f'lr {args.lr}, {args.steps} steps; target: LAMB\'s final training loss '
           f'{target:.3f} (smoothed)')
  lines = ['| optimizer | steps to target | seconds to target | ms/step | ms/step, in blocks '
           '| final train loss | test loss |', '|---|---|---|---|---|---|---|']
  for name, r in rows.items():
    steps = '-' if r['steps'] is None else str(r['steps'])
    secs = '-' if r['seconds'] is None else f'{r["seconds"]:.2f}'
    lines.append(f'| {name} | {steps} | {secs} | {r["ms_per_step"]:.2f} | '
                 f'{r["ms_per_step_blocks"]:.2f} | {r["final_train_loss"]:.3f} | {r["test_loss"]:.3f} |')
  words = verdict(rows)
  print(f'\n{title}\n')
  print('\n'.join(lines))
  print(f'\n{words}')

  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'demo.md'), 'w') as f:
    f.write(f'{title}. Machine: {os.cpu_count()} CPUs, jax {jax.__version__} '
            f'({jax.default_backend()}).\n\n' + '\n'.join(lines) + f'\n\n{words}\n')
  with open(os.path.join(args.out, 'demo.json'), 'w') as f:
    json.dump({'args': vars(args), 'target': float(target), 'rows': rows}, f, indent=1)

  if not args.no_plot:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, (curve, times) in curves.items():
      axes[0].plot(np.arange(1, len(curve) + 1), curve, label=name)
      axes[1].plot(times, curve, label=name)
    for ax, xlabel in zip(axes, ('step', 'seconds')):
      ax.set_yscale('log')
      ax.axhline(target, color='gray', ls=':', lw=1)
      ax.set_xlabel(xlabel)
      ax.set_ylabel('training loss (smoothed)')
      ax.legend()
    fig.suptitle('digits autoencoder: LAMB vs MKOR+LAMB')
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, 'loss.png'), dpi=100)
  print(f'\nwrote {args.out}/demo.md' + ('' if args.no_plot else ' and loss.png'))


if __name__ == '__main__':
  main()
