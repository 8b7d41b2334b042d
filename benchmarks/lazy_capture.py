"""An experiment, not a configuration of the library: default MKOR with its
statistics captured only on the steps that refresh them, against default
MKOR capturing every step, against LAMB, per step (interleaved blocks, as
``step_cost.py`` times them) and per compile.

MKOR reads its statistics only inside the refresh (every ``inv_freq``
steps), yet the capture runs on every step. Here the whole forward and
backward pass is put under a ``lax.cond`` on the step counter: the capture
on the refresh steps, plain ``jax.value_and_grad`` with zero statistics on
the others. The trained parameters come out the same (after 15 steps: bit
for bit on the Dense models, to rounding with convolutions, whose kernels
XLA compiles differently inside a branch); the question is what the step
costs.

    python benchmarks/lazy_capture.py [--tasks autoencoder,cnn,resnet,mlp64,demo,256,1024] [--rounds 3]
"""

from __future__ import annotations

import argparse
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
from step_cost import case  # noqa: E402


def lazy_step(loss_fn, opt, kind, period):
  """A jitted train step that captures statistics only when the MKOR state
  (the chain's first) refreshes at this step."""
  grad_fn = mkor_optax.value_and_grad(loss_fn, kind=kind)
  plain = jax.value_and_grad(loss_fn)

  @jax.jit
  def step(params, opt_state, *batch):
    shapes = jax.eval_shape(grad_fn, params, *batch)[2]

    def without():
      loss, grads = plain(params, *batch)
      return loss, grads, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    due = opt_state[0].count % period == 0
    loss, grads, stats = jax.lax.cond(due, lambda: grad_fn(params, *batch), without)
    updates, opt_state = opt.update(grads, opt_state, params, stats=stats)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument('--tasks', default='autoencoder,cnn,resnet,mlp64,demo,256,1024')
  ap.add_argument('--rounds', type=int, default=3)
  args = ap.parse_args(argv)
  for task in args.tasks.split(','):
    params, batch, loss_fn = case(task)
    make = lambda: mkor_optax.mkor(1e-2, weight_decay=0.0, max_factor_dim=FACTOR_DIM.get(task, 4096))
    cfgs = {'lamb': (optax.lamb(1e-2, weight_decay=0.0), None), 'mkor': (make(), mkor_optax.SKETCH),
            'mkor, statistics when due': (make(), mkor_optax.SKETCH)}
    fns, carries, compile_s = {}, {}, {}
    for name, (opt, kind) in cfgs.items():
      state = opt.init(params)
      step = (lazy_step(loss_fn, opt, kind, PERIOD) if name.endswith('when due')
              else make_step(loss_fn, opt, kind))
      t0 = time.perf_counter()
      step.lower(params, state, *batch).compile()
      compile_s[name] = time.perf_counter() - t0
      jax.block_until_ready(step(params, state, *batch))
      fns[name] = lambda c, step=step: step(c[0], c[1], *batch)[:2]
      carries[name] = (params, state)
    a, b = carries['mkor'], carries['mkor, statistics when due']
    for _ in range(15):
      a, b = fns['mkor'](a), fns['mkor, statistics when due'](b)
    diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a[0]), jax.tree.leaves(b[0])))
    ratios = []
    for _ in range(args.rounds):
      med = seconds_per_step(fns, dict(carries), 7)
      ratios.append({k: v / med['lamb'] for k, v in med.items()})
    print(task, f'params apart after 15 steps: {diff:.1e};',
          'per step', {k: round(float(np.median([r[k] for r in ratios])), 2) for k in cfgs},
          'compile', {k: round(compile_s[k] / compile_s['lamb'], 2) for k in cfgs}, flush=True)


if __name__ == '__main__':
  main()
