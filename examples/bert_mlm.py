"""A small BERT-style encoder trained with masked-language modelling on the
English text of Python's bundled pydoc_data.topics, LAMB as the backend as in
the MKOR paper. Run:
    python examples/bert_mlm.py [--optimizers lamb,mkor] [--steps 300] [--smoke]
"""

import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import (Encoder, compare, example_args, load_pydoc_tokens, mlm_batches,  # noqa: E402
                    mlm_loss)


def main():
  args = example_args(__doc__, steps=300, lr=2e-3, methods='lamb,mkor', extra={
      '--d': dict(type=int, default=128), '--depth': dict(type=int, default=2),
      '--seq': dict(type=int, default=64), '--batch': dict(type=int, default=32),
      '--vocab': dict(type=int, default=2000)})
  if args.smoke:
    args.d, args.depth, args.seq, args.batch = 32, 1, 16, 8
  tokens, vocab = load_pydoc_tokens(args.seq, args.vocab)
  rng = np.random.default_rng(args.seed)
  perm = rng.permutation(len(tokens))
  n_test = max(1, len(tokens) // 20)
  test, train = tokens[perm[:n_test]], tokens[perm[n_test:]]
  model = Encoder(vocab=len(vocab), d=args.d, depth=args.depth, heads=4, max_len=args.seq)
  params = model.init(jax.random.PRNGKey(args.seed), tokens[:2])['params']
  loss_fn = mlm_loss(model)
  test_batch = next(mlm_batches(test, min(len(test), 256), seed=123))
  test_loss = jax.jit(lambda p: loss_fn(p, *test_batch))
  print(f'MLM on pydoc_data.topics: {len(train)} sequences of {args.seq} tokens, vocab '
        f'{len(vocab)}, d={args.d}, {args.depth} blocks, batch {args.batch} '
        f'({args.batch * args.seq} tokens), {args.steps} steps, lr {args.lr}; eval = test MLM loss')
  compare(args, params, lambda: mlm_batches(train, args.batch, args.seed), loss_fn,
          evaluate=lambda p: float(test_loss(p)))


if __name__ == '__main__':
  main()
