"""Shared bits of the examples: bundled data, models, a training loop."""

from __future__ import annotations

import functools
import inspect
import time
from typing import Callable, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import mkor_optax


def load_digits(test_fraction: float = 0.2, seed: int = 0):
  """scikit-learn's bundled 8x8 digits (1797 images), scaled to [0, 1]."""
  try:
    from sklearn.datasets import load_digits as _load
  except ImportError:
    raise SystemExit("the examples read scikit-learn's bundled digits: "
                     "pip install -e '.[examples]' (or pip install scikit-learn)") from None
  data = _load()
  x = (data.images / 16.0).astype(np.float32)  # (n, 8, 8)
  y = data.target.astype(np.int32)
  perm = np.random.default_rng(seed).permutation(len(y))
  x, y = x[perm], y[perm]
  n_test = int(len(y) * test_fraction)
  return (x[n_test:], y[n_test:]), (x[:n_test], y[:n_test])


class MLP(nn.Module):
  features: Sequence[int] = (128, 128)
  classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for f in self.features:
      x = nn.tanh(nn.Dense(f)(x))
    return nn.Dense(self.classes)(x)


class Autoencoder(nn.Module):
  """The classic deep autoencoder benchmark of second-order methods, sized
  for 8x8 digits: 64-128-64-16-64-128-64, tanh, logits out."""
  widths: Sequence[int] = (128, 64, 16, 64, 128)

  @nn.compact
  def __call__(self, x):
    flat = x.reshape(x.shape[0], -1)
    h = flat
    for w in self.widths:
      h = nn.Dense(w)(h)
      h = h if w == min(self.widths) else nn.tanh(h)
    return nn.Dense(flat.shape[-1])(h)


def autoencoder_loss(model):
  """Bernoulli reconstruction error, summed over pixels, mean over images."""
  def loss_fn(params, x, y=None):
    del y
    flat = x.reshape(x.shape[0], -1)
    logits = model.apply({'params': params}, x)
    return jnp.mean(jnp.sum(optax.sigmoid_binary_cross_entropy(logits, flat), axis=-1))
  return loss_fn


class EncoderBlock(nn.Module):
  """Pre-LayerNorm transformer encoder block (BERT-style, GELU MLP)."""
  heads: int
  mlp_ratio: int = 4

  @nn.compact
  def __call__(self, h):
    d = h.shape[-1]
    a = nn.LayerNorm()(h)
    h = h + nn.MultiHeadDotProductAttention(num_heads=self.heads)(a, a)
    m = nn.LayerNorm()(h)
    m = nn.Dense(self.mlp_ratio * d)(m)
    return h + nn.Dense(d)(nn.gelu(m))


class Encoder(nn.Module):
  """Token embedding + learned positions + encoder blocks + vocabulary head."""
  vocab: int
  d: int = 128
  depth: int = 2
  heads: int = 4
  max_len: int = 512

  @nn.compact
  def __call__(self, tokens):
    h = nn.Embed(self.vocab, self.d)(tokens)
    pos = self.param('pos', nn.initializers.normal(0.02), (self.max_len, self.d))
    h = h + pos[:tokens.shape[-1]]
    for _ in range(self.depth):
      h = EncoderBlock(self.heads)(h)
    return nn.Dense(self.vocab)(nn.LayerNorm()(h))


