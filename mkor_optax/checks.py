"""Guards every transform shares: hyperparameter validation, the step
counter, the data-parallel check and the ``optax.MultiSteps`` check."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mkor_optax.layers import varying_axes

# ------------------------------------------------------------ hyperparameters


def is_concrete(value) -> bool:
  """Whether ``value`` is a Python or NumPy number (not an array that
  ``optax.inject_hyperparams`` made of it, which may be traced)."""
  return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


INT32_MAX = 2 ** 31 - 1  # step counters are int32: a period beyond this is never reached


def _check_period(name, value):
  if is_int(value):
    if not 1 <= value <= INT32_MAX:
      raise ValueError(f'{name}: must be an integer in [1, 2**31 - 1] (the step counter is '
                       f'int32), got {value!r}')
  elif not isinstance(value, (jax.Array, np.ndarray)) or not jnp.issubdtype(value.dtype, jnp.integer):
    raise ValueError(f'{name}: must be an integer >= 1, got {value!r}')


def validate(**checks):
  """Raises ``ValueError('name: message')`` for the first failed check.

  Each check is ``name=(value, predicate, message)``. Only Python numbers are
  checked: hyperparameters that arrive as arrays (``optax.inject_hyperparams``
  stores numeric hyperparameters as arrays, traced inside ``jit``) are the
  caller's responsibility. Every Python number must be finite (``inf`` and
  ``nan`` are never a setting). ``predicate`` ``None`` means "must be a
  Python int in ``[1, 2**31 - 1]``" (a count or period, compared with the
  int32 step counter), for which an integer-valued array is also accepted.
  """
  for name, (value, ok, msg) in checks.items():
    if ok is None:
      _check_period(name, value)
    elif is_concrete(value) and not math.isfinite(value):
      raise ValueError(f'{name}: must be finite, got {value!r}')
    elif is_concrete(value) and not ok(value):
      raise ValueError(f'{name}: {msg}, got {value!r}')
    elif not is_concrete(value) and not isinstance(value, (jax.Array, np.ndarray)):
      raise ValueError(f'{name}: must be a number, got {value!r}')


def resolve_dtype(name: str, dtype):
  """``None`` -> float32; a dtype, its name or a NumPy/JAX scalar type -> ``jnp.dtype``."""
  if dtype is None:
    return jnp.dtype(jnp.float32)
  try:
    out = jnp.dtype(dtype)
  except TypeError:
    out = None
  if out is None or not jnp.issubdtype(out, jnp.floating):
    raise ValueError(f'{name}: must be a floating dtype, got {dtype!r}')
  return out


def common_checks(*, gamma, inv_freq, max_factor_dim) -> dict:
  """The ``validate`` checks every Kronecker-factored transform shares."""
  return dict(
      gamma=(gamma, lambda v: 0.0 < v < 1.0, 'must be in (0, 1)'),
      inv_freq=(inv_freq, None, ''),
      max_factor_dim=(max_factor_dim, None, ''),
  )


def increment(count):
  """optax's overflow-safe step counter increment."""
  safe = getattr(optax, 'safe_increment', None) or optax.safe_int32_increment
  return safe(count)


# --------------------------------------------------------------- data parallel

def check_data_parallel(stats, axis_name: Optional[str], who: str):
  """Per-device statistics without ``axis_name`` would precondition every
  device differently: an error under ``shard_map`` (where it is visible),
  a warning under a named ``pmap``/``vmap`` axis (which may be intended)."""
  if axis_name is not None:
    return
  varying = frozenset().union(*[varying_axes(x) for x in jax.tree.leaves(stats)])
  if varying:
    raise ValueError(
        f'{who}: the statistics differ between devices along {sorted(varying)} (computed from a '
        f'per-device loss): pass axis_name={sorted(varying)[0]!r}, or under shard_map make the '
        'loss the lax.pmean of the per-device losses.')
  # shard_map's axes are tracked (a statistic that varies is caught above);
  # pmap's and vmap's are not, and their statistics may be per device
  named = frozenset(a for a in bound_axis_names() if not varying_axes(jax.lax.axis_index(a)))
  if named:
    warnings.warn(
        f'{who}: update runs under the named axes {sorted(named)} (pmap?) but axis_name=None: '
        'each device refreshes its factors from its own statistics. Pass '
        f'axis_name={sorted(named)[0]!r} to average them (and lax.pmean the gradients).',
        stacklevel=4)


def bound_axis_names() -> frozenset:
  """Named axes bound by ``pmap``/``vmap(axis_name=...)`` here (empty if unknown)."""
  try:
    from jax._src import core as jax_core  # no public API for this in jax 0.10
    return frozenset(jax_core.get_axis_env().axis_sizes)
  except Exception:  # pragma: no cover - a future jax without it
    return frozenset()


# ---------------------------------------------------------------- accumulation

# An optional scalar entry of a layer's statistics: False means "no statistics
# this step" (mkor_optax.MultiSteps, for a layer no micro-batch of the
# accumulation called), and the layer's factors are then left as they are.
PRESENT = 'present'

_accumulating = threading.local()


def accumulating() -> bool:
  return getattr(_accumulating, 'on', False)


@contextlib.contextmanager
def accumulated_stats():
  """Marks the statistics handed on inside as accumulated (mkor_optax.MultiSteps)."""
  old = accumulating()
  _accumulating.on = True
  try:
    yield
  finally:
    _accumulating.on = old


def check_accumulation(who: str):
  """``optax.MultiSteps`` calls the inner transform with the current
  micro-batch's extra arguments only, so its factors would see one micro-batch
  in k: refuse, pointing at :class:`mkor_optax.MultiSteps`."""
  if accumulating():
    return
  frame = sys._getframe(1)
  while frame is not None:
    if frame.f_code.co_name == '_do_update' and frame.f_code.co_filename.endswith(
        os.path.join('transforms', '_accumulation.py')):
      raise ValueError(
          f'{who} inside optax.MultiSteps would refresh its factors from the last micro-batch '
          'only (optax hands extra arguments such as stats= to the inner transform as they '
          'are). Use mkor_optax.MultiSteps (the same signature), which accumulates the '
          'statistics over the micro-batches too.')
    frame = frame.f_back
