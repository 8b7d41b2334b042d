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
* :class:`Sketch` (:data:`SKETCH`): ``k`` random-sign sketches of each side,
  whose outer products are ``A`` and ``G`` in expectation, at ``k`` vectors
  per side instead of a ``d x d`` matrix.
"""

from __future__ import annotations

from typing import NamedTuple

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


def _check_seed(seed):
  """``seed`` as a uint32 scalar (``None`` stays ``None``): an integer, or an
  integer array of one element, concrete or traced."""
  if seed is None:
    return None
  if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
    return jnp.asarray(int(seed) & 0xFFFFFFFF, jnp.uint32)
  ok = (hasattr(seed, 'dtype') and hasattr(seed, 'shape') and jnp.issubdtype(seed.dtype, jnp.integer)
        and int(np.prod(seed.shape)) == 1)
  if not ok:
    raise TypeError('Sketch: seed must be an integer scalar that changes every step (such as the '
                    f'step counter), got {seed!r}')
  return jnp.reshape(seed, ()).astype(jnp.uint32)


class Sketch(StatKind):
  r"""Random-sign sketches of both sides' second moments, ``k`` per side.

  With the ``N`` input rows ``X`` of a layer (a 1 appended for the bias) and
  its ``R`` per-example output-gradient rows ``H`` (as in
  :class:`Covariance`), and independent random signs ``s_j`` per row,

  .. math::

     a_j &= X^T s_j / \sqrt{N}, \quad g_j = H^T s'_j / \sqrt{R}, \\
     E[a_j a_j^T] &= X^T X / N = A, \quad E[g_j g_j^T] = H^T H / R = G,

  so ``k`` sketches give MKOR ``k`` rank-1 directions per refresh whose
  average is K-FAC's factor, where the mean statistic gives one (and under a
  training-mode BatchNorm, whose mean output gradient is zero, none).

  The randomness costs no argument: each call's signs are hashes of the
  global row index and of a digest of the layer's output rows (each row's
  sign and exponent bits added, hashed with its index, summed mod 2^32),
  which changes with the batch and which every device layout computes
  alike: one device and a batch split over several get the same signs.
  Since the digest keeps only each entry's sign and exponent, a layer whose
  output does not move between steps (a constant output, or a small model
  fed the same full batch while its outputs drift by less than a power of
  two) keeps its signs. Pass ``seed`` (any integer that changes every step,
  such as the step counter, the same on every device) to mix it into the
  signs, so that no two steps share them::

    kind = mkor_optax.Sketch(4, seed=state.step)
    loss, grads, stats = mkor_optax.value_and_grad(loss_fn, kind=kind)(state.params, x, y)

  A layer called several times (shared, or under
  ``nn.scan``'s steps) pools its calls as :class:`Covariance` does. Under
  ``shard_map`` each device sketches its own rows with its own signs and
  the summed sketch, divided by the root of the global row count, sketches
  the global moments; over a ``pmap``/``shard_map`` ``axis_name`` the
  transforms sum the per-device sketches and divide by the root of the
  device count (``mkor_optax.statistics.gather_stats``).

  Statistics per layer (stacking axes first): ``a_sketches``
  ``(k, d_in + 1)`` and ``g_sketches`` ``(k, d_out)``, and :data:`RANK1`'s
  means (``a``, ``g``, ``g_mass``, computed alike) for Eva. In one ``jit``
  with an ``update`` that does not read them, XLA drops them; where the
  statistics leave the ``jit``, ``means=False`` does not compute them.

  Example:
    >>> grad_fn = mkor_optax.value_and_grad(loss_fn, kind=mkor_optax.Sketch(8))
    >>> loss, grads, stats = grad_fn(params, x, y)
    >>> stats['layers_0']['a_sketches'].shape  # (k, d_in + 1)
    (8, 4)
    >>> opt = mkor_optax.mkor(1e-2)  # MKOR refreshes from all k sketches
    >>> updates, state = opt.update(grads, opt.init(params), params, stats=stats)
  """

  def __init__(self, k: int = 4, seed=None, *, means: bool = True):
    if not (isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k >= 1):
      raise ValueError(f'Sketch: k must be an integer >= 1, got {k!r}')
    if not isinstance(means, (bool, np.bool_)):
      raise ValueError(f'Sketch: means must be True or False, got {means!r}')
    self.k = int(k)
    self.seed = _check_seed(seed)
    self.means = bool(means)  # RANK1's entries ride along, summed alike

  def __repr__(self):
    args = [f'k={self.k}'] + (['seed=...'] if self.seed is not None else [])
    return f"Sketch({', '.join(args + ([] if self.means else ['means=False']))})"

  def zeros(self, info):
    d_in = info.d_in + int(info.has_bias)
    return {**(RANK1.zeros(info) if self.means else {}),
            'xs': jnp.zeros((self.k, d_in), jnp.float32),
            'hs': jnp.zeros((self.k, info.d_out), jnp.float32),
            'rows': jnp.zeros((), jnp.float32), 'calls': jnp.zeros((), jnp.float32)}

  def forward(self, call):
    if call.output is None:
      raise ValueError('Sketch: the layer call carries no output to draw its signs from')
    seed, offset = _output_digest(call.output, call.out_ndim)
    if self.seed is not None:
      seed = _hash(seed ^ _hash(self.seed + jnp.uint32(0x2545F491)))
    signs = _signs(seed, 0, call.rows, self.k, offset)
    xs = call.sketch_of_inputs(signs)
    if call.has_bias:
      xs = jnp.concatenate([gathered(xs), jnp.sum(signs, axis=0)[:, None]], axis=1)
    # the seed and the row offset travel as exact float32 halves (a residual
    # here must be a float array)
    halves = jnp.stack([seed >> 16, seed & 0xFFFF, offset >> 16, offset & 0xFFFF]).astype(jnp.float32)
    return {**(RANK1.forward(call) if self.means else {}),
            'xs': xs, 'rows': jnp.asarray(call.rows, jnp.float32),
            'n': jnp.asarray(call.rows * call.g_scale, jnp.float32), 'seed': halves}

  def backward(self, fwd, dy_rows, g_scale, devices):
    # per-example rows h as in Covariance (undoing shard_map's pmean)
    halves = fwd['seed'].astype(jnp.uint32)
    rows = dy_rows.shape[0]
    signs = _signs((halves[0] << 16) | halves[1], 1, rows, self.k, (halves[2] << 16) | halves[3])
    h = dy_rows.astype(jnp.float32) * (fwd['n'] * devices)
    return {**(RANK1.backward(fwd, dy_rows, g_scale, devices) if self.means else {}),
            'xs': fwd['xs'], 'rows': fwd['rows'], 'calls': jnp.ones_like(fwd['rows']),
            'hs': (signs.T @ h) / jnp.sqrt(jnp.asarray(rows, jnp.float32))}

  def finalize(self, ct, info):
    rows = jnp.maximum(ct['rows'], 1.0)[..., None, None]
    calls = jnp.maximum(ct['calls'], 1.0)[..., None, None]
    return {'a_sketches': ct['xs'] / jnp.sqrt(rows), 'g_sketches': ct['hs'] / jnp.sqrt(calls),
            **(RANK1.finalize(ct, info) if self.means else {})}


SKETCH = Sketch(4)
# What value_and_grad (linen and NNX) captures, and MultiSteps expects, unless told otherwise.
DEFAULT_KIND = SKETCH


def _hash(x):
  """A 32-bit integer hash with full avalanche (``lowbias32``, C. Wellons)."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


COARSE_BITS = 0xFF800000


def _output_digest(y, out_ndim: int):
  """``(seed, row offset)`` of a layer call, both uint32, from what every
  device layout computes alike: each output row's signs and exponents, added over
  its features, hashed with the row's global index, and the hashes added (mod
  2^32, so in any order). Under ``shard_map`` the row offset is the device's
  position times its rows, and the sum runs over the devices (``psum``); with
  a batch sharded under ``jit`` the rows are global already. A summation
  order therefore changes no sign, a different batch or kernel changes all
  of them, and one step computed twice sketches the same."""
  y = jax.lax.stop_gradient(y).astype(jnp.float32)
  d_out = int(np.prod(y.shape[y.ndim - out_ndim:]))
  # sign and exponent: the last-bit differences that another summation order
  # leaves (1e-7 relative, growing over steps) rarely cross a power of two
  bits = jax.lax.bitcast_convert_type(y.reshape(-1, d_out), jnp.uint32) & jnp.uint32(COARSE_BITS)
  # added mod 2^32 (in any order, and an all-reduce every backend has when
  # the features are split over devices, where XOR is not)
  per_row = jnp.sum(bits, axis=1, dtype=jnp.uint32)
  rows = per_row.shape[0]
  axes = tuple(sorted(layers_lib.varying_axes(y)))
  offset = jnp.zeros((), jnp.uint32)
  if axes:
    offset = jax.lax.axis_index(axes).astype(jnp.uint32) * jnp.uint32(rows)
  index = jnp.arange(rows, dtype=jnp.uint32) + offset
  digest = jnp.sum(_hash(per_row ^ _hash(index + jnp.uint32(0x9E3779B9))), dtype=jnp.uint32)
  if axes:
    digest = jax.lax.psum(digest, axes)
  return _hash(digest), offset


def _signs(seed, side: int, rows: int, k: int, offset=0):
  """``(rows, k)`` float32 signs, one hash per entry of ``seed``'s stream
  ``side``, rows numbered from ``offset`` (their global index): a few
  integer operations each, where a counter-based generator such as
  threefry would add its twenty rounds to every captured layer's program."""
  idx = jnp.arange(rows * k, dtype=jnp.uint32).reshape(rows, k) + jnp.uint32(k) * jnp.asarray(offset, jnp.uint32)
  bits = _hash(idx * jnp.uint32(2) + jnp.uint32(side) + _hash(seed))
  return 1.0 - 2.0 * (bits >> 31).astype(jnp.float32)
