"""Where MKOR's extra time per step goes: the train step split into its parts,
each jitted on its own and timed side by side (medians of interleaved blocks).

    python benchmarks/profile_step.py [--task autoencoder|bert] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import optax

sys.path.insert(0, os.path.dirname(__file__))
import mkor_optax  # noqa: E402
from compare import TASK_METHODS, build  # noqa: E402
from common import interleaved  # noqa: E402


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument('--task', default='autoencoder')
  ap.add_argument('--repeats', type=int, default=7)
  ap.add_argument('--n', type=int, default=50)
  args = ap.parse_args(argv)
  params, make_iter, loss_fn, _ = build(args.task, quick=True)
  batch = next(make_iter())
  plain = jax.jit(jax.value_and_grad(loss_fn))
  captured = jax.jit(mkor_optax.value_and_grad(loss_fn))
  _, grads = plain(params, *batch)
  _, _, stats = captured(params, *batch)
  lamb = optax.lamb(1e-2)
  mkor = TASK_METHODS[args.task]['mkor'].make(1e-2)
  refresh_every = mkor_optax.mkor(1e-2, inv_freq=1, max_factor_dim=4096 if args.task != 'bert' else 1024)
  fns = {
      'value_and_grad (plain)': lambda c: plain(params, *batch)[1],
      'value_and_grad (with capture)': lambda c: captured(params, *batch)[1],
      'update: lamb': jax.jit(lambda s: lamb.update(grads, s, params)[1]),
      'update: mkor+lamb, no refresh': jax.jit(lambda s: mkor.update(grads, s, params, stats=stats)[1]),
      'update: mkor+lamb, refresh': jax.jit(lambda s: refresh_every.update(grads, s, params, stats=stats)[1]),
  }
  carries = {k: None for k in fns}
  carries['update: lamb'] = lamb.init(params)
  mkor_state = mkor.init(params)
  carries['update: mkor+lamb, no refresh'] = fns['update: mkor+lamb, no refresh'](mkor_state)  # past step 0
  carries['update: mkor+lamb, refresh'] = refresh_every.init(params)
  med = interleaved(fns, carries, args.n, args.repeats)
  print(f'{args.task}: ms per call (median of {args.repeats} blocks of {args.n})')
  for k, v in med.items():
    print(f'  {k:32s} {1e3 * v:8.3f}')


if __name__ == '__main__':
  main()
