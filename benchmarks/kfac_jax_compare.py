"""kfac-jax (practitioners' K-FAC) against every optimizer of this library on
the digits autoencoder.

kfac-jax 0.0.8 fails at Optimizer.step on jax >= 0.9.2, so this runs in its own
pinned environment, and all the others run there too (one JAX version measured):

    make compare-kfac-jax   # creates .venv-kfac (jax==0.9.1, flax<0.12.8, kfac-jax==0.0.8,
                            # mkor_optax) and runs this script in it
    .venv-kfac/bin/python benchmarks/kfac_jax_compare.py [--steps 500] [--out results/kfac_jax]

kfac-jax runs as its examples do: adaptive learning rate, momentum and damping
(no learning-rate grid), `num_burnin_steps=0`, its automatic layer
registration and a registered sigmoid cross-entropy loss. The others take
the best learning rate of the compare.py grid. Same data order and seed.
Seconds are medians over --timing-repeats runs of each best-lr configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'examples'))
from common import Autoencoder, autoencoder_loss, batches, load_digits, run_method  # noqa: E402
from compare import GRIDS, ORDER, TASK_METHODS, first_at_or_below, repeat_timing, smooth  # noqa: E402


def autoencoder_kfac_loss(model):
  """The autoencoder's loss of ``(params, (x, y))``, its likelihood registered with kfac-jax."""
  import kfac_jax

  def loss_fn(params, batch):
    x = batch[0]
    flat = x.reshape(x.shape[0], -1)
    logits = model.apply({'params': params}, x)
    kfac_jax.register_sigmoid_cross_entropy_loss(logits, flat)
    return jnp.mean(jnp.sum(optax.sigmoid_binary_cross_entropy(logits, flat), axis=-1))
  return loss_fn


def kfac_jax_optimizer(loss_fn):
  """kfac-jax as every benchmark here runs it, as its examples do: adaptive
  learning rate, momentum and damping, ``num_burnin_steps=0``; ``loss_fn(params,
  (x, y))`` registers its likelihood."""
  import kfac_jax
  return kfac_jax.Optimizer(
      value_and_grad_func=jax.value_and_grad(loss_fn), l2_reg=0.0,
      use_adaptive_learning_rate=True, use_adaptive_momentum=True, use_adaptive_damping=True,
      initial_damping=1.0, multi_device=False, num_burnin_steps=0)


