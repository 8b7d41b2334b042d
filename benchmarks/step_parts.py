"""Where default MKOR's extra time per step goes, in wall-clock time: the
step with parts of MKOR's work taken out, each against LAMB's step.

The configurations, each a jitted train step as in ``step_cost.py``, timed
in interleaved blocks (whole refresh periods lasting at least 0.2 s of
LAMB's steps; the median of ``--repeats`` blocks, then the median of
``--rounds`` such rounds):

* ``lamb``: LAMB (the reference, 1.00);
* ``lamb + capture``: LAMB's step on the gradients of
  ``mkor_optax.value_and_grad`` (default ``Sketch(4)``), the statistics
  returned from the step so that XLA keeps them;
* ``mkor, no refresh, no preconditioning``: default ``mkor`` with its
  factor rule's refresh and preconditioning replaced by the identity (the
  capture, the checks and the bookkeeping stay: the finiteness check reads
  the statistics);
* ``mkor, no refresh``: the preconditioning put back (the factors stay at
  their initial value);
* ``mkor``: the default, refreshing every 10th step;
* ``mkor, refresh every step``: ``inv_freq=1``;
* ``lamb, donated`` and ``mkor, donated``: LAMB's and default MKOR's steps
  jitted with ``donate_argnums=(0, 1)`` (parameters and state updated in
  place: no copy of the factors that a step leaves unchanged).

Read the differences: the capture, the checks and the bookkeeping
(finiteness, the layers' gradient matrices) = row 3 - 1; the
preconditioning = row 4 - row 3; the refresh (its ``lax.cond`` and, every
10th step, its work) = row 5 - row 4; one refresh's work = (row 6 - row 5)
/ 0.9. Row 2 shows the capture alone, but its statistics leave the step as
outputs, which costs something of its own. Differences of medians of noisy
times: read each to about +-0.05 of a LAMB step, more on a loaded machine.

    python benchmarks/step_parts.py [--tasks autoencoder,cnn,resnet,mlp64,256] [--out results/bench]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'examples'))
import mkor_optax  # noqa: E402
from common import PERIOD, make_step, seconds_per_step  # noqa: E402
from compare import FACTOR_DIM  # noqa: E402
from step_cost import WD, case, machine  # noqa: E402

MKOR_MODULE = importlib.import_module('mkor_optax.mkor')  # (the package exports the alias mkor)
NAMES = ('lamb', 'lamb + capture', 'mkor, no refresh, no preconditioning', 'mkor, no refresh', 'mkor',
         'mkor, refresh every step', 'lamb, donated', 'mkor, donated')


@contextlib.contextmanager
def rule_without(refresh: bool, precondition: bool):
  """``scale_by_mkor`` built inside builds its factor rule with the refresh
  and/or the preconditioning replaced by the identity (everything else,
  defaults included, as the library builds it)."""
  original = MKOR_MODULE.mkor_rule

  def rule(**kw):
    r = original(**kw)
    return r._replace(
        refresh=(lambda sides, prep: sides) if refresh else r.refresh,
        precondition=(lambda sides, prep: {k: g for k, (_, g) in prep.grads.items()})
        if precondition else r.precondition)

  MKOR_MODULE.mkor_rule = rule
  try:
    yield
  finally:
    MKOR_MODULE.mkor_rule = original


def capture_step(loss_fn, opt):
  """LAMB's step on the captured gradients, the statistics returned."""
  grad_fn = mkor_optax.value_and_grad(loss_fn)

  @jax.jit
  def step(params, state, *batch):
    _, grads, stats = grad_fn(params, *batch)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, stats

  return step


