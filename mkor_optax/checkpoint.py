"""Restoring an optimizer state from a checkpoint, with errors that say what differs.

A checkpointer restores a tree into a target (``opt.init(params)``) only when
the two have the same structure, and its error names none of what makes
them differ. :func:`restore_state` takes what was restored without a target
(plain dicts and lists, as ``orbax.checkpoint`` gives it) and the target,
and either returns the state in the target's structure or raises a
``ValueError`` that names every entry that differs and what it means: a
state saved by an earlier release (a field it did not have, or had under
another name: the error names the release and points to CHANGELOG.md, which
says how to carry such a checkpoint across), another ``low_rank`` setting (a
dense inverse against a low-rank one), another statistic kind
(``MultiSteps``' accumulated sketches against means), or other layers and
shapes.
"""

from __future__ import annotations

import jax
import numpy as np

from mkor_optax._version import __version__

__all__ = ['restore_state']

# How states changed between releases (CHANGELOG.md): fields a release added,
# and the names that 0.1.0's states gave what 0.2.0 calls input_side and
# output_side (MKOR's r_inv/l_inv, K-FAC's a_cov/a_inv/g_cov/g_inv; Eva's a/g
# are told apart from MultiSteps' accumulated means by where they sit).
ADDED_FIELDS = {'input_scale': '0.2.0', 'output_scale': '0.2.0', 'acc_counts': '0.2.0',
                'finite_count': '0.2.0'}
RENAMED_FIELDS = {'r_inv': 'input_side', 'l_inv': 'output_side', 'a_cov': 'input_side/.../cov',
                  'a_inv': 'input_side/.../inv', 'g_cov': 'output_side/.../cov',
                  'g_inv': 'output_side/.../inv', 'a': 'input_side', 'g': 'output_side'}
RENAMED_IN = '0.2.0'
LOW_RANK_FIELDS = ('c', 'q', 's')
SKETCH_FIELDS = ('a_sketches', 'g_sketches')
EARLIER = ('The checkpoint was written by an earlier release of mkor_optax than this one '
           f'({__version__}). CHANGELOG.md lists every change of a state\'s structure and how to '
           'carry a checkpoint across it; or start the optimizer state afresh with '
           'opt.init(params).')


def _key(entry) -> str:
  for attr in ('name', 'key', 'idx'):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _leaves(tree) -> dict:
  """``{'a/b/c': shape}`` of every array leaf, whatever the containers."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(_key(k) for k in path): tuple(np.shape(v)) for path, v in flat}


def _old_name(parts) -> str | None:
  """A 0.1.0 field name among a path's parts (Eva's ``a``/``g`` only as a state's own field,
  first or after a chain's index, not a layer's statistic in ``MultiSteps``)."""
  for i, part in enumerate(parts):
    if part in RENAMED_FIELDS and (part not in ('a', 'g') or i == 0 or parts[i - 1].isdigit()):
      return part
  return None


def _meaning(path: str, other: set, shape_only: bool = False) -> tuple[str, bool]:
  """What an entry that differs means, and whether an earlier release explains it."""
  parts = path.split('/')
  earlier = ': the checkpoint was saved by an earlier release'
  for field, version in ADDED_FIELDS.items():
    if field in parts:
      return f'{field!r} was added in {version}{earlier}', True
  old = _old_name(parts)
  if old is not None:
    return (f'{old!r} is what releases before {RENAMED_IN} called {RENAMED_FIELDS[old]!r}'
            f'{earlier}'), True
  if any(_old_name(p.split('/')) for p in other) and {'input_side', 'output_side'} & set(parts):
    return f'releases before {RENAMED_IN} called it by another name{earlier}', True
  if parts[-1] in LOW_RANK_FIELDS and shape_only:
    return ('another low_rank: the rank of a low-rank inverse (the default was 16 for part of '
            '0.1.0, 8 since)'), False
  if parts[-1] in LOW_RANK_FIELDS or any(p.rsplit('/', 1)[0] == path for p in other):
    return ('a low-rank inverse on one side, a dense one on the other: another low_rank setting '
            '(or a state of 0.1.0, which began with every side dense by default; in 0.2.0 a '
            'side 256 or wider is low-rank)'), False
  if parts[-1] in SKETCH_FIELDS or parts[-1] in ('a', 'g'):
    return ('accumulated statistics of another kind (sketches against means): another kind= '
            '(MultiSteps accumulated means by default in 0.1.0, Sketch(4) since 0.2.0)'), False
  return 'another model, exclude= or max_factor_dim=', False


def _shown(lines: list, meanings: list, limit: int = 12) -> list:
  """At most ``limit`` of ``lines`` in their order, the first line of each meaning among them."""
  first = sorted({m: i for i, m in reversed(list(enumerate(meanings)))}.values())[:limit]
  rest = [i for i in range(len(lines)) if i not in set(first)][:limit - len(first)]
  keep = sorted({*first, *rest})
  more = len(lines) - len(keep)
  return [lines[i] for i in keep] + ([f'  ... and {more} more'] if more else [])


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
  lines, meanings, earlier = [], [], False
  for path, where, other, shape_only in (
      *((p, 'missing from the checkpoint', set(got), False) for p in sorted(set(want) - set(got))),
      *((p, 'in the checkpoint, not in this optimizer', set(want), False)
        for p in sorted(set(got) - set(want))),
      *((p, f'shape {got[p]} in the checkpoint, {want[p]} here', set(), True)
        for p in sorted(set(got) & set(want)) if got[p] != want[p])):
    meaning, by_release = _meaning(path, other, shape_only)
    lines.append(f'  {path}: {where} ({meaning})')
    meanings.append(meaning)
    earlier = earlier or by_release
  if lines:
    shown = _shown(lines, meanings)
    raise ValueError('the checkpoint does not match opt.init(params):\n' + '\n'.join(shown)
                     + ('\n' + EARLIER if earlier else ''))
  order = {p: i for i, p in enumerate(want)}
  flat = jax.tree_util.tree_flatten_with_path(restored)[0]
  by_path = {'/'.join(_key(k) for k in path): v for path, v in flat}
  leaves = [by_path[p] for p in sorted(order, key=order.get)]
  return jax.tree.unflatten(jax.tree.structure(target), leaves)
