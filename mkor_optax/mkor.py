r"""MKOR: Kronecker-factored preconditioning with rank-1 inverse refreshes.

Mozaffari, Li, Zhang, Mehri Dehnavi (2023), *MKOR: Momentum-Enabled
Kronecker-Factor-Based Optimizer Using Rank-1 Updates*, NeurIPS 2023,
arXiv:2306.01685.

Per second-order layer with statistics ``a`` (mean input, bias 1 appended) and
``g`` (mean output gradient), factor inverses ``R^-1`` (``d_in+1`` square,
the input side) and ``L^-1`` (``d_out`` square, the output side) start at the
identity and are refreshed at step 0 and every ``inv_freq`` steps by the
rank-1 rule of :mod:`mkor_optax.rank1` (a stabiliser, then Sherman-Morrison
on ``F_t = gamma F_{t-1} + (1 - gamma) v v^T``, ``v = a`` for ``R`` and
``v = g`` for ``L``), or for wide sides its low-rank-plus-identity form
(:mod:`mkor_optax.lowrank`). With ``k`` sketches per side
(:class:`mkor_optax.Sketch`, what :func:`mkor_optax.value_and_grad` captures
by default, ``k = 4``) the refresh is
``F_t = gamma F_{t-1} + (1 - gamma)/k sum_j v_j v_j^T``, ``k`` rank-1 steps
whose terms average to K-FAC's covariance factors.

Scale-free factors (beyond the paper): each side tracks ``n_t``, the EMA of
its statistics' mean eigenvalue ``|v|^2/d``, and keeps its inverse in units
of ``damping * n_t``, ``P_t = damping n_t F_t^{-1}`` with the prior
``F_{-1} = damping n_0 I`` (:func:`mkor_optax.factors.refresh_relative`): the
rule above runs on ``v / sqrt(damping n_t)``, so neither the scale of the
loss nor that of either side's statistics changes the update, and the side
with small statistics (usually the output side) is not damped to ``I``.
Every step:

.. math::  U = R^{-1} [G; g_b] L^{-1}, \quad U \leftarrow U\, \|[G; g_b]\|_F / \|U\|_F,

handed on to the next transform of the chain. Everything else passes
through unchanged.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mkor_optax import checks, factors
from mkor_optax import kronecker as kr
from mkor_optax.factors import DENSE_16_BIT
from mkor_optax.layout import OUTPUT, SIDES
from mkor_optax.rank1 import REFRESH_RULES, check_stabiliser, refresh_inverse, refresh_inverse_checked  # noqa: F401

# Low-rank factors by default for sides of at least this width (measured:
# benchmarks/width_sweep.py, docs/guides/wide_layers.md).
LOW_RANK = 8
LOW_RANK_MIN_DIM = 256
# The factor EMA's momentum. The paper runs 0.95; 0.98 took the fewest steps to
# LAMB's final loss on both compare.py tasks over 3 seeds (autoencoder 0.884x,
# BERT-style MLM 0.935x the steps of 0.95; results/seeds/gamma_*.md, docs/benchmarks.md
# "Defaults").
GAMMA = 0.98
ZETA = 0.9
EPSILON = 2.0
# The relative damping of the scale-free factors: the identity prior's weight
# against the side's mean eigenvalue (docs/how_it_works.md "Scale-free factors").
DAMPING = 0.25


class MKORState(NamedTuple):
  """MKOR's state.

  Attributes:
    count: ``()`` int32, updates done.
    input_side: layer path -> the input-side inverse ``R^-1``: a dense
      ``(S, d_in + 1, d_in + 1)`` array or, for sides of at least
      ``low_rank_min_dim``, a :class:`~mkor_optax.lowrank.LowRankInverse`.
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
              low_rank_min_dim, factor_power=1.0, who: str = 'scale_by_mkor') -> kr.FactorRule:
  """MKOR's :class:`~mkor_optax.kronecker.FactorRule`: rank-1 refreshes of
  the inverses every ``inv_freq`` steps, then ``R^-1 G L^-1``, rescaled."""
  def init_side(width, n_stack):  # at init, where low_rank is a Python number
    rank = None if low_rank is None else int(low_rank)
    return factors.identity(width, n_stack, rank=rank, min_dim=low_rank_min_dim, dtype=dtype)

  def refreshed(sides, prep):
    new, scales, flags = [], [], {}
    for side, entries, rms_of in zip(SIDES, sides[:2], sides[2:]):
      out, out_rms = {}, {}
      for k, p in entries.items():
        if k not in prep.stats:
          out[k], out_rms[k] = p, rms_of[k]
          continue
        fresh, rms, reset = factors.refresh_relative(
            p, rms_of[k], prep.stats[k][side], damping=damping, gamma=gamma, zeta=zeta,
            epsilon=epsilon, refresh=refresh)
        # finite here: the refresh is due
        out[k], out_rms[k] = prep.keep_unless_fresh(k, (fresh, rms), (p, rms_of[k]))
        if side == OUTPUT and k in prep.cancelled:  # rounding noise is no curvature
          out[k], out_rms[k] = jax.tree.map(lambda a, b: jnp.where(prep.cancelled[k], a, b),
                                            (p, rms_of[k]), (out[k], out_rms[k]))
        flags[f'{k} ({side} side)'] = jnp.any(reset) & prep.present[k]
      new.append(out)
      scales.append(out_rms)
    return tuple(new) + tuple(scales), flags

  def kept(sides, prep):
    names = [f'{k} ({side} side)' for side, entries in zip(SIDES, sides[:2])
             for k in entries if k in prep.stats]
    return sides, {n: jnp.asarray(False) for n in names}

  def refresh_sides(sides, prep):
    due = jnp.logical_and(prep.count % inv_freq == 0, prep.finite)
    sides, resets = jax.lax.cond(due, lambda s: refreshed(s, prep), lambda s: kept(s, prep), sides)
    factors.report_resets(resets, who)
    return sides

  def precondition(sides, prep):
    r_inv, l_inv = ({k: factors.power(p, factor_power) for k, p in side.items()} for side in sides[:2])
    return {k: factors.precondition_rescaled(g, r_inv.get(k), l_inv.get(k), prep.blocks(k),
                                             prep.sq_norms[k])
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


def scale_by_mkor(
    *,
    damping: Optional[float] = DAMPING,
    gamma: float = GAMMA,
    zeta: float = ZETA,
    epsilon: float = EPSILON,
    inv_freq: int = kr.INV_FREQ,
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
  """MKOR preconditioning of every captured Dense/DenseGeneral/Conv layer.

  Args:
    damping: relative damping ``lambda`` of the scale-free factors (> 0):
      each side's inverse is kept in units of ``lambda n_t``, ``n_t`` an EMA
      of the side's mean eigenvalue ``|v|^2/d``, so it starts at the prior
      ``lambda n_0 I`` and its stabiliser acts relative to the side's own
      scale; the update then does not depend on the scale of the loss or of
      either side's statistics. ``None``: the absolute form (inverses start
      at ``I`` and ``epsilon`` bounds ``max|F^-1|`` itself), which damps a
      side whose statistics are small (usually the output side) to the identity.
    gamma: momentum of the factor EMA, in (0, 1) (the paper's runs: 0.95).
    zeta: stabiliser blend ``P <- zeta P + (1-zeta) I``, in [0, 1]; with
      ``refresh='ema'`` it must be below ``gamma`` (:func:`check_stabiliser`).
    epsilon: stabiliser threshold on ``max|P|`` (> 0), in the inverse's
      units (``lambda n_t``, or absolute with ``damping=None``).
    inv_freq: refresh the inverses at step 0 and every ``inv_freq`` steps.
    refresh: ``'ema'`` (exact EMA inverse, default) or ``'blend'`` (authors' code).
    axis_name: data-parallel axis (``pmap``/``shard_map``): ``a`` and ``g``
      are ``lax.pmean``-ed over it before the refresh. Gradients are the
      caller's to average, as with any optax transform.
    factor_dtype: storage dtype of the inverses (``None``: float32; refresh
      math is float32). A 16-bit dtype is for low-rank factors only (it
      stores their basis ``Q``; ``low_rank_min_dim <= low_rank`` is
      required, sides no wider than ``low_rank`` stay dense float32): a
      dense inverse in 16 bits cannot stay positive definite. Under ``optax.inject_hyperparams`` pass a dtype name
      (``'bfloat16'``): a dtype class is callable and would be taken for a schedule.
    max_factor_dim: a side larger than this is preconditioned by the identity
      (read at ``init`` only).
    low_rank: rank ``k`` of the low-rank-plus-identity inverses
      ``c I + Q diag(s) Q^T`` (:mod:`mkor_optax.lowrank`; exact for the first
      ``k`` refreshes, the best rank-``k`` truncation after) used for sides of
      dimension ``>= low_rank_min_dim``; ``None``: dense inverses everywhere.
      Memory ``O(d k)`` per side, preconditioning ``O(d_in d_out k)``.
    low_rank_min_dim: smallest side dimension (``d_in+1`` or ``d_out``) held
      in low-rank form; ``0`` puts every side with ``d > low_rank`` in it.
      Both are read at ``init`` only.
    factor_power: the power of each side's inverse that preconditions:
      ``1`` (default) is ``R^-1 G L^-1``, MKOR's and K-FAC's; ``0.5`` and
      ``0.25`` use the inverse square and fourth roots of the factors (the
      Shampoo family, whose limit without accumulation is Muon's update).
      Free for low-rank sides (their eigen form); a dense side costs an
      ``eigh`` per step. In ``(0, 1]``.
    shard_factors: when ``init`` sees partitioned parameters (a mesh
      ``NamedSharding``, model parallel), split each factor over that mesh's
      devices instead of replicating it (:mod:`mkor_optax.sharding`).
    exclude: layers to leave alone: regex(es) searched in the layer path
      ``'a/b/c'``, or a predicate on it (a predicate needs
      ``static_args=('exclude',)`` under ``optax.inject_hyperparams``).
    layouts: ``{path: Layout}`` overriding the layout read from parameter
      shapes and names (see :func:`mkor_optax.layer_layouts`).

  Every numeric hyperparameter may be an array (``optax.inject_hyperparams``);
  Python numbers are validated here.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose update is
    ``update(grads, state, params=None, *, stats)``.

  Example:
    >>> opt = optax.chain(mkor_optax.scale_by_mkor(inv_freq=5), optax.adam(1e-3))
    >>> state = opt.init(params)
    >>> loss, grads, stats = mkor_optax.value_and_grad(loss_fn)(params, x, y)
    >>> updates, state = opt.update(grads, state, params, stats=stats)
    >>> int(state[0].count)
    1
  """
  dtype = check_mkor_args(gamma=gamma, zeta=zeta, epsilon=epsilon, inv_freq=inv_freq,
                          refresh=refresh, factor_dtype=factor_dtype,
                          max_factor_dim=max_factor_dim, low_rank=low_rank,
                          low_rank_min_dim=low_rank_min_dim, factor_power=factor_power,
                          damping=damping)
  rule = mkor_rule(damping=damping, gamma=gamma, zeta=zeta, epsilon=epsilon, inv_freq=inv_freq, refresh=refresh,
                   dtype=dtype, low_rank=low_rank, low_rank_min_dim=low_rank_min_dim,
                   factor_power=factor_power)
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


def mkor(
    learning_rate: optax.ScalarOrSchedule,
    *,
    weight_decay: float = 0.01,
    backend: Optional[optax.GradientTransformation] = None,
    damping: Optional[float] = DAMPING,
    gamma: float = GAMMA,
    zeta: float = ZETA,
    epsilon: float = EPSILON,
    inv_freq: int = kr.INV_FREQ,
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
  """MKOR with a LAMB backend: ``optax.chain(scale_by_mkor(...), backend)``.

  Args:
    learning_rate: the backend's learning rate or schedule.
    weight_decay: LAMB's weight decay, masked off biases, norm scales and 1-D
      leaves (the paper's BERT runs).
    backend: the transform after the preconditioner (default
      ``optax.lamb(learning_rate, weight_decay=...)``). With an explicit
      backend, ``learning_rate`` and ``weight_decay`` are unused (the backend
      carries its own).
    damping, gamma, zeta, epsilon, inv_freq, refresh: as in :func:`scale_by_mkor`.
    axis_name: as in :func:`scale_by_mkor`.
    factor_dtype, max_factor_dim, low_rank: as in :func:`scale_by_mkor`.
    low_rank_min_dim, factor_power, shard_factors, exclude: as in :func:`scale_by_mkor`.
    layouts: as in :func:`scale_by_mkor`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` takes
    ``stats=`` from :func:`mkor_optax.value_and_grad`. Works with
    ``optax.inject_hyperparams``.

  Example:
    >>> opt = mkor_optax.mkor(1e-2)
    >>> state = opt.init(params)
    >>> loss, grads, stats = mkor_optax.value_and_grad(loss_fn)(params, x, y)
    >>> updates, state = opt.update(grads, state, params, stats=stats)
    >>> bool(loss_fn(optax.apply_updates(params, updates), x, y) < loss)
    True
  """
  return kr.with_backend(scale_by_mkor(**mkor_args(locals())), backend, learning_rate,
                         weight_decay)


decay_mask = kr.decay_mask
default_backend = kr.default_backend
