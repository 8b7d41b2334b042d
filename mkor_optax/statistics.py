"""The layer statistics ``update`` receives: their shapes per kind, the
checks against the layer plan, and their gathering (and averaging over a
data-parallel axis).

Per layer, ``mkor_optax.value_and_grad`` returns (stacking axes first):

* ``RANK1``: ``a`` ``(d_in + 1,)``, the mean input row with a 1 appended for
  the bias, and ``g`` ``(d_out,)``, the mean per-example output gradient;
* ``COVARIANCE``: ``A = E[a a^T]`` ``(d_in + 1, d_in + 1)`` and ``G``
  ``(d_out, d_out)``, the mean of per-example outer products;
* ``Sketch(k)``: ``a_sketches`` ``(k, d_in + 1)`` and ``g_sketches``
  ``(k, d_out)``, random-sign sketches whose outer products average to ``A``
  and ``G``, and ``RANK1``'s statistics as well (so the default capture,
  ``SKETCH``, serves the transforms that read the means: Eva);
* ``Sketch(k, lazy=True)``: for the layers that hand over their rows,
  ``x_rows`` ``(N, d_in)``, ``dy_rows`` ``(N, d_out)``, ``dy_scale`` and an
  empty ``sketches`` ``(k, 0)`` in place of the sketches, which the
  transforms form when they refresh (``mkor_optax.sketch.sketch_rows``).
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mkor_optax.layers import varying_axes
from mkor_optax.layout import LAYOUTS_FIX, SIDES, LayerPlan
from mkor_optax.paths import get_at, unbox
from mkor_optax.sketch import ROWS, sketch_rows


# (input side, output side)
NAMES = {'RANK1': ('a', 'g'), 'COVARIANCE': ('A', 'G'), 'SKETCH': ('a_sketches', 'g_sketches')}
# the trailing shape of one side's statistic, for a side of width d (k sketches)
TAILS = {'RANK1': lambda d, k: (d,), 'COVARIANCE': lambda d, k: (d, d),
         'SKETCH': lambda d, k: (k, d)}
# the kinds whose statistics a sketch capture (the default) holds: its
# sketches, and the means of RANK1 computed alike
SKETCH_CARRIES = ('SKETCH', 'RANK1')


def capture_call(kind: str) -> str:
  """The ``value_and_grad`` call that gives ``kind``'s statistics: the
  default one when the default kind carries them."""
  if kind in SKETCH_CARRIES:
    return 'mkor_optax.value_and_grad(loss_fn) (its default kind, mkor_optax.SKETCH)'
  return f'mkor_optax.value_and_grad(loss_fn, kind=mkor_optax.{kind})'


def _layer_sketches(fields) -> Optional[int]:
  """``k`` when one layer's ``fields`` hold sketches (or the rows a lazy
  sketch capture hands over, ``k`` as the shape of its empty ``'sketches'``),
  else ``None``."""
  for name in NAMES['SKETCH'] + ('sketches',):
    if hasattr(fields, 'get') and fields.get(name) is not None:
      return int(np.shape(fields[name])[-2])
  return None


def holds_rows(fields) -> bool:
  """Whether one layer's statistics are the rows of ``Sketch(lazy=True)``."""
  return hasattr(fields, 'get') and fields.get(ROWS) is not None


def sketch_count(stats) -> Optional[int]:
  """``k`` when ``stats`` are sketches (``mkor_optax.Sketch``), else ``None``."""
  if not hasattr(stats, 'values'):  # None, or not the dict of value_and_grad (an error later)
    return None
  return next((k for k in map(_layer_sketches, stats.values()) if k is not None), None)


def kind_of(stats, kinds: tuple) -> str:
  """The kind among ``kinds`` that ``stats`` hold (the first one when unclear)."""
  if 'SKETCH' in kinds and sketch_count(stats) is not None:
    return 'SKETCH'
  return kinds[0]


