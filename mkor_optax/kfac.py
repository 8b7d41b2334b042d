"""K-FAC (KAISA-like) on the same capture: our own baseline for MKOR.

Martens & Grosse (2015), *Optimizing Neural Networks with Kronecker-factored
Approximate Curvature*, ICML, arXiv:1503.05671; Grosse & Martens (2016) for
convolutions; Pauloski et al. (2021), *KAISA*, SC'21, arXiv:2107.01739, for
the refresh-every-``inv_freq``-steps schedule MKOR is compared against.

Per second-order layer, with ``A`` and ``G`` from
``mkor_optax.value_and_grad(loss_fn, kind=mkor_optax.COVARIANCE)``
(the full input and output-gradient second moments, bias row included)::

    A_t = gamma A_{t-1} + (1 - gamma) A          (A_0 = A; the same for G)
    every inv_freq steps (and at step 0), n_F = tr(F_t)/d (1 without relative_damping):
        A^-1 <- (A_t + sqrt(damping) n_A I)^-1,  G^-1 <- (G_t + sqrt(damping) n_G I)^-1   (Cholesky)
    every step:
        U = A^-1 [G; g_b] G^-1, rescaled to the Frobenius norm of [G; g_b]

The damping is split evenly between the factors (``sqrt(damping)`` each;
with ``relative_damping`` times each factor's mean eigenvalue ``tr(F)/d``), and
the update is rescaled like MKOR's (instead of KAISA's KL clipping) so the two
differ only in their curvature. Cost per refresh O(d^3), memory 4 d^2 per
layer (factors and inverses); with ``axis_name`` the factors' d^2 entries are
averaged across devices (MKOR sends 2d numbers).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from mkor_optax import checks
from mkor_optax import kronecker as kr
from mkor_optax.precondition import precondition, rescale_to


# Relative (pi-adjusted) damping by default: each factor gets sqrt(DAMPING)
# times its mean eigenvalue (docs/how_it_works.md "Scale-free factors").
DAMPING = 0.1


class CovarianceFactor(NamedTuple):
  """One K-FAC side: ``cov`` ``(S, d, d)`` float32, the EMA of the
  covariance statistic, and ``inv`` ``(S, d, d)`` (``factor_dtype``), its
  damped inverse at the last refresh."""

  cov: jax.Array
  inv: jax.Array

  @property
  def shape(self) -> tuple:
    return self.cov.shape


class KFACState(NamedTuple):
  """K-FAC's state.

  Attributes:
    count: ``()`` int32, updates done.
    input_side: layer path -> :class:`CovarianceFactor` of ``A`` (``d_in + 1`` square).
    output_side: layer path -> :class:`CovarianceFactor` of ``G`` (``d_out`` square).

  Example:
    >>> state = mkor_optax.scale_by_kfac().init(params)
    >>> state.input_side['layers_0'].inv.shape[-2:]  # (d_in + 1) square
    (4, 4)
  """

  count: jax.Array
  input_side: dict
  output_side: dict
  KIND = 'COVARIANCE'


def damped_inverse(f, damping_per_side, relative: bool = False):
  """``(F + damping I)^-1`` for a stack of symmetric PSD ``F``, via Cholesky.

  With ``relative``, the damping is multiplied by ``F``'s mean eigenvalue
  ``tr(F)/d`` (per stack entry), so it scales with the factor: the result
  times ``tr(F)/d`` does not change when ``F`` is multiplied by a constant.
  """
  f = f.astype(jnp.float32)
  eye = jnp.eye(f.shape[-1], dtype=f.dtype)
  shift = damping_per_side
  if relative:
    mean_eig = jnp.trace(f, axis1=-2, axis2=-1) / f.shape[-1]
    shift = damping_per_side * jnp.where(mean_eig > 0, mean_eig, 1.0)[..., None, None]
  chol = jnp.linalg.cholesky(f + shift * eye)
  solve = jax.vmap(lambda c: jax.scipy.linalg.cho_solve((c, True), eye))
  return solve(chol)


def kfac_rule(*, damping, relative_damping, gamma, inv_freq, dtype) -> kr.FactorRule:
  """K-FAC's :class:`~mkor_optax.kronecker.FactorRule`: covariance EMAs every
  step, damped inverses every ``inv_freq`` steps, then ``A^-1 G G^-1``, rescaled."""

  def init_side(width, n_stack):
    return CovarianceFactor(jnp.zeros((n_stack, width, width), jnp.float32),
                            jnp.broadcast_to(jnp.eye(width, dtype=dtype), (n_stack, width, width)))

  def refresh(sides, prep):
    covs = kr.ema_sides(tuple({k: f.cov for k, f in s.items()} for s in sides), prep, gamma)
    root = jnp.sqrt(jnp.asarray(damping, jnp.float32))

    def inverted(olds):
      out = []
      for cov, old in zip(covs, olds):
        new = {k: damped_inverse(f, root, relative_damping) for k, f in cov.items()}
        out.append({k: jnp.where(jnp.all(jnp.isfinite(v)), v, old[k]).astype(dtype)
                    for k, v in new.items()})
      return tuple(out)

    due = jnp.logical_and(prep.count % inv_freq == 0, prep.finite)
    olds = tuple({k: f.inv for k, f in s.items()} for s in sides)
    invs = jax.lax.cond(due, inverted, lambda old: old, olds)
    return tuple({k: CovarianceFactor(cov[k], inv[k]) for k in cov} for cov, inv in zip(covs, invs))

  def precondition_all(sides, prep):
    a, g = ({k: f.inv for k, f in s.items()} for s in sides)
    return {k: rescale_to(precondition(m, a.get(k), g.get(k)), m, prep.sq_norms[k])
            for k, (_, m) in prep.grads.items()}

  return kr.FactorRule(init_side, refresh, precondition_all)


def scale_by_kfac(
    *,
    damping: float = DAMPING,
    relative_damping: bool = True,
    gamma: float = 0.95,
    inv_freq: int = kr.INV_FREQ,
    axis_name: Optional[str] = None,
    factor_dtype: Any = None,
    max_factor_dim: int = kr.MAX_FACTOR_DIM,
    shard_factors: bool = True,
    exclude: kr.Exclude = None,
    layouts: Optional[dict] = None,
) -> optax.GradientTransformationExtraArgs:
  """K-FAC preconditioning of every captured Dense/DenseGeneral/Conv layer.

  Args:
    damping: Tikhonov damping ``mu`` (> 0, finite); each factor gets
      ``sqrt(mu)``, times its mean eigenvalue with ``relative_damping``.
    relative_damping: multiply each factor's ``sqrt(mu)`` by its mean
      eigenvalue ``tr(F)/d`` (default: Martens and Grosse's pi-adjusted
      factored damping, relative to the product of the factors' scales),
      which makes the preconditioned update invariant to the scale of the
      inputs and of the loss; ``False``: absolute, as in K-FAC/KAISA
      (earlier releases' default, with ``damping=1e-3``).
    gamma: decay of the factor EMAs, in (0, 1).
    inv_freq: recompute the inverses at step 0 and every ``inv_freq`` steps.
    axis_name: data-parallel axis over which ``A`` and ``G`` are averaged.
    factor_dtype: storage dtype of the damped inverses (``None``: float32).
      The covariance EMAs are always kept in float32 and the inversion runs in
      float32: a bfloat16 covariance of inputs with a large mean loses its
      small eigenvalues and its Cholesky factor turns NaN. A non-finite
      inverse is never stored (the previous one is kept).
    max_factor_dim, shard_factors, exclude, layouts: as in
      :func:`mkor_optax.scale_by_mkor` (with partitioned params the covariances
      and inverses are split over the mesh, :mod:`mkor_optax.sharding`).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update(grads, state,
    params=None, *, stats)`` with ``stats`` of kind ``COVARIANCE``.

  Example:
    >>> opt = optax.chain(mkor_optax.scale_by_kfac(damping=1e-2), optax.sgd(1e-2))
    >>> state = opt.init(params)
    >>> kind = mkor_optax.COVARIANCE
    >>> loss, grads, stats = mkor_optax.value_and_grad(loss_fn, kind=kind)(params, x, y)
    >>> updates, state = opt.update(grads, state, params, stats=stats)
    >>> stats['layers_0']['A'].shape  # (d_in + 1) x (d_in + 1)
    (4, 4)
  """
  checks.validate(
      damping=(damping, lambda v: v > 0, 'must be > 0'),
      **checks.common_checks(gamma=gamma, inv_freq=inv_freq, max_factor_dim=max_factor_dim),
  )
  dtype = checks.resolve_dtype('factor_dtype', factor_dtype)
  rule = kfac_rule(damping=damping, relative_damping=relative_damping, gamma=gamma,
                   inv_freq=inv_freq, dtype=dtype)
  return kr.scale_by_kronecker(rule, KFACState, who='scale_by_kfac', kind='COVARIANCE',
                               axis_name=axis_name, max_factor_dim=max_factor_dim,
                               exclude=exclude, layouts=layouts, shard_factors=shard_factors,
                               guarded='the covariances and inverses are left as they were')


def kfac(
    learning_rate: optax.ScalarOrSchedule,
    *,
    weight_decay: float = 0.01,
    backend: Optional[optax.GradientTransformation] = None,
    damping: float = DAMPING,
    relative_damping: bool = True,
    gamma: float = 0.95,
    inv_freq: int = kr.INV_FREQ,
    axis_name: Optional[str] = None,
    factor_dtype: Any = None,
    max_factor_dim: int = kr.MAX_FACTOR_DIM,
    shard_factors: bool = True,
    exclude: kr.Exclude = None,
    layouts: Optional[dict] = None,
) -> optax.GradientTransformationExtraArgs:
  """K-FAC with a LAMB backend: ``optax.chain(scale_by_kfac(...), backend)``,
  as :func:`mkor_optax.mkor`. Works with ``optax.inject_hyperparams``.

  Args:
    learning_rate, weight_decay, backend: as in :func:`mkor_optax.mkor`.
    damping, relative_damping, gamma, inv_freq, axis_name: as in :func:`mkor_optax.scale_by_kfac`.
    factor_dtype, max_factor_dim, shard_factors, exclude: as in :func:`mkor_optax.scale_by_kfac`.
    layouts: as in :func:`mkor_optax.scale_by_kfac`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` takes ``stats=``
    of kind ``COVARIANCE``.

  Example:
    >>> opt = mkor_optax.kfac(1e-2)
    >>> state = opt.init(params)
    >>> grad_fn = mkor_optax.value_and_grad(loss_fn, kind=mkor_optax.COVARIANCE)
    >>> loss, grads, stats = grad_fn(params, x, y)
    >>> updates, state = opt.update(grads, state, params, stats=stats)
  """
  kw = dict(locals())
  for k in ('learning_rate', 'weight_decay', 'backend'):
    del kw[k]
  return kr.with_backend(scale_by_kfac(**kw), backend, learning_rate, weight_decay)
