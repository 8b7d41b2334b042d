"""Restoring an optimizer state from a checkpoint, with errors that say what differs.

A checkpointer restores a tree into a target (``opt.init(params)``) only when
the two have the same structure, and its error names none of what makes
them differ. :func:`restore_state` takes what was restored without a target
(plain dicts and lists, as ``orbax.checkpoint`` gives it) and the target,
and either returns the state in the target's structure or raises a
``ValueError`` that names every entry that differs and what it means: a
state saved by an earlier release (a field it did not have), another
``low_rank`` setting (a dense inverse against a low-rank one), another
statistic kind (``MultiSteps``' accumulated sketches against means), or
other layers and shapes.
"""

from __future__ import annotations

import jax
import numpy as np

__all__ = ['restore_state']

# Fields that later releases added to a state (see CHANGELOG.md).
ADDED_FIELDS = {'input_scale': '0.2', 'output_scale': '0.2'}
LOW_RANK_FIELDS = ('c', 'q', 's')
SKETCH_FIELDS = ('a_sketches', 'g_sketches')


def _key(entry) -> str:
  for attr in ('name', 'key', 'idx'):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _leaves(tree) -> dict:
  """``{'a/b/c': shape}`` of every array leaf, whatever the containers."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(_key(k) for k in path): tuple(np.shape(v)) for path, v in flat}


def _meaning(path: str, other: set) -> str:
  parts = path.split('/')
  for field, version in ADDED_FIELDS.items():
    if field in parts:
      return (f'{field!r} was added in {version}: the checkpoint was saved by an earlier release '
              '(CHANGELOG.md says how to carry a state across)')
  if parts[-1] in LOW_RANK_FIELDS or any(p.rsplit('/', 1)[0] == path for p in other):
    return 'a low-rank inverse on one side, a dense one on the other: another low_rank setting'
  if parts[-1] in SKETCH_FIELDS or parts[-1] in ('a', 'g'):
    return 'accumulated statistics of another kind (sketches against means): another kind='
  return 'another model, exclude= or max_factor_dim='


def restore_state(restored, target):
  """``restored`` (a tree restored without a target) in ``target``'s structure.

  Args:
    restored: what a checkpointer gave back without a target, e.g.
      ``ocp.StandardCheckpointer().restore(path)``.
    target: the state to restore into, ``opt.init(params)``.

  Returns:
    ``target``'s structure holding ``restored``'s arrays.

  Raises:
    ValueError: naming each entry that only one of them has, or whose shape
      differs, and what that means (an earlier release, another
      ``low_rank``, another statistic kind, another model).

  Example:
    >>> state = mkor_optax.scale_by_mkor().init(params)
    >>> raw = {'count': state.count, 'input_side': state.input_side,
    ...        'output_side': state.output_side}  # as saved by 0.1.0
    >>> try:
    ...   mkor_optax.restore_state(raw, state)
    ... except ValueError as e:
    ...   print(str(e).splitlines()[0])
    the checkpoint does not match opt.init(params):
  """
  got, want = _leaves(restored), _leaves(target)
  lines = []
  for path in sorted(set(want) - set(got)):
    lines.append(f'  {path}: missing from the checkpoint ({_meaning(path, set(got))})')
  for path in sorted(set(got) - set(want)):
    lines.append(f'  {path}: in the checkpoint, not in this optimizer ({_meaning(path, set(want))})')
  for path in sorted(set(got) & set(want)):
    if got[path] != want[path]:
      lines.append(f'  {path}: shape {got[path]} in the checkpoint, {want[path]} here '
                   f'({_meaning(path, set())})')
  if lines:
    shown = lines[:12] + ([f'  ... and {len(lines) - 12} more'] if len(lines) > 12 else [])
    raise ValueError('the checkpoint does not match opt.init(params):\n' + '\n'.join(shown))
  order = {p: i for i, p in enumerate(want)}
  flat = jax.tree_util.tree_flatten_with_path(restored)[0]
  by_path = {'/'.join(_key(k) for k in path): v for path, v in flat}
  leaves = [by_path[p] for p in sorted(order, key=order.get)]
  return jax.tree.unflatten(jax.tree.structure(target), leaves)
