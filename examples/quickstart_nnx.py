"""Quickstart, Flax NNX form: an ordinary nnx.Optimizer loop on digits, with MKOR.

The same two changed lines as examples/quickstart.py (the linen form), marked.
Run:
    python examples/quickstart_nnx.py [--steps 300] [--smoke]
"""

import argparse
import os
import sys

import jax.numpy as jnp
import optax
from flax import nnx

try:  # a progress bar on a terminal, when tqdm is installed (pip install -e '.[examples]')
  from tqdm.auto import tqdm
except ImportError:
  tqdm = None

sys.path.insert(0, os.path.dirname(__file__))
import mkor_optax  # noqa: E402
from common import batches, load_digits  # noqa: E402


class MLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(64, 128, rngs=rngs)
    self.fc2 = nnx.Linear(128, 128, rngs=rngs)
    self.out = nnx.Linear(128, 10, rngs=rngs)

  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    x = nnx.tanh(self.fc1(x))
    x = nnx.tanh(self.fc2(x))
    return self.out(x)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--steps', type=int, default=300)
  ap.add_argument('--smoke', action='store_true')
  args = ap.parse_args()
  steps = 3 if args.smoke else args.steps

  (x, y), (x_test, y_test) = load_digits()
  model = MLP(nnx.Rngs(0))

  def loss_fn(model, x, y):
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  optimizer = nnx.Optimizer(model, mkor_optax.mkor(1e-2), wrt=nnx.Param)  # was: optax.lamb(1e-2)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    loss, grads, stats = mkor_optax.value_and_grad(loss_fn)(model, x, y)  # was: nnx.value_and_grad
    optimizer.update(model, grads, stats=stats)
    return loss

  data = batches(x, y, 64, seed=0)
  bar = tqdm(range(steps), disable=None) if tqdm else range(steps)
  for step in bar:
    loss = train_step(model, optimizer, *next(data))
    if tqdm:
      bar.set_postfix(loss=f'{float(loss):.4f}')
  print(f'final training loss {float(loss):.4f}')
  accuracy = jnp.mean(jnp.argmax(model(x_test), -1) == y_test)
  print(f'test accuracy {float(accuracy):.3f}')


if __name__ == '__main__':
  main()
