"""A convolution's input sketch as one forward convolution
(mkor_optax.conv_sketch): the float64 patch sketch ``S^T P`` on every
geometry it takes, computed in the layout that stays fast inside a
``lax.cond``, and the transposed form kept where the layer's own
convolution does not take its input as it is."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mkor_optax
from mkor_optax import conv_sketch, layers

FAST = {
    'same': (dict(kernel_size=(3, 3), padding='SAME'), (4, 8, 8, 3)),
    'same strided': (dict(kernel_size=(3, 3), strides=2, padding='SAME'), (4, 9, 8, 3)),
    'valid dilated': (dict(kernel_size=(3, 2), kernel_dilation=2, padding='VALID'), (4, 9, 8, 3)),
    'explicit pads': (dict(kernel_size=(3, 3), strides=(2, 1), padding=((2, 1), (0, 2))), (4, 9, 8, 3)),
    'one by one strided': (dict(kernel_size=(1, 1), strides=2, padding='SAME'), (4, 8, 8, 3)),
    '1-d': (dict(kernel_size=(4,), strides=3, padding='SAME'), (4, 17, 3)),
    '3-d': (dict(kernel_size=(2, 3, 2), strides=(1, 2, 1), padding='SAME'), (2, 5, 6, 4, 3)),
}
# the layer's convolution takes a padded or dilated copy of its input: the transposed form
KEPT = {
    'circular': (dict(kernel_size=(3, 3), padding='CIRCULAR'), (4, 8, 8, 3)),
    'causal': (dict(kernel_size=(3,), padding='CAUSAL'), (4, 8, 3)),
    'input dilation': (dict(kernel_size=(3, 3), input_dilation=2, padding=1), (4, 5, 5, 3)),
    'two batch axes': (dict(kernel_size=(3, 3), padding='SAME'), (2, 3, 8, 8, 3)),
}


def layer_call(kwargs, shape, k=4):
  """``(LayerCall, signs)`` of one nn.Conv call on a random input."""
  conv = nn.Conv(5, **kwargs)
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  variables = conv.init(jax.random.PRNGKey(1), x)
  call = layers.conv_adapter(conv.bind(variables), (x,), {})(conv.apply(variables, x))
  signs = jnp.sign(jax.random.normal(jax.random.PRNGKey(2), (call.rows, k)))
  return call, signs


def is_forward_form(sketch, signs) -> bool:
  """Whether ``sketch`` is one convolution in the canonical layout
  (input and output features last, kernel ``(*window, in, out)``)."""
  convs = [e for e in jax.make_jaxpr(sketch)(signs).jaxpr.eqns
           if e.primitive.name == 'conv_general_dilated']
  if len(convs) != 1:
    return False
  dims, nd = convs[0].params['dimension_numbers'], len(convs[0].params['window_strides'])
  return (dims.lhs_spec == (0, nd + 1) + tuple(range(1, nd + 1))
          and dims.rhs_spec == (nd + 1, nd) + tuple(range(nd)))


def reference(call, signs):
  """``S^T P`` in float64 from the layer's im2col patches."""
  return np.asarray(signs, np.float64).T @ np.asarray(call.input_rows(), np.float64)


def assert_sketch(call, signs, forward: bool):
  """The call's input sketch is (or is not) the forward form, and is ``S^T P``."""
  assert is_forward_form(call.input_sketch, signs) == forward
  want = reference(call, signs)
  np.testing.assert_allclose(call.input_sketch(signs), want, rtol=1e-5,
                             atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize('name', sorted(FAST))
def test_forward_form_is_the_float64_patch_sketch(name):
  assert_sketch(*layer_call(*FAST[name]), forward=True)


@pytest.mark.parametrize('name', sorted(KEPT))
def test_other_geometries_keep_the_transposed_form(name):
  assert_sketch(*layer_call(*KEPT[name]), forward=False)


def test_forward_form_inside_a_cond_and_under_jit():
  call, signs = layer_call(*FAST['same strided'])
  want = reference(call, signs)
  zeros = lambda s: jnp.zeros(want.shape, jnp.float32)
  got = jax.jit(lambda s, on: jax.lax.cond(on, call.input_sketch, zeros, s))(signs, True)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_nnx_convolution_takes_the_forward_form():
  from flax import nnx
  from mkor_optax import nnx_layers

  conv = nnx.Conv(3, 5, kernel_size=(3, 3), strides=2, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 8, 3))
  call = nnx_layers.conv_adapter(conv, (x,), {})(conv(x))
  assert_sketch(call, jnp.sign(jax.random.normal(jax.random.PRNGKey(2), (call.rows, 4))), forward=True)


