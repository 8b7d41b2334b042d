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

Layouts come from the modules themselves (:func:`layouts`): NNX keeps its
modules, so no trace and no guessing from shapes is needed. At ``init`` the
transform is given ``nnx.state(model, nnx.Param)``, whose ``Param`` objects
are the model's own: :func:`layout_hints` finds the modules that own them in
the calling frames (``nnx.Optimizer.__init__`` holds ``model``), and
remembers the layouts per ``(path, kernel shape)`` for ``update``, which is
given plain arrays.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
import types
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx as fnnx

from mkor_optax import capture as capture_lib
from mkor_optax import kronecker as kr
from mkor_optax import layers as layers_lib
from mkor_optax.kronecker import Layout
from mkor_optax.layers import LayerCall
from mkor_optax.paths import path_str

TAP_ATTR = '_mkor_tap'


class Tap(fnnx.Param):
  """The capture's zero dummy on a layer module (an ``nnx.Param``, so that it
  is differentiated, stacked and split exactly like the layer's kernel)."""


# ------------------------------------------------------------------ layouts

class _Layer(NamedTuple):
  module: object
  layout: Layout
  info: capture_lib.LayerInfo
  stack: tuple


def _param_shape(v) -> tuple:
  return tuple(np.shape(v.get_value())) if isinstance(v, fnnx.Variable) else tuple(np.shape(v))


def _has_bias(module) -> bool:
  return isinstance(getattr(module, 'bias', None), fnnx.Variable)


def _linear_layout(m):
  return Layout(len(_param_shape(m.kernel)) - 2, 1, _has_bias(m))


def _linear_general_layout(m):
  if m.batch_axis:
    return kr.UNSUPPORTED  # a batch of kernels, not one (d_in, d_out) matrix
  core = len(m.in_features) + len(m.out_features)
  return Layout(len(_param_shape(m.kernel)) - core, len(m.out_features), _has_bias(m))


def _conv_layout(m):
  if getattr(m, 'feature_group_count', 1) != 1 or getattr(m, 'transpose_kernel', False):
    return kr.UNSUPPORTED
  core = len(m.kernel_size) + 2
  return Layout(len(_param_shape(m.kernel)) - core, 1, _has_bias(m))


def _einsum_parts(einsum_str: Optional[str]):
  """``(lhs, contracted, features)`` when ``lhs,rhs->out`` is ``y = x W (+ b)``
  with a kernel ``W`` of shape ``(*contracted, *features)``: ``rhs`` is
  contracted letters (all in ``lhs``, none in ``out``) then feature letters
  (in ``out``, none in ``lhs``), ``out`` ends with the feature letters in
  the kernel's order and holds every other letter of ``lhs``. ``None`` else."""
  if not einsum_str:
    return None
  s = einsum_str.replace(' ', '')
  if '->' not in s or s.count(',') != 1:
    return None
  ins, out = s.split('->')
  lhs, rhs = ins.split(',')
  if '.' in rhs:
    return None
  n_feat = sum(c in out for c in rhs)
  contracted, features = rhs[:len(rhs) - n_feat], rhs[len(rhs) - n_feat:]
  if (not contracted or not features or any(c in out for c in contracted)
      or any(c not in lhs for c in contracted) or any(c in lhs for c in features)
      or not out.endswith(features)):
    return None
  rest = ''.join(c for c in lhs if c not in contracted)
  if rest + features != out or len(set(rhs)) != len(rhs):
    return None
  return lhs, contracted, features


def _einsum_layout(m):
  parts = _einsum_parts(m.einsum_str)
  if parts is None:
    return kr.UNSUPPORTED
  _, contracted, features = parts
  has_bias = _has_bias(m)
  kshape = _param_shape(m.kernel)
  stack = len(kshape) - len(contracted) - len(features)
  if has_bias and _param_shape(m.bias)[stack:] != kshape[len(kshape) - len(features):]:
    return kr.UNSUPPORTED  # a bias that is not one entry per output feature
  return Layout(stack, len(features), has_bias)


