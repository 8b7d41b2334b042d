"""One command reruns the comparison: every optimizer on the same model, data
order and seed, each at the best learning rate of the same small grid.

    python benchmarks/compare.py [--tasks autoencoder,bert,cnn] [--quick] [--out results/compare]

Per task it records loss against step and against wall-clock (compiled step,
clock started after compilation), and reports steps and seconds to reach
LAMB's final loss (ratios to LAMB), per-step time ratios and optimizer-state
bytes; then the scaling of one refresh with layer width (MKOR's rank-1
refresh vs K-FAC's damped inversion) and the paper's refresh-period table
(optimizer ms per iteration at refresh period 1, 10, 100, 1000).

Muon (optax.contrib.muon) and PSGD Kron (distributed-kron, optional: pip
install -e '.[bench]') run beside ours. Seconds are medians over
--timing-repeats runs of each best-lr configuration (default 3).

Learning-rate grid (documented, the same for every optimizer): the three
values of GRIDS[task]; the best is the one with the lowest final training loss
(mean of the last 10% of steps). kfac-jax is not included here: it needs its
own pinned environment (jax 0.9.1), see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'examples'))
import mkor_optax  # noqa: E402
from common import (METHODS, Autoencoder, Method, Encoder, autoencoder_loss, batches,  # noqa: E402
                    classification_loss, load_digits, load_pydoc_tokens, mlm_batches, mlm_loss,
                    run_method)
from mkor_optax.kfac import damped_inverse  # noqa: E402
from mkor_optax.mkor import refresh_inverse  # noqa: E402
from common import interleaved  # noqa: E402
from step_time import refresh_update_fns  # noqa: E402

GRIDS = {'autoencoder': (3e-3, 1e-2, 3e-2), 'bert': (2e-3, 5e-3, 1e-2), 'cnn': (3e-3, 1e-2, 3e-2),
         'resnet': (1e-3, 3e-3, 1e-2), 'mlp64': (3e-3, 1e-2, 3e-2)}
ORDER = ('adamw', 'lamb', 'muon', 'psgd_kron', 'mkor', 'mkor_mean', 'mkor_adam', 'mkor_muon', 'mkor_h', 'kfac', 'eva', 'sonew')
# The peers users pick in 2026: optax's Muon (Adam on the non-matrix leaves, its
# default) and PSGD Kron (the optional `distributed-kron` package, an optax
# transform; pip install -e '.[bench]'). Same lr grid rule as everyone else.
PEERS = {'muon': Method(lambda lr: optax.contrib.muon(lr))}
try:
  from jax.sharding import PartitionSpec
  if not hasattr(PartitionSpec, '__class_getitem__'):
    # distributed-kron 2.0.0 annotates with PartitionSpec[str, str], which jax 0.10's
    # PartitionSpec does not accept at import time; annotations only, nothing else changes
    PartitionSpec.__class_getitem__ = classmethod(lambda cls, item: cls)
  import distributed_kron  # noqa: E402
  PEERS['psgd_kron'] = Method(lambda lr: distributed_kron.kron(lr, merge_small_dims=False, partition_grads_into_blocks=False))
except ImportError:  # optional benchmark dependency
  distributed_kron = None
# On the BERT-style task the 2000-word vocabulary projection is preconditioned on
# its input side only (as the paper leaves BERT's vocabulary projection out).
BERT_FACTOR_DIM = 1024


def mkor_with(backend, max_factor_dim=4096):
  """MKOR's preconditioning handed to another backend than LAMB (``backend(lr)``;
  the backend study, benchmarks/seeds.py --study backend): documented
  configurations, not defaults."""
  return Method(lambda lr: mkor_optax.mkor(lr, max_factor_dim=max_factor_dim, backend=backend(lr)),
                mkor_optax.RANK1)


def mkor_peers(max_factor_dim=4096):
  return dict(mkor_muon=mkor_with(optax.contrib.muon, max_factor_dim),
              mkor_adam=mkor_with(optax.adam, max_factor_dim))


TASK_METHODS = {
    'autoencoder': dict(METHODS, **PEERS, **mkor_peers()),
    'cnn': dict(METHODS, **PEERS, **mkor_peers()),
    'resnet': dict(METHODS, **PEERS, **mkor_peers()),
    'mlp64': dict(METHODS, **PEERS, **mkor_peers()),
    'bert': dict(METHODS, **PEERS, **mkor_peers(BERT_FACTOR_DIM),
                 mkor=Method(lambda lr: mkor_optax.mkor(lr, weight_decay=0.0, max_factor_dim=BERT_FACTOR_DIM),
                             mkor_optax.SKETCH),
                 mkor_mean=Method(lambda lr: mkor_optax.mkor(lr, weight_decay=0.0,
                                                             max_factor_dim=BERT_FACTOR_DIM),
                                  mkor_optax.RANK1),
                 mkor_h=Method(lambda lr: mkor_optax.mkor_h(lr, weight_decay=0.0,
                                                            max_factor_dim=BERT_FACTOR_DIM),
                               mkor_optax.SKETCH, True),
                 kfac=Method(lambda lr: mkor_optax.kfac(lr, weight_decay=0.0, max_factor_dim=BERT_FACTOR_DIM),
                             mkor_optax.Covariance(max_dim=BERT_FACTOR_DIM)),
                 eva=Method(lambda lr: mkor_optax.eva(lr, weight_decay=0.0, max_factor_dim=BERT_FACTOR_DIM),
                            mkor_optax.RANK1)),
}
FACTOR_DIM = {'autoencoder': 4096, 'bert': BERT_FACTOR_DIM, 'cnn': 4096, 'resnet': 4096, 'mlp64': 4096}
STANDARD_BATCH = {'autoencoder': 256, 'bert': 32, 'cnn': 64, 'resnet': 64, 'mlp64': 128}


def build(task, quick, seed=0, batch=None):
  """(params0, make_iter, loss_fn, steps); ``seed`` sets the init and the data order,
  ``batch`` the batch size (None: the task's own, STANDARD_BATCH)."""
  batch = STANDARD_BATCH[task] if batch is None else batch
  if task == 'autoencoder':
    (x, y), _ = load_digits()
    model = Autoencoder()
    loss_fn = autoencoder_loss(model)
    make_iter = lambda: batches(x, y, batch, seed=seed)
    steps = 100 if quick else 500
  elif task == 'mlp64':
    # a small MLP autoencoder as a user writes one: four Dense layers of width
    # at most 64 (32-16-32-64), tanh, a mean squared error over pixels
    (x, y), _ = load_digits()
    model = Autoencoder(widths=(32, 16, 32))
    loss_fn = mse_autoencoder_loss(model)
    make_iter = lambda: batches(x, y, batch, seed=seed)
    steps = 60 if quick else 300
  elif task == 'cnn':
    from cnn import CNN  # examples/cnn.py: strided and padded convolutions, digits, batch 64
    (x, y), _ = load_digits()
    model = CNN()
    loss_fn = classification_loss(model)
    make_iter = lambda: batches(x, y, batch, seed=seed)
    steps = 60 if quick else 300
  elif task == 'resnet':
    from resnet import ResNet, init, train_mode_loss  # examples/resnet.py: BatchNorm after every conv
    (x, y), _ = load_digits()
    model = ResNet()
    params, batch_stats = init(model, x[:2], seed)
    make_iter = lambda: batches(x, y, batch, seed=seed)
    return params, make_iter, train_mode_loss(model, batch_stats), 60 if quick else 300
  else:
    tokens, vocab = load_pydoc_tokens(64, 2000)
    model = Encoder(vocab=len(vocab), d=64, depth=2, heads=4, max_len=64)
    loss_fn = mlm_loss(model)
    make_iter = lambda: mlm_batches(tokens, batch, seed=seed)
    steps = 60 if quick else 300
  params = model.init(jax.random.PRNGKey(seed), next(make_iter())[0])['params']
  return params, make_iter, loss_fn, steps


def mse_autoencoder_loss(model):
  """Mean squared reconstruction error of the sigmoid output, over pixels and images."""
  def loss_fn(params, x, y=None):
    del y
    flat = x.reshape(x.shape[0], -1)
    return jnp.mean(jnp.square(jax.nn.sigmoid(model.apply({'params': params}, x)) - flat))
  return loss_fn


def smooth(losses, beta=0.9):
  out, m = np.empty(len(losses)), losses[0]
  for i, v in enumerate(losses):
    m = beta * m + (1 - beta) * v
    out[i] = m
  return out


def first_at_or_below(curve, target):
  hit = np.nonzero(curve <= target)[0]
  return int(hit[0]) if len(hit) else None


def repeat_timing(first, rerun, repeats):
  """The best-lr run again: ``first`` (a run's cumulative times) and
  ``repeats - 1`` more ``rerun()`` runs, and their per-step median (the losses
  repeat exactly; this shared machine's clock does not)."""
  runs = [np.asarray(first)] + [np.asarray(rerun()) for _ in range(repeats - 1)]
  return np.median(np.stack(runs), axis=0), runs


def run_task(task, methods, quick, timing_repeats=3, seed=0):
  params0, make_iter, loss_fn, steps = build(task, quick, seed=seed)
  runs = {}
  methods = [m for m in methods if m in TASK_METHODS[task]]
  for name in methods:
    best = None
    for lr in GRIDS[task]:
      _, losses, times = run_method(name, params0, make_iter(), steps, loss_fn, lr,
                                    methods=TASK_METHODS[task])
      final = float(np.mean(losses[-max(1, steps // 10):]))
      if not np.isfinite(final):
        final = float('inf')
      print(f'  {task} {name} lr={lr:g}: final {final:.4f}', flush=True)
      if best is None or final < best['final']:
        best = {'lr': lr, 'final': final, 'losses': losses.tolist(), 'times': times.tolist()}
    median, runs_times = repeat_timing(
        best['times'], lambda: run_method(name, params0, make_iter(), steps, loss_fn, best['lr'],
                                          methods=TASK_METHODS[task])[2], timing_repeats)
    best['times_runs'] = [t.tolist() for t in runs_times]
    best['times'] = median.tolist()
    opt = TASK_METHODS[task][name].make(best['lr'])
    state = opt.init(params0)
    best['state_bytes'] = int(sum(v.size * v.dtype.itemsize for v in jax.tree.leaves(state)))
    best['ms_per_step'] = 1e3 * float(np.median(np.diff([0.0] + best['times'])))
    runs[name] = best
  lamb = runs['lamb']
  target = float(smooth(np.array(lamb['losses']))[-1])
  for name, r in runs.items():
    curve = smooth(np.array(r['losses']))
    hit = first_at_or_below(curve, target)
    r['steps_to_target'] = None if hit is None else hit + 1
    r['seconds_to_target'] = None if hit is None else r['times'][hit]
  lamb_s, lamb_n = runs['lamb']['seconds_to_target'], runs['lamb']['steps_to_target']
  for r in runs.values():
    r['steps_ratio'] = None if r['steps_to_target'] is None else r['steps_to_target'] / lamb_n
    r['seconds_ratio'] = None if r['seconds_to_target'] is None else r['seconds_to_target'] / lamb_s
    r['step_time_ratio'] = r['ms_per_step'] / runs['lamb']['ms_per_step']
  return {'task': task, 'steps': steps, 'lr_grid': GRIDS[task], 'target': target, 'runs': runs}


def refresh_scaling(dims, repeats):
  """ms for one MKOR rank-1 refresh vs one K-FAC damped inversion of a d x d factor."""
  fns, carries = {}, {}
  for d in dims:
    v = jax.random.normal(jax.random.PRNGKey(d), (1, d)) / np.sqrt(d)
    a = jax.random.normal(jax.random.PRNGKey(d + 1), (1, d, 2 * d)) / np.sqrt(2 * d)
    cov = a @ jnp.swapaxes(a, 1, 2)
    fns[('mkor', d)] = jax.jit(lambda p, v=v: refresh_inverse(p, v, gamma=0.95, zeta=0.9,
                                                              epsilon=2.0), donate_argnums=0)
    carries[('mkor', d)] = jnp.eye(d)[None]
    fns[('kfac', d)] = jax.jit(lambda c: damped_inverse(c, 0.03) * 0 + c)  # keeps the carry
    carries[('kfac', d)] = cov
  med = interleaved(fns, carries, 5, repeats)
  return {str(d): {'mkor_ms': 1e3 * med[('mkor', d)], 'kfac_ms': 1e3 * med[('kfac', d)]}
          for d in dims}


def refresh_period_table(task, quick, repeats):
  """Optimizer ms per iteration at refresh period f: the update alone (grads and
  statistics precomputed), t(f) = t_no_refresh + (t_refresh - t_no_refresh) / f."""
  params, make_iter, loss_fn, _ = build(task, quick)
  batch = next(make_iter())
  out = {}
  dim = FACTOR_DIM[task]
  for name, make, kind in (('mkor', mkor_optax.scale_by_mkor, mkor_optax.RANK1),
                           ('kfac', mkor_optax.scale_by_kfac, mkor_optax.Covariance(max_dim=dim))):
    _, grads, stats = jax.jit(mkor_optax.value_and_grad(loss_fn, kind=kind))(params, *batch)
    fns, carries = refresh_update_fns(make, grads, stats, params, max_factor_dim=dim)
    med = interleaved(fns, carries, 10, repeats)
    every, never = 1e3 * med['every'], 1e3 * med['never']
    out[name] = {str(f): never + (every - never) / f for f in (1, 10, 100, 1000)}
  return out


def plot(result, out_dir):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for name, r in result['runs'].items():
    curve = smooth(np.array(r['losses']))
    axes[0].plot(np.arange(1, len(curve) + 1), curve, label=f"{name} (lr {r['lr']:g})")
    axes[1].plot(r['times'], curve, label=name)
  for ax, xlabel in zip(axes, ('step', 'seconds')):
    ax.set_yscale('log')
    ax.axhline(result['target'], color='gray', ls=':', lw=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel('training loss (EMA 0.9)')
  axes[0].legend(fontsize=8)
  fig.suptitle(f"{result['task']}: loss vs step and vs wall-clock (dotted: LAMB's final loss)")
  fig.tight_layout()
  path = os.path.join(out_dir, f"{result['task']}_loss.png")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def plot_scaling(scaling, out_dir):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  dims = [int(d) for d in scaling]
  fig, ax = plt.subplots(figsize=(5, 4))
  for k, label in (('mkor_ms', 'MKOR rank-1 refresh'), ('kfac_ms', 'K-FAC damped inverse')):
    ax.plot(dims, [scaling[str(d)][k] for d in dims], 'o-', label=label)
  ax.set_xscale('log', base=2)
  ax.set_yscale('log')
  ax.set_xlabel('factor dimension d')
  ax.set_ylabel('ms per factor refresh')
  ax.legend()
  fig.tight_layout()
  path = os.path.join(out_dir, 'refresh_scaling.png')
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def fmt(v, spec):
  return '-' if v is None else format(v, spec)


def markdown(results, scaling, periods, machine):
  lines = [f"Machine: {machine['platform']}, {machine['cpus']} CPUs, jax {machine['jax']} "
           f"({machine['backend']}).", '']
  for r in results:
    lines += [f"### {r['task']} ({r['steps']} steps, lr grid {list(r['lr_grid'])}, "
              f"target = LAMB's final loss {r['target']:.4f})", '',
              '| optimizer | lr | final loss | steps to target (/ LAMB) | seconds to target (/ LAMB) '
              '| ms/step (/ LAMB) | state MB |', '|---|---|---|---|---|---|---|']
    for name, x in r['runs'].items():
      lines.append(
          f"| {name} | {x['lr']:g} | {x['final']:.4f} | {fmt(x['steps_to_target'], 'd')} "
          f"({fmt(x['steps_ratio'], '.2f')}) | {fmt(x['seconds_to_target'], '.2f')} "
          f"({fmt(x['seconds_ratio'], '.2f')}) | {x['ms_per_step']:.2f} ({x['step_time_ratio']:.2f}) "
          f"| {x['state_bytes'] / 1e6:.2f} |")
    lines.append('')
  if scaling:
    lines += ['### One factor refresh vs width d (ms)', '', '| d | MKOR rank-1 | K-FAC inverse | K-FAC / MKOR |',
              '|---|---|---|---|']
    for d, v in scaling.items():
      lines.append(f"| {d} | {v['mkor_ms']:.3f} | {v['kfac_ms']:.3f} | {v['kfac_ms'] / v['mkor_ms']:.1f} |")
    lines.append('')
  if periods:
    lines += ['### Optimizer ms per iteration vs refresh period (update only)', '',
              '| task | method | 1 | 10 | 100 | 1000 |', '|---|---|---|---|---|---|']
    for task, per in periods.items():
      for method, row in per.items():
        lines.append(f"| {task} | {method} | " + ' | '.join(f'{row[f]:.2f}' for f in ('1', '10', '100', '1000')) + ' |')
    lines.append('')
  return '\n'.join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--tasks', default='autoencoder,bert,cnn')
  ap.add_argument('--optimizers', default=','.join(ORDER))
  ap.add_argument('--quick', action='store_true', help='fewer steps (a smoke run)')
  ap.add_argument('--repeats', type=int, default=5)
  ap.add_argument('--timing-repeats', type=int, default=3,
                  help='runs of each best-lr configuration whose times are medianed')
  ap.add_argument('--dims', default='128,256,512,1024,2048')
  ap.add_argument('--out', default='results/compare')
  args = ap.parse_args(argv)
  methods = args.optimizers.split(',')
  if 'lamb' not in methods:
    methods = ['lamb'] + methods
  os.makedirs(args.out, exist_ok=True)
  machine = {'platform': platform.platform(), 'cpus': os.cpu_count(), 'jax': jax.__version__,
             'backend': jax.default_backend()}
  results = []
  for task in args.tasks.split(','):
    print(f'{task} ...', flush=True)
    r = run_task(task, methods, args.quick, args.timing_repeats)
    plot(r, args.out)
    results.append(r)
  print('refresh scaling ...', flush=True)
  scaling = refresh_scaling([int(d) for d in args.dims.split(',')], args.repeats)
  plot_scaling(scaling, args.out)
  print('refresh-period table ...', flush=True)
  periods = {task: refresh_period_table(task, args.quick, args.repeats) for task in args.tasks.split(',')}
  with open(os.path.join(args.out, 'compare.json'), 'w') as f:
    json.dump({'machine': machine, 'results': results, 'refresh_scaling': scaling,
               'refresh_period_ms': periods}, f, indent=1)
  table = markdown(results, scaling, periods, machine)
  with open(os.path.join(args.out, 'compare.md'), 'w') as f:
    f.write(table + '\n')
  print(table)


if __name__ == '__main__':
  main()
