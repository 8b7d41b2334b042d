"""Quickstart: an ordinary Flax training loop on digits, with MKOR.

Only two lines differ from a LAMB loop (marked). Run:
    python examples/quickstart.py [--steps 300] [--smoke]
"""

import argparse
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

try:  # a progress bar on a terminal, when tqdm is installed (pip install -e '.[examples]')
  from tqdm.auto import tqdm
except ImportError:
  tqdm = None

sys.path.insert(0, os.path.dirname(__file__))
import mkor_optax  # noqa: E402
from common import batches, load_digits  # noqa: E402


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    x = nn.tanh(nn.Dense(128)(x))
    x = nn.tanh(nn.Dense(128)(x))
    return nn.Dense(10)(x)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--steps', type=int, default=300)
  ap.add_argument('--smoke', action='store_true')
  args = ap.parse_args()
  steps = 3 if args.smoke else args.steps

  (x, y), (x_test, y_test) = load_digits()
  model = MLP()
  params = model.init(jax.random.PRNGKey(0), x[:1])['params']

  def loss_fn(params, x, y):
    logits = model.apply({'params': params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  opt = mkor_optax.mkor(1e-2)                            # was: optax.lamb(1e-2)
  opt_state = opt.init(params)

  @jax.jit
  def train_step(params, opt_state, x, y):
    loss, grads, stats = mkor_optax.value_and_grad(loss_fn)(params, x, y)  # was: jax.value_and_grad
    updates, opt_state = opt.update(grads, opt_state, params, stats=stats)
    return optax.apply_updates(params, updates), opt_state, loss

  data = batches(x, y, 64, seed=0)
  bar = tqdm(range(steps), disable=None) if tqdm else range(steps)
  for step in bar:
    params, opt_state, loss = train_step(params, opt_state, *next(data))
    if tqdm:
      bar.set_postfix(loss=f'{float(loss):.4f}')
  print(f'final training loss {float(loss):.4f}')
  accuracy = jnp.mean(jnp.argmax(model.apply({'params': params}, x_test), -1) == y_test)
  print(f'test accuracy {float(accuracy):.3f}')


if __name__ == '__main__':
  main()
