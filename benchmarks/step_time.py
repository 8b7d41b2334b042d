"""Per-step time of MKOR vs optax.lamb, and the cost of a refresh.

Runs the competitors side by side in one process, interleaved, and reports
medians over repeated timed blocks (this machine is shared and noisy):

1. train-step time (value_and_grad + update + apply) of ``mkor`` vs
   ``optax.lamb`` on the demo MLP and on a stack of transformer encoder
   blocks whose tokens per batch far exceed d;
2. what ``lax.cond`` saves: update time when every step refreshes
   (inv_freq=1) vs when no step does (steps past 0 with a huge inv_freq);
3. refresh-only time of one (d x d) factor inverse for d = 512 ... 4096.

    python benchmarks/step_time.py [--repeats 7] [--out results/bench]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'examples'))
import mkor_optax  # noqa: E402
from common import (METHODS, MLP, Encoder, classification_loss, interleaved, load_digits,  # noqa: E402
                    make_step, token_loss)
from mkor_optax.mkor import refresh_inverse  # noqa: E402


def step_times(name, model, loss_fn, batch, lr, n, repeats):
  params = model.init(jax.random.PRNGKey(0), batch[0])['params']
  fns, carries = {}, {}
  for k in ('lamb', 'mkor'):
    opt = METHODS[k].make(lr)
    step = make_step(loss_fn, opt, METHODS[k].kind)
    fns[k] = lambda c, step=step: step(c[0], c[1], *batch)[:2]
    carries[k] = (params, opt.init(params))
  med = interleaved(fns, carries, n, repeats)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  return {'model': name, 'params': int(n_params), 'lamb_ms': 1e3 * med['lamb'],
          'mkor_ms': 1e3 * med['mkor'], 'ratio': med['mkor'] / med['lamb']}


def refresh_update_fns(make, grads, stats, params, **kwargs):
  """Jitted update-only steps (grads and statistics precomputed) of
  ``make(inv_freq=1, **kwargs)`` ('every': each step refreshes) and of
  ``make(inv_freq=2**30, **kwargs)`` ('never'), with states past step 0 (which
  always refreshes); ready for :func:`interleaved`."""
  fns, carries = {}, {}
  for label, inv_freq in (('every', 1), ('never', 2 ** 30)):
    tx = make(inv_freq=inv_freq, **kwargs)
    upd = jax.jit(lambda s, tx=tx: tx.update(grads, s, params, stats=stats)[1])
    fns[label], carries[label] = upd, upd(tx.init(params))
  return fns, carries


def refresh_skip(model, loss_fn, batch, n, repeats):
  """Update-only time (grads and stats precomputed) with and without refresh."""
  params = model.init(jax.random.PRNGKey(0), batch[0])['params']
  _, grads, stats = jax.jit(mkor_optax.value_and_grad(loss_fn))(params, *batch)
  fns, carries = refresh_update_fns(mkor_optax.scale_by_mkor, grads, stats, params)
  lamb = optax.lamb(1e-3)
  fns['lamb_update'] = jax.jit(lambda s: lamb.update(grads, s, params)[1])
  carries['lamb_update'] = lamb.init(params)
  med = interleaved(fns, carries, n, repeats)
  return {'refresh_every_step': 1e3 * med['every'], 'no_refresh': 1e3 * med['never'],
          'lamb_update': 1e3 * med['lamb_update']}


def refresh_scaling(dims, repeats):
  out = {}
  fns, carries = {}, {}
  for d in dims:
    v = jax.random.normal(jax.random.PRNGKey(d), (1, d)) / np.sqrt(d)
    # donated, as the optimizer state is in a train step that donates it: a
    # fresh 64 MB output buffer per call would otherwise cost more than the refresh
    f = jax.jit(lambda p, v=v: refresh_inverse(p, v, gamma=0.95, zeta=0.9, epsilon=2.0),
                donate_argnums=0)
    fns[d], carries[d] = f, jnp.eye(d)[None]
  med = interleaved(fns, carries, 20, repeats)
  for d in dims:
    out[str(d)] = 1e3 * med[d]
  return out


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument('--repeats', type=int, default=7)
  ap.add_argument('--steps', type=int, default=20, help='steps per timed block')
  ap.add_argument('--out', default='results/bench')
  ap.add_argument('--seq', type=int, default=128)
  ap.add_argument('--batch', type=int, default=32)
  ap.add_argument('--d', type=int, default=128)
  ap.add_argument('--depth', type=int, default=2)
  ap.add_argument('--dims', default='512,1024,2048,4096')
  args = ap.parse_args(argv)

  (x, y), _ = load_digits()
  mlp = MLP((128, 128))
  mlp_batch = (jnp.asarray(x[:64]), jnp.asarray(y[:64]))
  vocab = 512
  enc = Encoder(vocab=vocab, d=args.d, depth=args.depth, heads=4, max_len=args.seq)
  tok = jax.random.randint(jax.random.PRNGKey(1), (args.batch, args.seq), 0, vocab)
  enc_batch = (tok, jnp.roll(tok, 1, axis=1))
  enc_name = (f'encoder d={args.d} depth={args.depth} seq={args.seq} batch={args.batch} '
              f'({args.batch * args.seq} tokens/batch)')

  results = {'machine': {'platform': platform.platform(), 'cpus': os.cpu_count(),
                         'jax': jax.__version__, 'backend': jax.default_backend()},
             'repeats': args.repeats}
  print('step time ...', flush=True)
  results['step_time'] = [
      step_times('digits MLP 64-128-128-10, batch 64', mlp, classification_loss(mlp),
                 mlp_batch, 1e-2, args.steps * 5, args.repeats),
      step_times(enc_name, enc, token_loss(enc), enc_batch, 1e-3, args.steps, args.repeats),
  ]
  print('refresh skipping ...', flush=True)
  results['refresh_skip'] = refresh_skip(enc, token_loss(enc), enc_batch, args.steps, args.repeats)
  results['refresh_skip']['model'] = enc_name
  print('refresh scaling ...', flush=True)
  dims = [int(d) for d in args.dims.split(',')]
  results['refresh_ms'] = refresh_scaling(dims, args.repeats)

  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'step_time.json'), 'w') as f:
    json.dump(results, f, indent=2)
  lines = ['| model | LAMB ms/step | MKOR ms/step | MKOR / LAMB |', '|---|---|---|---|']
  for r in results['step_time']:
    lines.append(f"| {r['model']} | {r['lamb_ms']:.2f} | {r['mkor_ms']:.2f} | {r['ratio']:.3f} |")
  rs = results['refresh_skip']
  lines += ['', f"Update only ({rs['model']}): MKOR refreshing every step "
            f"{rs['refresh_every_step']:.2f} ms, MKOR on a non-refresh step {rs['no_refresh']:.2f} ms, "
            f"LAMB {rs['lamb_update']:.2f} ms.", '',
            '| d | refresh ms (one d x d inverse) | ratio to previous d |', '|---|---|---|']
  prev = None
  for d in dims:
    ms = results['refresh_ms'][str(d)]
    lines.append(f"| {d} | {ms:.3f} | {'' if prev is None else f'{ms / prev:.2f}'} |")
    prev = ms
  table = '\n'.join(lines)
  with open(os.path.join(args.out, 'step_time.md'), 'w') as f:
    f.write(table + '\n')
  print(table)


if __name__ == '__main__':
  main()
