"""Paths into nested parameter dicts: read, and copy-on-write update."""

from __future__ import annotations

from typing import Mapping

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
