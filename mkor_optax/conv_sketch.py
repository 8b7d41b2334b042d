r"""A convolution's input sketch as a forward convolution.

The input side of a convolution's sketch is ``S^T P`` (``k x d_in``) for
signs ``S`` (``rows x k``, one row per example and output position) and the
im2col patches ``P`` of the layer input. It is the kernel gradient of
``<S, conv(x, K)>``, which :func:`jax.vjp` computes as the transposed
convolution of the input with ``S``. XLA:CPU runs that transposed form at
the speed of a plain convolution in a program's top level, but 6-35 times
slower inside a ``lax.cond`` or loop body (its layout is not the one the
fast kernels take there), where the adaptive recipe's statistics pass runs.

Written out with the layer's strides ``s``, kernel dilation ``e`` and
padding, each spatial axis reads

.. math::  (S^\top P)_{j, (t, c)} = \sum_{n, o} x^{\text{pad}}_{n,\, o s + t e,\, c}\; S_{n, o, j},

the forward convolution of the input seen as ``c`` images of ``n`` channels
with the signs seen as a kernel of window ``o`` (``n`` inputs, ``k``
outputs), dilated by ``s`` and strided by ``e``: the same sum, in a layout
that is fast everywhere. :func:`forward_form` reads the layer's geometry
from the convolution that the layer's own code traces, so every padding
Flax computes (SAME, VALID, explicit) is the layer's; a layer whose
convolution does not take its input as it is (CIRCULAR and CAUSAL pad it
first, ``nn.ConvTranspose`` dilates it) keeps the transposed form.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp

_CONV = 'conv_general_dilated'


def _canonical_dims(nd: int) -> jax.lax.ConvDimensionNumbers:
  """Features last in the input and output, kernel ``(*window, in, out)``:
  the layout XLA:CPU runs fast everywhere."""
  features_last = (0, nd + 1) + tuple(range(1, nd + 1))
  return jax.lax.ConvDimensionNumbers(lhs_spec=features_last, rhs_spec=(nd + 1, nd) + tuple(range(nd)),
                                      out_spec=features_last)


def geometry(run: Callable, kshape: tuple, x32, cast: Callable = lambda v: v) -> Optional[dict]:
  """The parameters of the one convolution that ``run(kernel)`` applies to
  ``x32`` itself (features last in the input, output and kernel), or ``None``."""
  closed = jax.make_jaxpr(run)(cast(jnp.zeros(tuple(kshape[:-1]) + (1,), jnp.float32)))
  jaxpr = closed.jaxpr
  convs = [e for e in jaxpr.eqns if e.primitive.name == _CONV]
  if len(convs) != 1 or convs[0].invars[1] is not jaxpr.invars[0]:
    return None
  eqn = convs[0]
  lhs = eqn.invars[0]
  if not any(v is lhs and c is x32 for v, c in zip(jaxpr.constvars, closed.consts)):
    return None
  p = eqn.params
  nd = len(p['window_strides'])
  dims = p['dimension_numbers']
  last = nd + 1
  if (any(d != 1 for d in p['lhs_dilation']) or p['feature_group_count'] != 1
      or p['batch_group_count'] != 1 or any(lo < 0 or hi < 0 for lo, hi in p['padding'])
      or dims.lhs_spec[1] != last or dims.out_spec[1] != last or dims.rhs_spec[0] != last):
    return None
  return dict(p, out_shape=eqn.outvars[0].aval.shape)


def forward_form(g: Optional[dict], kshape: tuple, x32, cast: Callable = lambda v: v) -> Optional[Callable]:
  """``signs (rows, k) -> (k, d_in)``: ``S^T P`` of the convolution of
  ``x32`` whose :func:`geometry` is ``g`` (the layer's own code with a probe
  kernel of shape ``kshape[:-1] + (c,)``), as one forward convolution;
  ``None`` where ``g`` is. ``cast`` makes an array vary like ``x32`` (under
  ``shard_map``: each device's own sum)."""
  if g is None:
    return None
  dims = g['dimension_numbers']
  nd = len(g['window_strides'])
  batch, spatial_in = dims.lhs_spec[0], dims.lhs_spec[2:]
  window = tuple(kshape[a] for a in dims.rhs_spec[2:])
  # the input as c images of n channels, the signs as a kernel (window o, n in, k out)
  image = jnp.transpose(x32, (dims.lhs_spec[1],) + tuple(spatial_in) + (batch,))
  canonical = _canonical_dims(nd)
  out_shape = g['out_shape'][:-1]
  # the result (c, *window, k) placed in the kernel's axes, output axis last
  order = [0] * len(kshape)
  order[dims.rhs_spec[1]] = 0
  for i, a in enumerate(dims.rhs_spec[2:]):
    order[a] = 1 + i
  order[dims.rhs_spec[0]] = nd + 1
  d_in = math.prod(kshape[:-1])

  def sketch(signs):
    k = signs.shape[1]
    s = signs.reshape(out_shape + (k,))
    s = jnp.transpose(s, tuple(dims.out_spec[2:]) + (dims.out_spec[0], nd + 1))
    out = jax.lax.conv_general_dilated(
        image, cast(s.astype(jnp.float32)), window_strides=g['rhs_dilation'], padding=g['padding'],
        rhs_dilation=g['window_strides'], dimension_numbers=canonical, precision=g['precision'])
    out = out[(slice(None),) + tuple(slice(0, w) for w in window) + (slice(None),)]
    return jax.lax.stop_gradient(jnp.transpose(out, order).reshape(d_in, k).T)

  return sketch


def _canonical(g: dict) -> bool:
  dims, want = g['dimension_numbers'], _canonical_dims(len(g['window_strides']))
  return all(tuple(a) == tuple(b) for a, b in zip(dims, want))


def input_gradient(g: Optional[dict], kshape: tuple, in_shape: tuple) -> Optional[Callable]:
  r"""``(dy, kernel) -> dx``, float32: the input's cotangent of the
  convolution of :func:`geometry` ``g`` (inputs ``in_shape``, features last,
  kernel ``(*window, in, out)``), as the forward convolution of ``dy``
  dilated by the strides with the kernel reversed in space and its two
  feature axes swapped, padded by ``k_eff - 1 - lo`` before each axis
  (``k_eff = (k - 1) e + 1``): the transpose that :func:`jax.vjp` builds,
  in a layout XLA:CPU runs as fast inside a ``lax.cond`` as outside it.
  ``None`` where ``g`` is, for other layouts, and where a padding exceeds
  the dilated kernel."""
  if g is None or not _canonical(g):
    return None
  nd = len(g['window_strides'])
  pads = []
  for i, (lo, _) in enumerate(g['padding']):
    k_eff = (kshape[i] - 1) * g['rhs_dilation'][i] + 1
    before = k_eff - 1 - lo
    after = in_shape[1 + i] - 1 - (g['out_shape'][1 + i] - 1) * g['window_strides'][i] + lo
    if before < 0 or after < 0:
      return None
    pads.append((before, after))
  dims = _canonical_dims(nd)
  swap = tuple(range(nd)) + (nd + 1, nd)

  def grad(dy, kernel):
    flipped = jnp.transpose(jnp.flip(kernel.astype(jnp.float32), tuple(range(nd))), swap)
    return jax.lax.conv_general_dilated(
        dy.astype(jnp.float32), flipped, window_strides=(1,) * nd, padding=pads,
        lhs_dilation=g['window_strides'], rhs_dilation=g['rhs_dilation'],
        dimension_numbers=dims, precision=g['precision'])

  return grad


def through_input(y, x, kernel, grad: Callable, cast: Callable = lambda v: v):
  """``y`` (computed from ``stop_gradient(x)``) with ``x``'s cotangent
  ``grad(dy, kernel)``: a zero of ``y``'s shape whose VJP is ``grad``. The
  kernel gets no cotangent here. ``cast`` makes an array vary like ``x``
  (under ``shard_map``)."""
  shape, dtype, x_dtype = y.shape, y.dtype, x.dtype

  @jax.custom_vjp
  def zero(x, kernel):
    del x, kernel
    return cast(jnp.zeros(shape, dtype))  # varying like y: its cotangent is this device's

  def fwd(x, kernel):
    return zero(x, kernel), kernel

  def bwd(kernel, dy):
    return cast(grad(cast(dy), cast(kernel)).astype(x_dtype)), jnp.zeros_like(kernel)

  zero.defvjp(fwd, bwd)
  return y + zero(x, jax.lax.stop_gradient(kernel))


def reroute(read, x, args, kwargs, kernel, cast: Callable = lambda v: v) -> None:
  """Gives a convolution's ``read`` (from :func:`mkor_optax.layers.probe_conv_reader`,
  its ``geometry`` read) a ``run_layer(next_fun)``: the layer's call on
  ``stop_gradient(x)`` (``x`` the first positional argument, or ``inputs=``),
  ``x``'s cotangent from :func:`input_gradient` with ``kernel`` (the layer's,
  unmasked). A capture in :func:`mkor_optax.layers.statistics_only` calls it."""
  grad = input_gradient(read.geometry, tuple(kernel.shape), x.shape)
  if grad is None:
    return
  stopped = jax.lax.stop_gradient(x)
  args, kwargs = ((stopped,) + tuple(args[1:]), kwargs) if args else (args, dict(kwargs, inputs=stopped))
  read.run_layer = lambda next_fun: through_input(next_fun(*args, **kwargs), x, kernel, grad, cast)
