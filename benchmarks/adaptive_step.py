"""Does the quadratic-model step (mkor_optax.scale_by_quadratic_step) make each
step count? Digits autoencoder, steps to LAMB's final loss, over seeds.

    python benchmarks/adaptive_step.py [--steps 500] [--seeds 0,1,2] [--configs 'a;b'] [--tag t]

The ``sketch`` rows take MKOR's statistics as ``mkor_optax.SKETCH`` (4
random-sign sketches per layer) instead of the batch mean.

Writes results/adaptive_step/adaptive_step.{json,md}. Steps are deterministic
for a seed; ms/step is the mean over the run after compilation (this shared
2-core machine: ratios only within one run).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'examples'))
import mkor_optax  # noqa: E402
from common import Autoencoder, autoencoder_loss, batches, load_digits  # noqa: E402
from compare import first_at_or_below, smooth  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
FISHER = 'sigmoid_cross_entropy'  # the autoencoder's Bernoulli likelihood


def configs():
  quad = mkor_optax.scale_by_quadratic_step
  return {
      'lamb (lr 0.01)': (optax.lamb(1e-2, weight_decay=0.0), None, False),
      'mkor + lamb (lr 0.01)': (mkor_optax.mkor(1e-2, weight_decay=0.0), mkor_optax.RANK1, False),
      'kfac + lamb (lr 0.01)': (mkor_optax.kfac(1e-2, weight_decay=0.0), mkor_optax.COVARIANCE,
                                False),
      'gradient + quadratic step': (quad(damping=0.1), None, True),
      'mkor + quadratic step': (optax.chain(mkor_optax.scale_by_mkor(), quad(damping=0.1)),
                                mkor_optax.RANK1, True),
      'mkor + lamb direction + quadratic step': (
          optax.chain(mkor_optax.scale_by_mkor(), optax.scale_by_adam(),
                      optax.scale_by_trust_ratio(), quad(damping=0.1)), mkor_optax.RANK1, True),
      'kfac + quadratic step': (optax.chain(mkor_optax.scale_by_kfac(), quad(damping=0.1)),
                                mkor_optax.COVARIANCE, True),
      'mkor sketch + lamb (lr 0.01)': (mkor_optax.mkor(1e-2, weight_decay=0.0), mkor_optax.SKETCH,
                                       False),
      'mkor sketch + quadratic step': (optax.chain(mkor_optax.scale_by_mkor(), quad(damping=0.1)),
                                       mkor_optax.SKETCH, True),
      # the scale-free factors' relative damping under the quadratic step
      # (None: the absolute form of earlier releases)
      **{f'mkor sketch damping {d} + quadratic step': (
          optax.chain(mkor_optax.scale_by_mkor(damping=d), quad(damping=0.1)), mkor_optax.SKETCH, True)
         for d in (None, 1.0, 0.25, 0.0625, 0.015625)},
      **{f'kfac relative {d:g} + quadratic step': (
          optax.chain(mkor_optax.scale_by_kfac(damping=d, relative_damping=True), quad(damping=0.1)),
          mkor_optax.COVARIANCE, True) for d in (0.1, 0.01)},
      'kfac absolute 1e-3 + quadratic step': (
          optax.chain(mkor_optax.scale_by_kfac(damping=1e-3, relative_damping=False), quad(damping=0.1)),
          mkor_optax.COVARIANCE, True),
      'mkor sketch + lamb direction + quadratic step': (
          optax.chain(mkor_optax.scale_by_mkor(), optax.scale_by_adam(),
                      optax.scale_by_trust_ratio(), quad(damping=0.1)), mkor_optax.SKETCH, True),
      # The recipe (mkor_optax.adaptive_mkor + adaptive_inputs): the natural
      # gradient (no per-layer rescale) from the true Fisher's statistics
      # (targets sampled from the model), against the same from the labels'
      'adaptive_mkor (true Fisher)': (mkor_optax.adaptive_mkor(), mkor_optax.SKETCH, True, FISHER),
      'adaptive_mkor (empirical Fisher)': (mkor_optax.adaptive_mkor(), mkor_optax.SKETCH, True),
      'kfac relative 0.1 + quadratic step (true Fisher)': (
          optax.chain(mkor_optax.scale_by_kfac(damping=0.1, relative_damping=True), quad(damping=1e-3)),
          mkor_optax.COVARIANCE, True, FISHER),
      **{f'adaptive_mkor {name} (true Fisher)': (mkor_optax.adaptive_mkor(**kw), mkor_optax.SKETCH,
                                                 True, FISHER)
         for name, kw in (('damping 0.25', dict(damping=0.25)), ('damping 0.015625', dict(damping=0.015625)),
                          ('inv_freq 10', dict(inv_freq=10)), ('inv_freq 3', dict(inv_freq=3)),
                          ('inv_freq 2', dict(inv_freq=2)), ('gamma 0.95', dict(gamma=0.95)))},
      'adaptive_mkor Sketch(8) (true Fisher)': (mkor_optax.adaptive_mkor(), mkor_optax.Sketch(8), True,
                                                FISHER),
  }


def run(opt, kind, quad, seed, steps, fisher=None):
  (x, y), _ = load_digits()
  model = Autoencoder()
  loss_fn = autoencoder_loss(model)
  params = model.init(jax.random.PRNGKey(seed), x[:2])['params']
  grad_fn = mkor_optax.value_and_grad(loss_fn, kind=kind) if kind else None

  @jax.jit
  def step(p, s, xb, yb, key):
    if quad and kind:  # the recipe's inputs (adaptive_inputs), as a user writes them
      flat = xb.reshape(xb.shape[0], -1)
      bce = lambda logits: jnp.mean(jnp.sum(optax.sigmoid_binary_cross_entropy(logits, flat), -1))
      # K-FAC's chain takes the statistics every step (stats=), adaptive_mkor lazily
      loss, g, extra = mkor_optax.adaptive_inputs(lambda q: model.apply({'params': q}, xb), bce, p, key,
                                                  fisher=fisher, kind=kind,
                                                  lazy=kind != mkor_optax.COVARIANCE)
      u, s = opt.update(g, s, p, **extra)
      return optax.apply_updates(p, u), s, loss
    if kind:
      loss, g, stats = grad_fn(p, xb, yb)
      extra = {'stats': stats}
    else:
      loss, g = jax.value_and_grad(loss_fn)(p, xb, yb)
      extra = {}
    if quad:
      flat = xb.reshape(xb.shape[0], -1)
      bce = lambda logits: jnp.mean(jnp.sum(optax.sigmoid_binary_cross_entropy(logits, flat), -1))
      extra.update(grad=g, value=loss, value_fn=lambda q: loss_fn(q, xb, yb),
                   curvature=mkor_optax.gauss_newton(
                       lambda q: model.apply({'params': q}, xb), bce))
    u, s = opt.update(g, s, p, **extra)
    return optax.apply_updates(p, u), s, loss

  state = opt.init(params)
  it = batches(x, y, 256, seed=seed)
  b = next(it)
  keys = jax.random.split(jax.random.PRNGKey(1000 + seed), steps)
  jax.block_until_ready(step(params, state, *b, keys[0]))
  losses = []
  t0 = time.perf_counter()
  for i in range(steps):
    params, state, loss = step(params, state, *b, keys[i])
    losses.append(float(loss))
    b = next(it)
  return np.array(losses), (time.perf_counter() - t0) / steps


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument('--steps', type=int, default=500)
  ap.add_argument('--seeds', default='0,1,2')
  ap.add_argument('--configs', default=None, help="';'-separated subset (LAMB always runs)")
  ap.add_argument('--tag', default=None, help='suffix of the output names')
  ap.add_argument('--out', default=str(ROOT / 'results' / 'adaptive_step'))
  args = ap.parse_args(argv)
  seeds = [int(s) for s in args.seeds.split(',')]
  chosen = configs()
  if args.configs:
    unknown = set(args.configs.split(';')) - set(chosen)
    if unknown:
      ap.error(f'unknown configurations {sorted(unknown)}; choose from {sorted(chosen)}')
    chosen = {k: v for k, v in chosen.items()
              if k == 'lamb (lr 0.01)' or k in args.configs.split(';')}
  rows = {name: {'steps': [], 'ms': [], 'final': []} for name in chosen}
  for seed in seeds:
    curves = {}
    for name, (opt, kind, quad, *fisher) in chosen.items():
      losses, sec = run(opt, kind, quad, seed, args.steps, *fisher)
      curves[name] = smooth(losses)
      rows[name]['ms'].append(1e3 * sec)
      rows[name]['final'].append(float(curves[name][-1]))
    target = curves['lamb (lr 0.01)'][-1]
    for name, c in curves.items():
      hit = first_at_or_below(c, target)
      rows[name]['steps'].append(None if hit is None else hit + 1)  # steps taken, as elsewhere
  text = render(rows, args.steps, seeds)
  print(text)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  name = 'adaptive_step' + ('_' + args.tag if args.tag else '')
  (out / f'{name}.md').write_text(text + '\n')
  (out / f'{name}.json').write_text(json.dumps(rows, indent=1))


def render(rows, steps, seeds):
  """The markdown table of ``rows`` (name -> steps, final, ms per seed)."""
  lines = [f'Digits autoencoder, batch 256, {steps} steps, seeds {seeds}; target = LAMB\'s '
           'final loss (EMA 0.9) of the same seed.', '',
           '| optimizer | steps to target, per seed | final loss (mean ± std) | ms/step (mean) | ms/step / LAMB |',
           '|---|---|---|---|---|']
  lamb_ms = np.mean(rows['lamb (lr 0.01)']['ms'])
  for name, r in rows.items():
    steps = ' / '.join('-' if s is None else str(s) for s in r['steps'])
    lines.append(f'| {name} | {steps} | {np.mean(r["final"]):.3f} ± {np.std(r["final"]):.3f} | '
                 f'{np.mean(r["ms"]):.2f} | {np.mean(r["ms"]) / lamb_ms:.2f} |')
  return '\n'.join(lines)


if __name__ == '__main__':
  main()
