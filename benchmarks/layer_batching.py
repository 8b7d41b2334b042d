"""What batching same-shaped layers into one stacked product would save.

MKOR's per-layer work is two products (``L^-1 G R^-1``), a norm rescale and,
on refresh steps, two rank-1 Sherman-Morrison updates (``refresh_inverse``). Layers of the same
shape could share one batched product instead of one product each. This
measures that upper bound before building it: the per-layer work of MKOR on
a model's layer shapes, written once layer by layer and once grouped by
shape (stacked, one batched matmul per group), each in one jitted function,
timed side by side in interleaved blocks (medians), next to the model's LAMB
train step for scale.

    python benchmarks/layer_batching.py [--task autoencoder] [--repeats 9]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(__file__))
from compare import build  # noqa: E402
from common import interleaved  # noqa: E402
from mkor_optax.mkor import GAMMA, refresh_inverse  # noqa: E402

# the library's own refresh (batched over leading axes), at the defaults
REFRESH = dict(gamma=GAMMA, zeta=0.9, epsilon=2.0)


def precondition(l, g, r, refresh, a, b):
  """One layer's (or a stack's) MKOR work: optional refresh, two products and
  the norm rescale (the direction keeps the gradient's norm)."""
  if refresh:
    l, r = refresh_inverse(l, b, **REFRESH), refresh_inverse(r, a, **REFRESH)
  u = l @ g @ r
  scale = jnp.sqrt(jnp.sum(g * g, axis=(-2, -1), keepdims=True)
                   / jnp.maximum(jnp.sum(u * u, axis=(-2, -1), keepdims=True), 1e-30))
  return u * scale, l, r


def layer_shapes(params):
  """(d_out, d_in + 1) of every 2-D kernel with a bias, in tree order
  (multi-axis attention kernels are left out)."""
  shapes = []
  for layer in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, dict) and 'kernel' in x):
    if isinstance(layer, dict) and layer['kernel'].ndim == 2 and 'bias' in layer:
      d_in, d_out = layer['kernel'].shape
      shapes.append((d_out, d_in + 1))
  return shapes


def make_inputs(shapes, seed=0):
  rng = np.random.default_rng(seed)
  def spd(d):
    m = rng.standard_normal((d, d)) / np.sqrt(d)
    return jnp.asarray(np.eye(d) + 0.1 * m @ m.T, jnp.float32)
  return [dict(l=spd(o), r=spd(i), g=jnp.asarray(rng.standard_normal((o, i)), jnp.float32),
               a=jnp.asarray(rng.standard_normal(i) / np.sqrt(i), jnp.float32),
               b=jnp.asarray(rng.standard_normal(o) / np.sqrt(o), jnp.float32)) for o, i in shapes]


def separate_fn(refresh):
  def f(layers):
    out = []
    for x in layers:
      u, l, r = precondition(x['l'], x['g'], x['r'], refresh, x['a'], x['b'])
      out.append(dict(x, g=u, l=l, r=r))
    return out
  return jax.jit(f)


def grouped_fn(shapes, refresh):
  groups = defaultdict(list)
  for i, s in enumerate(shapes):
    groups[s].append(i)
  def f(layers):
    out = list(layers)
    for idx in groups.values():
      st = {k: jnp.stack([layers[i][k] for i in idx]) for k in layers[idx[0]]}
      u, l, r = precondition(st['l'], st['g'], st['r'], refresh, st['a'], st['b'])
      for j, i in enumerate(idx):
        out[i] = dict(layers[i], g=u[j], l=l[j], r=r[j])
    return out
  return jax.jit(f), len(groups)


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument('--task', default='autoencoder')
  ap.add_argument('--repeats', type=int, default=9)
  ap.add_argument('--n', type=int, default=200)
  args = ap.parse_args(argv)
  params, make_iter, loss_fn, _ = build(args.task, quick=True)
  shapes = layer_shapes(params)
  batch = next(make_iter())
  lamb = optax.lamb(1e-2)

  @jax.jit
  def lamb_step(c):
    p, s = c
    g = jax.grad(loss_fn)(p, *batch)
    u, s = lamb.update(g, s, p)
    return optax.apply_updates(p, u), s

  fns, carries = {'lamb train step': lamb_step}, {'lamb train step': (params, lamb.init(params))}
  n_groups = None
  for refresh in (False, True):
    tag = 'with refresh' if refresh else 'no refresh'
    fns[f'separate, {tag}'] = separate_fn(refresh)
    fns[f'grouped, {tag}'], n_groups = grouped_fn(shapes, refresh)
    for k in (f'separate, {tag}', f'grouped, {tag}'):
      carries[k] = make_inputs(shapes)
  med = interleaved(fns, carries, args.n, args.repeats)
  base = med['lamb train step']
  print(f'{args.task}: {len(shapes)} layers {shapes}, {n_groups} shape groups; '
        f'medians of {args.repeats} interleaved blocks of {args.n} calls')
  print('| part | ms | / LAMB train step |')
  print('|---|---|---|')
  for k, v in med.items():
    print(f'| {k} | {1e3 * v:.3f} | {v / base:.3f} |')
  for tag in ('no refresh', 'with refresh'):
    saved = med[f'separate, {tag}'] - med[f'grouped, {tag}']
    print(f'batching saves {1e3 * saved:.3f} ms per step {tag} '
          f'({saved / base:+.3f} of a LAMB step)')


if __name__ == '__main__':
  main()
