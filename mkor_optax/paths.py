"""Paths into nested parameter dicts: read, copy-on-write update, and Flax boxes."""

from __future__ import annotations

from typing import Mapping

import jax
from flax.core import meta

DELETE = object()  # as a value for set_at: remove the entry


def path_str(path) -> str:
  return '/'.join(str(p) for p in path)


def get_at(tree, path):
  for p in path:
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
  return new if type(node) is dict else type(node)(new)



def set_at(tree, path, value):
  """Copy-on-write ``tree[path] = value`` (``value=DELETE`` removes it)."""
  if len(path) == 1:
    return _rebuild(tree, {path[0]: value})
  return _rebuild(tree, {path[0]: set_at(tree[path[0]], path[1:], value)})


def unbox(tree):
  """``tree`` without Flax's ``AxisMetadata`` boxes (``nn.Partitioned``,
  ``nn.LogicallyPartitioned``...): their values in their places."""
  def plain(x):
    if not meta.is_axis_metadata(x):
      return x
    try:
      inner = x.unbox(apply_constraint=False)  # values only: no sharding constraint here
    except TypeError:
      inner = x.unbox()
    return unbox(inner)
  return jax.tree.map(plain, tree, is_leaf=meta.is_axis_metadata)


def rebox_like(boxed, plain):
  """``plain`` (a tree shaped like ``unbox(boxed)``) put back into ``boxed``'s boxes."""
  return meta.replace_boxed(boxed, plain)
