"""Steps and seconds to LAMB's loss: MKOR with the adaptive step (the recipe,
mkor_optax.adaptive_mkor + adaptive_inputs) beside kfac-jax, our K-FAC with
the same step, Muon, AdamW and LAMB, in one process, over seeds.

    make .venv-kfac/.installed   # once: jax 0.9.1, kfac-jax 0.0.8 (its PyPI release)
    .venv-kfac/bin/python benchmarks/adaptive_race.py [--task autoencoder|cnn] [--seeds 0,1,2]
        [--only 'ROW;ROW' --tag NAME]   # a subset of the adaptive rows, written to adaptive_race_<task>_NAME

(With the main .venv, kfac-jax is skipped.) compare.py's tasks (the digits
autoencoder, batch 256, 500 steps; the CNN, batch 64, 300 steps; the masked
LM, batch 32, 300 steps, the sampled targets weighted by its mask; the ResNet
with BatchNorm in training mode, batch 64, 300 steps; these two without
kfac-jax): the learning-rate methods take their best lr of the
compare.py grid per seed; kfac-jax runs as kfac_jax_compare.py runs it
(adaptive learning rate, momentum and damping); the adaptive methods need
no learning rate. Target: the same seed's LAMB final loss (EMA 0.9).
Seconds are the per-step medians of --timing-repeats runs of each
configuration, interleaved within a seed in a new random order each round. Writes
results/adaptive_step/adaptive_race_<task>.{md,json}.
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
import mkor_optax  # noqa: E402
from common import Autoencoder, run_method  # noqa: E402
from compare import GRIDS, TASK_METHODS, build, first_at_or_below, smooth  # noqa: E402

# Rows name the sampled pass's statistics: 'adaptive_mkor' passes SKETCH (4
# sketches, adaptive_inputs' default before 8 became it); the recipe's
# default (kind=None with fisher=, Sketch(8)) is the row 'adaptive_mkor Sketch(8)'.
ADAPTIVE = {
    'adaptive_mkor': (lambda: mkor_optax.adaptive_mkor(), mkor_optax.SKETCH),
    'adaptive_mkor Sketch(8)': (lambda: mkor_optax.adaptive_mkor(), mkor_optax.Sketch(8)),
    'adaptive_mkor Sketch(8, lazy=True)': (lambda: mkor_optax.adaptive_mkor(), mkor_optax.Sketch(8, lazy=True)),
    'adaptive_mkor rescale': (lambda: mkor_optax.adaptive_mkor(rescale=True), mkor_optax.SKETCH),
    'adaptive_mkor Sketch(8) rescale': (lambda: mkor_optax.adaptive_mkor(rescale=True), mkor_optax.Sketch(8)),
    # the Gauss-Newton products on the batch's first quarter (adaptive_inputs' curvature_on)
    'adaptive_mkor, curvature on 1/4': (lambda: mkor_optax.adaptive_mkor(), mkor_optax.SKETCH, 4),
    'adaptive_mkor Sketch(8), curvature on 1/4': (lambda: mkor_optax.adaptive_mkor(),
                                                  mkor_optax.Sketch(8), 4),
    'kfac + quadratic step': (
        lambda: optax.chain(mkor_optax.scale_by_kfac(), mkor_optax.scale_by_quadratic_step()),
        mkor_optax.COVARIANCE),
}
LR_METHODS = ('lamb', 'adamw', 'muon')


def bernoulli_pixels(out, x, y):
  """The autoencoder's loss of its outputs: pixels as Bernoulli, summed, mean over images."""
  del y
  return jnp.mean(jnp.sum(optax.sigmoid_binary_cross_entropy(out, x.reshape(x.shape[0], -1)), -1))


def classes(out, x, y):
  del x
  return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()


def masked_tokens(out, inputs, targets, weights):
  """The masked LM's loss of its logits: cross-entropy on the masked positions."""
  del inputs
  ce = optax.softmax_cross_entropy_with_integer_labels(out, targets)
  return jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)


class TrainMode:
  """A BatchNorm model applied as compare.py's ResNet task applies it: in
  training mode, on the batch's own statistics (its running averages unused)."""

  def __init__(self, model, batch_stats):
    self.model, self.batch_stats = model, batch_stats

  def apply(self, variables, x):
    return self.model.apply(dict(variables, batch_stats=self.batch_stats), x,
                            mutable=['batch_stats'])[0]


# per task: the weight of each output position in the sampled loss (from the batch)
FISHER_WEIGHTS = {'bert': lambda inputs, targets, weights: weights}


def kfac_loss(model, loss_of_outputs, register):
  """``loss_fn(params, (x, y))`` for kfac-jax, its likelihood registered."""
  def loss_fn(params, batch):
    x, y = batch
    out = model.apply({'params': params}, x)
    register(out, x, y)
    return loss_of_outputs(out, x, y)
  return loss_fn


