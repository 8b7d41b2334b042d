"""Wide layers: per-step time and optimizer memory of MKOR with dense and
low-rank-plus-identity factors, against LAMB, side by side in one process.

1. a d-d-d MLP (two d x d Dense layers with bias, tanh) with batch 256 for
   d = 256 ... 4096 (``--widths``);
2. a small VAE on 28x28 images with a 784-wide decoder output, batch 32.

Every optimizer's jitted train step (value_and_grad + update + apply, state
donated) is timed in interleaved blocks and the median block is reported, as
a ratio to LAMB's. Memory is the optimizer state's bytes over the
parameters' bytes (LAMB's two moments included in MKOR's, since MKOR runs on
LAMB).

    python benchmarks/width_sweep.py [--repeats 5] [--out results/width_sweep]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'examples'))
import mkor_optax  # noqa: E402
from common import interleaved  # noqa: E402


class DDD(nn.Module):
  """The d-d-d MLP: two d x d Dense layers (the input is d wide)."""

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    return nn.Dense(d)(nn.tanh(nn.Dense(d)(x)))


class VAE(nn.Module):
  """784-256-(2 x 32) encoder, 32-256-784 decoder (Bernoulli logits)."""
  hidden: int = 256
  latent: int = 32

  @nn.compact
  def __call__(self, x, eps):
    h = nn.relu(nn.Dense(self.hidden)(x))
    mu, logvar = nn.Dense(self.latent)(h), nn.Dense(self.latent)(h)
    z = mu + jnp.exp(0.5 * logvar) * eps
    logits = nn.Dense(x.shape[-1])(nn.relu(nn.Dense(self.hidden)(z)))
    return logits, mu, logvar


def ddd_loss(model):
  def loss_fn(params, x, y):
    return jnp.mean(jnp.sum((model.apply({'params': params}, x) - y) ** 2, axis=-1))
  return loss_fn


def vae_loss(model):
  def loss_fn(params, x, eps):
    logits, mu, logvar = model.apply({'params': params}, x, eps)
    rec = jnp.sum(optax.sigmoid_binary_cross_entropy(logits, x), axis=-1)
    kl = 0.5 * jnp.sum(jnp.exp(logvar) + mu ** 2 - 1.0 - logvar, axis=-1)
    return jnp.mean(rec + kl)
  return loss_fn


def digits_28(n: int, seed: int = 0):
  """scikit-learn's 8x8 digits resized to 28x28, flattened to 784, in [0, 1]."""
  from sklearn.datasets import load_digits
  x = load_digits().images[np.random.default_rng(seed).integers(0, 1797, n)] / 16.0
  return np.asarray(jax.image.resize(jnp.asarray(x, jnp.float32), (n, 28, 28), 'linear')
                    ).reshape(n, 784).clip(0, 1)


def optimizers(ranks: Sequence[int], dense: bool) -> dict:
  out = {'lamb': (optax.lamb(1e-3), False)}
  if dense:
    out['mkor dense'] = (mkor_optax.mkor(1e-3, low_rank=None), True)
  for k in ranks:
    out[f'mkor rank {k}'] = (mkor_optax.mkor(1e-3, low_rank=k, low_rank_min_dim=0), True)
  return out


