"""How cheap can an MKOR step be on XLA:CPU? A hand-written minimal MKOR
beside the library's and LAMB, timed in one process.

The minimal step keeps only what the method needs, for models made of
``nn.Dense`` layers:

* capture: each Dense call's input rows are recorded and a zero
  perturbation is added to its output (``nn.intercept_methods``); the
  perturbations' gradients are the output-gradient rows ``dL/dy``;
* statistics: ``k`` random-sign sketches per side, ``a = S^T [x, 1] /
  sqrt(N)`` and ``g = S'^T (N dL/dy) / sqrt(N)``, formed **inside** the
  refresh's ``lax.cond`` (so only on refresh steps), from a counter hash;
* refresh, every ``inv_freq`` steps, of every side in one ``lax.cond``:
  the inverse of ``F <- gamma F + (1 - gamma) V^T V / k`` by Woodbury,
  ``P <- (P - P V^T (c I + V P V^T)^-1 V P) / gamma`` with ``c = gamma k /
  (1 - gamma)``, the sketches divided by the root of the side's mean
  eigenvalue (scale-free, as the library's factors are, without its
  running scale, stabiliser, checks and warnings);
* preconditioning ``P_in [G; g_b] P_out``, rescaled to the gradient's norm;
* then ``optax.lamb``.

What it leaves out (the library has each for a reason: checks of bad
input and non-finite steps, warnings, data parallel, stacked and scanned
layers, low-rank and sharded factors, convolutions, checkpoints) is cost
the library pays beyond the method. So the ratio of this step to LAMB's is
a floor for the library's: how far its cost marks can be reached by leaner
code on these models, and how far not at all.

    python benchmarks/floor.py [--tasks autoencoder,mlp64,64,128] [--repeats 7]

Only models whose sides are all narrower than 256 qualify: from there on
default ``mkor`` keeps low-rank inverses, which the minimal step does not.

Writes results/bench/floor.md and floor.json.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'examples'))
import mkor_optax  # noqa: E402
from common import block_steps, interleaved, make_step  # noqa: E402
from step_cost import case, machine  # noqa: E402

K, GAMMA, INV_FREQ = 4, 0.95, 7
# default mkor's sides below this width are dense inverses, as the minimal step's
DENSE_BELOW = inspect.signature(mkor_optax.mkor).parameters['low_rank_min_dim'].default


def capturing(loss_fn):
  """``grad(params, eps, *batch) -> (loss, grads, rows)``: ``rows`` maps each
  Dense call (in call order) to its input rows; ``grads`` holds the
  parameters' and the perturbations' gradients (the ``dL/dy`` rows)."""
  def run(params, eps, *batch):
    rows, calls = [], iter(range(10 ** 9))

    def tap(next_fun, args, kwargs, context):
      if not isinstance(context.module, nn.Dense) or context.method_name != '__call__':
        return next_fun(*args, **kwargs)
      x = args[0]
      rows.append(x.reshape(-1, x.shape[-1]))
      y = next_fun(*args, **kwargs)
      i = next(calls)
      return y if eps is None else y + eps[i].reshape(y.shape)

    with nn.intercept_methods(tap):
      loss = loss_fn(params, *batch)
    return loss, rows

  return run


def dense_paths(params) -> list:
  """The Dense layers' parameter dicts in call order (a chain: Dense_0, ...)."""
  flat = {k: v for k, v in params.items() if 'kernel' in v}
  return sorted(flat, key=lambda k: int(k.split('_')[-1]))


def signs(count, rows, side):
  idx = jnp.arange(rows * K, dtype=jnp.uint32).reshape(rows, K) * jnp.uint32(2) + jnp.uint32(side)
  x = idx + (count.astype(jnp.uint32) * jnp.uint32(0x9E3779B9))
  x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
  x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
  return 1.0 - 2.0 * ((x ^ (x >> 16)) >> 31).astype(jnp.float32)


def woodbury(p, v):
  """Inverse of ``gamma P^-1 + (1 - gamma) v^T v / k`` from ``P``, ``v`` ``(k, d)``,
  ``v`` first put in the units of the side's mean eigenvalue."""
  v = v / jnp.sqrt(jnp.maximum(jnp.sum(v * v) / (K * v.shape[1]), 1e-30))
  pv = v @ p  # (k, d); P symmetric
  core = (GAMMA * K / (1 - GAMMA)) * jnp.eye(K) + pv @ v.T
  return (p - pv.T @ jnp.linalg.solve(core, pv)) / GAMMA


