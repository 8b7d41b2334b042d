"""Capturing per-layer statistics from an unmodified Flax model.

:func:`value_and_grad` runs the user's loss function under
``flax.linen.intercept_methods``. Every call of a registered layer
(:mod:`mkor_optax.layers`) is routed through a *tap*: a ``jax.custom_vjp``
identity on the layer output with one extra input, a zero-valued dummy that
rides in the ``params`` collection next to the layer's kernel. The dummy does
not change the output; its cotangent is the statistic. So the statistics come
out of the backward pass as ordinary gradients, which is why this works
unchanged under ``jax.jit``, ``nn.remat`` (no Python-side recording, nothing
to leak) and ``nn.scan``-over-layers (the dummy is stacked like the kernel
and split per layer by the scan, because the scan splits ``params``), and why a
layer called several times pools all its calls: the cotangents of a shared
input add up.

A *statistic kind* (:class:`StatKind`) decides what the dummy holds. The
rank-1 kind used by MKOR (Mozaffari et al. 2023, arXiv:2306.01685) collects, per layer,

    a = (1/N) sum_rows x_row            (with a trailing 1 when there is a bias)
    g = s * sum_rows dL/dy_row          (s = 1 dense, 1/P conv)

which for a loss that is a mean over examples is the mean per-example output
gradient. Other kinds (full covariances for K-FAC) plug in with their own
``zeros/forward/backward/finalize``.
"""

from __future__ import annotations

import functools
import threading
import weakref
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mkor_optax import checks, composites
from mkor_optax import layers as layers_lib
from mkor_optax.layout import Layout
from mkor_optax.paths import DELETE, get_at, path_str, set_at, unbox

from mkor_optax.sketch import DEFAULT_KIND, ROW_FIELDS, ROWS, SKETCH, Sketch  # noqa: F401 (re-exported)
from mkor_optax.tap import (COVARIANCE, RANK1, TAP, Covariance, LayerInfo, Rank1,  # noqa: F401 (re-exported)
                            StatKind, tap)

_active = threading.local()  # [module, re-entered] for the layer calls in progress


def _capture(mode: str, record: dict, kind: StatKind, path: tuple, call, y, dummy):
  """One layer call: recorded (``'discover'``) or tapped (``'tap'``, when the
  layer has its ``dummy``; a call with another parameter tree has none)."""
  if mode == 'discover':
    d_out = int(np.prod(call.kernel_shape[len(call.kernel_shape) - call.out_ndim:]))
    d_in = int(np.prod(call.kernel_shape)) // d_out
    info = LayerInfo(path, tuple(call.kernel_shape), d_in, d_out, call.out_ndim, call.has_bias)
    old = record.get(path)
    if old is not None and old._replace(rows=None, row_axes=()) != info:
      raise ValueError(f'layer {path_str(path)!r} is called with inconsistent shapes: '
                       f'{old._replace(rows=None, row_axes=())} vs {info}')
    # rows to hand over: one call with plain input rows (under shard_map, each device's)
    rowwise = old is None and call.input_sketch is None and call.input_sum is None
    record[path] = info._replace(rows=int(call.rows) if rowwise else None,
                                 row_axes=tuple(sorted(layers_lib.varying_axes(y))) if rowwise else ())
    return y
  if dummy is None:
    return y
  record.setdefault('tapped', set()).add(path)
  call = call._replace(output=y)
  fwd = kind.forward_rows(call) if ROWS in dummy else kind.forward(call)
  return tap(dummy, y, fwd, kind, call.out_ndim, call.g_scale)


def _composite_call(mode, record, kind, module, fn, args, kwargs):
  """A composite layer recomputed by its ``fn`` (``composites.composite_for``)
  with one captured product per child kernel."""
  params = module.variables['params']

  def dense(name, x):
    child = params[name]
    kernel, bias = unbox(child['kernel']), child.get('bias')
    bias = None if bias is None else unbox(bias)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=getattr(module, 'dtype', None))
    y = jnp.dot(x, kernel) + (0 if bias is None else bias)
    call = layers_lib.rows_call(x.reshape(-1, x.shape[-1]), 1, bias is not None, kernel.shape)
    return _capture(mode, record, kind, tuple(module.scope.path) + (name,), call, y, child.get(TAP))

  return fn(module, args, kwargs, dense)


def _make_interceptor(mode: str, record: dict, kind: StatKind):
  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name != '__call__' or layers_lib.capture_disabled()
        or module.scope is None):
      return next_fun(*args, **kwargs)
    composite = composites.composite_for(module)
    if composite is not None:
      return _composite_call(mode, record, kind, module, composite, args, kwargs)
    stack = getattr(_active, 'stack', None)
    if stack is None:
      stack = _active.stack = []
    adapter = layers_lib.adapter_for(module)
    if adapter is None or not module.has_variable('params', 'kernel'):
      return next_fun(*args, **kwargs)
    read = adapter(module, args, kwargs)
    if read is None:
      return next_fun(*args, **kwargs)
    y, innermost = layers_lib.call_innermost(stack, module, layers_lib.layer_run(read, next_fun, args, kwargs))
    if not innermost:
      return y
    dummy = module.get_variable('params', TAP) if module.has_variable('params', TAP) else None
    return _capture(mode, record, kind, tuple(module.scope.path), read(y), y, dummy)

  return interceptor


