"""What would sketches formed only on refresh steps save in the library?

A measurement, not a feature (nothing here is in the package). The
capture hands MKOR the Dense layers' raw rows instead of their sketches
(``[x, 1]`` and ``dL/dy``, ``(N, d)`` each, references to buffers the
backward pass holds anyway), and MKOR's refresh, which runs inside its
``lax.cond``, multiplies them by ``k`` random signs there: the sketch
products then run on refresh steps only (as benchmarks/floor.py's minimal
step does). Two patches, active only inside :func:`lazy`:

* ``factors.refresh_relative_many`` sketches a statistic that arrives with
  more than ``K`` rows (its rows are the layer's; the factors are
  scale-free, so the per-example scale of ``dL/dy`` does not matter);
* the step's finiteness check reads the gradients only (the raw rows
  would cost a pass over every activation each step; the refresh checks
  its own result).

The signs are one fixed draw (a cost measurement: which signs does not
change the time). Timed beside default ``mkor`` and LAMB in interleaved
blocks, on Dense-only tasks whose sides are dense inverses.

    python benchmarks/lazy_sketch.py [--tasks autoencoder,mlp64,64,128] [--repeats 15]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'examples'))
import mkor_optax  # noqa: E402
from mkor_optax import factors, kronecker, numerics  # noqa: E402
from mkor_optax import tap as tap_lib  # noqa: E402
from common import block_steps, interleaved, make_step  # noqa: E402
from step_cost import case, machine  # noqa: E402

K = 4


class Rows(tap_lib.StatKind):
  """A Dense layer's raw rows under the sketch statistics' names (``rows``
  of them per call, fixed at construction)."""

  def __init__(self, rows: int):
    self.rows = rows

  def zeros(self, info):
    return {'x': jnp.zeros((self.rows, info.d_in + int(info.has_bias)), jnp.float32),
            'dy': jnp.zeros((self.rows, info.d_out), jnp.float32)}

  def forward(self, call):
    x = call.input_rows()
    if call.has_bias:
      x = jnp.concatenate([x, jnp.ones((x.shape[0], 1), x.dtype)], axis=1)
    return {'x': x}

  def backward(self, fwd, dy_rows, g_scale, devices):
    return {'x': fwd['x'], 'dy': dy_rows.astype(jnp.float32)}

  def finalize(self, ct, info):
    return {'a_sketches': ct['x'], 'g_sketches': ct['dy']}


@contextlib.contextmanager
def lazy():
  many, finite = factors.refresh_relative_many, kronecker.all_finite

  def sketched_many(jobs, **rule):
    def sketch(v):  # (S, N, d) rows -> (S, K, d) sketches
      if v.shape[-2] <= K:
        return v
      n = v.shape[-2]
      signs = jnp.where(jnp.arange(n * K).reshape(n, K) % 3 == 1, -1.0, 1.0)
      return jnp.einsum('nk,snd->skd', signs, v) / np.sqrt(n)
    return many([(p, rms, sketch(v), keep) for p, rms, v, keep in jobs], **rule)

  factors.refresh_relative_many = sketched_many
  kronecker.all_finite = lambda stats, sq_norms: finite(sq_norms)
  try:
    yield
  finally:
    factors.refresh_relative_many, kronecker.all_finite = many, finite


def time_task(task: str, repeats: int) -> dict:
  params, batch, loss_fn = case(task)
  fns, carries = {}, {}

  def add(name, opt, kind):
    step = make_step(loss_fn, opt, kind)
    fns[name] = lambda c, step=step: step(c[0], c[1], *batch)[:2]
    carries[name] = (params, opt.init(params))

  add('lamb', optax.lamb(1e-2), None)
  add('mkor', mkor_optax.mkor(1e-2, weight_decay=0.0), mkor_optax.SKETCH)
  rows = batch[0].shape[0]  # one row per example in these Dense chains
  with lazy():  # traced (and compiled) inside: the patches are in the program
    add('mkor, sketches on refresh steps', mkor_optax.mkor(1e-2, weight_decay=0.0), Rows(rows))
    name = 'mkor, sketches on refresh steps'
    carries[name] = jax.block_until_ready(fns[name](carries[name]))
  for name in fns:
    carries[name] = jax.block_until_ready(fns[name](fns[name](carries[name])))
  n = block_steps(fns['lamb'], carries['lamb'], 7)
  per = interleaved(fns, carries, n, repeats)
  return {name: per[name] / per['lamb'] for name in per} | {'lamb_ms': per['lamb'] * 1e3}


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument('--tasks', default='autoencoder,mlp64,64,128')
  ap.add_argument('--repeats', type=int, default=15)
  args = ap.parse_args(argv)
  print(machine())
  for task in args.tasks.split(','):
    print(task, {k: round(v, 3) for k, v in time_task(task, args.repeats).items()}, flush=True)


if __name__ == '__main__':
  main()
