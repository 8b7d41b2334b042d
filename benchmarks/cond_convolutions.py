"""Convolutions inside a ``lax.cond``: what XLA:CPU makes of them, and what
the forward forms of mkor_optax.conv_sketch (a convolution's input sketch,
and its input cotangent in the adaptive recipe's statistics pass) save the
steps that run one there.

1. One convolution of a ResNet block's shape (64 x 8 x 8 x 16, 3 x 3, 16
   channels), its two gradients (the input's also in the forward form of
   ``conv_sketch.input_gradient``) and the input sketch (k = 4) in its
   transposed (``jax.vjp``) and forward forms: microseconds per call at a
   program's top level and inside a taken ``lax.cond`` branch.
2. Per step against LAMB, in one process with interleaved blocks: default
   ``mkor`` (its sketches formed in the capture, at the top level) and
   ``adaptive_mkor`` (its statistics pass inside a ``lax.cond`` on the steps
   that refresh): with the transposed forms (``conv_sketch.forward_form``
   and ``conv_sketch.input_gradient`` switched off while the step is
   traced), with the forward-form sketch, and (``adaptive_mkor``, whose
   statistics pass takes them) with the forward-form input cotangents too.

    python benchmarks/cond_convolutions.py [--tasks cnn,resnet] [--out results/bench/cond_convolutions.md]
"""

from __future__ import annotations

import argparse
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
from mkor_optax import conv_sketch  # noqa: E402
from common import make_step, seconds_per_step  # noqa: E402
from compare import FACTOR_DIM, build  # noqa: E402
from step_cost import machine  # noqa: E402

# default mkor's refresh period and the adaptive recipe's (refresh and damping adaptation)
PERIOD = int(np.lcm(7, 5))


def per_call_us(f, *args, calls=200, repeats=5) -> float:
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(calls):
      out = f(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / calls)
  return 1e6 * float(np.median(times))


def kernels() -> dict:
  """name -> (top-level µs, in-cond µs) for one block-sized convolution."""
  key = jax.random.split(jax.random.PRNGKey(0), 4)
  x = jax.random.normal(key[0], (64, 8, 8, 16))
  kernel = jax.random.normal(key[1], (3, 3, 16, 16))
  dy = jax.random.normal(key[2], (64, 8, 8, 16))
  signs = jnp.sign(jax.random.normal(key[3], (64 * 8 * 8, 4)))
  conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), 'SAME',
                                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  geometry = lambda x: conv_sketch.geometry(lambda p: conv(x, p), (3, 3, 16, 16), x)
  ops = {  # functions of their inputs (arguments of the jit, not constants it could fold)
      'convolution': lambda x, k, dy, s: conv(x, k),
      'kernel gradient': lambda x, k, dy, s: jax.vjp(lambda k: conv(x, k), k)[1](dy)[0],
      'input gradient': lambda x, k, dy, s: jax.vjp(lambda v: conv(v, k), x)[1](dy)[0],
      'input sketch, transposed form': lambda x, k, dy, s: jax.vjp(
          lambda p: conv(x, p), jnp.zeros((3, 3, 16, 4)))[1](s.reshape(64, 8, 8, 4))[0],
      # (the geometry read from x's convolution; the sums are of the arguments)
      'input sketch, forward form': lambda x, k, dy, s: conv_sketch.forward_form(
          geometry(x), (3, 3, 16, 16), x)(s),
      'input gradient, forward form': lambda x, k, dy, s: conv_sketch.input_gradient(
          geometry(x), (3, 3, 16, 16), x.shape)(dy, k),
  }
  args = (x, kernel, dy, signs)
  out = {}
  for name, op in ops.items():
    shape = jax.eval_shape(op, *args)
    top = jax.jit(lambda on, *a, op=op: op(*a) * on)
    branch = jax.jit(lambda on, *a, op=op, shape=shape: jax.lax.cond(
        on > 0, lambda: op(*a), lambda: jnp.zeros(shape.shape, shape.dtype)))
    out[name] = (per_call_us(top, 1.0, *args), per_call_us(branch, 1.0, *args))
  return out