def discover(fun: Callable, params, *args, **kwargs) -> dict:
  """Traces ``fun(params, *args)`` abstractly; returns ``{path: LayerInfo}``
  for every registered layer it calls (``LayerInfo.kernel_shape`` as the layer
  saw it; ``path`` its module path)."""
  record: dict = {}
  with nn.intercept_methods(_make_interceptor('discover', record, RANK1)):
    jax.eval_shape(lambda p: fun(p, *args, **kwargs), params)
  return record


# fun -> {signature of its arguments: discover's answer}, for eager calls: an
# unjitted training loop would otherwise trace the whole model abstractly on
# every step (under jit the trace happens once anyway, and nothing is kept)
_DISCOVERED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _signature(args, kwargs):
  """A hashable key for the shapes, dtypes and static values of the arguments,
  or ``None`` when they are traced or not hashable (nothing is cached then)."""
  leaves, treedef = jax.tree.flatten((args, kwargs))
  key = [treedef]
  for x in leaves:
    if isinstance(x, jax.core.Tracer):
      return None
    if hasattr(x, 'shape') and hasattr(x, 'dtype'):
      key.append((type(x), tuple(x.shape), str(x.dtype), bool(getattr(x, 'weak_type', False))))
    else:
      key.append((type(x), x))
  try:
    hash(tuple(key))
  except TypeError:
    return None
  return tuple(key)


def _discover_cached(fun, argnums, args, kwargs, run: Callable[[], dict]) -> dict:
  """``run()`` (a :func:`discover`), remembered per ``fun``, argument
  signature and layer registry when the call is eager."""
  sig = _signature(args, kwargs)
  try:
    cache = _DISCOVERED.setdefault(fun, {}) if sig is not None else None
  except TypeError:  # fun cannot be weakly referenced
    cache = None
  if cache is None:
    return run()
  key = (argnums, sig, layers_lib.registry_key())
  if key not in cache:
    if len(cache) >= 8:
      cache.pop(next(iter(cache)))
    cache[key] = run()
  return cache[key]


def _locate(params, info: LayerInfo):
  """``(prefix, stack)``: where ``info``'s kernel is in ``params`` (at its module
  path, or under ``'params'`` when ``params`` is a whole variables dict) and
  the stacking axes ``nn.scan``/``nn.vmap`` added; ``None`` if it is not there."""
  for prefix in ((), ('params',)):
    kernel = get_at(params, prefix + info.path + ('kernel',))
    if kernel is None:
      continue
    outer = tuple(np.shape(unbox(kernel)))
    n = len(outer) - len(info.kernel_shape)
    if n < 0 or outer[n:] != info.kernel_shape:
      raise ValueError(
          f'layer {path_str(info.path)!r}: its kernel in params has shape {outer}, which is not '
          f'(stacking axes first) + the shape the layer used, {info.kernel_shape}. Lifted '
          f'transforms must stack parameters on axis 0 (variable_axes={{"params": 0}}).')
    return prefix, outer[:n]
  return None


def layer_layouts(fun: Callable, params, *args, **kwargs) -> dict:
  """The exact :class:`~mkor_optax.Layout` of every captured layer.

  Pass the result as ``scale_by_mkor(layouts=...)`` when ``init`` says a
  layout cannot be told from the parameter shapes and names alone.

  Args:
    fun: the loss, as for :func:`value_and_grad`.
    params: its parameters.
    *args: one batch of its other arguments (only shapes are used: one
      abstract trace, nothing is computed).
    **kwargs: its keyword arguments, likewise.

  Returns:
    ``{path: Layout}`` for every captured layer.

  Example:
    >>> mkor_optax.layer_layouts(loss_fn, params, x, y)['layers_0']
    Layout(stack_ndim=0, out_ndim=1, has_bias=True)
    >>> opt = mkor_optax.mkor(1e-2, layouts=mkor_optax.layer_layouts(loss_fn, params, x, y))
  """
  out = {}
  for path, info in discover(fun, params, *args, **kwargs).items():
    where = _locate(params, info)
    if where is not None:
      prefix, stack = where
      out[path_str(prefix + path)] = Layout(len(stack), info.out_ndim, info.has_bias)
  return out