def run_kfac_jax(model, params, make_iter, steps, loss_fn=None):
  """kfac-jax's run: ``(losses, cumulative seconds, state bytes)``; ``loss_fn(params,
  (x, y))`` registers its likelihood (default: the autoencoder's)."""
  loss_fn = autoencoder_kfac_loss(model) if loss_fn is None else loss_fn
  opt = kfac_jax_optimizer(loss_fn)
  data = make_iter()
  rng = jax.random.PRNGKey(0)
  first = tuple(jnp.asarray(v) for v in next(data))
  state = opt.init(params, rng, first)
  # Warm-up (compilation) on copies, since kfac-jax donates its inputs; not timed.
  # Its step has several compiled variants (damping adaptation every 5 steps,
  # inverse updates every 5): run enough steps that all are compiled.
  # Like the other runs, the first batch is then reused for the first timed step.
  copy = lambda tree: jax.tree.map(lambda v: jnp.array(v, copy=True) if hasattr(v, 'dtype') else v, tree)
  p, s = copy(params), copy(state)
  for i in range(12):
    p, s, _ = opt.step(p, s, rng, batch=first, global_step_int=i)
  jax.block_until_ready(p)
  losses, times = [], []
  batch = first
  params = copy(params)  # the caller's params stay valid (kfac-jax donates): runs repeat
  jax.block_until_ready(params)
  t0 = time.perf_counter()
  for i in range(steps):
    params, state, stats = opt.step(params, state, rng, batch=batch, global_step_int=i)
    losses.append(float(stats['loss']))
    times.append(time.perf_counter() - t0)
    batch = tuple(jnp.asarray(v) for v in next(data))
  n_bytes = int(sum(v.size * v.dtype.itemsize for v in jax.tree.leaves(state) if hasattr(v, 'dtype')))
  return np.array(losses), np.array(times), n_bytes


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--steps', type=int, default=500)
  ap.add_argument('--out', default='results/kfac_jax')
  ap.add_argument('--optimizers', default=','.join(ORDER),
                  help='those not installed in this environment (PSGD Kron) are skipped')
  ap.add_argument('--timing-repeats', type=int, default=3,
                  help='runs of each best-lr configuration (and of kfac-jax) whose times are medianed')
  args = ap.parse_args(argv)
  methods = TASK_METHODS['autoencoder']
  (x, y), _ = load_digits()
  model = Autoencoder()
  loss_fn = autoencoder_loss(model)
  make_iter = lambda: batches(x, y, 256, seed=0)
  params0 = model.init(jax.random.PRNGKey(0), x[:2])['params']
  runs = {}
  names = args.optimizers.split(',')
  skipped = [n for n in names if n not in methods]
  if skipped:
    print(f'not installed here, skipped: {skipped}', flush=True)
  for name in ['lamb'] + [n for n in names if n != 'lamb' and n in methods]:
    best = None
    for lr in GRIDS['autoencoder']:
      _, losses, times = run_method(name, params0, make_iter(), args.steps, loss_fn, lr, methods=methods)
      final = float(np.mean(losses[-args.steps // 10:]))
      print(f'{name} lr={lr:g}: final {final:.4f}', flush=True)
      if best is None or final < best['final']:
        best = {'lr': lr, 'final': final, 'losses': losses, 'times': times}
    best['times'], _ = repeat_timing(
        best['times'], lambda: run_method(name, params0, make_iter(), args.steps, loss_fn, best['lr'],
                                          methods=methods)[2], args.timing_repeats)
    runs[name] = best
  losses, times, _ = run_kfac_jax(model, params0, make_iter, args.steps)
  times, _ = repeat_timing(times, lambda: run_kfac_jax(model, params0, make_iter, args.steps)[1],
                           args.timing_repeats)
  runs['kfac-jax'] = {'lr': 'adaptive', 'final': float(np.mean(losses[-args.steps // 10:])),
                      'losses': losses, 'times': times}
  print(f"kfac-jax: final {runs['kfac-jax']['final']:.4f}", flush=True)
  target = float(smooth(runs['lamb']['losses'])[-1])
  for name, r in runs.items():
    hit = first_at_or_below(smooth(r['losses']), target)
    r['steps_to_target'] = None if hit is None else hit + 1
    r['seconds_to_target'] = None if hit is None else float(r['times'][hit])
    r['ms_per_step'] = 1e3 * float(np.median(np.diff(np.concatenate([[0.0], r['times']]))))
  lamb = runs['lamb']
  lines = [f'jax {jax.__version__}, digits autoencoder, batch 256, {args.steps} steps; target = '
           f"LAMB's final loss {target:.4f}", '',
           '| optimizer | lr | final loss | steps to target (/ LAMB) | seconds to target (/ LAMB) | ms/step (/ LAMB) |',
           '|---|---|---|---|---|---|']
  for name, r in runs.items():
    st = '-' if r['steps_to_target'] is None else f"{r['steps_to_target']} ({r['steps_to_target'] / lamb['steps_to_target']:.2f})"
    se = '-' if r['seconds_to_target'] is None else f"{r['seconds_to_target']:.2f} ({r['seconds_to_target'] / lamb['seconds_to_target']:.2f})"
    lines.append(f"| {name} | {r['lr']} | {r['final']:.4f} | {st} | {se} | {r['ms_per_step']:.2f} "
                 f"({r['ms_per_step'] / lamb['ms_per_step']:.2f}) |")
  table = '\n'.join(lines)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'kfac_jax.json'), 'w') as f:
    json.dump({name: {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in r.items()}
               for name, r in runs.items()} | {'jax': jax.__version__, 'target': target}, f, indent=1)
  with open(os.path.join(args.out, 'kfac_jax.md'), 'w') as f:
    f.write(table + '\n')
  print(table)


if __name__ == '__main__':
  main()
