"""A small ResNet with BatchNorm on digits: every convolution feeds a
training-mode BatchNorm, so its mean output gradient is zero. MKOR with the
batch-mean statistics (``--kind mean``) warns and names those layers. With
the default sketched statistics their output-side factors see the curvature.
Run:
    python examples/resnet.py [--optimizers lamb,mkor] [--kind sketch|mean] [--steps 300] [--smoke]

The loss is the training-mode loss (batch statistics). The running averages
that evaluation would use are not kept, because this compares training.
"""

import os
import sys

import flax.linen as nn
import jax
import optax

sys.path.insert(0, os.path.dirname(__file__))
from common import METHODS, Method, batches, compare, example_args, load_digits  # noqa: E402
import mkor_optax  # noqa: E402


class Block(nn.Module):
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x):
    norm = lambda name: nn.BatchNorm(use_running_average=False, name=name)
    h = nn.relu(norm('bn1')(nn.Conv(self.features, (3, 3), self.strides, use_bias=False,
                                    name='conv1')(x)))
    h = norm('bn2')(nn.Conv(self.features, (3, 3), use_bias=False, name='conv2')(h))
    if x.shape != h.shape:
      x = norm('bn_skip')(nn.Conv(self.features, (1, 1), self.strides, use_bias=False,
                                  name='skip_conv')(x))
    return nn.relu(x + h)


class ResNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = x[..., None]                                                 # (B, 8, 8, 1)
    x = nn.relu(nn.BatchNorm(use_running_average=False, name='bn')(
        nn.Conv(16, (3, 3), use_bias=False, name='stem_conv')(x)))
    x = Block(16, name='block1')(x)
    x = Block(32, strides=2, name='block2')(x)                      # (B, 4, 4, 32)
    return nn.Dense(10, name='head')(x.mean(axis=(1, 2)))


def init(model, x, seed):
  """``(params, batch_stats)`` of ``model`` for inputs like ``x``."""
  variables = model.init(jax.random.PRNGKey(seed), x)
  return variables['params'], variables['batch_stats']


def train_mode_loss(model, batch_stats):
  """Cross-entropy in training mode (BatchNorm on the batch's statistics)."""
  def loss_fn(params, x, y):
    logits, _ = model.apply({'params': params, 'batch_stats': batch_stats}, x,
                            mutable=['batch_stats'])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss_fn


def main():
  args = example_args(__doc__, steps=300, lr=1e-2, methods='lamb,mkor',
                      extra={'--kind': dict(default='sketch', choices=['mean', 'sketch'],
                                            help="MKOR's statistics (sketch: the default)")})
  methods = dict(METHODS)
  if args.kind == 'mean':
    methods['mkor'] = Method(METHODS['mkor'].make, mkor_optax.RANK1)
  (x, y), _ = load_digits(seed=args.seed)
  model = ResNet()
  params, batch_stats = init(model, x[:2], args.seed)
  print(f'ResNet with BatchNorm on digits, batch 64, {args.steps} steps, lr {args.lr}, '
        f'MKOR statistics: {args.kind}')
  compare(args, params, lambda: batches(x, y, 64, args.seed), train_mode_loss(model, batch_stats),
          methods=methods)


if __name__ == '__main__':
  main()