def untapped(params):
  """``params`` without the capture's entries.

  Inside a loss passed to :func:`value_and_grad`, ``params`` carries one
  extra ``'__mkor_tap__'`` entry per captured layer (the statistics ride in
  it). A loss that combines ``params`` leaf by leaf with another tree of the
  model's structure (an L2-SP or EWC penalty, a pruning mask) uses
  ``untapped(params)`` for that; gradients flow through it unchanged.
  Outside the capture it returns ``params`` as it is.

  Args:
    params: the parameters a loss receives inside :func:`value_and_grad`
      (or any tree).

  Returns:
    The same tree without the ``'__mkor_tap__'`` entries.

  Example:
    >>> reference = jax.tree.map(jnp.zeros_like, params)
    >>> def penalised(p, x, y):  # an L2-SP penalty zips p with another tree
    ...   d = jax.tree.map(lambda a, b: jnp.sum((a - b) ** 2),
    ...                    mkor_optax.untapped(p), reference)
    ...   return loss_fn(p, x, y) + 1e-3 * sum(jax.tree.leaves(d))
    >>> sorted(mkor_optax.value_and_grad(penalised)(params, x, y)[2])
    ['layers_0', 'layers_2']
  """
  def strip(node):
    if not hasattr(node, 'items'):
      return node
    if TAP not in node and not any(hasattr(v, 'items') for v in node.values()):
      return node
    items = {k: strip(v) for k, v in node.items() if k != TAP}
    return items if type(node) is dict else type(node)(items)
  return strip(params)


# (predicate on the differentiated argument, value_and_grad for it): the NNX
# capture registers itself here, so this module does not import it.
_MODEL_CAPTURES: list = []


def register_model_capture(is_model: Callable[[object], bool], capture: Callable):
  """Hands ``value_and_grad`` of arguments for which ``is_model`` holds to
  ``capture(fun, argnums, has_aux, kind=kind)`` (the NNX capture uses this)."""
  if (is_model, capture) not in _MODEL_CAPTURES:
    _MODEL_CAPTURES.append((is_model, capture))


def _with_taps(params, infos: dict, kind):
  """``params`` with a zero dummy next to each located layer's kernel, and
  ``{path: (prefix, info)}`` of those layers."""
  tapped, tapped_params = {}, params
  for path, info in infos.items():
    where = _locate(params, info)
    if where is None:
      continue
    prefix, stack = where
    dummy = jax.tree.map(lambda z: jnp.zeros(stack + z.shape, z.dtype), kind.zeros(info))
    if info.row_axes and ROWS in dummy:  # shard_map sums a replicated dummy's gradient:
      rows = {k: v for k, v in dummy.items() if k in ROW_FIELDS}  # each device keeps its rows
      dummy = {**dummy, **layers_lib.cast_varying(rows, frozenset(info.row_axes))}
    tapped_params = set_at(tapped_params, prefix + path + (TAP,), dummy)
    tapped[path] = (prefix, info)
  return tapped_params, tapped


def _check_outcome(tapped: dict, seen: set, loss):
  missing = sorted(path_str(p) for p in tapped if p not in seen)
  if missing:
    raise ValueError(
        f'could not capture statistics for layer(s) {missing}: their parameters did not '
        'reach the layer with the capture tap. Pass params to apply unchanged as '
        "{'params': params}; for nn.scan/nn.vmap stack 'params' (variable_axes={'params': 0}).")
  local = layers_lib.varying_axes(loss)
  if local:
    raise ValueError(
        f'under shard_map the loss differs between devices along {sorted(local)}: make it the '
        f'mean over devices, lax.pmean(local_loss, {sorted(local)[0]!r}), so that gradients '
        'and statistics are those of the whole batch.')