def tasks():
  """task -> (model, loss of its outputs, the likelihood's name, kfac-jax's registration)."""
  try:
    import kfac_jax
    pixels = lambda out, x, y: kfac_jax.register_sigmoid_cross_entropy_loss(out, x.reshape(x.shape[0], -1))
    labels = lambda out, x, y: kfac_jax.register_softmax_cross_entropy_loss(out, y)
  except ImportError:
    pixels = labels = None
  from cnn import CNN
  from common import Encoder, load_digits, load_pydoc_tokens
  from resnet import ResNet, init
  vocab = load_pydoc_tokens(64, 2000)[1]
  resnet = ResNet()
  return {'autoencoder': (Autoencoder(), bernoulli_pixels, 'sigmoid_cross_entropy', pixels),
          'cnn': (CNN(), classes, 'softmax_cross_entropy', labels),
          # (kfac-jax not run: its masked cross-entropy is not registered here)
          'bert': (Encoder(vocab=len(vocab), d=64, depth=2, heads=4, max_len=64), masked_tokens,
                   'softmax_cross_entropy', None),
          # (kfac-jax not run: its graph matcher is not given the BatchNorm model here)
          'resnet': (TrainMode(resnet, init(resnet, load_digits()[0][0][:2], 0)[1]), classes,
                     'softmax_cross_entropy', None)}