def stat_shapes(kind: str, lp: LayerPlan, fields=None) -> dict:
  """The ``kind`` statistics a layer's factored sides need (stacking axes
  first); for ``'SKETCH'``, ``k`` is read from the layer's own ``fields``."""
  k = _layer_sketches(fields) if kind == 'SKETCH' else None
  d, tail = lp.dims, TAILS[kind]
  if kind == 'SKETCH' and holds_rows(fields):  # N rows of each side, k sketches to form
    n = int(np.shape(fields[ROWS])[-2])
    return {ROWS: d.stack + (n, d.d_in), 'dy_rows': d.stack + (n, d.d_out), 'dy_scale': d.stack,
            'sketches': d.stack + (k, 0)}
  sides = ((lp.has_r, d.d_in_aug), (lp.has_l, d.d_out))
  return {name: d.stack + tail(width, k)
          for name, (has, width) in zip(NAMES[kind], sides) if has}


def missing_stats(who: str, kinds) -> ValueError:
  """The error for an ``update`` without ``stats=``: the capture to call (the
  default kind where the transform takes it), and Flax's ``TrainState``."""
  kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
  capture = capture_call(next((k for k in kinds if k in SKETCH_CARRIES), kinds[0]))
  return ValueError(
      f'{who}.update needs the layer statistics: call it as update(grads, state, params, '
      f'stats=stats) with stats from {capture}. With a Flax TrainState, use '
      'mkor_optax.TrainState, whose apply_gradients(grads=..., stats=...) hands them on.')


def _check_known(stats, plan, params, excluded, who, kind):
  if stats is None:
    raise missing_stats(who, kind)
  if not hasattr(stats, 'keys'):
    raise ValueError(f'{who}: stats must be the dict returned by mkor_optax.value_and_grad')
  plain = unbox(params) if params is not None else None
  unknown = [name for name in stats if name not in plan and not excluded(name)
             and plain is not None and get_at(plain, tuple(name.split('/')) + ('kernel',)) is None]
  if unknown:
    raise ValueError(f'{who}: stats has layer(s) {sorted(unknown)} but params has no kernel there')


def check_stats(stats, plan: dict, params, excluded: Callable[[str], bool], who: str,
                kind: str = 'RANK1'):
  """Checks ``stats`` against ``plan``; returns the planned layers that have none.

  Raises ``ValueError`` naming every offending layer for statistics of a
  layer that ``params`` lacks, or of the wrong kind or shape (the stacking
  axes may come flattened, as ``mkor_optax.MultiSteps`` hands them on).
  Planned layers without statistics (a layer the capture does not know, or
  one the loss did not call) pass through unpreconditioned, with one warning
  naming all of them each time ``update`` is traced.
  """
  _check_known(stats, plan, params, excluded, who, kind)
  bad = []
  for name, lp in plan.items():
    if name not in stats:
      continue
    want = stat_shapes(kind, lp, stats[name])
    if not hasattr(stats[name], 'get') or any(k not in stats[name] for k in want):
      held = (f' (they hold sketches, which {who} does not read)'
              if _layer_sketches(stats[name]) is not None else '')
      raise ValueError(
          f'{who}: statistics for layer {name!r} lack {sorted(want)}{held}: compute them with '
          f'{capture_call(kind)}.')
    got = {k: tuple(np.shape(stats[name][k])) for k in want}
    flat = {k: (lp.dims.n_stack,) + v[len(lp.dims.stack):] for k, v in want.items()}
    if got != want and got != flat:
      bad.append(f'{name!r}: {got}, read from its parameters as {want} ({lp.dims})')
  if bad:
    raise ValueError(
        f'{who}: statistics of the wrong shape for ' + '; '.join(bad) + '. If a layout was '
        f'guessed wrongly, {LAYOUTS_FIX}.')
  lacking = sorted(name for name in plan if name not in stats)
  if lacking:
    warnings.warn(
        f'{who}: no statistics for layer(s) {lacking}; they pass through unpreconditioned. '
        'The capture does not know their class (register it with mkor_optax.register_layer), '
        'or the loss did not call them; exclude=[...] silences this.', stacklevel=4)
  return lacking


def sided_sketches(by_side: dict, plan: dict, count) -> dict:
  """``{layer: {side: statistic}}`` with a lazy sketch capture's rows
  (``{ROWS: fields}``, see ``mkor_optax.kronecker.prepare``) sketched
  (``mkor_optax.sketch.sketch_rows``): called where a refresh is due."""
  out = dict(by_side)
  for name, fields in by_side.items():
    if ROWS in fields:
      out[name] = dict(zip(SIDES, sketch_rows(fields[ROWS], count, name, plan[name].dims.has_bias)))
  return out