def value_and_grad(fun: Callable, argnums: int = 0, has_aux: bool = False, *,
                   kind: StatKind = DEFAULT_KIND):
  """Like ``jax.value_and_grad``, returning the layer statistics as well.

  The same function serves Flax NNX: when the differentiated argument is an
  ``nnx.Module``, ``fun(model, *args)`` is differentiated by
  :func:`mkor_optax.nnx.value_and_grad` (``nnx.value_and_grad`` with the
  statistics; ``grads`` is then an ``nnx.State``).

  Args:
    fun: a loss ``fun(params, *args)`` returning a scalar (or ``(loss, aux)``
      with ``has_aux``) that calls an unmodified linen model as
      ``model.apply({'params': params, ...}, ...)`` (or as
      ``model.apply(variables, ...)`` when the differentiated argument is the
      whole variables dict). The loss should be a mean over examples (then
      ``g`` is the mean per-example gradient). The model may also be applied
      with other parameter trees (a teacher, an EMA target, a frozen copy):
      only the calls with the differentiated tree are captured.
    argnums: which positional argument holds the parameters (an int, as
      the optimizer preconditions one parameter tree).
    has_aux: as in ``jax.value_and_grad``.
    kind: the statistic kind: ``mkor_optax.SKETCH`` (default, ``Sketch(4,
      lazy=True)``: four random-sign sketches of each side's second moment
      for MKOR and MKOR-H, which sketch the rows ``nn.Dense``-like layers
      hand over on their refresh steps; the batch means too, for Eva),
      ``Sketch(k)`` (all sketched here, every step: ``2k`` vectors per
      layer, for statistics kept outside the ``jit``),
      ``mkor_optax.RANK1`` (the batch means of the MKOR paper alone: cheaper
      where only Eva reads them) or ``mkor_optax.COVARIANCE`` (K-FAC).

  Returns:
    A function ``(*args, **kwargs) -> (value, grads, stats)`` where
    ``value`` and ``grads`` are what ``jax.value_and_grad(fun, argnums,
    has_aux)`` gives and ``stats`` maps each captured layer's path ``'a/b/c'``
    (where ``params['a']['b']['c']['kernel']`` is its kernel) to its
    statistics: ``{'a': (*stack, d_in[+1]), 'g': (*stack, d_out), 'g_mass':
    (*stack,)}`` for ``RANK1``, and for sketches these and ``'a_sketches':
    (*stack, k, d_in[+1]), 'g_sketches': (*stack, k, d_out)``; with
    ``Sketch(k, lazy=True)`` (the default) a layer that hands over its ``N`` rows has
    ``'x_rows': (*stack, N, d_in), 'dy_rows': (*stack, N, d_out),
    'dy_scale': (*stack,), 'sketches': (*stack, k, 0)`` in place of the
    sketches.

  Raises:
    ValueError: naming every captured layer that did not receive its tap (its
      parameters went through a transform that dropped or re-arranged them);
      under ``shard_map``, for a loss that is not the same on every device
      (not ``lax.pmean``-ed), whose statistics and gradients would be wrong.

  Example:
    >>> loss, grads, stats = mkor_optax.value_and_grad(loss_fn)(params, x, y)
    >>> jax.tree.map(jnp.shape, stats['layers_0'])  # N = 8 rows, d_in = 3, d_out = 8, k = 4
    {'a': (4,), 'dy_rows': (8, 8), 'dy_scale': (), 'g': (8,), 'g_mass': (), 'sketches': (4, 0), 'x_rows': (8, 3)}
    >>> sketched = mkor_optax.value_and_grad(loss_fn, kind=mkor_optax.Sketch(4))
    >>> jax.tree.map(jnp.shape, sketched(params, x, y)[2]['layers_0'])  # d_in + 1 = 4
    {'a': (4,), 'a_sketches': (4, 4), 'g': (8,), 'g_mass': (), 'g_sketches': (4, 8)}
    >>> means = mkor_optax.value_and_grad(loss_fn, kind=mkor_optax.RANK1)
    >>> jax.tree.map(jnp.shape, means(params, x, y)[2]['layers_0'])
    {'a': (4,), 'g': (8,), 'g_mass': ()}
  """
  if not checks.is_int(argnums):
    raise TypeError(f'value_and_grad: argnums must be an int (one parameter tree), got {argnums!r}')

  @functools.wraps(fun)
  def wrapped(*args, **kwargs):
    if len(args) <= argnums:
      raise TypeError(f'value_and_grad: argnums={argnums} but only {len(args)} positional '
                      'argument(s) were given')
    params = args[argnums]
    for is_model, capture in _MODEL_CAPTURES:  # an NNX model: mkor_optax.nnx.value_and_grad
      if is_model(params):
        return capture(fun, argnums, has_aux, kind=kind)(*args, **kwargs)
    call = lambda p: fun(*args[:argnums], p, *args[argnums + 1:], **kwargs)
    infos = _discover_cached(fun, argnums, args, kwargs, lambda: discover(call, params))
    tapped_params, tapped = _with_taps(params, infos, kind)
    record: dict = {}

    def inner(p):
      with nn.intercept_methods(_make_interceptor('tap', record, kind)):
        try:
          return call(p)
        except (ValueError, TypeError) as e:
          if TAP not in str(e):
            raise
          raise ValueError(
              f'the loss combines params with another tree leaf by leaf ({e}). The capture adds '
              f"'{TAP}' entries to params; use mkor_optax.untapped(params) in that "
              'combination (for example jax.tree.map(f, mkor_optax.untapped(params), other)).'
          ) from e

    value, grads = jax.value_and_grad(inner, has_aux=has_aux)(tapped_params)
    _check_outcome(tapped, record.get('tapped', set()), value[0] if has_aux else value)
    stats = {}
    for path, (prefix, info) in tapped.items():
      stats[path_str(prefix + path)] = kind.finalize(get_at(grads, prefix + path + (TAP,)), info)
      grads = set_at(grads, prefix + path + (TAP,), DELETE)
    return value, grads, stats

  return wrapped
