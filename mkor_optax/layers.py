"""Which Flax layers are second-order layers, and how each one is a matrix.

Every captured layer is viewed as ``y = x W + b`` with ``W`` of shape
``(d_in, d_out)``, as in K-FAC and MKOR (Martens & Grosse 2015;
Mozaffari et al. 2023):

* ``nn.Dense``: the kernel as it is; rows are all leading axes of the input.
* ``nn.DenseGeneral`` (the q/k/v/out projections of
  ``nn.MultiHeadDotProductAttention`` included): the contracted input axes
  flattened into ``d_in`` (in the order of ``axis``, which is the kernel's
  order), the feature axes into ``d_out``.
* ``nn.Conv`` with ``P`` output positions per example: ``d_in = prod(kernel
  window) * c_in`` (im2col patches, zero padding included, ordered like the
  kernel's ``(*window, c_in)`` axes), ``d_out = c_out``. The sum of the patches
  over batch and positions is obtained without materialising them, as the
  kernel gradient of ``sum(conv(x, K))`` for a ones kernel ``K`` with one output
  channel, computed by a clone of the layer itself so that every padding mode
  Flax supports (SAME, VALID, explicit, CIRCULAR, CAUSAL, dilations) is honoured.
  Its sketch ``S^T P`` (``k`` channels) is one forward convolution where the
  clone's convolution takes the input as it is (:mod:`mkor_optax.conv_sketch`).

* ``nn.OptimizedLSTMCell`` is a *composite* (:mod:`mkor_optax.composites`):
  the capture recomputes it one gate kernel at a time. (``nn.LSTMCell``,
  ``nn.GRUCell``, ``nn.MGUCell`` and ``nn.SimpleCell`` call ``nn.Dense``
  children and need nothing.)

An adapter reads one call of a layer and returns a :class:`LayerCall`, or
``None`` to let that call pass through uncaptured (for example a grouped
convolution). Custom layers opt in with :func:`register_layer`.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mkor_optax import conv_sketch
from mkor_optax.paths import unbox


class LayerCall(NamedTuple):
  """What the capture needs from one call of a second-order layer.

  Attributes:
    input_rows: ``() -> (rows, d_in)`` float32 rows of the layer input (for a
      convolution, its im2col patches); called only by statistic kinds that
      need more than the sum (full covariances).
    rows: the number of rows (a Python int).
    out_ndim: how many trailing axes of the output are feature axes; the
      output is read as ``(rows_out, d_out)`` by flattening the others.
    g_scale: factor applied to the sum over rows of ``dL/dy`` (``1/P`` for a
      convolution with ``P`` output positions per example, 1 for dense).
    has_bias: whether the layer adds a bias ``b`` of shape ``features`` (its
      parameter must be called ``'bias'``; the kernel ``'kernel'``).
    kernel_shape: the shape of the kernel the call used (without any
      leading stacking axes that ``nn.scan``/``nn.vmap`` split off).
    input_sum: optional ``() -> (d_in,)``, the sum of ``input_rows()`` computed
      more cheaply; by default the rows are summed.
    output: the layer's output ``y`` (the capture sets it before handing
      the call to a statistic kind; :class:`~mkor_optax.sketch.Sketch` draws
      its random signs from it).
    input_sketch: optional ``signs (rows, k) -> (k, d_in)``, ``signs^T
      input_rows()`` computed without the rows; by default the rows are
      multiplied.

  Example: see :func:`mkor_optax.register_layer`.

    >>> mkor_optax.LayerCall._fields[:3]
    ('input_rows', 'rows', 'out_ndim')
  """

  input_rows: Callable[[], jax.Array]
  rows: int
  out_ndim: int
  g_scale: float
  has_bias: bool
  kernel_shape: tuple
  input_sum: Optional[Callable[[], jax.Array]] = None
  output: Optional[jax.Array] = None
  input_sketch: Optional[Callable[[jax.Array], jax.Array]] = None

  def sum_of_inputs(self) -> jax.Array:
    if self.input_sum is not None:
      return self.input_sum()
    return jnp.sum(self.input_rows(), axis=0)

  def sketch_of_inputs(self, signs) -> jax.Array:
    """``signs^T input_rows()``, ``(k, d_in)`` for ``signs`` ``(rows, k)``."""
    if self.input_sketch is not None:
      return self.input_sketch(signs)
    return signs.T @ self.input_rows()


Adapter = Callable[[nn.Module, tuple, dict], Optional[Callable[[jax.Array], LayerCall]]]

_REGISTRY: dict[type, Adapter] = {}
_local = threading.local()


@contextlib.contextmanager
def _flag(name: str):
  """The thread's flag ``name`` set while inside."""
  old = getattr(_local, name, False)
  setattr(_local, name, True)
  try:
    yield
  finally:
    setattr(_local, name, old)


