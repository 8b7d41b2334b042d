r"""The tap: how a layer's statistic comes out of the backward pass.

A *tap* is a ``jax.custom_vjp`` identity on a layer's output ``y`` with one
extra input, a zero-valued dummy that rides in the parameters next to the
layer's kernel. The dummy does not change the output; its cotangent is the
statistic, computed in the backward pass from the forward-side quantity the
statistic kind keeps (the layer inputs) and the output cotangent ``dL/dy``.
So statistics come out as ordinary gradients (under ``jit``, ``remat``,
``scan``, ``shard_map``).

A *statistic kind* (:class:`StatKind`) decides what the dummy holds:

* :data:`RANK1` (MKOR, Eva): ``a = (1/N) sum_rows [x_row, 1]`` and
  ``g = s sum_rows dL/dy_row`` (``s = 1`` dense, ``1/P`` conv with ``P``
  output positions), the mean per-example output gradient for a loss that
  is a mean over examples (Mozaffari et al. 2023, arXiv:2306.01685);
* :data:`COVARIANCE` (K-FAC): the full second moments ``A`` and ``G``
  (Martens & Grosse 2015, arXiv:1503.05671);
* :class:`~mkor_optax.sketch.Sketch` (``SKETCH``, in :mod:`mkor_optax.sketch`): ``k`` random-sign sketches of each side,
  whose outer products are ``A`` and ``G`` in expectation, at ``k`` vectors
  per side instead of a ``d x d`` matrix.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mkor_optax import layers as layers_lib
from mkor_optax.sharding import gathered

TAP = '__mkor_tap__'


class LayerInfo(NamedTuple):
  """A captured layer as seen by one trace of the model."""

  path: tuple
  kernel_shape: tuple  # as the layer saw it (per layer under nn.scan)
  d_in: int
  d_out: int
  out_ndim: int
  has_bias: bool
  # the rows of its one call, for a layer that can hand them over (its
  # LayerCall has input rows and no sketch of its own, it is called once
  # per trace); None otherwise
  rows: Optional[int] = None
  # the shard_map axes its rows vary over (each device hands over its own)
  row_axes: tuple = ()


class StatKind:
  """What a tap collects. Subclass and override all four methods.

  ``zeros(info)`` gives the dummy (a dict of float32 arrays) for one layer;
  ``forward(call)`` computes, from a :class:`~mkor_optax.layers.LayerCall`,
  the forward-pass part as a dict; ``backward(fwd, dy_rows, g_scale, devices)``
  returns a dict with the dummy's structure (its cotangent) from the forward
  part and the output gradient rows ``(rows, d_out)``; ``devices`` is the
  number of ``shard_map`` devices the batch is split over (1 elsewhere), whose
  loss there is the ``pmean`` of the per-device losses; ``finalize(ct, info)``
  turns the summed cotangent (leading stacking axes possible) into the
  statistics. Cotangents of a replicated dummy are summed over devices.

  Example:
    >>> [isinstance(k, mkor_optax.StatKind) for k in (mkor_optax.RANK1, mkor_optax.SKETCH)]
    [True, True]
  """

  def zeros(self, info: LayerInfo) -> dict:
    raise NotImplementedError

  def forward(self, call: layers_lib.LayerCall) -> dict:
    raise NotImplementedError

  def backward(self, fwd: dict, dy_rows: jax.Array, g_scale: float, devices: int) -> dict:
    raise NotImplementedError

  def finalize(self, ct: dict, info: LayerInfo) -> dict:
    raise NotImplementedError


class Rank1(StatKind):
  """The mean input ``a`` and output gradient ``g``, MKOR's and Eva's statistics.

  Besides ``a`` and ``g`` it returns ``g_mass``, ``s sum_rows |dL/dy_row|``:
  what ``|g|`` would be if the rows did not cancel. ``|g| / g_mass`` is
  about ``1/sqrt(rows)`` for unrelated rows and at rounding level when the
  rows cancel by construction (a training-mode BatchNorm after the layer),
  which the transforms warn about.

  Example:
    >>> stats = mkor_optax.value_and_grad(loss_fn, kind=mkor_optax.RANK1)(params, x, y)[2]
    >>> bool(jnp.allclose(stats['layers_0']['a'][:3], x.mean(0)))  # the mean input row
    True
  """

  def zeros(self, info):
    return {'input_sum': jnp.zeros((info.d_in,), jnp.float32),
            'rows': jnp.zeros((), jnp.float32),
            'g': jnp.zeros((info.d_out,), jnp.float32), 'g_mass': jnp.zeros((), jnp.float32)}

  def forward(self, call):
    return {'input_sum': call.sum_of_inputs(), 'rows': jnp.asarray(call.rows, jnp.float32)}

  def backward(self, fwd, dy_rows, g_scale, devices):
    del devices  # linear in dy: the sum over devices is already the global statistic
    dy = dy_rows.astype(jnp.float32)
    g = g_scale * jnp.sum(dy, axis=0)
    mass = g_scale * jnp.sum(jnp.sqrt(jnp.sum(jnp.square(dy), axis=1)))
    return {'input_sum': fwd['input_sum'], 'rows': fwd['rows'], 'g': g, 'g_mass': mass}

  def finalize(self, ct, info):
    rows = jnp.maximum(ct['rows'], 1.0)[..., None]
    a = ct['input_sum'] / rows
    if info.has_bias:
      a = jnp.concatenate([gathered(a), jnp.ones(a.shape[:-1] + (1,), a.dtype)], axis=-1)
    return {'a': a, 'g': ct['g'], 'g_mass': ct['g_mass']}


RANK1 = Rank1()


def tap(dummy, y, fwd, kind, out_ndim, g_scale):
  """Identity on ``y``; the cotangent of ``dummy`` is the layer's statistic."""
  axes = layers_lib.varying_axes(y)
  devices = int(np.prod([jax.lax.axis_size(a) for a in axes]))
  dummy = {k: dummy[k] for k in dummy}  # a plain dict even inside FrozenDict params
  dummy, fwd = layers_lib.cast_varying((dummy, fwd), axes)

  @jax.custom_vjp
  def identity(dummy, y, fwd):
    del dummy, fwd
    return y

  def tap_fwd(dummy, y, fwd):
    del dummy
    return y, fwd

  def tap_bwd(fwd, ct_y):
    d_out = int(np.prod(ct_y.shape[ct_y.ndim - out_ndim:]))
    ct_dummy = jax.tree.map(gathered, kind.backward(fwd, ct_y.reshape(-1, d_out), g_scale, devices))
    ct_fwd = jax.tree.map(jnp.zeros_like, fwd)
    return layers_lib.cast_varying(ct_dummy, axes), ct_y, layers_lib.cast_varying(ct_fwd, axes)

  identity.defvjp(tap_fwd, tap_bwd)
  return identity(dummy, y, fwd)