def minimal_mkor(loss_fn, params, batch, lazy=True, refresh=True):
  """``(step, state)`` of the minimal MKOR + LAMB step (see the module);
  ``lazy=False``: the sketches formed every step, outside the refresh's
  ``lax.cond``; ``refresh=False``: no refresh (the preconditioning alone)."""
  names = dense_paths(params)
  run = capturing(loss_fn)
  _, rows0 = run(params, None, *batch)
  d_outs = [params[n]['kernel'].shape[1] for n in names]
  lamb = optax.lamb(1e-2)
  state = {'count': jnp.zeros((), jnp.int32),
           'p_in': [jnp.eye(params[n]['kernel'].shape[0] + 1) for n in names],
           'p_out': [jnp.eye(d) for d in d_outs], 'lamb': lamb.init(params)}

  @jax.jit
  def step(params, state, *batch):
    eps = [jnp.zeros((r.shape[0], d), jnp.float32) for r, d in zip(rows0, d_outs)]
    (loss, rows), (grads, dys) = jax.value_and_grad(run, argnums=(0, 1), has_aux=True)(params, eps, *batch)
    count = state['count']

    def sketches():
      n = rows[0].shape[0]
      s_in, s_out = signs(count, n, 0), signs(count, n, 1)
      a = [jnp.concatenate([s_in.T @ x, jnp.sum(s_in, 0)[:, None]], 1) / np.sqrt(n) for x in rows]
      g = [(s_out.T @ dy) * np.sqrt(n) for dy in dys]
      return a, g

    def refreshed(p_in, p_out, a, g):
      return [woodbury(p, v) for p, v in zip(p_in, a)], [woodbury(p, v) for p, v in zip(p_out, g)]

    if not refresh:
      p_in, p_out = state['p_in'], state['p_out']
    elif lazy:
      p_in, p_out = jax.lax.cond(count % INV_FREQ == 0, lambda pi, po: refreshed(pi, po, *sketches()),
                                 lambda pi, po: (pi, po), state['p_in'], state['p_out'])
    else:
      a, g = sketches()
      p_in, p_out = jax.lax.cond(count % INV_FREQ == 0, lambda pi, po: refreshed(pi, po, a, g),
                                 lambda pi, po: (pi, po), state['p_in'], state['p_out'])
    pre = dict(grads)
    for n, pi, po in zip(names, p_in, p_out):
      g_aug = jnp.concatenate([grads[n]['kernel'], grads[n]['bias'][None]], 0)
      u = pi @ g_aug @ po
      u = u * (jnp.linalg.norm(g_aug) / jnp.maximum(jnp.linalg.norm(u), 1e-30))
      pre[n] = {'kernel': u[:-1], 'bias': u[-1]}
    updates, lamb_state = lamb.update(pre, state['lamb'], params)
    return (optax.apply_updates(params, updates),
            {'count': count + 1, 'p_in': p_in, 'p_out': p_out, 'lamb': lamb_state}, loss)

  return step, state


def time_task(task: str, repeats: int) -> dict:
  params, batch, loss_fn = case(task)
  bad = [k for k, v in params.items() if set(v) != {'kernel', 'bias'}]
  if bad:
    raise SystemExit(f'floor.py: {task} has layers other than Dense: {bad}')
  wide = [k for k, v in params.items() if max(v['kernel'].shape) + 1 > DENSE_BELOW]
  if wide:  # the library keeps low-rank inverses there: a dense floor says nothing about its cost
    raise SystemExit(f'floor.py: {task} has sides of width >= {DENSE_BELOW} ({wide}), where the '
                     'library keeps low-rank inverses; the minimal step is dense only')
  fns, carries = {}, {}

  def add(name, step, state):
    fns[name] = lambda c, step=step: step(c[0], c[1], *batch)[:2]
    carries[name] = (params, state)

  lamb = optax.lamb(1e-2)
  add('lamb', make_step(loss_fn, lamb), lamb.init(params))
  opt = mkor_optax.mkor(1e-2, weight_decay=0.0)
  add('mkor', make_step(loss_fn, opt, mkor_optax.SKETCH), opt.init(params))
  add('minimal', *minimal_mkor(loss_fn, params, batch, lazy=True))
  add('minimal, sketches every step', *minimal_mkor(loss_fn, params, batch, lazy=False))
  add('minimal, no refresh', *minimal_mkor(loss_fn, params, batch, refresh=False))
  step, state = minimal_mkor(loss_fn, params, batch)
  # the minimal step's loss is the model's (the perturbations add zeros)
  np.testing.assert_allclose(float(step(params, state, *batch)[2]), float(loss_fn(params, *batch)), rtol=1e-5)
  for name in fns:
    carries[name] = jax.block_until_ready(fns[name](fns[name](carries[name])))
  n = block_steps(fns['lamb'], carries['lamb'], INV_FREQ)  # whole refresh periods, >= 0.2 s of LAMB
  per = interleaved(fns, carries, n, repeats)
  return {name: per[name] / per['lamb'] for name in per} | {'lamb_ms': per['lamb'] * 1e3}


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument('--tasks', default='autoencoder,mlp64,64,128')
  ap.add_argument('--repeats', type=int, default=7)
  ap.add_argument('--out', default=os.path.join(os.path.dirname(__file__), '..', 'results', 'bench', 'floor'))
  args = ap.parse_args(argv)
  rows = {}
  for task in args.tasks.split(','):
    rows[task] = time_task(task, args.repeats)
    print(task, {k: round(v, 3) for k, v in rows[task].items()}, flush=True)
  names = [k for k in next(iter(rows.values())) if k not in ('lamb', 'lamb_ms')]
  lines = [f'Per-step cost against LAMB of a hand-written minimal MKOR (benchmarks/floor.py: Dense layers only; '
           f'Sketch({K}) formed inside the refresh, Woodbury refresh every {INV_FREQ} steps, no checks, '
           f'warnings or running scale) beside the library\'s default `mkor`, in one process, interleaved '
           f'blocks, median of {args.repeats} ({machine()}); `python benchmarks/floor.py --tasks "{args.tasks}"`.',
           '', '| task | ' + ' | '.join(names) + ' | LAMB ms/step |', '|---' * (len(names) + 2) + '|']
  for task, r in rows.items():
    lines.append(f'| {task} | ' + ' | '.join(f'{r[n]:.2f}' for n in names) + f" | {r['lamb_ms']:.2f} |")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out + '.md', 'w') as f:
    f.write('\n'.join(lines) + '\n')
  with open(args.out + '.json', 'w') as f:
    json.dump({'rows': rows, 'command': f'python benchmarks/floor.py --tasks "{args.tasks}"'}, f, indent=1)
  print('\n'.join(lines))


if __name__ == '__main__':
  main()