def _no_capture():
  """Calls made inside (the adapters' own helper calls) are not captured."""
  return _flag('off')


def capture_disabled() -> bool:
  return getattr(_local, 'off', False)


def statistics_only():
  """A capture traced inside serves its statistics alone (no parameter gradient): a
  convolution's input cotangent may come from :func:`mkor_optax.conv_sketch.input_gradient`."""
  return _flag('stats_only')


def layer_run(read, next_fun, args, kwargs) -> Callable[[], jax.Array]:
  """The layer's call: ``read``'s own (``run_layer``) in :func:`statistics_only`, else the call."""
  own = getattr(read, 'run_layer', None) if getattr(_local, 'stats_only', False) else None
  return (lambda: next_fun(*args, **kwargs)) if own is None else (lambda: own(next_fun))


def varying_axes(x) -> frozenset:
  """The mesh axes ``x`` varies over inside ``shard_map`` (empty elsewhere)."""
  t = jax.typeof(x)
  mat = getattr(t, 'manual_axis_type', None)
  return frozenset(mat.varying) if mat is not None else frozenset(getattr(t, 'vma', ()))


def cast_varying(tree, axes: frozenset):
  """Marks every leaf of ``tree`` as varying over ``axes`` (a no-op outside
  ``shard_map``); its transpose is the ``psum`` that makes a statistic of a
  replicated dummy the sum over devices, like any replicated parameter's."""
  def cast(leaf):
    missing = tuple(sorted(axes - varying_axes(leaf)))
    return jax.lax.pcast(leaf, missing, to='varying') if missing else leaf
  return jax.tree.map(cast, tree) if axes else tree


def register_layer(module_type: type, adapter: Adapter, *, layout=None) -> None:
  """Lets calls of ``module_type`` (and its subclasses) be preconditioned.

  The module's parameters must be named ``'kernel'`` (shape ``(*in_axes,
  *out_axes)``, flattening to ``(d_in, d_out)`` in C order) and, if
  ``LayerCall.has_bias``, ``'bias'`` (shape ``out_axes``): entries of the
  ``'params'`` collection (linen), or ``nnx.Param`` attributes (NNX).

  Args:
    module_type: a ``flax.linen.Module`` or ``flax.nnx.Module`` subclass.
    adapter: ``adapter(module, args, kwargs)``, called with the module (for
      linen, bound) and its ``__call__`` arguments before the call runs;
      returns ``None`` to leave the call alone, or ``read(y) -> LayerCall``,
      given the call's output (``nn.Dense``'s built-in one is ``dense_adapter``).
    layout: NNX only, optional: ``layout(module) -> Layout`` (``None``: not
      preconditioned), read at ``init`` and before each capture; by default
      read off the kernel and bias shapes.

  Returns:
    None; the registration holds for the process.

  Example:
    >>> class Doubled(nn.Module):  # y = 2 x @ kernel: a layer of one's own
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     return 2.0 * x @ self.param('kernel', nn.initializers.lecun_normal(), (3, 8))
    >>> def adapter(module, args, kwargs):
    ...   rows = args[0].reshape(-1, args[0].shape[-1])
    ...   shape = module.get_variable('params', 'kernel').shape
    ...   return lambda y: mkor_optax.LayerCall(lambda: rows, len(rows), 1, 1.0, False, shape)
    >>> mkor_optax.register_layer(Doubled, adapter)
    >>> net = nn.Sequential([Doubled(), nn.tanh, nn.Dense(2)])
    >>> f = lambda p, x, y: jnp.mean((net.apply({'params': p}, x) - y) ** 2)
    >>> p = net.init(jax.random.PRNGKey(0), x)['params']
    >>> sketched = mkor_optax.value_and_grad(f, kind=mkor_optax.Sketch(4))
    >>> sketched(p, x, y)[2]['layers_0']['a_sketches'].shape  # no bias row
    (4, 3)
  """
  nnx = _nnx_if_loaded()
  is_linen = isinstance(module_type, type) and issubclass(module_type, nn.Module)
  is_nnx = (nnx is not None and isinstance(module_type, type)
            and issubclass(module_type, nnx.Module))
  if not (is_linen or is_nnx):
    raise TypeError(f'register_layer: {module_type!r} is not a flax.linen.Module or '
                    'flax.nnx.Module subclass')
  if layout is not None and not is_nnx:
    raise TypeError('register_layer: layout= is for flax.nnx modules (linen layouts are read '
                    'from parameters or given as layouts= to the transform)')
  _REGISTRY[module_type] = adapter
  if is_nnx:
    _NNX_LAYOUTS[module_type] = layout
  else:
    _NNX_LAYOUTS.pop(module_type, None)


