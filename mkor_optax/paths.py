"""Paths into nested parameter dicts: read, copy-on-write update, and Flax boxes."""

from __future__ import annotations

import sys
from typing import Mapping

import jax
from flax.core import meta

DELETE = object()  # as a value for set_at: remove the entry


def path_str(path) -> str:
  return '/'.join(str(p) for p in path)


def get_at(tree, path):
  for p in path:
    if isinstance(tree, Mapping) and p not in tree and isinstance(p, str) and p.isdigit():
      p = int(p)  # an NNX list index in a path read back from its string
    if not isinstance(tree, Mapping) or p not in tree:
      return None
    tree = tree[p]
  return tree


def _rebuild(node, items):
  """A copy of mapping ``node`` with ``items`` changed, of the same type."""
  new = dict(node)
  new.update(items)
  for k in [k for k, v in items.items() if v is DELETE]:
    del new[k]
  if type(node) is dict:
    return new
  if hasattr(node, 'raw_mapping'):  # an nnx.State: its __setitem__ stores sub-States as dicts
    out = type(node)({})
    for k, v in new.items():
      out[k] = v
    return out
  return type(node)(new)



def set_at(tree, path, value):
  """Copy-on-write ``tree[path] = value`` (``value=DELETE`` removes it)."""
  if len(path) == 1:
    return _rebuild(tree, {path[0]: value})
  return _rebuild(tree, {path[0]: set_at(tree[path[0]], path[1:], value)})


def _is_variable(x) -> bool:
  """An NNX ``Variable`` (``nnx.Param``...): a box around one value, like
  ``AxisMetadata``. NNX is imported only if the caller already has."""
  nnx = sys.modules.get('flax.nnx')
  return nnx is not None and isinstance(x, nnx.Variable)


def _is_box(x) -> bool:
  return meta.is_axis_metadata(x) or _is_variable(x)


def unbox(tree):
  """``tree`` without Flax's ``AxisMetadata`` boxes (``nn.Partitioned``,
  ``nn.LogicallyPartitioned``...) and NNX ``Variable`` wrappers (the
  ``nnx.Param`` leaves of ``nnx.state(model, nnx.Param)``): their values in
  their places."""
  def plain(x):
    if _is_variable(x):
      return unbox(x.get_value())
    if not meta.is_axis_metadata(x):
      return x
    try:
      inner = x.unbox(apply_constraint=False)  # values only: no sharding constraint here
    except TypeError:
      inner = x.unbox()
    return unbox(inner)
  return jax.tree.map(plain, tree, is_leaf=_is_box)


def rebox_like(boxed, plain):
  """``plain`` (a tree shaped like ``unbox(boxed)``) put back into ``boxed``'s
  boxes (NNX ``Variable`` wrappers included)."""
  def inner(box, value):
    if _is_variable(box):
      return box.replace(rebox_like(box.get_value(), value))
    if meta.is_axis_metadata(box):
      return box.replace_boxed(rebox_like(box.unbox(), value))
    return value
  return jax.tree.map(inner, boxed, plain, is_leaf=_is_box)
