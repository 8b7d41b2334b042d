"""What a host callback costs a compiled train step, though it never runs.

The digits autoencoder's LAMB train step (compare.py's task), jitted, with
and without the checks the transforms compile in (``report_if``: a
``jax.pure_callback`` in a ``lax.cond`` branch that runs only on a
non-finite loss): one check
early in the step, three, one late (after the update), an unconditional
``pure_callback``, and a ``jax.debug.callback`` (an effect). Medians of
interleaved blocks, as ratios to the step without any.

    python benchmarks/callback_cost.py            # 2 cores
    taskset -c 0 python benchmarks/callback_cost.py   # pinned to one core

The numbers are quoted in docs/guides/safety.md (mkor_optax.jit_warnings).
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'examples'))
from compare import build  # noqa: E402
from mkor_optax.numerics import report_if  # noqa: E402
from common import interleaved  # noqa: E402


def guarded(flag, n):
  """``n`` checks exactly as the transforms compile them
  (:func:`mkor_optax.numerics.report_if`: a host call only if ``flag``)."""
  return sum((report_if(flag, 'callback_cost: a check that never fires') for _ in range(n)),
             jnp.zeros((), jnp.int32))


def unconditional(flag, n):
  return jax.pure_callback(lambda f: np.zeros((), np.int32), jax.ShapeDtypeStruct((), jnp.int32), flag)


def effect(flag, n):
  jax.debug.callback(lambda f: None, flag)
  return jnp.zeros((), jnp.int32)


def main():
  params, make_iter, loss_fn, _ = build('autoencoder', quick=True, seed=0)
  batch = next(make_iter())
  lamb = optax.lamb(1e-2)

  def stepper(check, n, late=False):
    @jax.jit
    def step(params, state, x, y):
      loss, g = jax.value_and_grad(loss_fn)(params, x, y)
      if check is not None and not late:
        r = check(~jnp.isfinite(loss), n)
        g = jax.tree.map(lambda a: a + r, g)
      u, state = lamb.update(g, state, params)
      if check is not None and late:
        r = check(~jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(u)])), n)
        u = jax.tree.map(lambda a: a + r, u)
      return optax.apply_updates(params, u), state, loss
    return step

  cases = {'no check': stepper(None, 0), 'one check': stepper(guarded, 1),
           'three checks': stepper(guarded, 3), 'one check, late': stepper(guarded, 1, late=True),
           'unconditional pure_callback': stepper(unconditional, 1),
           'jax.debug.callback': stepper(effect, 1)}
  fns = {k: (lambda c, f=f: f(c[0], c[1], *batch)[:2]) for k, f in cases.items()}
  carries = {k: (params, lamb.init(params)) for k in cases}
  med = interleaved(fns, carries, 20, 9)
  print(f'LAMB train step, digits autoencoder ({os.cpu_count()} cores visible, '
        f'{len(os.sched_getaffinity(0))} usable)')
  for k, v in med.items():
    print(f'  {k:30s} {1e3 * v:7.3f} ms  {v / med["no check"]:.2f}x')


if __name__ == '__main__':
  main()