def _layout_of(module):
  """The :class:`Layout` of a registered NNX layer module, :data:`UNSUPPORTED`
  for one that cannot be preconditioned, ``None`` for a non-layer."""
  if layers_lib.adapter_for(module) is None or not isinstance(getattr(module, 'kernel', None),
                                                                fnnx.Variable):
    return None
  fn = layers_lib.nnx_layout_fn(module)
  if fn is not None:
    out = fn(module)
    return kr.UNSUPPORTED if out is None else out
  params = {'kernel': module.kernel.get_value()}
  if _has_bias(module):
    params['bias'] = module.bias.get_value()
  return kr.infer_layout(params)


def _layers(model) -> dict:
  """``{path: _Layer}`` for every capturable layer module in ``model``'s graph."""
  out = {}
  for path, node in fnnx.iter_graph(model):
    if not isinstance(node, fnnx.Module):
      continue
    layout = _layout_of(node)
    if not isinstance(layout, Layout):
      continue
    kshape = _param_shape(node.kernel)
    d = kr.dims(kshape, layout)
    core = kshape[layout.stack_ndim:]
    info = capture_lib.LayerInfo(tuple(path), core, d.d_in, d.d_out, layout.out_ndim,
                                 layout.has_bias)
    out[tuple(path)] = _Layer(node, layout, info, d.stack)
  return out


def layouts(model) -> dict:
  """``{path: Layout}`` of every registered layer of an NNX ``model`` (read
  from the modules), keyed like ``nnx.state(model, nnx.Param)``: pass it as
  ``layouts=`` to a transform built where the model cannot be found at
  ``init`` (parameters given as plain arrays, with a layer whose layout
  cannot be told from its shapes)."""
  out = {}
  for path, node in fnnx.iter_graph(model):
    if isinstance(node, fnnx.Module):
      layout = _layout_of(node)
      if isinstance(layout, Layout):
        out[path_str(path)] = layout
  return out


# (path, kernel shape) -> layout, for update (plain arrays); None = conflicting
_SEEN: dict = {}
_SEEN_LOCK = threading.Lock()


def _remember(name: str, kshape: tuple, layout):
  with _SEEN_LOCK:
    key = (name, tuple(kshape))
    old = _SEEN.get(key, layout)
    _SEEN[key] = layout if old == layout else None


def _kernel_leaves(tree, prefix=()):
  """``(path, kernel leaf)`` of every mapping in ``tree`` holding a ``'kernel'``."""
  if not hasattr(tree, 'items'):
    return
  for k, v in tree.items():
    if k == 'kernel' and not hasattr(v, 'items'):
      yield prefix, v
    elif hasattr(v, 'items'):
      yield from _kernel_leaves(v, prefix + (k,))


def _caller_modules(depth: int = 64):
  seen = set()
  frame = sys._getframe(2)
  while frame is not None and depth > 0:
    for value in list(frame.f_locals.values()):
      if isinstance(value, fnnx.Module) and id(value) not in seen:
        seen.add(id(value))
        yield value
    frame, depth = frame.f_back, depth - 1


def is_nnx_tree(params) -> bool:
  if isinstance(params, fnnx.State):
    return True
  return any(isinstance(x, fnnx.Variable) for x in
             jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, fnnx.Variable)))


def layout_hints(params) -> dict:
  """``{path: Layout or UNSUPPORTED}`` for the kernels of an NNX parameter
  tree, from the modules that own them: found in the calling frames when
  ``params`` holds the model's own ``nnx.Param`` objects (as
  ``nnx.state(model, nnx.Param)`` does), else remembered from an earlier
  ``init`` or capture of the same path and kernel shape. ``{}`` for a
  non-NNX tree."""
  if not is_nnx_tree(params):
    return {}
  kernels = {}
  for path, leaf in _kernel_leaves(params):
    kernels[path_str(path)] = leaf
  hints = {}
  by_id = {id(v): name for name, v in kernels.items() if isinstance(v, fnnx.Variable)}
  if by_id:
    for model in _caller_modules():
      for _, node in fnnx.iter_graph(model):
        if isinstance(node, fnnx.Module) and id(getattr(node, 'kernel', None)) in by_id:
          layout = _layout_of(node)
          if layout is not None:
            hints[by_id[id(node.kernel)]] = layout
      if len(hints) == len(by_id):
        break
  for name, leaf in kernels.items():
    kshape = _param_shape(leaf)
    if name in hints:
      _remember(name, kshape, hints[name])
    else:
      with _SEEN_LOCK:
        layout = _SEEN.get((name, kshape))
      if layout is not None:
        hints[name] = layout
  return hints


