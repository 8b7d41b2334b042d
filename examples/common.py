"""Shared bits of the examples: bundled data, models, a training loop."""

from __future__ import annotations

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
  from sklearn.datasets import load_digits as _load
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
    'mkor': Method(lambda lr: mkor_optax.mkor(lr, weight_decay=0.0), mkor_optax.RANK1),
    'mkor_h': Method(lambda lr: mkor_optax.mkor_h(lr, weight_decay=0.0), mkor_optax.RANK1, True),
    'kfac': Method(lambda lr: mkor_optax.kfac(lr, weight_decay=0.0), mkor_optax.COVARIANCE),
    'eva': Method(lambda lr: mkor_optax.eva(lr, weight_decay=0.0), mkor_optax.RANK1),
    'sonew': Method(lambda lr: mkor_optax.sonew(lr)),
}


def make_step(loss_fn, opt, kind=None, needs_value=False):
  """A jitted train step; the two lines MKOR changes are marked."""
  if kind is not None:
    grad_fn = mkor_optax.value_and_grad(loss_fn, kind=kind)           # changed line 1
  else:
    plain = jax.value_and_grad(loss_fn)
    grad_fn = lambda p, *b: (*plain(p, *b), None)

  @jax.jit
  def step(params, opt_state, *batch):
    loss, grads, stats = grad_fn(params, *batch)
    extra = {'stats': stats} if kind is not None else {}
    if needs_value:
      extra['value'] = loss
    updates, opt_state = opt.update(grads, opt_state, params, **extra)  # changed line 2
    return optax.apply_updates(params, updates), opt_state, loss

  return step


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
    from tqdm.auto import tqdm
    it = tqdm(it, desc=desc, leave=False)
  t0 = time.perf_counter()
  for _ in it:
    params, opt_state, loss = step(params, opt_state, *batch)
    losses.append(float(loss))
    times.append(time.perf_counter() - t0)
    batch = next(data_iter)
  return params, np.array(losses), np.array(times)


def run_method(name, params, data_iter, steps, loss_fn, lr, **kw):
  m = METHODS[name]
  return train(params, m.make(lr), data_iter, steps, loss_fn, m.kind, m.needs_value, **kw)
