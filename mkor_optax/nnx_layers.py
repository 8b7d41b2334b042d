"""NNX layers: their layouts, read from the modules, and the adapters that
read one call of each built-in NNX layer (``nnx.Linear``, ``nnx.LinearGeneral``,
``nnx.Conv``, ``nnx.ConvTranspose``, ``nnx.Einsum``) as a
:class:`~mkor_optax.layers.LayerCall`.

At ``init`` the transform is given ``nnx.state(model, nnx.Param)``, whose
``Param`` objects are the model's own: :func:`layout_hints` finds the modules
that own them in the calling frames (``nnx.Optimizer.__init__`` holds
``model``; the walk is :func:`_caller_modules`, the only place that reads
frames). Nothing is remembered between calls: ``update``, given plain
arrays, reads each layer's matrix view from the shapes of the factors the
state holds (:func:`mkor_optax.layout.plan_from_state`), so two models never
see each other's layouts.
"""

from __future__ import annotations

import sys
import types
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx as fnnx

from mkor_optax import layout as layout_lib
from mkor_optax import conv_sketch
from mkor_optax import layers as layers_lib
from mkor_optax import tap as tap_lib
from mkor_optax.layout import Layout
from mkor_optax.paths import path_str

# ------------------------------------------------------------------ layouts

class _Layer(NamedTuple):
  module: object
  layout: Layout
  info: tap_lib.LayerInfo
  stack: tuple


def _param_shape(v) -> tuple:
  return tuple(np.shape(v.get_value())) if isinstance(v, fnnx.Variable) else tuple(np.shape(v))


def _has_bias(module) -> bool:
  return isinstance(getattr(module, 'bias', None), fnnx.Variable)


def _linear_layout(m):
  return Layout(len(_param_shape(m.kernel)) - 2, 1, _has_bias(m))


def _linear_general_layout(m):
  if m.batch_axis:
    return layout_lib.UNSUPPORTED  # a batch of kernels, not one (d_in, d_out) matrix
  core = len(m.in_features) + len(m.out_features)
  return Layout(len(_param_shape(m.kernel)) - core, len(m.out_features), _has_bias(m))


def _conv_layout(m):
  if getattr(m, 'feature_group_count', 1) != 1 or getattr(m, 'transpose_kernel', False):
    return layout_lib.UNSUPPORTED
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
    return layout_lib.UNSUPPORTED
  _, contracted, features = parts
  has_bias = _has_bias(m)
  kshape = _param_shape(m.kernel)
  stack = len(kshape) - len(contracted) - len(features)
  if has_bias and _param_shape(m.bias)[stack:] != kshape[len(kshape) - len(features):]:
    return layout_lib.UNSUPPORTED  # a bias that is not one entry per output feature
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
    return layout_lib.UNSUPPORTED if out is None else out
  params = {'kernel': module.kernel.get_value()}
  if _has_bias(module):
    params['bias'] = module.bias.get_value()
  return layout_lib.infer_layout(params)


def layers_of(model) -> dict:
  """``{path: _Layer}`` for every capturable layer module in ``model``'s graph."""
  out = {}
  for path, node in fnnx.iter_graph(model):
    if not isinstance(node, fnnx.Module):
      continue
    layout = _layout_of(node)
    if not isinstance(layout, Layout):
      continue
    kshape = _param_shape(node.kernel)
    d = layout_lib.dims(kshape, layout)
    core = kshape[layout.stack_ndim:]
    info = tap_lib.LayerInfo(tuple(path), core, d.d_in, d.d_out, layout.out_ndim,
                                 layout.has_bias)
    out[tuple(path)] = _Layer(node, layout, info, d.stack)
  return out


def layouts(model) -> dict:
  """``{path: Layout}`` of every registered layer of an NNX ``model`` (read
  from the modules), keyed like ``nnx.state(model, nnx.Param)``: pass it as
  ``layouts=`` to a transform built where the model cannot be found at
  ``init`` (parameters given as plain arrays, with a layer whose layout
  cannot be told from its shapes).

  Args:
    model: an ``nnx.Module``.

  Returns:
    ``{path: Layout}``.

  Example:
    >>> from flax import nnx
    >>> net = nnx.Sequential(nnx.Linear(3, 8, rngs=nnx.Rngs(0)), nnx.tanh,
    ...                      nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
    >>> mkor_optax.nnx.layouts(net)['layers/0']
    Layout(stack_ndim=0, out_ndim=1, has_bias=True)
  """
  out = {}
  for path, node in fnnx.iter_graph(model):
    if isinstance(node, fnnx.Module):
      layout = _layout_of(node)
      if isinstance(layout, Layout):
        out[path_str(path)] = layout
  return out


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
  """The NNX modules held by the local variables of the calling frames,
  innermost first (``init`` is handed the model's ``Param`` objects but not
  the model; ``nnx.Optimizer.__init__`` has it as a local)."""
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
  tree, from the modules that own them, found in the calling frames when
  ``params`` holds the model's own ``nnx.Param`` objects (as
  ``nnx.state(model, nnx.Param)`` does). ``{}`` for plain arrays (then
  pass ``layouts=mkor_optax.nnx.layouts(model)`` for a kernel whose layout
  its shapes do not tell) and for a non-NNX tree."""
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
  return hints


# ----------------------------------------------------------- built-in adapters

def _inputs(args, kwargs):
  return jnp.asarray(args[0] if args else kwargs['inputs'])


def _reader(module, rows, out_ndim):
  def read(y):
    del y
    return layers_lib.rows_call(rows, out_ndim, _has_bias(module), _param_shape(module.kernel))

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
  x32 = jax.lax.stop_gradient(x.astype(jnp.float32))

  def run(kernel):
    attrs = dict(vars(module))
    attrs.update(kernel=kernel, bias=None, use_bias=False, mask=None, dtype=jnp.float32,
                 param_dtype=jnp.float32, kernel_shape=tuple(kernel.shape),
                 out_features=kernel.shape[-1], preferred_element_type=None)
    return call(types.SimpleNamespace(**attrs), x32)

  read = layers_lib.probe_conv_reader(run, _param_shape(module.kernel), x32, _has_bias(module))
  if getattr(module, 'mask', None) is None:  # (statistics-only captures: see layers.statistics_only)
    conv_sketch.reroute(read, x, args, kwargs, module.kernel[...],
                        lambda v: layers_lib.cast_varying(v, layers_lib.varying_axes(x)))
  return read


for _cls, _adapter in ((fnnx.Linear, linear_adapter), (fnnx.LinearGeneral, linear_general_adapter),
                       (fnnx.Conv, conv_adapter), (fnnx.ConvTranspose, conv_adapter),
                       (fnnx.Einsum, einsum_adapter)):
  layers_lib.register_layer(_cls, _adapter)
for _cls, _fn in ((fnnx.Linear, _linear_layout), (fnnx.LinearGeneral, _linear_general_layout),
                  (fnnx.Conv, _conv_layout), (fnnx.ConvTranspose, _conv_layout),
                  (fnnx.Einsum, _einsum_layout)):
  layers_lib._NNX_LAYOUTS[_cls] = _fn
del _cls, _adapter, _fn