# ----------------------------------------------------------- built-in adapters

def _inputs(args, kwargs):
  return jnp.asarray(args[0] if args else kwargs['inputs'])


def _reader(module, rows, out_ndim):
  input_rows = lambda: jax.lax.stop_gradient(rows.astype(jnp.float32))

  def read(y):
    del y
    return LayerCall(input_rows, int(rows.shape[0]), out_ndim, 1.0, _has_bias(module),
                     _param_shape(module.kernel))

  return read


def linear_adapter(module, args, kwargs):
  """``nnx.Linear``: rows are all leading axes of the input."""
  x = _inputs(args, kwargs)
  return _reader(module, x.reshape(-1, x.shape[-1]), 1)


def linear_general_adapter(module, args, kwargs):
  """``nnx.LinearGeneral`` (the q/k/v/out of ``nnx.MultiHeadAttention``)
  without ``batch_axis``: the contracted axes (sorted, as NNX orders the
  kernel's) flattened into ``d_in``."""
  if module.batch_axis:
    return None
  x = _inputs(args, kwargs)
  axis = tuple(sorted(a % x.ndim for a in module.axis))
  d_in = int(np.prod([x.shape[a] for a in axis]))
  moved = jnp.moveaxis(x, axis, tuple(range(x.ndim - len(axis), x.ndim)))
  return _reader(module, moved.reshape(-1, d_in), len(module.out_features))


def einsum_adapter(module, args, kwargs):
  """``nnx.Einsum`` when its equation is a matrix product (see :func:`_einsum_parts`)."""
  eq = args[1] if len(args) > 1 else kwargs.get('einsum_str')
  parts = _einsum_parts(eq if eq is not None else module.einsum_str)
  if parts is None:
    return None
  lhs, contracted, features = parts
  if _has_bias(module) and _param_shape(module.bias) != _param_shape(module.kernel)[-len(features):]:
    return None
  x = _inputs(args, kwargs)
  ell = '...' if '...' in lhs else ''
  letters = lhs.replace('...', '')
  rest = ''.join(c for c in letters if c not in contracted)
  moved = jnp.einsum(f'{lhs}->{ell}{rest}{contracted}', x)
  d_in = int(np.prod(moved.shape[moved.ndim - len(contracted):]))
  return _reader(module, moved.reshape(-1, d_in), len(features))


def _original_call(cls):
  f = cls.__dict__['__call__']
  return getattr(f, '__mkor_original__', f)


