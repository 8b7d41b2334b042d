"""A Flax NNX CNN with BatchNorm and Dropout on digits: LAMB against MKOR.

The NNX counterpart of examples/cnn.py (strided and padded nnx.Conv layers,
all preconditioned), trained the way NNX code is written: nnx.Optimizer,
nnx.jit, model.train()/model.eval(), an RNG stream for Dropout.
Run:
    python examples/cnn_nnx.py [--optimizers lamb,mkor,kfac] [--steps 300] [--smoke]
"""

import argparse
import os
import sys
import time

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(__file__))
import mkor_optax  # noqa: E402
from common import batches, load_digits  # noqa: E402


class CNN(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 16, (3, 3), padding='SAME', rngs=rngs)
    self.bn1 = nnx.BatchNorm(16, rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, (3, 3), strides=2, padding='SAME', rngs=rngs)  # (B, 4, 4, 32)
    self.bn2 = nnx.BatchNorm(32, rngs=rngs)
    self.conv3 = nnx.Conv(32, 32, (3, 3), padding='VALID', rngs=rngs)            # (B, 2, 2, 32)
    self.dropout = nnx.Dropout(0.1, rngs=rngs)
    self.head = nnx.Linear(128, 10, rngs=rngs)

  def __call__(self, x):
    x = x[..., None]
    x = self.bn1(nnx.relu(self.conv1(x)))
    x = self.bn2(nnx.relu(self.conv2(x)))
    x = nnx.relu(self.conv3(x))
    return self.head(self.dropout(x.reshape(x.shape[0], -1)))


def loss_fn(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


OPTIMIZERS = {  # name -> (transform, statistics kind or None, passes the loss)
    'lamb': (lambda lr: optax.lamb(lr), None, False),
    'mkor': (lambda lr: mkor_optax.mkor(lr), mkor_optax.SKETCH, False),
    'mkor_h': (lambda lr: mkor_optax.mkor_h(lr), mkor_optax.SKETCH, True),
    'kfac': (lambda lr: mkor_optax.kfac(lr), mkor_optax.COVARIANCE, False),
    'eva': (lambda lr: mkor_optax.eva(lr), mkor_optax.RANK1, False),
    'sonew': (lambda lr: mkor_optax.sonew(lr), None, False),
}


def train(name, steps, lr, seed, data, x_test, y_test):
  make, kind, wants_value = OPTIMIZERS[name]
  model = CNN(nnx.Rngs(params=seed, dropout=seed + 1))
  optimizer = nnx.Optimizer(model, make(lr), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, y):
    if kind is None:
      loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
      optimizer.update(model, grads)
    else:
      loss, grads, stats = mkor_optax.value_and_grad(loss_fn, kind=kind)(model, x, y)
      optimizer.update(model, grads, stats=stats, **({'value': loss} if wants_value else {}))
    return loss

  model.train()
  losses, start = [], None
  for i in range(steps):
    losses.append(float(step(model, optimizer, *next(data))))
    if i == 0:
      start = time.perf_counter()  # after compilation
  seconds = time.perf_counter() - start
  model.eval()
  accuracy = float(jnp.mean(jnp.argmax(model(x_test), -1) == y_test))
  tail = max(1, steps // 10)
  return np.mean(losses[-tail:]), accuracy, 1e3 * seconds / max(steps - 1, 1)


def main():
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument('--optimizers', default='lamb,mkor')
  ap.add_argument('--steps', type=int, default=300)
  ap.add_argument('--lr', type=float, default=1e-2)
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--smoke', action='store_true')
  args = ap.parse_args()
  steps = 3 if args.smoke else args.steps
  (x, y), (x_test, y_test) = load_digits(seed=args.seed)
  print(f'NNX CNN (BatchNorm, Dropout) on digits, batch 64, {steps} steps, lr {args.lr}')
  print('| optimizer | final loss (last 10%) | test accuracy | ms/step |')
  print('|---|---|---|---|')
  for name in args.optimizers.split(','):
    loss, acc, ms = train(name, steps, args.lr, args.seed, batches(x, y, 64, args.seed),
                          x_test, y_test)
    print(f'| {name} | {loss:.4f} | {acc:.3f} | {ms:.2f} |')


if __name__ == '__main__':
  main()
