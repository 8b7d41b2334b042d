"""An unjitted training loop (as flax's VAE example writes it): MKOR vs LAMB per step.

Neither step is jitted: ``mkor_optax.value_and_grad`` (or ``jax.value_and_grad``)
and ``opt.update`` are called eagerly, as in flax's examples/vae. The two
optimizers run side by side in one process, interleaved in blocks, and the
table reports the median seconds per step over the blocks (after each
optimizer's first steps, which compile) and their ratio.

The model has the example's shape on the bundled digits: an MLP VAE 64 -> 500
-> (20, 20) -> 500 -> 64, batch 32, a fresh PRNG key per step.

    python benchmarks/eager.py [--blocks 5] [--steps 4]
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import mkor_optax


class VAE(nn.Module):
  @nn.compact
  def __call__(self, x, key):
    h = nn.relu(nn.Dense(500)(x))
    mean, logvar = nn.Dense(20)(h), nn.Dense(20)(h)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    return nn.Dense(x.shape[-1])(nn.relu(nn.Dense(500)(z))), mean, logvar


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--blocks', type=int, default=5)
  ap.add_argument('--steps', type=int, default=4, help='timed steps per block')
  args = ap.parse_args()
  x = jnp.asarray(load_digits().data[:32] / 16.0, jnp.float32)
  model = VAE()
  params0 = model.init(jax.random.PRNGKey(0), x, jax.random.PRNGKey(1))['params']

  def loss(params, x, key):
    logits, mean, logvar = model.apply({'params': params}, x, key)
    bce = optax.sigmoid_binary_cross_entropy(logits, x).sum(-1).mean()
    kld = -0.5 * jnp.mean(jnp.sum(1 + logvar - mean ** 2 - jnp.exp(logvar), -1))
    return bce + kld

  def lamb_step(params, state, key):
    _, grads = jax.value_and_grad(loss)(params, x, key)
    updates, state = runs['lamb']['opt'].update(grads, state, params)
    return optax.apply_updates(params, updates), state

  def mkor_step(params, state, key):
    _, grads, stats = mkor_optax.value_and_grad(loss)(params, x, key)
    updates, state = runs['mkor']['opt'].update(grads, state, params, stats=stats)
    return optax.apply_updates(params, updates), state

  runs = {'lamb': {'opt': optax.lamb(1e-3), 'step': lamb_step},
          'mkor': {'opt': mkor_optax.mkor(1e-3), 'step': mkor_step}}
  for r in runs.values():
    r['carry'] = (params0, r['opt'].init(params0))
    r['times'] = []
  key = jax.random.PRNGKey(2)
  for block in range(args.blocks + 1):
    for name, r in runs.items():
      start = time.perf_counter()
      for _ in range(args.steps):
        key, sub = jax.random.split(key)
        r['carry'] = r['step'](*r['carry'], sub)
      jax.block_until_ready(r['carry'])
      if block > 0:  # block 0 compiles
        r['times'].append((time.perf_counter() - start) / args.steps)
  med = {name: float(np.median(r['times'])) for name, r in runs.items()}
  print('| optimizer | s/step (median of blocks) | / LAMB |')
  print('|---|---|---|')
  for name in runs:
    print(f'| {name} | {med[name]:.4f} | {med[name] / med["lamb"]:.2f} |')


if __name__ == '__main__':
  main()
