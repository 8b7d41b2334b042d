"""Gradient accumulation that accumulates the layer statistics too.

``optax.MultiSteps(opt, k)`` averages the gradients of ``k`` micro-batches and
steps ``opt`` once. Its inner transform is called on every micro-batch with
that micro-batch's extra arguments, and keeps only the state of the last call,
so a Kronecker-factored transform inside it would refresh its factors from
the last micro-batch alone (our transforms refuse to run there, pointing here).

:class:`MultiSteps` has optax's signature and behaviour and also keeps the
running mean of the statistics passed as ``stats=``. For micro-batches of
equal size and a loss that is a mean over examples, the mean of the
micro-batch statistics is exactly the full batch's, for every statistic kind
of :mod:`mkor_optax.capture`: ``a`` and ``A`` are means over rows, ``g`` is
the mean per-example output gradient and ``G`` the mean of per-example outer
products. So ``k`` accumulated micro-batches give the same factors and the
same update as one step on their concatenation.

Sketches (the default statistics of MKOR and MKOR-H; ``MultiSteps(...,
kind=mkor_optax.Sketch(k))`` for another ``k``) are summed instead and handed
on divided by ``sqrt(M)`` after ``M`` micro-batches: with
``a_m = X_m^T s_m / sqrt(N)`` for ``N`` rows each,
``sum_m a_m / sqrt(M) = X^T s / sqrt(M N)`` is a sketch of the whole batch
``X`` with the signs ``s = [s_1, ..., s_M]``.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mkor_optax import checks
from mkor_optax.kronecker import factored_states, stats_template
from mkor_optax.statistics import SKETCH_CARRIES, capture_call, holds_rows, sketch_count
from mkor_optax.sketch import DEFAULT_KIND, ROW_FIELDS, ROWS, Sketch, _output_digest, sketch_rows
from mkor_optax.sketch import _hash as tap_hash
from mkor_optax.tap import StatKind


def micro_batch_signs(micro_step, side: int, k: int) -> jax.Array:
  """``(k,)`` float32 signs for the ``k`` sketches of one side of one micro-batch."""
  idx = (jnp.asarray(micro_step, jnp.uint32) * jnp.uint32(2 * k) + jnp.uint32(side * k)
         + jnp.arange(k, dtype=jnp.uint32))
  return 1.0 - 2.0 * (tap_hash(idx ^ jnp.uint32(0x85EBCA6B)) >> 31).astype(jnp.float32)


class MultiStepsState(NamedTuple):
  """The state of :class:`MultiSteps`.

  Attributes:
    inner: optax's ``MultiStepsState`` (the accumulated gradients and the
      inner optimizer's state).
    acc_stats: per layer, the running mean of the micro-batch statistics (of
      sketches: their running sum), stacking axes flattened.
    acc_counts: per layer, the number of micro-batches of the current
      accumulation that had statistics for it (float32 scalars).

  Example:
    >>> state = mkor_optax.MultiSteps(mkor_optax.mkor(1e-2), 2).init(params)
    >>> state._fields
    ('inner', 'acc_stats', 'acc_counts')
  """

  inner: optax.MultiStepsState
  acc_stats: dict
  acc_counts: dict


class MultiSteps:
  """``optax.MultiSteps`` that accumulates the layer statistics as well.

  Same arguments and methods as ``optax.MultiSteps`` (``init``, ``update``,
  ``has_updated``, ``gradient_transformation``, ``inner_opt``). Call
  ``update(grads, state, params, stats=stats, **extra_args)`` on every
  micro-batch; the inner optimizer receives the mean of the gradients and of
  the statistics when the ``k``-th micro-batch arrives. Other extra arguments
  (``value=`` for MKOR-H) are handed on as they are, as optax does.

  Args:
    opt: the inner transform (``mkor_optax.mkor(...)``, ...).
    every_k_schedule: an int ``k >= 1``, or ``step -> k``, as in
      ``optax.MultiSteps``.
    use_grad_mean, should_skip_update_fn: as in ``optax.MultiSteps``.
    kind: the statistics ``update`` will receive, as passed to
      :func:`mkor_optax.value_and_grad` (their shape is fixed at ``init``).
      ``None`` (default): what ``value_and_grad`` gives by default, that is
      ``mkor_optax.SKETCH``, whose sketches MKOR and MKOR-H accumulate and
      whose means Eva does; K-FAC accumulates its own kind
      (``mkor_optax.COVARIANCE``, captured with that kind). Pass
      ``mkor_optax.RANK1`` to accumulate MKOR's mean statistics,
      ``mkor_optax.Sketch(k)`` for ``k`` sketches.

  Example:
    >>> opt = mkor_optax.MultiSteps(mkor_optax.mkor(1e-2), every_k_schedule=2)
    >>> state = opt.init(params)
    >>> grad_fn = mkor_optax.value_and_grad(loss_fn)
    >>> for half in (slice(0, 4), slice(4, 8)):  # two micro-batches, one update
    ...   loss, grads, stats = grad_fn(params, x[half], y[half])
    ...   updates, state = opt.update(grads, state, params, stats=stats)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(opt.has_updated(state))
    True
  """

  def __init__(self, opt: optax.GradientTransformation,
               every_k_schedule: Union[int, Callable[[jax.Array], jax.Array]],
               use_grad_mean: bool = True,
               should_skip_update_fn: Optional[Callable[..., Any]] = None, *,
               kind: Optional[StatKind] = None):
    if not use_grad_mean:
      raise ValueError('mkor_optax.MultiSteps: use_grad_mean=False would sum the statistics '
                       'over micro-batches, which no statistic kind means; keep it True.')
    if not callable(every_k_schedule):
      checks.validate(every_k_schedule=(every_k_schedule, None, ''))
    if kind is not None and not isinstance(kind, StatKind):
      raise ValueError(f'mkor_optax.MultiSteps: kind must be a statistic kind such as '
                       f'mkor_optax.Sketch(4), got {kind!r}')
    kind = DEFAULT_KIND if kind is None else kind  # value_and_grad's default
    self._sketches = kind.k if isinstance(kind, Sketch) else None  # for the sketch-taking states
    self._multi = optax.MultiSteps(opt, every_k_schedule, use_grad_mean, should_skip_update_fn)

  @property
  def inner_opt(self):
    return self._multi.inner_opt

  def init(self, params) -> MultiStepsState:
    inner = self._multi.init(params)
    template = stats_template(inner.inner_opt_state, self._sketches)
    return MultiStepsState(inner, template, {k: jnp.zeros([], jnp.float32) for k in template})

  def update(self, updates, state: MultiStepsState, params=None, *, stats=None, **extra_args):
    old = state.inner
    acc, counts = state.acc_stats, state.acc_counts
    if stats is None:
      new_acc, new_counts, handed = acc, counts, None
    else:
      if not hasattr(stats, 'keys'):
        raise ValueError('mkor_optax.MultiSteps: stats must be the dict returned by '
                         'mkor_optax.value_and_grad')
      stats = self._rows_sketched(stats, acc, old)
      sketches = sketch_count(acc)  # what init made room for
      if acc and stats:  # (an empty dict: no layer of this micro-batch, warned below)
        self._check_sketches(sketch_count(stats), sketches, old.inner_opt_state, acc, stats)
      new_acc, new_counts = self._accumulate(acc, counts, stats, sketches, old.mini_step)
      absent = sorted(layer for layer in acc if layer not in stats)
      if absent:
        warnings.warn(
            f'mkor_optax.MultiSteps: no statistics for layer(s) {absent} on this micro-batch: '
            'their factors are refreshed from the micro-batches of the accumulation that had '
            'statistics for them, and left as they are when none had.', stacklevel=2)
      # every layer with factors is handed on, marked absent when no
      # micro-batch of the accumulation had it (its factors are then kept)
      handed = {layer: dict(self._handed(new_acc[layer], new_counts[layer], sketches),
                            **{checks.PRESENT: new_counts[layer] > 0}) for layer in acc}
      handed.update({k: v for k, v in stats.items() if k not in acc})
    with checks.accumulated_stats():
      kw = dict(extra_args) if handed is None else dict(extra_args, stats=handed)
      out, inner = self._multi.update(updates, old, params, **kw)
    emitted = inner.gradient_step > old.gradient_step
    advanced = jnp.logical_or(emitted, inner.mini_step != old.mini_step)
    keep = lambda new, prev: jax.tree.map(lambda a, b: jnp.where(advanced, a, b), new, prev)
    reset = lambda tree: jax.tree.map(lambda v: jnp.where(emitted, jnp.zeros_like(v), v), tree)
    return out, MultiStepsState(inner, reset(keep(new_acc, acc)), reset(keep(new_counts, counts)))

  def _check_sketches(self, k, want, inner_state, acc, stats):
    if k == want:
      return
    takes = {kind for n in factored_states(inner_state) for kind in getattr(type(n), 'KINDS', (n.KIND,))}
    if k is not None and 'SKETCH' not in takes:  # K-FAC, Eva: no sketches at all
      if want is None and all(name in stats[layer] for layer in acc if layer in stats
                              for name in acc[layer]):
        return  # a sketch capture's means, for a transform that reads the means (Eva)
      need = sorted(takes)[0]
      build = '' if need in SKETCH_CARRIES else f' and build MultiSteps(..., kind=mkor_optax.{need})'
      raise ValueError(
          f'mkor_optax.MultiSteps: got {k} sketches per layer without the mkor_optax.{need} '
          f'statistics that the transform it wraps reads: capture them with '
          f'{capture_call(need)}{build}.')
    built = 'mean statistics' if want is None else f'{want} sketches per layer'
    got = 'mean statistics' if k is None else f'{k} sketches per layer'
    fix = 'mkor_optax.RANK1' if k is None else f'mkor_optax.Sketch({k})'
    raise ValueError(f'mkor_optax.MultiSteps was built for {built} but got {got}: build it with '
                     f'MultiSteps(..., kind={fix}), the kind passed to value_and_grad, so that '
                     'init makes room for them.')

  def _rows_sketched(self, stats, acc, inner):
    """``stats`` with the rows of ``Sketch(lazy=True)`` sketched now, each
    micro-batch with signs of its own (the accumulation sums sketches)."""
    out = dict(stats)
    for layer, fields in stats.items():
      if layer in acc and holds_rows(fields) and 'a_sketches' in acc[layer]:
        s, d_aug = acc[layer]['a_sketches'].shape[0], acc[layer]['a_sketches'].shape[-1]
        flat = {k: jnp.reshape(v, (s,) + np.shape(v)[np.ndim(v) - ROW_FIELDS[k]:])
                for k, v in fields.items() if k in ROW_FIELDS}
        # the micro-step, and a digest of the input rows (which the loss's
        # scale leaves alone): pmap's devices get signs of their own
        step = (jnp.asarray(inner.gradient_step, jnp.uint32) * jnp.uint32(0x9E3779B9)
                + jnp.asarray(inner.mini_step, jnp.uint32)) ^ _output_digest(flat[ROWS], 1)[0]
        a, g = sketch_rows(flat, step, layer, has_bias=d_aug == flat[ROWS].shape[-1] + 1)
        out[layer] = {**{k: v for k, v in fields.items() if k not in flat},
                      'a_sketches': a, 'g_sketches': g}
    return out

  def _accumulate(self, acc, counts, stats, sketches, micro_step):
    """Each layer's running mean (sketches: running sum) over the micro-batches
    that had statistics for it. Each micro-batch's sketch ``j`` of each side
    enters with a sign of its own (a hash of the micro-step, ``j`` and the
    side): a sum of sketches with independent signs is still a sketch of the
    pooled rows, and one micro-batch repeated is no longer counted twice
    (its two copies add or cancel, and in expectation count once)."""
    new_acc, new_counts = dict(acc), dict(counts)
    for layer, fields in acc.items():
      if layer in stats:
        n = counts[layer]
        x = {k: jnp.reshape(stats[layer][k], v.shape).astype(jnp.float32) for k, v in fields.items()}
        if sketches:
          x = {k: v * micro_batch_signs(micro_step, i, sketches)[:, None]
               for i, (k, v) in enumerate(sorted(x.items()))}
        new_acc[layer] = {k: v + x[k] if sketches else v + (x[k] - v) / (n + 1.0)
                          for k, v in fields.items()}
        new_counts[layer] = n + 1.0
    return new_acc, new_counts

  def _handed(self, fields, count, sketches):
    if not sketches:
      return fields
    return {k: v / jnp.sqrt(jnp.maximum(count, 1.0)) for k, v in fields.items()}

  def has_updated(self, state: MultiStepsState) -> jax.Array:
    return self._multi.has_updated(state.inner)

  def gradient_transformation(self) -> optax.GradientTransformationExtraArgs:
    return optax.GradientTransformationExtraArgs(self.init, self.update)