_NNX_LAYOUTS: dict[type, Optional[Callable]] = {}


def _nnx_if_loaded():
  import sys
  return sys.modules.get('flax.nnx')


def nnx_layout_fn(module) -> Optional[Callable]:
  """The ``layout=`` registered for an NNX module's class (by MRO), if any."""
  for cls in type(module).__mro__:
    if cls in _REGISTRY:
      return _NNX_LAYOUTS.get(cls)
  return None


def registry_key() -> tuple:
  """What decides which calls are captured: the registered classes and
  adapters (a cached discovery is valid while this is the same)."""
  return tuple(_REGISTRY.items())


def adapter_for(module) -> Optional[Adapter]:
  for cls in type(module).__mro__:
    if cls in _REGISTRY:
      return _REGISTRY[cls]
  return None


def _kernel_shape(module: nn.Module) -> tuple:
  return tuple(np.shape(unbox(module.get_variable('params', 'kernel'))))


def _has_bias(module: nn.Module) -> bool:
  return bool(getattr(module, 'use_bias', False)) and module.has_variable('params', 'bias')


def rows_call(rows, out_ndim: int, has_bias: bool, kernel_shape: tuple) -> LayerCall:
  """The :class:`LayerCall` of a dense-like product whose input rows are ``rows``."""
  input_rows = lambda: jax.lax.stop_gradient(rows.astype(jnp.float32))
  return LayerCall(input_rows, int(rows.shape[0]), out_ndim, 1.0, has_bias, tuple(kernel_shape))


def _rows_reader(module, rows, out_ndim):
  """A ``read(y)`` for a dense-like layer whose input rows are ``rows``."""
  def read(y):
    del y
    return rows_call(rows, out_ndim, _has_bias(module), _kernel_shape(module))

  return read


def dense_adapter(module, args, kwargs):
  """``nn.Dense``: rows are all leading axes of the input."""
  x = jnp.asarray(args[0] if args else kwargs['inputs'])
  return _rows_reader(module, x.reshape(-1, x.shape[-1]), 1)


def _normalize_axes(axes, ndim):
  """Non-negative and sorted, as ``nn.DenseGeneral`` orders its kernel's input axes."""
  if isinstance(axes, int):
    axes = (axes,)
  return tuple(sorted(a % ndim for a in axes))


def dense_general_adapter(module, args, kwargs):
  """``nn.DenseGeneral`` without ``batch_dims``: contracted axes -> ``d_in``."""
  if tuple(getattr(module, 'batch_dims', ())):
    return None  # batched kernels are not a single (d_in, d_out) matrix
  x = jnp.asarray(args[0] if args else kwargs['inputs'])
  axis = _normalize_axes(module.axis, x.ndim)
  features = module.features if isinstance(module.features, (tuple, list)) else (module.features,)
  d_in = int(np.prod([x.shape[a] for a in axis]))
  moved = jnp.moveaxis(x, axis, tuple(range(x.ndim - len(axis), x.ndim)))
  return _rows_reader(module, moved.reshape(-1, d_in), len(features))


def conv_adapter(module, args, kwargs):
  """``nn.Conv`` (not grouped) and ``nn.ConvTranspose`` (``transpose_kernel=False``):
  im2col patches through clones of the layer. Both are ``y[p, o] = sum_j
  P[p, j] K[j, o]`` for patches ``P`` of the (for the transpose, dilated) input.

  The patch sum is the kernel gradient of ``sum(conv(x, K))`` for a ones
  kernel with one output channel; the patches themselves (only for kinds that
  need rows) are the output of a conv whose kernel is the identity on the
  ``prod(window) * c_in`` patch entries. Both use the layer's own padding code.
  """
  if getattr(module, 'feature_group_count', 1) != 1 or getattr(module, 'transpose_kernel', False):
    return None  # grouped: a block-diagonal kernel; transposed kernel: output axis not last
  x = jnp.asarray(args[0] if args else kwargs['inputs'])
  x32 = jax.lax.stop_gradient(x.astype(jnp.float32))

  def run(kernel):
    probe = module.clone(parent=None, features=kernel.shape[-1], use_bias=False,
                         dtype=jnp.float32, param_dtype=jnp.float32, mask=None)
    return probe.apply({'params': {'kernel': kernel}}, x32)

  read = probe_conv_reader(run, _kernel_shape(module), x32, _has_bias(module))
  if getattr(module, 'mask', None) is None:  # (statistics-only captures: see statistics_only)
    conv_sketch.reroute(read, x, args, kwargs, unbox(module.get_variable('params', 'kernel')),
                        lambda v: cast_varying(v, varying_axes(x)))
  return read