def adaptive_step(model, opt, kind, loss_of_outputs, fisher, fisher_weights=None, part=1):
  """The recipe's jitted step ``(params, state, *batch, key) -> (params, state, loss)``
  (the model reads ``batch[0]``; ``part`` > 1: the curvature products on the
  batch's first ``1 / part`` of rows)."""
  @jax.jit
  def step(p, s, *batch_and_key):
    *batch, key = batch_and_key
    curvature_on = None
    if part > 1:
      rows = [b[:b.shape[0] // part] for b in batch]
      curvature_on = (lambda q: model.apply({'params': q}, rows[0]),
                      lambda out: loss_of_outputs(out, *rows))
    # K-FAC's chain takes the statistics every step (stats=), adaptive_mkor lazily
    loss, g, extra = mkor_optax.adaptive_inputs(lambda q: model.apply({'params': q}, batch[0]),
                                                lambda out: loss_of_outputs(out, *batch), p, key,
                                                fisher=fisher, kind=kind,
                                                weights=fisher_weights and fisher_weights(*batch),
                                                lazy=kind != mkor_optax.COVARIANCE,
                                                curvature_on=curvature_on)
    u, s = opt.update(g, s, p, **extra)
    return optax.apply_updates(p, u), s, loss

  return step


def train_adaptive(model, params, make_iter, steps, make, kind, loss_of_outputs, fisher, seed,
                   fisher_weights=None, part=1):
  """The recipe's loop as a user writes it; ``(losses, cumulative seconds)``."""
  opt = make()
  step = adaptive_step(model, opt, kind, loss_of_outputs, fisher, fisher_weights, part)
  state = opt.init(params)
  data = make_iter()
  batch = next(data)
  keys = jax.random.split(jax.random.PRNGKey(1000 + seed), steps)
  jax.block_until_ready(step(params, state, *batch, keys[0]))
  losses, times = [], []
  t0 = time.perf_counter()
  for i in range(steps):
    params, state, loss = step(params, state, *batch, keys[i])
    losses.append(float(loss))
    times.append(time.perf_counter() - t0)
    batch = next(data)
  return np.array(losses), np.array(times)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--task', default='autoencoder', choices=('autoencoder', 'cnn', 'bert', 'resnet'))
  ap.add_argument('--steps', type=int, default=None, help="default: the task's (compare.py)")
  ap.add_argument('--seeds', default='0,1,2')
  ap.add_argument('--timing-repeats', type=int, default=3)
  ap.add_argument('--out', default='results/adaptive_step')
  ap.add_argument('--only', default=None,
                  help="';'-separated adaptive rows to run (default: all; the learning-rate methods "
                       "and kfac-jax always run)")
  ap.add_argument('--tag', default=None, help='suffix of the output name (a subset run)')
  args = ap.parse_args(argv)
  adaptive = dict(ADAPTIVE)
  if args.only:
    wanted = [n for n in args.only.split(';') if n]
    unknown = sorted(set(wanted) - set(ADAPTIVE))
    if unknown:
      ap.error(f'--only: unknown rows {unknown}; choose from {sorted(ADAPTIVE)}')
    adaptive = {n: ADAPTIVE[n] for n in wanted}
  try:
    from kfac_jax_compare import run_kfac_jax
    import kfac_jax  # noqa: F401
  except ImportError:
    run_kfac_jax = None
    print('kfac-jax is not installed here: skipped', flush=True)
  model, loss_of_outputs, fisher, register = tasks()[args.task]
  run_kfac_jax = run_kfac_jax if register else None
  methods = TASK_METHODS[args.task]
  steps = args.steps or build(args.task, False)[3]
  names = list(LR_METHODS) + (['kfac-jax'] if run_kfac_jax else []) + list(adaptive)
  rows = {n: {'steps': [], 'seconds': [], 'ms': [], 'final': [], 'lr': []} for n in names}
  for seed in [int(s) for s in args.seeds.split(',')]:
    params0, make_iter, loss_fn, _ = build(args.task, False, seed)
    runs, timers = {}, {}
    for name in LR_METHODS:  # best lr of the grid, by final loss
      best = None
      for lr in GRIDS[args.task]:
        _, losses, times = run_method(name, params0, make_iter(), steps, loss_fn, lr, methods=methods)
        final = float(np.mean(losses[-steps // 10:]))
        final = final if np.isfinite(final) else float('inf')
        if best is None or final < best[0]:
          best = (final, lr, losses, times)
      runs[name] = {'lr': best[1], 'losses': best[2], 'times': [best[3]]}
      timers[name] = lambda name=name, lr=best[1]: run_method(name, params0, make_iter(), steps, loss_fn,
                                                              lr, methods=methods)[2]
    if run_kfac_jax:
      kloss = kfac_loss(model, loss_of_outputs, register)
      losses, times, _ = run_kfac_jax(model, params0, make_iter, steps, kloss)
      runs['kfac-jax'] = {'lr': 'adaptive', 'losses': losses, 'times': [times]}
      timers['kfac-jax'] = lambda: run_kfac_jax(model, params0, make_iter, steps, kloss)[1]
    for name, (make, kind, *part) in adaptive.items():
      run = lambda make=make, kind=kind, part=part: train_adaptive(
          model, params0, make_iter, steps, make, kind, loss_of_outputs, fisher, seed,
          FISHER_WEIGHTS.get(args.task), *part)
      losses, times = run()
      runs[name] = {'lr': 'adaptive', 'losses': losses, 'times': [times]}
      timers[name] = lambda run=run: run()[1]
    # the timed runs: every method once per round, in a new random order each
    # round (a fixed order timed each method after the same neighbours, which
    # moved some by 20% or more); the first runs above only pick the lr
    order = np.random.default_rng(seed)
    for name in runs:
      runs[name]['times'] = []
    for _ in range(args.timing_repeats):
      for name in order.permutation(list(runs)):
        runs[name]['times'].append(timers[name]())
    target = float(smooth(runs['lamb']['losses'])[-1])
    for name, r in runs.items():
      times = np.median(np.stack(r['times']), axis=0)
      hit = first_at_or_below(smooth(r['losses']), target)
      rows[name]['steps'].append(None if hit is None else hit + 1)
      rows[name]['seconds'].append(None if hit is None else float(times[hit]))
      rows[name]['ms'].append(1e3 * float(np.median(np.diff(np.concatenate([[0.0], times])))))
      rows[name]['final'].append(float(smooth(r['losses'])[-1]))
      rows[name]['lr'].append(r['lr'])
    print(seed, {n: (r['steps'][-1], r['seconds'][-1] and round(r['seconds'][-1], 3), round(r['ms'][-1], 2))
                 for n, r in rows.items()}, flush=True)
  med = lambda v: None if any(s is None for s in v) else float(np.median(v))
  lamb_steps, lamb_sec, lamb_ms = med(rows['lamb']['steps']), med(rows['lamb']['seconds']), np.median(rows['lamb']['ms'])
  fmt = lambda v: '-' if v is None else (f'{v:.2f}' if isinstance(v, float) else str(v))
  lines = [f"jax {jax.__version__}, {args.task} (compare.py), {steps} steps, seeds {args.seeds}; "
           "target = the same seed's LAMB final loss (EMA 0.9). Medians over seeds (ratio to LAMB's); "
           f'seconds: per-step medians of {args.timing_repeats} runs, interleaved in a random order.', '',
           '| optimizer | lr per seed | steps per seed | steps (/ LAMB) | seconds (/ LAMB) | ms/step (/ LAMB) | final loss |',
           '|---|---|---|---|---|---|---|']
  for name, r in rows.items():
    st, se, ms = med(r['steps']), med(r['seconds']), float(np.median(r['ms']))
    lines.append(
        f"| {name} | {' / '.join(str(v) for v in r['lr'])} | {' / '.join(fmt(s) for s in r['steps'])} | "
        f"{'-' if st is None else f'{st:g} ({st / lamb_steps:.2f})'} | "
        f"{'-' if se is None else f'{se:.2f} ({se / lamb_sec:.2f})'} | {ms:.2f} ({ms / lamb_ms:.2f}) | "
        f"{np.mean(r['final']):.3f} |")
  text = '\n'.join(lines)
  print(text)
  os.makedirs(args.out, exist_ok=True)
  name = f'adaptive_race_{args.task}' + (f'_{args.tag}' if args.tag else '')
  with open(os.path.join(args.out, name + '.md'), 'w') as f:
    f.write(text + '\n')
  with open(os.path.join(args.out, name + '.json'), 'w') as f:
    json.dump({'jax': jax.__version__, 'seeds': args.seeds, 'rows': rows}, f, indent=1)


if __name__ == '__main__':
  main()
