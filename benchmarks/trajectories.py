"""Bit-for-bit training trajectories of every method, to check that a refactor
changes no number.

    python benchmarks/trajectories.py --save results/trajectories.json   # before
    python benchmarks/trajectories.py --check results/trajectories.json  # after

Each case trains a small linen model (a Conv, a wide Dense that gets
low-rank factors, a Dense head) for a few jitted steps and records the loss,
the parameters and every array of the optimizer state after each step, as
a SHA-256 of its bytes (with dtype and shape). ``--check`` exits 1 and names
the first case and leaf whose bytes differ.

The bytes depend on the machine: XLA:CPU compiles for the host's
instruction set, so another CPU (or another jax, jaxlib or numpy) rounds
some steps differently. The file records where it was made (its
``_machine`` entry); a check on another machine says so, and its verdict
then means nothing: record the base commit on this machine first (from a
``git worktree`` or after ``git stash``) and check against that.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import mkor_optax

STEPS = 12


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), name='conv')(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.tanh(nn.Dense(300, name='wide')(x))
    x = nn.LayerNorm(name='norm')(x)
    return nn.Dense(5, use_bias=False, name='head')(x)


def batch(i):
  k1, k2 = jax.random.split(jax.random.PRNGKey(100 + i))
  return jax.random.normal(k1, (8, 6, 6, 2)), jax.random.randint(k2, (8,), 0, 5)


def loss_fn(params, x, y):
  logits = Net().apply({'params': params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def cases():
  lamb = optax.lamb(1e-2)
  yield 'mkor', mkor_optax.mkor(1e-2), mkor_optax.RANK1, {}
  yield 'mkor_dense_blend', mkor_optax.mkor(1e-2, refresh='blend', low_rank=None, inv_freq=2), \
      mkor_optax.RANK1, {}
  yield 'mkor_lowrank_all', mkor_optax.mkor(1e-2, low_rank=4, low_rank_min_dim=0, inv_freq=1), \
      mkor_optax.RANK1, {}
  yield 'mkor_h', mkor_optax.mkor_h(1e-2), mkor_optax.RANK1, {'value': True}
  # the default capture (the Dense layers' rows sketched on refresh steps) and
  # the sketches formed in the capture
  yield 'mkor_sketch', mkor_optax.mkor(1e-2, inv_freq=2), mkor_optax.SKETCH, {}
  yield 'mkor_sketch_capture', mkor_optax.mkor(1e-2, inv_freq=2), mkor_optax.Sketch(4), {}
  yield 'kfac', mkor_optax.kfac(1e-2, inv_freq=3), mkor_optax.COVARIANCE, {}
  yield 'kfac_relative', mkor_optax.kfac(1e-2, relative_damping=True), mkor_optax.COVARIANCE, {}
  yield 'eva', mkor_optax.eva(1e-2), mkor_optax.RANK1, {}
  yield 'sonew', mkor_optax.sonew(1e-2), None, {}
  yield 'chain_adam', optax.chain(mkor_optax.scale_by_mkor(), optax.adamw(1e-3)), mkor_optax.RANK1, {}
  yield 'multisteps', mkor_optax.MultiSteps(mkor_optax.mkor(1e-2), every_k_schedule=2,
                                                kind=mkor_optax.RANK1), \
      mkor_optax.RANK1, {}
  yield 'quadratic', optax.chain(mkor_optax.scale_by_mkor(), lamb,
                                 mkor_optax.scale_by_quadratic_step()), mkor_optax.RANK1, \
      {'value': True, 'value_fn': True}


def run_linen(tx, kind, extra):
  params = Net().init(jax.random.PRNGKey(0), batch(0)[0])['params']
  state = tx.init(params)
  grad = (mkor_optax.value_and_grad(loss_fn, kind=kind) if kind is not None
          else lambda p, x, y: (*jax.value_and_grad(loss_fn)(p, x, y), None))

  @jax.jit
  def step(params, state, x, y):
    loss, g, stats = grad(params, x, y)
    kw = {} if stats is None else {'stats': stats}
    if extra.get('value'):
      kw['value'] = loss
    if extra.get('value_fn'):
      kw['value_fn'] = lambda p: loss_fn(p, x, y)
      kw['grad'] = g
      kw['curvature'] = mkor_optax.gauss_newton(
          lambda p: Net().apply({'params': p}, x),
          lambda out: optax.softmax_cross_entropy_with_integer_labels(out, y).mean())
    u, state = tx.update(g, state, params, **kw)
    return optax.apply_updates(params, u), state, loss

  out = []
  for t in range(STEPS):
    params, state, loss = step(params, state, *batch(t))
    out.append((loss, params, state))
  return out


class NNXNet(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(2, 4, (3, 3), rngs=rngs)
    self.wide = nnx.Linear(144, 300, rngs=rngs)
    self.head = nnx.Linear(300, 5, use_bias=False, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.conv(x)).reshape(x.shape[0], -1)
    return self.head(nnx.tanh(self.wide(x)))


def run_nnx():
  model = NNXNet(nnx.Rngs(0))
  opt = nnx.Optimizer(model, mkor_optax.mkor(1e-2), wrt=nnx.Param)

  def loss(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

  @nnx.jit
  def step(model, opt, x, y):
    value, grads, stats = mkor_optax.nnx.value_and_grad(loss, kind=mkor_optax.RANK1)(model, x, y)
    opt.update(model, grads, stats=stats)
    return value

  out = []
  for t in range(STEPS):
    value = step(model, opt, *batch(t))
    out.append((value, nnx.state(model, nnx.Param), nnx.state(opt)))
  return out


def flatten(name, traj) -> dict:
  flat = {}
  for t, tree in enumerate(traj):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    for path, leaf in leaves:
      key = f'{name}/{t}/{jax.tree_util.keystr(path)}'
      a = np.ascontiguousarray(jax.device_get(leaf))
      flat[key] = f'{a.dtype}{list(a.shape)}:{hashlib.sha256(a.tobytes()).hexdigest()[:24]}'
  return flat


def record() -> dict:
  flat = {}
  for name, tx, kind, extra in cases():
    flat.update(flatten(name, run_linen(tx, kind, extra)))
    print(f'{name}: done', flush=True)
  flat.update(flatten('nnx_mkor', run_nnx()))
  print('nnx_mkor: done', flush=True)
  return flat


def check_renamed(want: dict, flat: dict) -> int:
  """State fields were renamed or regrouped: compare, per case and step, the
  multiset of array hashes (every array equal bit for bit, wherever it sits)."""
  def groups(d):
    out: dict = {}
    for k, v in d.items():
      case, step = k.split('/')[:2]
      out.setdefault((case, int(step)), []).append(v)
    return {k: sorted(v) for k, v in out.items()}
  a, b = groups(want), groups(flat)
  if set(a) != set(b):
    print(f'cases or steps differ: {sorted(set(a) ^ set(b))[:5]}')
    return 1
  for key in sorted(a):
    if a[key] != b[key]:
      lost = sorted(set(a[key]) - set(b[key]))
      print(f'first difference: case {key[0]} step {key[1]}: {len(lost)} recorded arrays not '
            f'produced now, e.g. {lost[:2]}')
      return 1
  print(f'all {len(want)} arrays equal bit for bit (paths renamed: compared per case and step)')
  return 0


MACHINE_KEY = '_machine'


def cpu_model() -> str:
  """The host CPU's model name (its architecture where that is not known)."""
  import platform
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), cpu)
  except OSError:
    pass
  return cpu