def adaptive_step(task):
  import adaptive_race
  model, loss_of_outputs, fisher, _ = adaptive_race.tasks()[task]
  opt = mkor_optax.adaptive_mkor()
  step = adaptive_race.adaptive_step(model, opt, None, loss_of_outputs, fisher)
  return opt, step


def steps(task: str, repeats: int) -> dict:
  """name -> per-step ratio to LAMB (the first task batch of seed 0)."""
  params, make_iter, loss_fn, _ = build(task, quick=True, seed=0)
  batch = tuple(next(make_iter()))
  key = (jax.random.PRNGKey(0),)
  fns, carries = {}, {}

  def add(name, opt, step, inputs):
    state = opt.init(params)
    jax.block_until_ready(step(params, state, *inputs))  # traced here
    fns[name] = lambda c, step=step: step(c[0], c[1], *inputs)[:2]
    carries[name] = (params, state)

  lamb = optax.lamb(1e-2)
  add('lamb', lamb, make_step(loss_fn, lamb), batch)
  real = conv_sketch.forward_form, conv_sketch.input_gradient
  off = lambda *a, **k: None
  forms = {'transposed': (off, off), 'forward sketch': (real[0], off),
           'forward sketch and input gradient': real}
  try:
    for form, (sketch, input_gradient) in forms.items():
      conv_sketch.forward_form, conv_sketch.input_gradient = sketch, input_gradient
      if form != 'forward sketch and input gradient':  # (mkor's capture takes no input gradient)
        mkor = mkor_optax.mkor(1e-2, max_factor_dim=FACTOR_DIM.get(task, 4096))
        add(f'mkor, {form}', mkor, make_step(loss_fn, mkor, mkor_optax.SKETCH), batch)
      opt, step = adaptive_step(task)
      add(f'adaptive_mkor, {form}', opt, step, batch + key)
  finally:
    conv_sketch.forward_form, conv_sketch.input_gradient = real
  med = seconds_per_step(fns, carries, repeats=repeats, period=PERIOD)
  return {name: med[name] / med['lamb'] for name in fns} | {'lamb ms': 1e3 * med['lamb']}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--tasks', default='cnn,resnet')
  ap.add_argument('--rounds', type=int, default=3, help='rounds of interleaved blocks per task')
  ap.add_argument('--repeats', type=int, default=7, help='blocks per configuration per round')
  ap.add_argument('--out', default=None, help='write the markdown here')
  args = ap.parse_args(argv)
  lines = [f'Convolutions inside a `lax.cond` ({machine()}); `python benchmarks/cond_convolutions.py`.',
           '', '**One convolution** (64 x 8 x 8 x 16 input, 3 x 3 kernel, 16 channels; the '
           'sketch k = 4): µs per call, median of 5 blocks of 200', '',
           '| computation | top level | inside a taken `lax.cond` | ratio |', '|---|---|---|---|']
  for name, (top, branch) in kernels().items():
    lines.append(f'| {name} | {top:.0f} | {branch:.0f} | {branch / top:.1f} |')
  lines += ['', f'**Per step against LAMB**: medians of {args.repeats} interleaved blocks of whole '
            f'{PERIOD}-step periods, each round a fresh median; one row per round', '']
  for task in args.tasks.split(','):
    rounds = [steps(task, args.repeats) for _ in range(args.rounds)]
    names = [n for n in rounds[0] if n not in ('lamb', 'lamb ms')]
    lines += [f'*{task}*', '', '| round | ' + ' | '.join(names) + ' | LAMB ms/step |',
              '|---' * (len(names) + 2) + '|']
    for i, r in enumerate(rounds):
      lines.append(f'| {i + 1} | ' + ' | '.join(f'{r[n]:.2f}' for n in names)
                   + f" | {r['lamb ms']:.2f} |")
    lines.append('')
  text = '\n'.join(lines)
  print(text)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text + '\n')


if __name__ == '__main__':
  main()