def probe_conv_reader(run, kshape: tuple, x32, has_bias: bool):
  """A convolution's ``read(y)`` from ``run(kernel)``, the layer's own
  convolution of its float32 input ``x32`` with a probe kernel of shape
  ``kshape[:-1] + (c,)`` (so every padding mode is the layer's):

  * the patch sketch ``S^T P`` is the kernel gradient of ``<S, run(K)>``
    (``c = k``, no patches formed), and the patch sum its ``S = 1`` case;
  * the patches ``P`` themselves (for kinds that need rows) are ``run`` of
    the identity on the ``prod(window) * c_in`` patch entries.
  """
  d_in = int(np.prod(kshape[:-1]))

  def kernel_grad(channels: int, cotangent):
    """``(channels, d_in)``: the probe kernel's gradient for the output
    cotangent ``cotangent(y)``, i.e. ``cotangent^T P`` over the rows."""
    # varying like x under shard_map, so that its gradient is this device's sum only
    zeros = cast_varying(jnp.zeros(kshape[:-1] + (channels,), jnp.float32), varying_axes(x32))
    with _no_capture():
      y, pull = jax.vjp(run, zeros)
      (grad,) = pull(cast_varying(cotangent(y).astype(y.dtype), varying_axes(y)))
    return jax.lax.stop_gradient(grad.reshape(d_in, channels).T)

  def sketch(signs):
    return kernel_grad(signs.shape[1], lambda y: signs.reshape(y.shape))

  # the same sums as one forward convolution, where the layer's geometry allows
  cast = lambda v: cast_varying(v, varying_axes(x32))
  with _no_capture():
    geometry = conv_sketch.geometry(run, kshape, x32, cast)
  fast = conv_sketch.forward_form(geometry, kshape, x32, cast)

  def patch_sum():
    return kernel_grad(1, jnp.ones_like)[0]

  def patches():
    eye = jnp.eye(d_in, dtype=jnp.float32).reshape(kshape[:-1] + (d_in,))
    with _no_capture():
      out = run(eye)
    return jax.lax.stop_gradient(out.reshape(-1, d_in))

  read = conv_reader(patches, patch_sum, kshape, has_bias, fast or sketch)
  read.geometry = geometry
  return read


def call_innermost(stack: list, module, run):
  """Runs ``run()`` (the module's call) and returns ``(y, innermost)``.

  ``stack`` holds the layer calls in progress. A subclass's ``__call__``
  calling ``super().__call__`` re-enters the same module: the outer calls are
  marked, so only the innermost one (the matrix product) is tapped."""
  for entry in stack:
    if entry[0] is module:
      entry[1] = True
  entry = [module, False]
  stack.append(entry)
  try:
    y = run()
  finally:
    stack.pop()
  return y, not entry[1]


def conv_reader(patches, patch_sum, kshape, has_bias: bool, sketch=None):
  """A convolution's ``read(y) -> LayerCall``: ``rows`` are the output
  positions of the batch, ``g`` is scaled by ``1 / positions`` (the mean over positions,
  as K-FAC for convolutions, Grosse & Martens 2016)."""
  def read(y):
    n_spatial = len(kshape) - 2
    positions = int(np.prod(y.shape[y.ndim - 1 - n_spatial:-1]))
    rows = int(np.prod(y.shape[:-1]))
    return LayerCall(patches, rows, 1, 1.0 / positions, has_bias, kshape, patch_sum,
                     input_sketch=sketch)

  return read


register_layer(nn.Dense, dense_adapter)
register_layer(nn.DenseGeneral, dense_general_adapter)
register_layer(nn.Conv, conv_adapter)
register_layer(nn.ConvTranspose, conv_adapter)