def conv_adapter(module, args, kwargs):
  """``nnx.Conv`` (not grouped) and ``nnx.ConvTranspose``
  (``transpose_kernel=False``): im2col patch sums (and, for kinds that need
  rows, the patches) through the layer's own ``__call__`` on a copy of its
  attributes with a probe kernel, so every padding mode is honoured (see
  :func:`mkor_optax.layers.conv_adapter`)."""
  if getattr(module, 'feature_group_count', 1) != 1 or getattr(module, 'transpose_kernel', False):
    return None
  base = fnnx.ConvTranspose if isinstance(module, fnnx.ConvTranspose) else fnnx.Conv
  call = _original_call(base)
  x = _inputs(args, kwargs)
  kshape = _param_shape(module.kernel)
  d_in = int(np.prod(kshape[:-1]))
  x32 = jax.lax.stop_gradient(x.astype(jnp.float32))

  def probe(kernel):
    attrs = dict(vars(module))
    attrs.update(kernel=kernel, bias=None, use_bias=False, mask=None, dtype=jnp.float32,
                 param_dtype=jnp.float32, kernel_shape=tuple(kernel.shape),
                 out_features=kernel.shape[-1], preferred_element_type=None)
    return call(types.SimpleNamespace(**attrs), x32)

  def patch_sum():
    ones = layers_lib.cast_varying(jnp.ones(kshape[:-1] + (1,), jnp.float32),
                                   layers_lib.varying_axes(x32))
    with layers_lib._no_capture():
      total = jax.grad(lambda k: probe(k).sum())(ones)
    return jax.lax.stop_gradient(total.reshape(-1))

  def patches():
    eye = jnp.eye(d_in, dtype=jnp.float32).reshape(kshape[:-1] + (d_in,))
    with layers_lib._no_capture():
      out = probe(eye)
    return jax.lax.stop_gradient(out.reshape(-1, d_in))

  return layers_lib.conv_reader(patches, patch_sum, kshape, _has_bias(module))


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
    y, innermost = layers_lib.call_innermost(stack, self, lambda: original(self, *args, **kwargs))
    if not innermost:
      return y
    call = read(y)
    name = tap.get_metadata().get('mkor_path', '?')
    want = tap.get_metadata().get('mkor_kernel_shape')
    if want is not None and tuple(call.kernel_shape) != tuple(want):
      raise ValueError(f'layer {name!r}: the call used a kernel of shape {tuple(call.kernel_shape)}'
                       f', its module says {tuple(want)}')
    record.setdefault('tapped', set()).add(name)
    return capture_lib._tap(tap.get_value(), y, kind.forward(call), kind, call.out_ndim,
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
                   kind: capture_lib.StatKind = capture_lib.RANK1, **grad_kwargs):
  """``nnx.value_and_grad`` that also returns the layer statistics.

  Args:
    fun: a loss ``fun(model, *args)`` calling an unmodified NNX model (its
      BatchNorm, Dropout and RNG streams included); a scalar, or ``(loss,
      aux)`` with ``has_aux``. It should be a mean over examples.
    argnums: the position of the model (an int), or an
      ``nnx.DiffState(position, filter)`` to differentiate other variables
      than ``nnx.Param`` (the capture's :class:`Tap` dummies are added to it).
    has_aux: as in ``nnx.value_and_grad``.
    kind: the statistic kind (default: MKOR's rank-1 means;
      ``mkor_optax.COVARIANCE`` for K-FAC).
    **grad_kwargs: other arguments of ``nnx.value_and_grad``.

  Returns:
    ``(*args, **kwargs) -> (value, grads, stats)``: ``value`` and ``grads``
    as ``nnx.value_and_grad`` gives them (an ``nnx.State``, for
    ``nnx.Optimizer.update(model, grads, stats=stats)``), and ``stats``
    keyed by each called layer's path in ``nnx.state(model, nnx.Param)``
    (``'blocks/linear'``), as for linen.
  """
  if isinstance(argnums, fnnx.DiffState):
    index, wrt = argnums.argnum, argnums.filter
  elif kr.is_int(argnums):
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
    found = _layers(model)
    for path, layer in found.items():
      if TAP_ATTR in vars(layer.module):
        raise ValueError(f'layer {path_str(path)!r} already carries a capture tap '
                         '(nested mkor_optax.value_and_grad on the same model?)')
      _remember(path_str(path), layer.stack + layer.info.kernel_shape, layer.layout)
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


for _cls, _adapter in ((fnnx.Linear, linear_adapter), (fnnx.LinearGeneral, linear_general_adapter),
                       (fnnx.Conv, conv_adapter), (fnnx.ConvTranspose, conv_adapter),
                       (fnnx.Einsum, einsum_adapter)):
  layers_lib.register_layer(_cls, _adapter)
for _cls, _fn in ((fnnx.Linear, _linear_layout), (fnnx.LinearGeneral, _linear_general_layout),
                  (fnnx.Conv, _conv_layout), (fnnx.ConvTranspose, _conv_layout),
                  (fnnx.Einsum, _einsum_layout)):
  layers_lib._NNX_LAYOUTS[_cls] = _fn
del _cls, _adapter, _fn