def machine() -> str:
  """The CPU model and the versions that the recorded bytes depend on."""
  import jaxlib
  return f'{cpu_model()}; jax {jax.__version__}, jaxlib {jaxlib.__version__}, numpy {np.__version__}'


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  group = ap.add_mutually_exclusive_group(required=True)
  group.add_argument('--save')
  group.add_argument('--check')
  args = ap.parse_args(argv)
  flat = record()
  if args.save:
    with open(args.save, 'w') as f:
      json.dump({**flat, MACHINE_KEY: machine()}, f, indent=0, sort_keys=True)
    print(f'{len(flat)} arrays recorded in {args.save}')
    return 0
  with open(args.check) as f:
    want = json.load(f)
  made, here = want.pop(MACHINE_KEY, 'an unrecorded machine'), machine()
  if made != here:
    print(f'note: {args.check} was recorded on {made}; this is {here}. Differences can be '
          "the machine's rounding: record the base commit here and check against that.")
  if set(want) != set(flat):
    return check_renamed(want, flat)
  for key in sorted(want, key=lambda k: (k.split('/')[0], int(k.split('/')[1]), k)):
    if want[key] != flat[key]:
      print(f'first difference: {key}: {want[key]} != {flat[key]}')
      return 1
  print(f'all {len(want)} arrays equal bit for bit')
  return 0

if __name__ == '__main__':
  sys.exit(main())
