r"""MKOR: Kronecker-factored preconditioning with rank-1 inverse refreshes.

Mozaffari, Li, Zhang, Mehri Dehnavi (2023), *MKOR: Momentum-Enabled
Kronecker-Factor-Based Optimizer Using Rank-1 Updates*, NeurIPS 2023,
arXiv:2306.01685.

The update rule, with the formula correction and the scale-free factors
(beyond the paper), is written out in :func:`scale_by_mkor`'s docstring; the
refresh itself is :mod:`mkor_optax.rank1` (dense sides) and
:mod:`mkor_optax.lowrank` (wide sides), reached through
:func:`mkor_optax.factors.refresh_relative`.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mkor_optax import checks, docstrings, factors
from mkor_optax import kronecker as kr
from mkor_optax.factors import DENSE_16_BIT
from mkor_optax.layout import OUTPUT, SIDES
from mkor_optax.rank1 import REFRESH_RULES, check_stabiliser, refresh_inverse, refresh_inverse_checked  # noqa: F401
from mkor_optax.statistics import sided_sketches

# Low-rank factors by default for sides of at least this width (measured:
# benchmarks/width_sweep.py, docs/guides/wide_layers.md).
LOW_RANK = 8
LOW_RANK_MIN_DIM = 256
# The factor EMA's momentum: the paper's 0.95 took 1.13x the steps of 0.98 on the
# autoencoder and 1.07x on the MLM over 3 seeds (results/seeds/gamma_*.md).
GAMMA = 0.98
ZETA = 0.9
EPSILON = 2.0
# The relative damping (the identity prior's weight against the side's mean
# eigenvalue) and the refresh period, chosen by the scale-free study over 5
# tasks and 3 seeds (results/seeds/scale_free_summary.md, results/README.md).
DAMPING = 1.0
INV_FREQ = 7


class MKORState(NamedTuple):
  """MKOR's state.

  Attributes:
    count: ``()`` int32, updates done.
    input_side: layer path -> the input-side inverse ``R^-1``: a dense
      ``(S, d_in + 1, d_in + 1)`` array or, for sides of at least
      ``low_rank_min_dim``, a low-rank ``LowRankInverse`` of ``c`` ``(S,)``,
      ``q`` ``(S, d, k)`` and ``s`` ``(S, k)``, the inverse ``c I + Q diag(s) Q^T``.
    output_side: layer path -> the output-side inverse ``L^-1``, ``(S, d_out, d_out)``
      or low-rank. A side wider than ``max_factor_dim`` has no entry (identity).
      Both sides' inverses are held in units of ``damping * n_t``
      (``damping=None``: as they are).
    input_scale: layer path -> ``(S,)`` float32 ``sqrt(n_t)``, the input
      side's scale: ``n_t`` is the EMA of its statistics' mean eigenvalue
      ``|a|^2 / (d_in + 1)`` (0 before the first statistic).
    output_scale: the same for the output side, ``n_t`` from ``|g|^2 / d_out``.

  Example:
    >>> state = mkor_optax.scale_by_mkor().init(params)
    >>> int(state.count)
    0
  """

  count: jax.Array
  input_side: dict
  output_side: dict
  input_scale: dict
  output_scale: dict
  KIND = 'RANK1'
  KINDS = ('RANK1', 'SKETCH')  # the statistics it takes


def mkor_rule(*, damping, gamma, zeta, epsilon, inv_freq, refresh, dtype, low_rank,
              low_rank_min_dim, factor_power=1.0, rescale=True,
              who: str = 'scale_by_mkor') -> kr.FactorRule:
  """MKOR's :class:`~mkor_optax.kronecker.FactorRule`: rank-1 refreshes of
  the inverses every ``inv_freq`` steps, then ``R^-1 G L^-1``, rescaled to
  the gradient's norm (``rescale``) or in the factors' own units."""
  def init_side(width, n_stack):  # at init, where low_rank is a Python number
    rank = None if low_rank is None else int(low_rank)
    return factors.identity(width, n_stack, rank=rank, min_dim=low_rank_min_dim, dtype=dtype)

  def refreshed(sides, prep):
    jobs = [(i, k) for i, entries in enumerate(sides[:2]) for k in entries if k in prep.stats]
    stats = sided_sketches(prep.stats, prep.plan, prep.count)  # rows are sketched here, when due
    # a side stays as it was on a non-finite step (the refresh is only due on finite ones), for a layer
    # without statistics this accumulation, and on the output side of a layer whose mean gradient
    # cancelled (rounding noise is no curvature)
    keep = {k: ~(prep.finite & prep.present[k]) for _, k in jobs}
    fresh = factors.refresh_relative_many(
        [(sides[i][k], sides[2 + i][k], stats[k][SIDES[i]],
          keep[k] | prep.cancelled[k] if SIDES[i] == OUTPUT and k in prep.cancelled else keep[k])
         for i, k in jobs], damping=damping, gamma=gamma, zeta=zeta, epsilon=epsilon, refresh=refresh)
    new, flags = [dict(s) for s in sides], {}
    for (i, k), (p, rms, reset) in zip(jobs, fresh):
      new[i][k], new[2 + i][k] = p, rms
      flags[f'{k} ({SIDES[i]} side)'] = jnp.any(reset)
    return tuple(new), flags

  def kept(sides, prep):
    names = [f'{k} ({side} side)' for side, entries in zip(SIDES, sides[:2]) for k in entries if k in prep.stats]
    return sides, {n: jnp.asarray(False) for n in names}

  def refresh_sides(sides, prep):
    due = jnp.logical_and(prep.count % inv_freq == 0, prep.finite)
    sides, resets = jax.lax.cond(due, lambda s: refreshed(s, prep), lambda s: kept(s, prep), sides)
    factors.report_resets(resets, who)
    return sides

  def precondition(sides, prep):
    r_inv, l_inv = ({k: factors.power(p, factor_power) for k, p in side.items()} for side in sides[:2])
    units = lambda k, u: u if rescale else factors.in_statistic_units(
        u, [rms[k] for side, rms in zip(sides[:2], sides[2:]) if k in side and k in rms], damping,
        factor_power)
    return {k: units(k, factors.precondition_rescaled(g, r_inv.get(k), l_inv.get(k), prep.blocks(k),
                                                      prep.sq_norms[k], rescale=rescale))
            for k, (_, g) in prep.grads.items()}

  return kr.FactorRule(init_side, refresh_sides, precondition, scaled=True)


def check_mkor_args(*, gamma, zeta, epsilon, inv_freq, refresh, factor_dtype, max_factor_dim,
                    low_rank, low_rank_min_dim, factor_power=1.0, damping=DAMPING):
  """Validates ``scale_by_mkor``'s hyperparameters; returns the factor dtype."""
  if damping is not None:
    checks.validate(damping=(damping, lambda v: v > 0, 'must be > 0 (or None: absolute)'))
  checks.validate(
      zeta=(zeta, lambda v: 0.0 <= v <= 1.0, 'must be in [0, 1]'),
      epsilon=(epsilon, lambda v: v > 0, 'must be > 0'),
      factor_power=(factor_power, lambda v: 0.0 < v <= 1.0, 'must be in (0, 1]'),
      **checks.common_checks(gamma=gamma, inv_freq=inv_freq, max_factor_dim=max_factor_dim),
  )
  if low_rank is not None:
    checks.validate(low_rank=(low_rank, None, ''))
  if not (checks.is_int(low_rank_min_dim) and low_rank_min_dim >= 0) and not isinstance(
      low_rank_min_dim, (jax.Array, np.ndarray)):
    raise ValueError(f'low_rank_min_dim: must be an integer >= 0, got {low_rank_min_dim!r}')
  if refresh not in REFRESH_RULES:
    raise ValueError(f'refresh: must be one of {REFRESH_RULES}, got {refresh!r}')
  check_stabiliser(gamma, zeta, refresh)
  dtype = checks.resolve_dtype('factor_dtype', factor_dtype)
  if jnp.finfo(dtype).bits < 32 and (low_rank is None or (
      checks.is_concrete(low_rank_min_dim) and checks.is_concrete(low_rank)
      and low_rank_min_dim > low_rank)):
    raise ValueError(DENSE_16_BIT.format(dtype=dtype.name))
  return dtype