def steps_of(task: str):
  params, batch, loss_fn = case(task)
  max_dim = FACTOR_DIM.get(task, 4096)
  mkor = lambda **kw: mkor_optax.mkor(1e-2, weight_decay=WD, max_factor_dim=max_dim, **kw)
  lamb = optax.lamb(1e-2, weight_decay=WD)
  with rule_without(refresh=True, precondition=True):
    bare = mkor()
  with rule_without(refresh=True, precondition=False):
    no_refresh = mkor()
  opts = dict(zip(NAMES, (lamb, lamb, bare, no_refresh, mkor(), mkor(inv_freq=1), lamb, mkor())))
  fns, carries = {}, {}
  for name, opt in opts.items():
    if name == 'lamb':
      step = make_step(loss_fn, opt)
    elif name == 'lamb + capture':
      step = capture_step(loss_fn, opt)
    elif name.endswith('donated'):
      step = make_step(loss_fn, opt, None if name.startswith('lamb') else mkor_optax.SKETCH, donate=True)
    else:
      step = make_step(loss_fn, opt, mkor_optax.SKETCH)
    state = opt.init(params)
    jax.block_until_ready(step(*fresh((params, state)), *batch))
    fns[name] = lambda c, step=step: step(c[0], c[1], *batch)[:2]
    carries[name] = (params, state)
  return fns, carries


def fresh(carry):
  """A copy of ``carry`` (a donated step consumes what it is given)."""
  return jax.tree.map(jnp.copy, carry)


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument('--tasks', default='autoencoder,cnn,resnet,mlp64,256')
  ap.add_argument('--repeats', type=int, default=7)
  ap.add_argument('--rounds', type=int, default=3)
  ap.add_argument('--out', default=None, help='write step_parts.{md,json} here')
  ap.add_argument('--from-json', default=None, help='render the tables of a saved step_parts.json; measures nothing')
  args = ap.parse_args(argv)
  if args.from_json:
    with open(args.from_json) as f:
      saved = json.load(f)
    args.rounds, args.repeats = saved['rounds'], saved['repeats']
    print('\n'.join(table(saved['rows'], args, saved['machine'])))
    return
  rows, t0 = {}, time.time()
  for task in [t for t in args.tasks.split(',') if t]:
    fns, carries = steps_of(task)
    rounds = []
    for _ in range(args.rounds):
      med = seconds_per_step(fns, {k: fresh(c) for k, c in carries.items()}, args.repeats)
      rounds.append({k: v / med['lamb'] for k, v in med.items()})
      rounds[-1]['lamb ms'] = 1e3 * med['lamb']
    rows[task] = {k: float(np.median([r[k] for r in rounds])) for k in rounds[0]}
    rows[task]['rounds'] = rounds
    print(task, {k: round(v, 3) for k, v in rows[task].items() if k != 'rounds'},
          f'{time.time() - t0:.0f} s', flush=True)
  where = machine()
  lines = table(rows, args, where)
  print('\n'.join(lines))
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'step_parts.md'), 'w') as f:
      f.write('\n'.join(lines) + '\n')
    with open(os.path.join(args.out, 'step_parts.json'), 'w') as f:
      json.dump({'machine': where, 'rounds': args.rounds, 'repeats': args.repeats, 'rows': rows}, f,
                indent=1)


def table(rows: dict, args, where: str) -> list:
  head = (f'Time per step against LAMB\'s, parts of default MKOR\'s work taken out ({where}); '
          f'`python benchmarks/step_parts.py`: medians of {args.rounds} rounds of {args.repeats} '
          'interleaved blocks each. Read each ratio to about +-0.05.')
  lines = [head, '', '| task | ' + ' | '.join(NAMES[1:]) + ' | LAMB ms/step |',
           '|---' * (len(NAMES) + 1) + '|']
  for task, r in rows.items():
    lines.append(f'| {task} | ' + ' | '.join(f'{r[n]:.2f}' if n in r else '-' for n in NAMES[1:])
                 + f" | {r['lamb ms']:.2f} |")
  lines += ['', '| task | capture, checks, bookkeeping | preconditioning | refresh (amortised) | one refresh '
            '| mkor / lamb, both donated |', '|---|---|---|---|---|---|']
  for task, r in rows.items():
    capture = r[NAMES[2]] - 1.0
    precondition = r[NAMES[3]] - r[NAMES[2]]
    refresh = r[NAMES[4]] - r[NAMES[3]]
    one = (r[NAMES[5]] - r[NAMES[4]]) / (1 - 1 / PERIOD)  # every step against one in PERIOD
    donated = r[NAMES[7]] / r[NAMES[6]] if NAMES[7] in r else float('nan')
    lines.append(f'| {task} | {capture:+.2f} | {precondition:+.2f} | {refresh:+.2f} | {one:+.2f} | {donated:.2f} |')
  return lines


if __name__ == '__main__':
  main()
