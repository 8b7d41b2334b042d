"""MKOR: Kronecker-factored preconditioning with rank-1 inverse refreshes.

Mohammadi, Nikdan, Alistarh, Dehnavi (2023), *MKOR: Momentum-Enabled
Kronecker-Factor-Based Optimizer Using Rank-1 Updates*, NeurIPS 2023,
arXiv:2306.01685. Mathematics as corrected in ``shared/SPEC.md`` section 1.

Per second-order layer with statistics ``a`` (mean input, bias 1 appended) and
``g`` (mean output gradient), factor inverses ``R^-1`` (``d_in+1`` square)
and ``L^-1`` (``d_out`` square) start at the identity and are refreshed at
step 0 and every ``inv_freq`` steps:

1. stabiliser: if ``max|P| > epsilon``: ``P <- zeta P + (1 - zeta) I``;
2. ``refresh='ema'`` (default), the exact inverse of
   ``F_t = gamma F_{t-1} + (1 - gamma) v v^T`` by Sherman-Morrison::

       F_t^-1 = P/gamma - ((1-gamma)/gamma^2) (P v)(P v)^T / (1 + ((1-gamma)/gamma) v^T P v)

   (the paper prints gamma*P, a plus sign and gamma(1-gamma): wrong);
   ``refresh='blend'``, the authors' code: ``P <- gamma P + (1-gamma) I``
   then ``P <- P - (P v)(P v)^T / (1 + v^T P v)``;
   both re-symmetrised, with ``v = a`` for ``R`` and ``v = g`` for ``L``.

Every step: ``U = R^-1 [G; g_b] L^-1``, rescaled to the Frobenius norm of
``[G; g_b]``, handed on to the next transform of the chain. Everything else
passes through unchanged.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mkor_optax import kronecker as kr
from mkor_optax import lowrank
from mkor_optax.numerics import rank1_coefficients, unit_statistic
from mkor_optax import sharding



class MKORState(NamedTuple):
  """``count``: updates done. ``r_inv``/``l_inv``: layer path -> stacked
  factor inverses, dense ``(S, d, d)`` arrays or, for sides of at least
  ``low_rank_min_dim``, :class:`~mkor_optax.lowrank.LowRankInverse`; a side
  larger than ``max_factor_dim`` has no entry (identity)."""

  count: jax.Array
  r_inv: dict
  l_inv: dict


# ---------------------------------------------------------------- refresh math

_REFRESH = ('ema', 'blend')

# Low-rank factors by default for sides of at least this width (measured:
# benchmarks/width_sweep.py, README "Wide layers").
LOW_RANK = 8
LOW_RANK_MIN_DIM = 256
# The factor EMA's momentum. The paper runs 0.95; 0.98 took the fewest steps to
# LAMB's final loss on both compare.py tasks over 3 seeds (autoencoder 0.884x,
# BERT-style MLM 0.935x the steps of 0.95; results/seeds/gamma_*.md, README
# "Defaults").
GAMMA = 0.98


def refresh_inverse(p, v, *, gamma: float, zeta: float, epsilon: float, refresh: str = 'ema'):
  """One factor-inverse refresh, batched over leading axes of ``p`` and ``v``.

  Stabiliser then rank-1 rule (module docstring), computed in at least
  float32 and returned in ``p``'s dtype. Both steps are affine in ``P`` up to
  the rank-1 term, so the whole refresh is one pass over ``P`` for the
  max-abs test, one for ``P v`` and one fused write::

      P' = alpha P + beta I                       (stabiliser; 'blend' too)
      u  = P' v = alpha (P v) + beta v
      P+ = kappa P' - lam u u^T

  ``ema``: ``kappa = 1/gamma``, ``lam = ((1-gamma)/gamma^2) / (1 + ((1-gamma)/gamma) v^T u)``;
  ``blend``: ``kappa = 1``, ``lam = 1 / (1 + v^T u)``. The result is exactly
  symmetric whenever ``P`` is (``u_i u_j == u_j u_i`` in floating point), so no
  re-symmetrisation pass is needed.

  Safety: ``v`` enters as ``|v| v_hat`` (:func:`unit_statistic`), so no
  product of two statistics is formed. A ``P`` that the refresh finds not
  positive definite (``v^T P' v <= 0``) or not finite is reset to ``I``
  before the rank-1 term, and a result that is not finite keeps ``p``:
  see :func:`refresh_inverse_checked`, which also says which entries were reset.
  """
  return refresh_inverse_checked(p, v, gamma=gamma, zeta=zeta, epsilon=epsilon,
                                 refresh=refresh)[0]


def refresh_inverse_checked(p, v, *, gamma, zeta, epsilon, refresh: str = 'ema'):
  """:func:`refresh_inverse` and a boolean per stack entry: ``True`` where
  the factor was found indefinite or non-finite and reset."""
  if refresh not in _REFRESH:
    raise ValueError(f'refresh: must be one of {_REFRESH}, got {refresh!r}')
  dtype = p.dtype
  compute = jnp.promote_types(dtype, jnp.float32)
  p = p.astype(compute)
  unit, inv_sq = unit_statistic(v.astype(compute))
  top = jnp.max(jnp.abs(p), axis=(-2, -1))
  big = top > epsilon
  alpha = jnp.where(big, zeta, 1.0).astype(compute)
  beta = jnp.where(big, 1.0 - zeta, 0.0).astype(compute)
  if refresh == 'blend':
    alpha, beta = gamma * alpha, gamma * beta + (1.0 - gamma)
  pv = jnp.einsum('...ij,...j->...i', p, unit)
  u = alpha[..., None] * pv + beta[..., None] * unit
  vu = jnp.sum(unit * u, axis=-1)
  moved = jnp.any(unit != 0, axis=-1)
  bad = (moved & ~(vu > 0)) | ~jnp.isfinite(vu)
  # reset to I: P' = I, u = v_hat, v_hat^T u = 1
  alpha, beta = jnp.where(bad, 0.0, alpha), jnp.where(bad, 1.0, beta)
  u = jnp.where(bad[..., None], unit, u)
  vu = jnp.where(bad, jnp.sum(unit * unit, axis=-1), vu)
  scale = jnp.where(bad, 1.0, alpha * top + beta)  # bounds the entries of P'
  kappa, lam = rank1_coefficients(vu, inv_sq, gamma, refresh, scale)
  eye = jnp.eye(p.shape[-1], dtype=compute)
  base = jnp.where(bad[..., None, None], 0.0, alpha[..., None, None] * p)
  new = (kappa[..., None, None] * (base + beta[..., None, None] * eye)
         - lam[..., None, None] * (u[..., :, None] * u[..., None, :]))
  ok = jnp.all(jnp.isfinite(new), axis=(-2, -1))
  new = jnp.where(ok[..., None, None], new, p)
  return new.astype(dtype), bad | ~ok


def report_resets(resets: dict, who: str):
  """A :class:`~mkor_optax.numerics.NumericalWarning` naming the factors that
  a refresh found indefinite or non-finite (and reset or kept)."""
  if not resets:
    return
  names = sorted(resets)
  kr.report_if(jnp.stack([resets[k] for k in names]),
               f'{who}: factor(s) {{names}} were not positive definite (or not '
               'finite) at the refresh and were reset toward the identity (16-bit factors, or '
               'statistics beyond float32 range)', names=names)


def check_stabiliser(gamma, zeta, refresh: str):
  """``refresh='ema'`` needs ``zeta < gamma``.

  A direction the statistics never visit is multiplied by ``1/gamma`` at
  every refresh; once ``max|P| > epsilon`` the stabiliser multiplies it by
  ``zeta`` and adds ``(1 - zeta)``, so per refresh it becomes
  ``(zeta P + 1 - zeta) / gamma``. That map is a contraction, with fixed point
  ``(1 - zeta) / (gamma - zeta)``, only when ``zeta < gamma``; at
  ``zeta == gamma`` the inverse grows linearly, above it exponentially (by
  ``zeta/gamma`` per refresh) until it overflows. ``'blend'`` contracts toward
  ``I`` by itself and needs no rule. Arrays (``inject_hyperparams``) are not checked.
  """
  if refresh == 'ema' and kr.is_concrete(gamma) and kr.is_concrete(zeta) and not zeta < gamma:
    raise ValueError(
        f'zeta: must be < gamma with refresh=\'ema\' (got zeta={zeta!r}, gamma={gamma!r}): '
        f'directions the statistics never visit grow by 1/gamma per refresh and the stabiliser '
        f'shrinks them by zeta, so with zeta >= gamma the factor inverse grows without bound '
        f'(exponentially for zeta > gamma) until it overflows. Lower zeta (e.g. zeta={0.9 * gamma:.3g}).')


DENSE_16_BIT = (
    'factor_dtype: {dtype} is only for low-rank factors (low_rank set and low_rank_min_dim <= '
    'low_rank, e.g. low_rank=8, low_rank_min_dim=0): a dense factor inverse stored in 16 bits '
    'cannot stay positive definite, since rounding each entry to 8 significant bits moves its '
    'eigenvalues by about 0.4% of the largest times the width, more than the small eigenvalues '
    'that carry the curvature, and the refreshes compound it (measured: smallest eigenvalue '
    '-0.06 after 300 steps on inputs x1000). A low-rank factor keeps its eigenvalues c and s '
    'in float32 and only the orthonormal basis Q in 16 bits, re-orthonormalised at every '
    'refresh, which stays positive definite. Sides no wider than low_rank stay dense float32.')


# ------------------------------------------------------------------- transform

def scale_by_mkor(
    *,
    gamma: float = GAMMA,
    zeta: float = 0.9,
    epsilon: float = 2.0,
    inv_freq: int = 10,
    refresh: str = 'ema',
    axis_name: Optional[str] = None,
    factor_dtype: Any = None,
    max_factor_dim: int = 4096,
    low_rank: Optional[int] = LOW_RANK,
    low_rank_min_dim: int = LOW_RANK_MIN_DIM,
    shard_factors: bool = True,
    exclude: kr.Exclude = None,
    layouts: Optional[dict] = None,
) -> optax.GradientTransformationExtraArgs:
  """MKOR preconditioning of every captured Dense/DenseGeneral/Conv layer.

  Args:
    gamma: momentum of the factor EMA, in (0, 1) (the paper's runs: 0.95).
    zeta: stabiliser blend ``P <- zeta P + (1-zeta) I``, in [0, 1]; with
      ``refresh='ema'`` it must be below ``gamma`` (:func:`check_stabiliser`).
    epsilon: stabiliser threshold on ``max|P|`` (> 0).
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
  """
  kr.validate(
      zeta=(zeta, lambda v: 0.0 <= v <= 1.0, 'must be in [0, 1]'),
      epsilon=(epsilon, lambda v: v > 0, 'must be > 0'),
      **kr.common_checks(gamma=gamma, inv_freq=inv_freq, max_factor_dim=max_factor_dim),
  )
  if low_rank is not None:
    kr.validate(low_rank=(low_rank, None, ''))
  if not (kr.is_int(low_rank_min_dim) and low_rank_min_dim >= 0) and not isinstance(
      low_rank_min_dim, (jax.Array, np.ndarray)):
    raise ValueError(f'low_rank_min_dim: must be an integer >= 0, got {low_rank_min_dim!r}')
  if refresh not in _REFRESH:
    raise ValueError(f'refresh: must be one of {_REFRESH}, got {refresh!r}')
  check_stabiliser(gamma, zeta, refresh)
  dtype = kr.resolve_dtype('factor_dtype', factor_dtype)
  if jnp.finfo(dtype).bits < 32 and (low_rank is None or (
      kr.is_concrete(low_rank_min_dim) and kr.is_concrete(low_rank) and low_rank_min_dim > low_rank)):
    raise ValueError(DENSE_16_BIT.format(dtype=dtype.name))
  excluded = kr.exclude_predicate(exclude)

  def init(params):
    plan = kr.plan_layers(params, layouts=layouts, excluded=excluded,
                          max_factor_dim=max_factor_dim, who='scale_by_mkor')
    rank = None if low_rank is None else int(low_rank)

    def eye(n, s):
      if rank is not None and rank < n and n >= int(low_rank_min_dim):
        return lowrank.identity(n, rank, s, dtype)
      if jnp.finfo(dtype).bits < 32 and n > (rank or 0):
        raise ValueError(DENSE_16_BIT.format(dtype=dtype.name))
      # a side no wider than the rank is dense and kept in float32 (nothing to save)
      return kr.identity_stack(n, s, jnp.promote_types(dtype, jnp.float32))

    eyes = lambda sizes: {k: eye(n, s) for k, (n, s) in sizes.items()}
    r_sizes, l_sizes = kr.side_sizes(plan)
    mesh = sharding.partitioned_mesh(params) if shard_factors else None
    return sharding.place_state(MKORState(jnp.zeros([], jnp.int32), sharding.place_factors(
        eyes(r_sizes), mesh), sharding.place_factors(eyes(l_sizes), mesh)), params)

  def update(updates, state, params=None, *, stats=None, **extra_args):
    del params, extra_args
    plan = kr.plan_layers(updates, layouts=layouts, excluded=excluded,
                          max_factor_dim=max_factor_dim, sides=(state.r_inv, state.l_inv), who='scale_by_mkor')
    prep = kr.prepare(updates, stats, plan, excluded, 'scale_by_mkor', axis_name)
    vecs = prep.stats
    do_refresh = jnp.logical_and(state.count % inv_freq == 0, prep.finite)
    kr.report_if(~prep.finite, 'scale_by_mkor: non-finite gradients or statistics: '
                 'the factors are left as they were')

    sides = (('a', 'input'), ('g', 'output'))

    def refreshed(factors):
      kw = dict(gamma=gamma, zeta=zeta, epsilon=epsilon, refresh=refresh)
      new, flags = [], {}
      for side, (stat, where) in zip(factors, sides):
        out = {}
        for k, p in side.items():
          if k not in vecs:
            out[k] = p
            continue
          rule = (lowrank.refresh_checked if isinstance(p, lowrank.LowRankInverse)
                  else refresh_inverse_checked)
          fresh, reset = rule(p, vecs[k][stat], **kw)
          here = prep.present[k]
          out[k] = jax.tree.map(lambda a, b: jnp.where(here, a, b), fresh, p)
          flags[f'{k} ({where} side)'] = jnp.any(reset) & here
        new.append(out)
      return tuple(new), flags

    def kept(factors):
      names = [f'{k} ({where} side)' for side, (_, where) in zip(factors, sides)
               for k in side if k in vecs]
      return factors, {n: jnp.asarray(False) for n in names}

    (r_inv, l_inv), resets = jax.lax.cond(do_refresh, refreshed, kept, (state.r_inv, state.l_inv))
    report_resets(resets, 'scale_by_mkor')
    out = {k: kr.precondition_rescaled(g, r_inv.get(k), l_inv.get(k),
                                       kr.row_blocks(module, prep.plan[k].dims), prep.sq_norms[k])
           for k, (module, g) in prep.grads.items()}
    return kr.write_layers(prep, out), MKORState(kr.increment(state.count), r_inv, l_inv)

  return optax.GradientTransformationExtraArgs(init, update)


def decay_mask(params):
  """Weight-decay mask: no decay on biases, norm scales and 1-D leaves."""
  def keep(path, leaf):
    name = getattr(path[-1], 'key', None) if path else None
    return np.ndim(leaf) >= 2 and name not in ('bias', 'scale')
  return jax.tree_util.tree_map_with_path(keep, params)


def mkor(
    learning_rate: optax.ScalarOrSchedule,
    *,
    weight_decay: float = 0.01,
    backend: Optional[optax.GradientTransformation] = None,
    gamma: float = GAMMA,
    zeta: float = 0.9,
    epsilon: float = 2.0,
    inv_freq: int = 10,
    refresh: str = 'ema',
    axis_name: Optional[str] = None,
    factor_dtype: Any = None,
    max_factor_dim: int = 4096,
    low_rank: Optional[int] = LOW_RANK,
    low_rank_min_dim: int = LOW_RANK_MIN_DIM,
    shard_factors: bool = True,
    exclude: kr.Exclude = None,
    layouts: Optional[dict] = None,
) -> optax.GradientTransformationExtraArgs:
  """MKOR with a LAMB backend: ``optax.chain(scale_by_mkor(...), backend)``.

  The default backend is ``optax.lamb(learning_rate, weight_decay=...)`` with
  weight decay masked off biases and norm scales (the paper's BERT runs). With
  an explicit ``backend``, ``learning_rate`` and ``weight_decay`` are unused
  (the backend carries its own). The other arguments are
  :func:`scale_by_mkor`'s. Works with ``optax.inject_hyperparams``.
  """
  return sharding.on_params_mesh(optax.chain(
      scale_by_mkor(gamma=gamma, zeta=zeta, epsilon=epsilon, inv_freq=inv_freq, refresh=refresh,
                    axis_name=axis_name, factor_dtype=factor_dtype,
                    max_factor_dim=max_factor_dim, low_rank=low_rank,
                    low_rank_min_dim=low_rank_min_dim, shard_factors=shard_factors,
                    exclude=exclude, layouts=layouts),
      backend or default_backend(learning_rate, weight_decay)))


def default_backend(learning_rate, weight_decay):
  """LAMB with weight decay masked off biases and norm scales (the paper's BERT runs)."""
  return optax.lamb(learning_rate, weight_decay=weight_decay, mask=decay_mask)