@pytest.mark.parametrize('name', sorted(FAST))
def test_input_gradient_is_the_transpose_that_jax_builds(name):
  kwargs, shape = FAST[name]
  conv = nn.Conv(5, use_bias=False, **kwargs)
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  variables = conv.init(jax.random.PRNGKey(1), x)
  kernel = variables['params']['kernel']
  read = layers.conv_adapter(conv.bind(variables), (x,), {})
  grad = conv_sketch.input_gradient(read.geometry, kernel.shape, x.shape)
  y, pull = jax.vjp(lambda v: conv.apply(variables, v), x)
  dy = jax.random.normal(jax.random.PRNGKey(2), y.shape)
  want = pull(dy)[0]
  np.testing.assert_allclose(grad(dy, kernel), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


class TwoConvs(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(6, (3, 3), strides=2, padding='SAME', name='c1')(x))
    h = nn.relu(nn.Conv(5, (3, 3), padding='VALID', name='c2')(h))
    return nn.Dense(3, name='head')(h.reshape(h.shape[0], -1))


def test_statistics_only_capture_gives_the_same_statistics():
  model = TwoConvs()
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 9, 9, 3))
  params = model.init(jax.random.PRNGKey(1), x)['params']
  w = jax.random.normal(jax.random.PRNGKey(2), (4, 3))
  loss = lambda p: jnp.sum(jnp.tanh(model.apply({'params': p}, x)) * w)
  capture = mkor_optax.value_and_grad(loss, kind=mkor_optax.COVARIANCE)

  def only():
    with layers.statistics_only():
      return capture(params)[2]

  want = jax.jit(lambda: capture(params)[2])()
  got = jax.jit(only)()
  # the convolutions' input cotangents came from conv_sketch.input_gradient
  assert 'custom_vjp' in str(jax.make_jaxpr(only)())
  assert 'custom_vjp' not in str(jax.make_jaxpr(lambda: capture(params)[2])())
  for name in want:
    for key in want[name]:
      np.testing.assert_allclose(got[name][key], want[name][key], rtol=1e-5,
                                 atol=1e-6 * np.abs(want[name][key]).max())


def test_statistics_only_under_shard_map_gives_the_same_statistics():
  """Each device's input cotangent from its own rows: a batch split over 4
  devices, the loss averaged over them, the same sketches as the usual capture."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  model = TwoConvs()
  mesh = jax.make_mesh((4,), ('b',))
  split = NamedSharding(mesh, P('b'))
  x = jax.device_put(jax.random.normal(jax.random.PRNGKey(0), (8, 9, 9, 3)), split)
  w = jax.device_put(jax.random.normal(jax.random.PRNGKey(2), (8, 3)), split)
  params = model.init(jax.random.PRNGKey(1), x)['params']

  def stats(p, x, w, only):
    loss = lambda q: jax.lax.pmean(jnp.mean(jnp.tanh(model.apply({'params': q}, x)) * w), 'b')
    capture = mkor_optax.value_and_grad(loss, kind=mkor_optax.Sketch(4, seed=3))
    if only:
      with layers.statistics_only():
        return capture(p)[2]
    return capture(p)[2]

  run = lambda only: jax.jit(jax.shard_map(lambda p, x, w: stats(p, x, w, only), mesh=mesh,
                                           in_specs=(P(), P('b'), P('b')), out_specs=P()))(params, x, w)
  want, got = run(False), run(True)
  for name in want:
    for key in want[name]:
      np.testing.assert_allclose(got[name][key], want[name][key], rtol=1e-5,
                                 atol=1e-6 * np.abs(want[name][key]).max())


def test_nnx_statistics_only_capture_gives_the_same_statistics(monkeypatch):
  from flax import nnx
  calls = []
  rerouted = conv_sketch.through_input
  monkeypatch.setattr(conv_sketch, 'through_input', lambda *a: calls.append(1) or rerouted(*a))

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.c1 = nnx.Conv(3, 6, kernel_size=(3, 3), strides=2, rngs=rngs)
      self.c2 = nnx.Conv(6, 5, kernel_size=(3, 3), padding='VALID', rngs=rngs)

    def __call__(self, x):
      return jnp.tanh(self.c2(nnx.relu(self.c1(x))))

  model = Net(nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 9, 9, 3))
  w = jax.random.normal(jax.random.PRNGKey(2), (4, 3, 3, 5))
  capture = mkor_optax.nnx.value_and_grad(lambda m: jnp.sum(m(x) * w), kind=mkor_optax.COVARIANCE)

  def only():
    with layers.statistics_only():
      return capture(model)[2]

  want = capture(model)[2]
  assert not calls
  got = only()
  assert len(calls) == 2  # both convolutions' input cotangents came from conv_sketch.input_gradient
  for name in want:
    for key in want[name]:
      np.testing.assert_allclose(got[name][key], want[name][key], rtol=1e-5,
                                 atol=1e-6 * np.abs(want[name][key]).max())
