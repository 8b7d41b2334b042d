"""Capturing layer statistics from an unmodified Flax NNX model.

The same statistics as :mod:`mkor_optax.capture` (linen), by the same tap: a
``jax.custom_vjp`` identity on each captured layer output whose zero dummy
input has the statistic as its cotangent. What differs is where the dummy
rides and how the call is seen:

* the dummy is an ``nnx.Param`` subclass, :class:`Tap`, set as an attribute
  of each captured layer module for the duration of the call, so NNX
  differentiates it like the kernel and ``nnx.scan``/``nnx.vmap``/
  ``nnx.remat`` split and carry it like the kernel (a layer stacked by
  ``nnx.vmap`` gets a stacked dummy, split per layer by the scan);
* the layer's call is seen by wrapping ``__call__`` of the registered NNX
  classes while :func:`value_and_grad` runs (restored afterwards; calls from
  other threads and calls of modules without a tap pass straight through);
* the differentiation is ``nnx.value_and_grad``, so BatchNorm statistics,
  Dropout RNG counts and any other NNX state the loss mutates are handled by
  NNX as in an ordinary NNX training step.

Layouts come from the modules themselves (:func:`layouts`, in
:mod:`mkor_optax.nnx_layers`): NNX keeps its modules, so no trace and no
guessing from shapes is needed.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx as fnnx

from mkor_optax import capture as capture_lib
from mkor_optax import checks
from mkor_optax import layout as layout_lib
from mkor_optax import layers as layers_lib
from mkor_optax import sketch as sketch_lib
from mkor_optax import tap as tap_lib
from mkor_optax.nnx_layers import layers_of, layout_hints, layouts  # noqa: F401 (public)
from mkor_optax.paths import path_str

TAP_ATTR = '_mkor_tap'


class Tap(fnnx.Param):
  """The capture's zero dummy on a layer module (an ``nnx.Param``, so that it
  is differentiated, stacked and split exactly like the layer's kernel).

  Example:
    >>> from flax import nnx
    >>> isinstance(mkor_optax.nnx.Tap(jnp.zeros(3)), nnx.Param)
    True
  """


# ------------------------------------------------------------ the call hook

_local = threading.local()  # .capture: (kind, record) while value_and_grad runs here
_patch_lock = threading.Lock()
_patched: dict = {}  # class -> (had its own __call__, original)
_patch_users = [0]


def _wrap(original):
  @functools.wraps(original)
  def __call__(self, *args, **kwargs):
    active = getattr(_local, 'capture', None)
    tap = vars(self).get(TAP_ATTR)
    if active is None or not isinstance(tap, Tap) or layers_lib.capture_disabled():
      return original(self, *args, **kwargs)
    kind, record = active
    adapter = layers_lib.adapter_for(self)
    read = adapter(self, args, kwargs) if adapter is not None else None
    if read is None:
      return original(self, *args, **kwargs)
    stack = record.setdefault('stack', [])
    y, innermost = layers_lib.call_innermost(
        stack, self, layers_lib.layer_run(read, lambda *a, **k: original(self, *a, **k), args, kwargs))
    if not innermost:
      return y
    call = read(y)
    name = tap.get_metadata().get('mkor_path', '?')
    want = tap.get_metadata().get('mkor_kernel_shape')
    if want is not None and tuple(call.kernel_shape) != tuple(want):
      raise ValueError(f'layer {name!r}: the call used a kernel of shape {tuple(call.kernel_shape)}'
                       f', its module says {tuple(want)}')
    record.setdefault('tapped', set()).add(name)
    return tap_lib.tap(tap.get_value(), y, kind.forward(call._replace(output=y)), kind, call.out_ndim,
                       call.g_scale)

  __call__.__mkor_original__ = original
  return __call__


def _nnx_classes():
  return [cls for cls in list(layers_lib._REGISTRY)
          if isinstance(cls, type) and issubclass(cls, fnnx.Module)]


@contextlib.contextmanager
def _hooked(kind, record):
  with _patch_lock:
    if _patch_users[0] == 0:
      for cls in _nnx_classes():
        own = '__call__' in cls.__dict__
        original = cls.__dict__['__call__'] if own else cls.__call__
        _patched[cls] = (own, original)
        cls.__call__ = _wrap(original)
    _patch_users[0] += 1
  old = getattr(_local, 'capture', None)
  _local.capture = (kind, record)
  try:
    yield
  finally:
    _local.capture = old
    with _patch_lock:
      _patch_users[0] -= 1
      if _patch_users[0] == 0:
        for cls, (own, original) in _patched.items():
          if own:
            cls.__call__ = original
          else:
            del cls.__call__
        _patched.clear()


# ------------------------------------------------------------- value_and_grad

def _get(state, path):
  for p in path:
    if state is None or p not in state:
      return None
    state = state[p]
  return state


def value_and_grad(fun: Callable, argnums=0, has_aux: bool = False, *,
                   kind: tap_lib.StatKind = sketch_lib.DEFAULT_KIND, **grad_kwargs):
  """``nnx.value_and_grad`` that also returns the layer statistics.

  Args:
    fun: a loss ``fun(model, *args)`` calling an unmodified NNX model (its
      BatchNorm, Dropout and RNG streams included); a scalar, or ``(loss,
      aux)`` with ``has_aux``. It should be a mean over examples.
    argnums: the position of the model (an int), or an
      ``nnx.DiffState(position, filter)`` to differentiate other variables
      than ``nnx.Param`` (the capture's :class:`Tap` dummies are added to it).
    has_aux: as in ``nnx.value_and_grad``.
    kind: the statistic kind, as in :func:`mkor_optax.value_and_grad`
      (default ``mkor_optax.SKETCH``, which serves MKOR, MKOR-H and Eva;
      ``mkor_optax.RANK1``, the means alone; ``mkor_optax.COVARIANCE`` for
      K-FAC).
    **grad_kwargs: other arguments of ``nnx.value_and_grad``.

  Returns:
    ``(*args, **kwargs) -> (value, grads, stats)``: ``value`` and ``grads``
    as ``nnx.value_and_grad`` gives them (an ``nnx.State``, for
    ``nnx.Optimizer.update(model, grads, stats=stats)``), and ``stats``
    keyed by each called layer's path in ``nnx.state(model, nnx.Param)``
    (``'blocks/linear'``), as for linen.

  Example:
    >>> from flax import nnx
    >>> net = nnx.Sequential(nnx.Linear(3, 8, rngs=nnx.Rngs(0)), nnx.tanh,
    ...                      nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
    >>> optimizer = nnx.Optimizer(net, mkor_optax.mkor(1e-2), wrt=nnx.Param)
    >>> nnx_loss = lambda m, x, y: jnp.mean((m(x) - y) ** 2)
    >>> loss, grads, stats = mkor_optax.nnx.value_and_grad(nnx_loss)(net, x, y)
    >>> _ = optimizer.update(net, grads, stats=stats)
    >>> sorted(stats)
    ['layers/0', 'layers/2']
  """
  if isinstance(argnums, fnnx.DiffState):
    index, wrt = argnums.argnum, argnums.filter
  elif checks.is_int(argnums):
    index, wrt = int(argnums), fnnx.Param
  else:
    raise TypeError(f'value_and_grad: argnums must be an int or an nnx.DiffState (one model), '
                    f'got {argnums!r}')

  @functools.wraps(fun)
  def wrapped(*args, **kwargs):
    if len(args) <= index:
      raise TypeError(f'value_and_grad: argnums={index} but only {len(args)} positional '
                      'argument(s) were given')
    model = args[index]
    if not isinstance(model, fnnx.Module):
      raise TypeError(f'mkor_optax.nnx.value_and_grad: argument {index} must be an nnx.Module, '
                      f'got {type(model).__name__}')
    found = layers_of(model)
    for path, layer in found.items():
      if TAP_ATTR in vars(layer.module):
        raise ValueError(f'layer {path_str(path)!r} already carries a capture tap '
                         '(nested mkor_optax.value_and_grad on the same model?)')
      zeros = jax.tree.map(lambda z, s=layer.stack: jnp.zeros(s + z.shape, z.dtype),
                           kind.zeros(layer.info))
      setattr(layer.module, TAP_ATTR,
              Tap(zeros, mkor_path=path_str(path), mkor_kernel_shape=layer.info.kernel_shape))
    record: dict = {}
    diff = fnnx.DiffState(index, fnnx.Any(wrt, Tap))
    try:
      with _hooked(kind, record):
        value, grads = fnnx.value_and_grad(fun, argnums=diff, has_aux=has_aux,
                                           **grad_kwargs)(*args, **kwargs)
    finally:
      for layer in found.values():
        if TAP_ATTR in vars(layer.module):
          delattr(layer.module, TAP_ATTR)
    loss = value[0] if has_aux else value
    local = layers_lib.varying_axes(loss)
    if local:
      raise ValueError(
          f'under shard_map the loss differs between devices along {sorted(local)}: make it the '
          f'mean over devices, lax.pmean(local_loss, {sorted(local)[0]!r}).')
    seen = record.get('tapped', set())
    stats = {}
    for path, layer in found.items():
      node = _get(grads, path)
      if node is None or TAP_ATTR not in node:
        continue
      ct = node[TAP_ATTR]
      del node[TAP_ATTR]
      name = path_str(path)
      if name in seen and 'kernel' in node:
        stats[name] = kind.finalize(ct.get_value() if isinstance(ct, fnnx.Variable) else ct,
                                    layer.info)
    return value, grads, stats

  return wrapped


capture_lib.register_model_capture(lambda x: isinstance(x, fnnx.Module), value_and_grad)
layout_lib.register_hint_provider(layout_hints)
