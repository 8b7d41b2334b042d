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

from typing import Callable, Optional

import jax
import jax.numpy as jnp

_CONV = 'conv_general_dilated'


def _geometry(run: Callable, kshape: tuple, x32, cast: Callable) -> Optional[dict]:
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


def forward_form(run: Callable, kshape: tuple, x32, cast: Callable = lambda v: v) -> Optional[Callable]:
  """``signs (rows, k) -> (k, d_in)``: ``S^T P`` of the convolution
  ``run(kernel)`` of ``x32`` (the layer's own code with a probe kernel of
  shape ``kshape[:-1] + (c,)``), as one forward convolution; ``None`` where
  the layer's convolution is not of the form this computes. ``cast`` makes
  an array vary like ``x32`` (under ``shard_map``: each device's own sum)."""
  g = _geometry(run, kshape, x32, cast)
  if g is None:
    return None
  dims = g['dimension_numbers']
  nd = len(g['window_strides'])
  batch, spatial_in = dims.lhs_spec[0], dims.lhs_spec[2:]
  window = tuple(kshape[a] for a in dims.rhs_spec[2:])
  # the input as c images of n channels, the signs as a kernel (window o, n in, k out)
  image = jnp.transpose(x32, (dims.lhs_spec[1],) + tuple(spatial_in) + (batch,))
  canonical = jax.lax.ConvDimensionNumbers(lhs_spec=(0, nd + 1) + tuple(range(1, nd + 1)),
                                           rhs_spec=(nd + 1, nd) + tuple(range(nd)),
                                           out_spec=(0, nd + 1) + tuple(range(1, nd + 1)))
  out_shape = g['out_shape'][:-1]
  # the result (c, *window, k) placed in the kernel's axes, output axis last
  order = [0] * len(kshape)
  order[dims.rhs_spec[1]] = 0
  for i, a in enumerate(dims.rhs_spec[2:]):
    order[a] = 1 + i
  order[dims.rhs_spec[0]] = nd + 1
  d_in = 1
  for n in kshape[:-1]:
    d_in *= n

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