def measure(model, loss_fn, batch, opts: dict, steps: int, repeats: int, n_inputs: int) -> dict:
  params = model.init(jax.random.PRNGKey(0), *batch[:n_inputs])['params']
  grad_mkor = mkor_optax.value_and_grad(loss_fn)
  grad_plain = jax.value_and_grad(loss_fn)
  fns, carries, memory = {}, {}, {}
  p_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  for name, (opt, captured) in opts.items():
    def step(carry, opt=opt, captured=captured):
      p, s = carry
      if captured:
        _, g, stats = grad_mkor(p, *batch)
        u, s = opt.update(g, s, p, stats=stats)
      else:
        _, g = grad_plain(p, *batch)
        u, s = opt.update(g, s, p)
      return optax.apply_updates(p, u), s
    fns[name] = jax.jit(step, donate_argnums=0)
    state = opt.init(params)
    memory[name] = sum(x.nbytes for x in jax.tree.leaves(state)) / p_bytes
    carries[name] = (jax.tree.map(jnp.copy, params), state)
  med = interleaved(fns, carries, steps, repeats)
  return {name: {'ms': 1e3 * med[name], 'ratio': med[name] / med['lamb'],
                 'state_over_params': memory[name]} for name in opts}


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument('--widths', default='256,512,1024,2048,4096')
  ap.add_argument('--ranks', default='8,16,32')
  ap.add_argument('--batch', type=int, default=256)
  ap.add_argument('--repeats', type=int, default=5)
  ap.add_argument('--dense-max', type=int, default=2048, help='widest d timed with dense factors')
  ap.add_argument('--out', default='results/width_sweep')
  args = ap.parse_args(argv)
  ranks = [int(k) for k in args.ranks.split(',')]
  rows = []
  for d in [int(w) for w in args.widths.split(',')]:
    x = jax.random.normal(jax.random.PRNGKey(d), (args.batch, d))
    y = jnp.tanh(x @ jax.random.normal(jax.random.PRNGKey(d + 1), (d, d)) / np.sqrt(d))
    steps = max(2, int(20 * (256 / d) ** 2))
    res = measure(DDD(), ddd_loss(DDD()), (x, y), optimizers(ranks, d <= args.dense_max),
                  steps, args.repeats, n_inputs=1)
    rows.append({'task': f'd-d-d MLP d={d} batch {args.batch}', 'width': d, 'results': res})
    print(rows[-1]['task'], {k: round(v['ratio'], 3) for k, v in res.items()}, flush=True)
  x = jnp.asarray(digits_28(32))
  eps = jax.random.normal(jax.random.PRNGKey(0), (32, 32))
  res = measure(VAE(), vae_loss(VAE()), (x, eps), optimizers(ranks, True), 20, args.repeats,
                n_inputs=2)
  rows.append({'task': 'VAE 784-256-32-256-784 batch 32', 'width': 784, 'results': res})
  print(rows[-1]['task'], {k: round(v['ratio'], 3) for k, v in res.items()}, flush=True)

  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'width_sweep.json'), 'w') as f:
    json.dump({'jax': jax.__version__, 'repeats': args.repeats, 'rows': rows}, f, indent=2)
  names = list(optimizers(ranks, True))
  lines = ['| task | LAMB ms/step | ' + ' | '.join(f'{n}: step / LAMB (state / params)'
                                                   for n in names[1:]) + ' |',
           '|---' * len(names) + '|---|']
  for r in rows:
    cells = []
    for n in names[1:]:
      v = r['results'].get(n)
      cells.append('not run' if v is None else f"{v['ratio']:.2f} ({v['state_over_params']:.2f})")
    lines.append(f"| {r['task']} | {r['results']['lamb']['ms']:.2f} | " + ' | '.join(cells) + ' |')
  lines.append(f"\nLAMB's state / params: {rows[0]['results']['lamb']['state_over_params']:.2f}.")
  table = '\n'.join(lines)
  with open(os.path.join(args.out, 'width_sweep.md'), 'w') as f:
    f.write(table + '\n')
  print(table)
  try:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
  except ImportError:
    return
  mlp = [r for r in rows if r['task'].startswith('d-d-d')]
  fig, ax = plt.subplots(figsize=(6, 4))
  for n in names[1:]:
    pts = [(r['width'], r['results'][n]['ratio']) for r in mlp if n in r['results']]
    ax.plot(*zip(*pts), marker='o', label=n)
  ax.axhline(1.2, color='gray', ls='--', lw=1, label='target 1.2x')
  ax.set_xscale('log', base=2)
  ax.set_yscale('log')
  ax.set_xlabel('width d (d-d-d MLP, batch 256)')
  ax.set_ylabel('train-step time / LAMB')
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, 'width_sweep.png'), dpi=120)


if __name__ == '__main__':
  main()
