r"""Random-sign sketches: the default statistics of MKOR and MKOR-H.

:class:`Sketch` is a statistic kind (:class:`~mkor_optax.tap.StatKind`):
``k`` random-sign sketches of each side's second moment per layer call,
``a_j = X^T s_j / sqrt(N)`` and ``g_j = H^T s'_j / sqrt(R)``, whose outer
products average to K-FAC's factors ``A`` and ``G``. The signs are integer
hashes (no random key to thread through a training loop).
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np

from mkor_optax import layers as layers_lib
from mkor_optax.sharding import gathered
from mkor_optax.tap import RANK1, StatKind

# The key of a layer's input rows in the statistics of Sketch(lazy=True)
ROWS = 'x_rows'
# Its row statistics, each with its number of trailing (non-stacking) axes
ROW_FIELDS = {ROWS: 2, 'dy_rows': 2, 'dy_scale': 0, 'sketches': 2}


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

  ``lazy=True`` (the default capture, :data:`SKETCH`) forms the sketches
  where they are used instead: the layers that can (a single call with
  plain input rows, as ``nn.Dense`` and ``nn.DenseGeneral``) hand the
  transform their rows,
  ``x_rows`` ``(N, d_in)`` and ``dy_rows`` ``(N, d_out)`` with the
  per-example scale ``dy_scale`` (buffers the backward pass holds anyway, so
  within one ``jit`` nothing is copied), and MKOR and MKOR-H sketch them on
  their refresh steps only (``mkor_optax.sketch.sketch_rows``), with signs drawn from
  their step count, the layer and the global row index: on the other steps
  the capture costs nothing. Other layers (convolutions, shared layers) are
  sketched here as before. Under ``shard_map`` each device hands over its
  own rows and the transform sums the devices' sketches; over a ``pmap``
  ``axis_name`` each device sketches its rows every step before the
  sketches are pooled, and under ``MultiSteps`` each micro-batch's rows are
  sketched as they arrive. Statistics kept outside the ``jit`` hold
  those layers' activations; ``Sketch(k)`` keeps them small.

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

  def __init__(self, k: int = 4, seed=None, *, means: bool = True, lazy: bool = False):
    if not (isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k >= 1):
      raise ValueError(f'Sketch: k must be an integer >= 1, got {k!r}')
    for name, flag in (('means', means), ('lazy', lazy)):
      if not isinstance(flag, (bool, np.bool_)):
        raise ValueError(f'Sketch: {name} must be True or False, got {flag!r}')
    if lazy and seed is not None:
      raise ValueError('Sketch: lazy=True draws its signs from the transform\'s step count; '
                       'seed= is for the sketches formed in the capture (lazy=False)')
    self.k = int(k)
    self.seed = _check_seed(seed)
    self.means = bool(means)  # RANK1's entries ride along, summed alike
    self.lazy = bool(lazy)

  def __repr__(self):
    args = ([f'k={self.k}'] + (['seed=...'] if self.seed is not None else [])
            + ([] if self.means else ['means=False']) + (['lazy=True'] if self.lazy else []))
    return f"Sketch({', '.join(args)})"

  def zeros(self, info):
    if self.lazy and info.rows is not None:  # the layer's rows, handed over (see the class)
      return {**(RANK1.zeros(info) if self.means else {}),
              ROWS: jnp.zeros((info.rows, info.d_in), jnp.float32),
              'dy_rows': jnp.zeros((info.rows, info.d_out), jnp.float32),
              'dy_scale': jnp.zeros((), jnp.float32)}
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

  def forward_rows(self, call):
    """:meth:`forward` of a layer whose dummy takes its rows (``lazy``)."""
    return {**(RANK1.forward(call) if self.means else {}), ROWS: call.input_rows(),
            'n': jnp.asarray(call.rows * call.g_scale, jnp.float32)}

  def backward(self, fwd, dy_rows, g_scale, devices):
    means = RANK1.backward(fwd, dy_rows, g_scale, devices) if self.means else {}
    if ROWS in fwd:  # dL/dy as it is: the per-example scale applies to the sketch
      return {**means, ROWS: fwd[ROWS], 'dy_rows': dy_rows.astype(jnp.float32),
              'dy_scale': fwd['n'] * devices}
    # per-example rows h as in Covariance (undoing shard_map's pmean)
    halves = fwd['seed'].astype(jnp.uint32)
    rows = dy_rows.shape[0]
    signs = _signs((halves[0] << 16) | halves[1], 1, rows, self.k, (halves[2] << 16) | halves[3])
    h = dy_rows.astype(jnp.float32) * (fwd['n'] * devices)
    return {**means, 'xs': fwd['xs'], 'rows': fwd['rows'], 'calls': jnp.ones_like(fwd['rows']),
            'hs': (signs.T @ h) / jnp.sqrt(jnp.asarray(rows, jnp.float32))}

  def finalize(self, ct, info):
    means = RANK1.finalize(ct, info) if self.means else {}
    if ROWS in ct:  # k rides as the shape of an empty array
      return {**means, ROWS: ct[ROWS], 'dy_rows': ct['dy_rows'], 'dy_scale': ct['dy_scale'],
              'sketches': jnp.zeros(ct['dy_scale'].shape + (self.k, 0), jnp.float32)}
    rows = jnp.maximum(ct['rows'], 1.0)[..., None, None]
    calls = jnp.maximum(ct['calls'], 1.0)[..., None, None]
    return {'a_sketches': ct['xs'] / jnp.sqrt(rows), 'g_sketches': ct['hs'] / jnp.sqrt(calls),
            **means}


def sketch_rows(fields: dict, count, layer: str, has_bias: bool, axis_name=None) -> tuple:
  """``(a_sketches, g_sketches)``, ``(S, k, d_in[+1])`` and ``(S, k, d_out)``,
  of a ``Sketch(lazy=True)`` layer's statistics ``fields`` (rows ``(S, N,
  d)``, stacking axes flattened): the sketches the capture would have
  formed, with signs hashed from the transform's step ``count``, the
  ``layer``'s name and the global row index, the same for any split of the
  rows over devices. Rows that vary over ``shard_map`` axes are numbered
  from the device's position along them, and the devices' sketches are
  summed over the root of their number (the sketch of the pooled rows);
  over a ``pmap`` ``axis_name`` (which does not say what varies) the
  rows are numbered alike and each device's sketch is returned for the
  caller to pool."""
  x, dy, scale = fields[ROWS], fields['dy_rows'], fields['dy_scale']
  k, n = fields['sketches'].shape[-2], x.shape[-2]
  tracked = tuple(sorted(layers_lib.varying_axes(x)))
  axes = tracked or axis_name
  offset = 0 if axes is None else jax.lax.axis_index(axes).astype(jnp.uint32) * jnp.uint32(n)
  salt = zlib.crc32(layer.encode()) & 0xFFFFFFFF
  seed = _hash(jnp.asarray(count).astype(jnp.uint32) ^ _hash(jnp.uint32(salt)))
  s_in, s_out = (_signs(seed, side, n, k, offset) for side in (0, 1))
  root = np.sqrt(n, dtype=np.float32)
  a = jnp.einsum('nk,snd->skd', s_in, x.astype(jnp.float32)) / root
  if has_bias:
    a = jnp.concatenate([a, jnp.broadcast_to(jnp.sum(s_in, axis=0)[None, :, None] / root,
                                             a.shape[:2] + (1,))], axis=-1)
  g = jnp.einsum('nk,snd->skd', s_out, dy.astype(jnp.float32)) * (scale.reshape(-1, 1, 1) / root)
  if tracked:  # the sketch of the pooled rows: the sum over the root of the device count
    a, g = jax.lax.psum((a, g), tracked)
    root_devices = np.sqrt(np.prod([jax.lax.axis_size(ax) for ax in tracked]), dtype=np.float32)
    a, g = a / root_devices, g / root_devices
  return a, g


SKETCH = Sketch(4, lazy=True)
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
