"""The deep autoencoder on digits (64-128-64-16-64-128-64), the classic
second-order benchmark of K-FAC, Eva and the MKOR paper, with several
optimizers side by side. Run:
    python examples/autoencoder.py [--optimizers lamb,mkor,kfac,eva] [--steps 500] [--smoke]
"""

import os
import sys

import jax

sys.path.insert(0, os.path.dirname(__file__))
from common import Autoencoder, autoencoder_loss, batches, compare, example_args, load_digits  # noqa: E402


def main():
  args = example_args(__doc__, steps=500, lr=1e-2, methods='lamb,mkor,kfac,eva')
  (x, y), (x_test, _) = load_digits(seed=args.seed)
  model = Autoencoder()
  params = model.init(jax.random.PRNGKey(args.seed), x[:2])['params']
  loss_fn = autoencoder_loss(model)
  test_loss = jax.jit(lambda p: loss_fn(p, x_test))
  print(f'autoencoder on digits, batch 256, {args.steps} steps, lr {args.lr}; eval = test loss')
  compare(args, params, lambda: batches(x, y, 256, args.seed), loss_fn,
          evaluate=lambda p: float(test_loss(p)))


if __name__ == '__main__':
  main()