class Covariance(StatKind):
  r"""Full second moments of inputs and output gradients, K-FAC's statistics.

  .. math::

     A = \frac{1}{R} \sum_{\text{rows}} \bar x \bar x^\top, \qquad
     G = \frac{1}{R} \sum_{\text{rows}} h h^\top, \qquad
     h = n\, \frac{\partial L}{\partial y_{\text{row}}},

  with :math:`\bar x = [x, 1]` for a layer with a bias, ``R`` rows and
  ``n = R * g_scale`` examples (``R/P`` for a convolution), so ``h`` is the
  per-example loss gradient for a loss that is a mean over examples. A layer called several times averages ``G`` over its calls. A
  side larger than ``max_dim`` is not collected (it is preconditioned by the
  identity: keep ``max_dim`` equal to the transform's ``max_factor_dim``).

  Example:
    >>> kind = mkor_optax.Covariance(max_dim=4)  # the 8-wide side is not collected
    >>> stats = mkor_optax.value_and_grad(loss_fn, kind=kind)(params, x, y)[2]
    >>> jax.tree.map(jnp.shape, stats['layers_0'])
    {'A': (4, 4)}
  """

  def __init__(self, max_dim: int = 4096):
    self.max_dim = max_dim

  def _sides(self, d_in_aug, d_out):
    return d_in_aug <= self.max_dim, d_out <= self.max_dim

  def zeros(self, info):
    d_in = info.d_in + int(info.has_bias)
    has_a, has_g = self._sides(d_in, info.d_out)
    out = {'rows': jnp.zeros((), jnp.float32), 'calls': jnp.zeros((), jnp.float32)}
    if has_a:
      out['xx'] = jnp.zeros((d_in, d_in), jnp.float32)
    if has_g:
      out['hh'] = jnp.zeros((info.d_out, info.d_out), jnp.float32)
    return out

  def forward(self, call):
    d_out = int(np.prod(call.kernel_shape[len(call.kernel_shape) - call.out_ndim:]))
    d_in = int(np.prod(call.kernel_shape)) // d_out + int(call.has_bias)
    has_a, _ = self._sides(d_in, d_out)
    out = {'rows': jnp.asarray(call.rows, jnp.float32),
           'n': jnp.asarray(call.rows * call.g_scale, jnp.float32)}
    if has_a:
      x = gathered(call.input_rows())
      if call.has_bias:
        x = jnp.concatenate([x, jnp.ones((x.shape[0], 1), x.dtype)], axis=1)
      out['xx'] = x.T @ x
    return out

  def backward(self, fwd, dy_rows, g_scale, devices):
    # Under shard_map dL/dy carries the pmean's 1/devices: undo it, so h is the
    # per-example gradient; the sums over devices of hh and of calls then
    # average G over devices.
    out = {'rows': fwd['rows'], 'calls': jnp.ones_like(fwd['rows'])}
    if 'xx' in fwd:
      out['xx'] = fwd['xx']
    if dy_rows.shape[-1] <= self.max_dim:
      h = gathered(dy_rows).astype(jnp.float32) * (fwd['n'] * devices)
      out['hh'] = (h.T @ h) / fwd['rows']
    return out

  def finalize(self, ct, info):
    out = {}
    if 'xx' in ct:
      out['A'] = ct['xx'] / jnp.maximum(ct['rows'], 1.0)[..., None, None]
    if 'hh' in ct:
      out['G'] = ct['hh'] / jnp.maximum(ct['calls'], 1.0)[..., None, None]
    return out


COVARIANCE = Covariance()
