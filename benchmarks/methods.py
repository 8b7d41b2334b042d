"""Every method side by side: per-step time relative to optax.lamb, and the
optimizer-state memory, on the same model, batch and process.

    python benchmarks/methods.py [--repeats 5] [--out results/bench]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'examples'))
import mkor_optax  # noqa: E402
from common import METHODS as COMMON_METHODS  # noqa: E402
from common import MLP, Encoder, Method, classification_loss, load_digits, make_step, token_loss  # noqa: E402
from common import interleaved  # noqa: E402

# the examples' registry, with K-FAC at two refresh periods
METHODS = dict(COMMON_METHODS)
METHODS['kfac (inv_freq 10)'] = Method(lambda lr: mkor_optax.kfac(lr, inv_freq=10), mkor_optax.COVARIANCE)
METHODS['kfac (inv_freq 100)'] = Method(lambda lr: mkor_optax.kfac(lr, inv_freq=100), mkor_optax.COVARIANCE)
del METHODS['kfac']


def state_bytes(state) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)))


def compare(name, model, loss_fn, batch, lr, n, repeats):
  params = model.init(jax.random.PRNGKey(0), batch[0])['params']
  fns, carries, mem = {}, {}, {}
  for method, spec in METHODS.items():
    opt = spec.make(lr)
    step = make_step(loss_fn, opt, spec.kind, spec.needs_value)
    fns[method] = lambda c, step=step: step(c[0], c[1], *batch)[:2]
    carries[method] = (params, opt.init(params))
    mem[method] = state_bytes(carries[method][1])
  med = interleaved(fns, carries, n, repeats)
  return {'model': name, 'param_bytes': state_bytes(params),
          'methods': {m: {'ms': 1e3 * med[m], 'ratio_to_lamb': med[m] / med['lamb'],
                          'state_bytes': mem[m]} for m in METHODS}}


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument('--repeats', type=int, default=5)
  ap.add_argument('--steps', type=int, default=10)
  ap.add_argument('--out', default='results/bench')
  args = ap.parse_args(argv)
  (x, y), _ = load_digits()
  mlp = MLP((128, 128))
  enc = Encoder(vocab=512, d=128, depth=2, heads=4, max_len=128)
  tok = jax.random.randint(jax.random.PRNGKey(1), (32, 128), 0, 512)
  results = [
      compare('digits MLP 64-128-128-10, batch 64', mlp, classification_loss(mlp),
              (jnp.asarray(x[:64]), jnp.asarray(y[:64])), 1e-2, args.steps * 10, args.repeats),
      compare('encoder d=128 depth=2 seq=128 batch=32', enc, token_loss(enc),
              (tok, jnp.roll(tok, 1, axis=1)), 1e-3, args.steps, args.repeats),
  ]
  lines = []
  for r in results:
    lines += [f"### {r['model']} (parameters: {r['param_bytes'] / 1e6:.2f} MB)", '',
              '| method | ms/step | / LAMB | optimizer state (MB) | state / params |',
              '|---|---|---|---|---|']
    for m, v in r['methods'].items():
      lines.append(f"| {m} | {v['ms']:.2f} | {v['ratio_to_lamb']:.3f} | "
                   f"{v['state_bytes'] / 1e6:.3f} | {v['state_bytes'] / r['param_bytes']:.2f} |")
    lines.append('')
  table = '\n'.join(lines)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'methods.json'), 'w') as f:
    json.dump(results, f, indent=2)
  with open(os.path.join(args.out, 'methods.md'), 'w') as f:
    f.write(table)
  print(table)


if __name__ == '__main__':
  main()