def token_loss(model):
  """Cross-entropy of predicted tokens (targets given per position)."""
  def loss_fn(params, tokens, targets):
    logits = model.apply({'params': params}, tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
  return loss_fn


def batches(x, y, batch_size: int, seed: int):
  """An endless, seeded stream of shuffled minibatches."""
  rng = np.random.default_rng(seed)
  while True:
    perm = rng.permutation(len(y))
    for i in range(0, len(y) - batch_size + 1, batch_size):
      idx = perm[i:i + batch_size]
      yield x[idx], y[idx]


def classification_loss(model):
  def loss_fn(params, x, y):
    logits = model.apply({'params': params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss_fn


class Method(NamedTuple):
  """An optimizer as the examples and benchmarks run it."""
  make: Callable[[float], optax.GradientTransformation]  # learning rate -> optimizer
  kind: Optional[mkor_optax.StatKind] = None  # statistics it needs (None: plain grads)
  needs_value: bool = False  # passes the loss as value=


METHODS = {
    'lamb': Method(lambda lr: optax.lamb(lr, weight_decay=0.0)),
    'adamw': Method(lambda lr: optax.adamw(lr, weight_decay=0.0)),
    # MKOR as value_and_grad captures by default (SKETCH), and with the batch means
    'mkor': Method(lambda lr: mkor_optax.mkor(lr, weight_decay=0.0), mkor_optax.SKETCH),
    'mkor_mean': Method(lambda lr: mkor_optax.mkor(lr, weight_decay=0.0), mkor_optax.RANK1),
    'mkor_h': Method(lambda lr: mkor_optax.mkor_h(lr, weight_decay=0.0), mkor_optax.SKETCH, True),
    'kfac': Method(lambda lr: mkor_optax.kfac(lr, weight_decay=0.0), mkor_optax.COVARIANCE),
    'eva': Method(lambda lr: mkor_optax.eva(lr, weight_decay=0.0), mkor_optax.RANK1),
    'sonew': Method(lambda lr: mkor_optax.sonew(lr)),
}


def make_step(loss_fn, opt, kind=None, needs_value=False, donate=False, capture=None):
  """A jitted train step; the two lines MKOR changes are marked.
  ``donate``: the parameters and the optimizer state are donated (updated
  in place; the arrays passed in cannot be used after the call).
  ``capture``: the ``value_and_grad`` to capture with (default
  ``mkor_optax.value_and_grad``; another version's, for a comparison)."""
  if kind is not None:
    grad_fn = (capture or mkor_optax.value_and_grad)(loss_fn, kind=kind)  # changed line 1
  else:
    plain = jax.value_and_grad(loss_fn)
    grad_fn = lambda p, *b: (*plain(p, *b), None)

  @functools.partial(jax.jit, donate_argnums=(0, 1) if donate else ())
  def step(params, opt_state, *batch):
    loss, grads, stats = grad_fn(params, *batch)
    extra = {'stats': stats} if kind is not None else {}
    if needs_value:
      extra['value'] = loss
    updates, opt_state = opt.update(grads, opt_state, params, **extra)  # changed line 2
    return optax.apply_updates(params, updates), opt_state, loss

  return step


# How a step's cost is timed, by make demo and benchmarks/step_cost.py alike:
# blocks of whole refresh periods of default MKOR (its inv_freq), each lasting
# at least MIN_BLOCK_S of the first function's steps, the functions taking turns.
PERIOD = inspect.signature(mkor_optax.mkor).parameters['inv_freq'].default
MIN_BLOCK_S = 0.2


def time_block(fn, carry, n):
  """Seconds per call of ``n`` chained calls ``carry = fn(carry)``, waited
  for at the end only (the calls queue as in a training loop that does not
  read the loss every step)."""
  carry = jax.block_until_ready(fn(carry))  # not timed: settles any recompilation
  t0 = time.perf_counter()
  for _ in range(n):
    carry = fn(carry)
  jax.block_until_ready(carry)
  return (time.perf_counter() - t0) / n, carry


def interleaved(fns: dict, carries: dict, n: int, repeats: int) -> dict:
  """Median seconds per call of each fn, timed in alternating blocks of ``n``
  calls, so that a noisy neighbour slows every fn alike."""
  samples = {k: [] for k in fns}
  for _ in range(repeats):
    for k, fn in fns.items():
      dt, carries[k] = time_block(fn, carries[k], n)
      samples[k].append(dt)
  return {k: float(np.median(v)) for k, v in samples.items()}


def block_steps(fn, carry, period: int = PERIOD, min_s: float = MIN_BLOCK_S) -> int:
  """Calls per timed block: as many whole ``period``s as make ``fn``'s block
  last ``min_s`` seconds."""
  dt, _ = time_block(fn, carry, period)
  return period * max(1, int(np.ceil(min_s / (period * dt))))


def seconds_per_step(fns: dict, carries: dict, repeats: int = 7, n: Optional[int] = None,
                     period: int = PERIOD) -> dict:
  """Median seconds per step of each ``fn`` (``carry -> carry``), in
  interleaved blocks of ``n`` steps (default: :func:`block_steps` of the
  first fn, whole ``period``s): the per-step cost that
  benchmarks/step_cost.py reports."""
  first = next(iter(fns))
  n = n or block_steps(fns[first], carries[first], period)
  return interleaved(fns, dict(carries), n, repeats)


def train(params, opt, data_iter, steps: int, loss_fn, kind=None, needs_value=False,
          progress: bool = False, desc: str = ''):
  """Runs ``steps`` steps; returns (params, losses, seconds after each step).

  The step is compiled (and run once) before the clock starts."""
  step = make_step(loss_fn, opt, kind, needs_value)
  opt_state = opt.init(params)
  losses, times = [], []
  batch = next(data_iter)
  jax.block_until_ready(step(params, opt_state, *batch))
  it = range(steps)
  if progress:
    try:
      from tqdm.auto import tqdm
      it = tqdm(it, desc=desc, leave=False, disable=None)  # off when not a terminal
    except ImportError:
      pass
  t0 = time.perf_counter()
  for _ in it:
    params, opt_state, loss = step(params, opt_state, *batch)
    losses.append(float(loss))
    times.append(time.perf_counter() - t0)
    batch = next(data_iter)
  return params, np.array(losses), np.array(times)


def run_method(name, params, data_iter, steps, loss_fn, lr, methods=None, **kw):
  m = (methods or METHODS)[name]
  return train(params, m.make(lr), data_iter, steps, loss_fn, m.kind, m.needs_value, **kw)


def example_args(description, steps, lr, methods, extra=None):
  """The command line every comparison example shares."""
  import argparse
  ap = argparse.ArgumentParser(description=description)
  ap.add_argument('--steps', type=int, default=steps)
  ap.add_argument('--lr', type=float, default=lr, help='learning rate of every optimizer')
  ap.add_argument('--optimizers', default=methods, help=f'comma list of {sorted(METHODS)}')
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--smoke', action='store_true', help='a few steps at a tiny size (CI)')
  for args, kw in (extra or {}).items():
    ap.add_argument(args, **kw)
  args = ap.parse_args()
  if args.smoke:
    args.steps = 3
  unknown = set(args.optimizers.split(',')) - set(METHODS)
  if unknown:
    ap.error(f'unknown optimizers {sorted(unknown)}; choose from {sorted(METHODS)}')
  return args


def compare(args, params0, make_iter, loss_fn, evaluate=None, methods=None):
  """Trains every ``args.optimizers`` from ``params0`` on the same data and
  prints final loss, an optional evaluation and ms/step as a table
  (``methods``: the name -> :class:`Method` table, ``METHODS`` by default)."""
  rows = []
  for name in args.optimizers.split(','):
    params, losses, times = run_method(name, params0, make_iter(), args.steps, loss_fn, args.lr,
                                       methods=methods, progress=not args.smoke, desc=name)
    tail = losses[-max(1, len(losses) // 10):].mean()
    ms = 1e3 * (np.median(np.diff(times)) if len(times) > 1 else times[0])
    rows.append((name, tail, None if evaluate is None else evaluate(params), ms))
  header = '| optimizer | train loss (last 10% of steps) |' + (' eval |' if evaluate else '') + ' ms/step |'
  print(header)
  print('|---' * (header.count('|') - 1) + '|')
  for name, tail, ev, ms in rows:
    print(f'| {name} | {tail:.4f} |' + (f' {ev:.4f} |' if evaluate else '') + f' {ms:.2f} |')
  return rows


def load_pydoc_tokens(seq_len: int, vocab_size: int):
  """The English text of Python's bundled ``pydoc_data.topics`` as word-level
  token sequences ``(n, seq_len)``. Ids: 0 pad, 1 [MASK], 2 [UNK], then the
  most frequent words and symbols."""
  import re
  from collections import Counter
  from pydoc_data.topics import topics
  words = re.findall(r'[a-z]+|[0-9]+|[^\sa-z0-9]', ' '.join(topics[k] for k in sorted(topics)).lower())
  common = [w for w, _ in Counter(words).most_common(vocab_size - 3)]
  ids = {w: i + 3 for i, w in enumerate(common)}
  stream = np.array([ids.get(w, 2) for w in words], np.int32)
  n = len(stream) // seq_len
  return stream[:n * seq_len].reshape(n, seq_len), ['<pad>', '<mask>', '<unk>'] + common


MASK_ID = 1


def mlm_batches(tokens, batch_size: int, seed: int, rate: float = 0.15):
  """Endless masked-LM batches: (inputs with [MASK], targets, weights on masked positions)."""
  rng = np.random.default_rng(seed)
  for x, _ in batches(tokens, np.zeros(len(tokens)), batch_size, seed):
    mask = rng.random(x.shape) < rate
    mask[:, 0] |= ~mask.any(axis=1)  # at least one masked position per sequence
    yield np.where(mask, MASK_ID, x), x, mask.astype(np.float32)


def mlm_loss(model):
  """Cross-entropy on the masked positions (mean over them)."""
  def loss_fn(params, inputs, targets, weights):
    logits = model.apply({'params': params}, inputs)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)
  return loss_fn