def gather_stats(stats, plan: dict, axis_name: Optional[str], kind: str = 'RANK1', count=0) -> dict:
  """The ``kind`` statistics of the planned layers, stacking axes flattened
  to one (``(S, ...)``), averaged over ``axis_name`` when given. Over an
  ``axis_name``, rows (``Sketch(lazy=True)``) are sketched here, each
  device's with the signs of its global rows (``count``: the transform's
  step), and pooled as sketches."""
  out = {}
  for name, lp in plan.items():
    want = stat_shapes(kind, lp, stats[name])
    out[name] = {k: jnp.reshape(stats[name][k], (lp.dims.n_stack,) + want[k][len(lp.dims.stack):])
                 for k in want}
    if axis_name is not None and holds_rows(out[name]):
      out[name] = dict(zip(NAMES['SKETCH'], sketch_rows(out[name], count, name, lp.dims.has_bias,
                                                        axis_name)))
  if axis_name is not None:
    pooled = kind == 'SKETCH' and already_pooled(out, axis_name)
    out = jax.lax.pmean(out, axis_name)
    if kind == 'SKETCH' and not pooled:
      # a sketch of the pooled rows is the sum of the devices' sketches over
      # the root of their number, not their mean (whose square shrinks by it)
      out = jax.tree.map(lambda v: v * np.sqrt(jax.lax.axis_size(axis_name)), out)
  return out


def already_pooled(stats, axis_name) -> bool:
  """Under ``shard_map`` (which tracks what varies over its axes) statistics
  that do not vary over ``axis_name`` were summed over its devices by the
  capture itself (its taps ride in the replicated params), so they describe
  the whole batch already; under ``pmap`` each device holds its own."""
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  tracked = bool(varying_axes(jax.lax.axis_index(names)))
  return tracked and not any(set(names) & varying_axes(v) for v in jax.tree.leaves(stats))


# |g| / g_mass below this: the output-gradient rows cancel by construction.
# Unrelated rows give about 1/sqrt(rows), above 1e-5 up to 1e10 rows; a
# training-mode BatchNorm after the layer gives rounding level (~1e-8).
CANCELLED = 1e-5

CANCELLED_FIX = (
    '{who}: the mean output gradient g of layer(s) {{names}} is numerically zero in the first '
    'steps: its rows cancel (|g| < 1e-5 of the sum of their norms), as they do when a training-mode BatchNorm '
    'follows the layer, or at the key projection of softmax attention, so the output-side '
    'factors of these layers stay the identity. Sketched statistics see the curvature there, '
    'and MKOR and MKOR-H read them: mkor_optax.value_and_grad(loss_fn, kind=mkor_optax.SKETCH), '
    'the default capture. Eva reads the means whatever the capture: exclude=[...] these layers '
    'to leave them to the backend.')


def cancelled_means(stats, plan: dict, kinds=('RANK1',)) -> dict:
  """``{layer: bool}``: the layers of ``plan`` whose mean output gradient
  (``RANK1``'s ``g``) is numerically zero against its ``g_mass`` (any stack
  entry), for the layers whose statistics carry ``g_mass``, when a
  transform taking ``kinds`` reads the means of ``stats`` (not when it
  reads the sketches that a sketch capture holds besides its means)."""
  if kind_of(stats, (kinds,) if isinstance(kinds, str) else tuple(kinds)) != 'RANK1':
    return {}
  out = {}
  for name, lp in plan.items():
    fields = stats.get(name)
    if not lp.has_l or not hasattr(fields, 'get') or fields.get('g_mass') is None:
      continue
    g = jnp.reshape(fields['g'], (lp.dims.n_stack, -1)).astype(jnp.float32)
    mass = jnp.reshape(fields['g_mass'], (lp.dims.n_stack,)).astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(g / jnp.maximum(mass, 1e-30)[:, None]), axis=1))
    out[name] = jnp.any((mass > 0) & (norm < CANCELLED))
  return out