@docstrings.filled()
def scale_by_mkor(
    *,
    damping: Optional[float] = DAMPING,
    gamma: float = GAMMA,
    zeta: float = ZETA,
    epsilon: float = EPSILON,
    inv_freq: int = INV_FREQ,
    refresh: str = 'ema',
    axis_name: Optional[str] = None,
    factor_dtype: Any = None,
    max_factor_dim: int = kr.MAX_FACTOR_DIM,
    low_rank: Optional[int] = LOW_RANK,
    low_rank_min_dim: int = LOW_RANK_MIN_DIM,
    factor_power: float = 1.0,
    shard_factors: bool = True,
    exclude: kr.Exclude = None,
    layouts: Optional[dict] = None,
    rescale: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""MKOR: Kronecker-factored preconditioning with rank-1 inverse refreshes.

  MKOR (Mozaffari et al., 2023) preconditions the gradient of every layer
  that :func:`value_and_grad` captures (Dense, DenseGeneral, Conv) with the
  inverses of two Kronecker factors, like K-FAC, but keeps the inverses
  themselves and refreshes them by rank-1 Sherman-Morrison updates from
  vector statistics: :math:`O(d^2)` per side instead of an inversion's
  :math:`O(d^3)`, cheap enough for every few steps. Other parameters pass
  through unchanged. :func:`mkor` chains it into LAMB.

  For a layer :math:`y = x W + b`, let :math:`\bar G = [G; g_b]` be its
  kernel and bias gradients stacked, :math:`(d_{in}+1) \times d_{out}`. Each
  side keeps its factor's inverse :math:`P` (:math:`R^{-1}` on the input
  side, :math:`L^{-1}` on the output side), starting at :math:`I`. At step 0
  and every ``inv_freq`` steps, each side takes its statistic :math:`v` of
  width :math:`d` (input side: the mean input :math:`a`, a 1 appended;
  output side: the mean output gradient :math:`g`), updates its scale
  :math:`n_t`, moves :math:`P` to the units of :math:`\lambda n_t`, blends
  it toward :math:`I` if it has grown large, and adds the unit-free
  statistic :math:`w`:

  .. math::

     n_t &= \gamma\, n_{t-1} + (1-\gamma)\, \|v\|^2 / d, \qquad
     w = v / \sqrt{\lambda\, n_t}, \qquad P \leftarrow P\, n_t / n_{t-1}, \\
     P &\leftarrow \zeta P + (1-\zeta) I \quad \text{if } \max_{ij} |P_{ij}| > \epsilon, \\
     P &\leftarrow \frac{P}{\gamma} - \frac{(1-\gamma)/\gamma^2}{1 + \frac{1-\gamma}{\gamma}\,
         w^\top P w}\, (P w)(P w)^\top .

  The last line is the exact inverse of :math:`\gamma P^{-1} + (1-\gamma)\, w w^\top`
  (the paper prints it with three errors). Between stabiliser blends,
  :math:`P_t = \lambda n_t F_t^{-1}`, :math:`F_t = \gamma F_{t-1} + (1-\gamma)\, v v^\top`,
  :math:`F_{-1} = \lambda n_0 I`: in units of the side's own scale, so the
  scale of the loss or of either side's statistics changes nothing (beyond
  the paper; ``damping=None`` is its absolute :math:`P = F^{-1}`). With
  :math:`k` sketches per side (the default capture, :data:`SKETCH`),
  :math:`v v^\top` is their mean :math:`\frac{1}{k} \sum_j v_j v_j^\top`.
  Every step, with the newest inverses and :math:`p` = ``factor_power``,

  .. math::

     U = R^{-p}\, \bar G\, L^{-p}, \qquad U \leftarrow U\, \frac{\|\bar G\|_F}{\|U\|_F},

  so the update keeps the raw gradient's norm and learning-rate schedules
  keep their meaning; ``rescale=False`` gives instead the natural gradient
  :math:`U = F_R^{-p} \bar G F_L^{-p} = (\lambda n^R_t \lambda n^L_t)^{-p} R^{-p} \bar G L^{-p}`,
  whose size per layer carries the curvature's. Every
  numeric hyperparameter may be an array
  (``optax.inject_hyperparams``); Python numbers are validated here.

  Args:
    damping: relative damping :math:`\lambda` of the scale-free factors
      (> 0): each side's inverse is kept in units of :math:`\lambda n_t`,
      :math:`n_t` an EMA of the side's mean eigenvalue :math:`\|v\|^2/d`, so
      it starts at the prior :math:`\lambda n_0 I` and its stabiliser acts
      relative to the side's own scale. ``None``: the paper's absolute form
      (inverses start at :math:`I` and ``epsilon`` bounds :math:`\max|F^{-1}|`
      itself), which damps a side whose statistics are small (usually the
      output side) to the identity.
    gamma: momentum :math:`\gamma` of the factor EMA, in (0, 1) (the
      paper's runs: 0.95).
    zeta: the stabiliser's blend :math:`P \leftarrow \zeta P + (1-\zeta) I`,
      in [0, 1]; with ``refresh='ema'`` it must be below ``gamma``.
    epsilon: the stabiliser's threshold :math:`\epsilon` on
      :math:`\max_{ij}|P_{ij}|` (> 0), in the inverse's units
      (:math:`\lambda n_t`, or absolute with ``damping=None``).
    inv_freq: refresh the inverses at step 0 and every ``inv_freq`` steps.
    refresh: ``'ema'``, the exact inverse of the factor EMA (default), or
      ``'blend'``, the authors' code: :math:`P \leftarrow \gamma P + (1-\gamma) I`,
      then the plain Sherman-Morrison inverse of :math:`P^{-1} + v v^\top`.
    axis_name: data-parallel axis (``pmap``/``shard_map``): the statistics,
      a few vectors of width :math:`d` per side, are averaged over it before
      the refresh (sketches: summed, over the root of the device count).
      Gradients are the caller's to average, as with any optax transform.
    factor_dtype: storage dtype of the inverses (``None``: float32, the
      refresh's). 16 bits only for low-rank bases :math:`Q` (needs
      ``low_rank_min_dim <= low_rank``): a dense 16-bit inverse cannot stay
      positive definite. Under ``optax.inject_hyperparams`` pass a name
      (``'bfloat16'``; a dtype class would be taken for a schedule).
    max_factor_dim: a side wider than this is the identity (read at ``init``).
    low_rank: rank :math:`k` of the inverses :math:`c I + Q \operatorname{diag}(s) Q^\top`
      of sides at least ``low_rank_min_dim`` wide (exact for :math:`k`
      refreshes, then the best rank-:math:`k` truncation; memory :math:`O(dk)`
      per side); ``None``: dense inverses everywhere.
    low_rank_min_dim: the narrowest side held in low-rank form (``0``: every
      side wider than ``low_rank``). Both are read at ``init`` only.
    factor_power: the power :math:`p` in (0, 1] of each side's inverse: ``1``
      (default) is MKOR's and K-FAC's; ``0.5`` and ``0.25`` the Shampoo
      family's roots (free for low-rank sides; an ``eigh`` per step for a
      dense one).
    shard_factors: split each factor over the mesh of partitioned
      parameters (model parallel) instead of replicating it (:mod:`mkor_optax.sharding`).
    exclude: layers to leave alone: regex(es) searched in the layer path
      ``'a/b/c'``, or a predicate on it (a predicate needs
      ``static_args=('exclude',)`` under ``optax.inject_hyperparams``).
    layouts: ``{path: Layout}`` overriding the layout read from parameter
      shapes and names (see :class:`Layout` and :func:`layer_layouts`).
    rescale: ``True``: each layer's update at its gradient's norm (for a
      learning rate); ``False``: :math:`F_R^{-p} \bar G F_L^{-p}` (absolute
      form: :math:`R^{-p} \bar G L^{-p}`), for :func:`adaptive_mkor`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose update is
    ``update(grads, state, params=None, *, stats)``, ``stats`` from
    :func:`value_and_grad` (kind :data:`SKETCH`, the default, or
    :data:`RANK1`); its state is an :class:`MKORState`.

  Example:
    >>> opt = optax.chain(mkor_optax.scale_by_mkor(inv_freq=5), optax.adam(1e-3))
    >>> state = opt.init(params)
    >>> loss, grads, stats = mkor_optax.value_and_grad(loss_fn)(params, x, y)
    >>> updates, state = opt.update(grads, state, params, stats=stats)
    >>> int(state[0].count)
    1
    >>> state[0].input_side['layers_0'].shape  # R^-1 of the first layer: (d_in + 1) square
    (1, 4, 4)

  References:
    {MKOR_REFERENCE}

  See Also:
    :func:`mkor` (this transform chained into LAMB), :func:`scale_by_mkor_h`
    (MKOR that switches itself off), :func:`scale_by_kfac` (full covariances,
    inverted), :func:`value_and_grad` (the statistics).
  """
  dtype = check_mkor_args(gamma=gamma, zeta=zeta, epsilon=epsilon, inv_freq=inv_freq,
                          refresh=refresh, factor_dtype=factor_dtype,
                          max_factor_dim=max_factor_dim, low_rank=low_rank,
                          low_rank_min_dim=low_rank_min_dim, factor_power=factor_power,
                          damping=damping)
  if not isinstance(rescale, (bool, np.bool_)):
    raise TypeError(f'scale_by_mkor: rescale must be True or False, got {rescale!r}')
  rule = mkor_rule(damping=damping, gamma=gamma, zeta=zeta, epsilon=epsilon, inv_freq=inv_freq, refresh=refresh,
                   dtype=dtype, low_rank=low_rank, low_rank_min_dim=low_rank_min_dim,
                   factor_power=factor_power, rescale=bool(rescale))
  return kr.scale_by_kronecker(rule, MKORState, who='scale_by_mkor', kind=('RANK1', 'SKETCH'),
                               axis_name=axis_name, max_factor_dim=max_factor_dim,
                               exclude=exclude, layouts=layouts, shard_factors=shard_factors)


# The arguments of scale_by_mkor, which mkor and the MKOR-H transforms hand on.
MKOR_ARGS = ('damping', 'gamma', 'zeta', 'epsilon', 'inv_freq', 'refresh', 'axis_name', 'factor_dtype',
             'max_factor_dim', 'low_rank', 'low_rank_min_dim', 'factor_power', 'shard_factors',
             'exclude', 'layouts')


def mkor_args(arguments: dict) -> dict:
  """The :data:`MKOR_ARGS` entries of ``arguments`` (a caller's ``locals()``)."""
  return {k: arguments[k] for k in MKOR_ARGS}


@docstrings.filled(scale_by_mkor)
def mkor(
    learning_rate: optax.ScalarOrSchedule,
    *,
    weight_decay: float = 0.01,
    backend: Optional[optax.GradientTransformation] = None,
    damping: Optional[float] = DAMPING,
    gamma: float = GAMMA,
    zeta: float = ZETA,
    epsilon: float = EPSILON,
    inv_freq: int = INV_FREQ,
    refresh: str = 'ema',
    axis_name: Optional[str] = None,
    factor_dtype: Any = None,
    max_factor_dim: int = kr.MAX_FACTOR_DIM,
    low_rank: Optional[int] = LOW_RANK,
    low_rank_min_dim: int = LOW_RANK_MIN_DIM,
    factor_power: float = 1.0,
    shard_factors: bool = True,
    exclude: kr.Exclude = None,
    layouts: Optional[dict] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""MKOR with a LAMB backend: ``optax.chain(scale_by_mkor(...), backend)``.

  The optimizer of the MKOR paper. The preconditioner (:func:`scale_by_mkor`,
  where the refresh of the factor inverses :math:`R^{-1}` and :math:`L^{-1}`
  is written out) turns each captured layer's gradient :math:`\bar G` into

  .. math::  U_t = R^{-1} \bar G_t L^{-1}\, \|\bar G_t\|_F / \|R^{-1} \bar G_t L^{-1}\|_F .

  {LAMB}

  Works with ``optax.inject_hyperparams``.

  Args:
    learning_rate: the backend's learning rate :math:`\eta_t`, a number or
      a schedule.
    weight_decay: LAMB's weight decay :math:`\omega`, masked off biases, norm
      scales and 1-D leaves (the MKOR paper's BERT runs).
    backend: the transform after the preconditioner (default
      ``optax.lamb(learning_rate, weight_decay=weight_decay)`` with that
      mask). With an explicit backend, ``learning_rate`` and
      ``weight_decay`` are unused (the backend carries its own).
    {scale_by_mkor: damping, gamma, zeta, epsilon, inv_freq, refresh, axis_name, factor_dtype, max_factor_dim, low_rank, low_rank_min_dim, factor_power, shard_factors, exclude, layouts}

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` takes ``stats=``
    from :func:`value_and_grad`. Its state is the chain's: ``(MKORState,
    the backend's state)``.

  Example:
    >>> opt = mkor_optax.mkor(1e-2)
    >>> state = opt.init(params)
    >>> loss, grads, stats = mkor_optax.value_and_grad(loss_fn)(params, x, y)
    >>> updates, state = opt.update(grads, state, params, stats=stats)
    >>> bool(loss_fn(optax.apply_updates(params, updates), x, y) < loss)
    True

  References:
    {MKOR_REFERENCE}

    {LAMB_REFERENCE}

  See Also:
    :func:`scale_by_mkor` (the preconditioner alone), :func:`mkor_h` (MKOR
    that hands over to LAMB for good once it stops paying), :func:`kfac`,
    :func:`eva`, :func:`sonew`, :class:`TrainState` (a training state that
    passes ``stats``), :class:`MultiSteps` (gradient accumulation).
  """
  return kr.with_backend(scale_by_mkor(**mkor_args(locals())), backend, learning_rate,
                         weight_decay)


decay_mask = kr.decay_mask
default_backend = kr.default_backend
