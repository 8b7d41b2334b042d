"""A small CNN on digits (strided and padded nn.Conv layers, all preconditioned).
Run:
    python examples/cnn.py [--optimizers lamb,mkor] [--steps 300] [--smoke]
"""

import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(__file__))
from common import batches, classification_loss, compare, example_args, load_digits  # noqa: E402


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = x[..., None]                                               # (B, 8, 8, 1)
    x = nn.relu(nn.Conv(16, (3, 3), padding='SAME')(x))
    x = nn.relu(nn.Conv(32, (3, 3), strides=2, padding='SAME')(x))  # (B, 4, 4, 32)
    x = nn.relu(nn.Conv(32, (3, 3), padding='VALID')(x))           # (B, 2, 2, 32)
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


def main():
  args = example_args(__doc__, steps=300, lr=1e-2, methods='lamb,mkor')
  (x, y), (x_test, y_test) = load_digits(seed=args.seed)
  model = CNN()
  params = model.init(jax.random.PRNGKey(args.seed), x[:2])['params']
  accuracy = jax.jit(lambda p: jnp.mean(jnp.argmax(model.apply({'params': p}, x_test), -1) == y_test))
  print(f'CNN on digits, batch 64, {args.steps} steps, lr {args.lr}; eval = test accuracy')
  compare(args, params, lambda: batches(x, y, 64, args.seed), classification_loss(model),
          evaluate=lambda p: float(accuracy(p)))


if __name__ == '__main__':
  main()
