"""K-FAC (KAISA-like) on the same capture: our own baseline for MKOR.

Martens & Grosse (2015), *Optimizing Neural Networks with Kronecker-factored
Approximate Curvature*, ICML, arXiv:1503.05671; Grosse & Martens (2016) for
convolutions; Pauloski et al. (2021), *KAISA*, SC'21, arXiv:2107.01739, for
the refresh-every-``inv_freq``-steps schedule MKOR is compared against
(SPEC section 3).

Per second-order layer, with ``A`` and ``G`` from
``mkor_optax.value_and_grad(loss_fn, kind=mkor_optax.COVARIANCE)``
(the full input and output-gradient second moments, bias row included)::

    A_t = gamma A_{t-1} + (1 - gamma) A          (A_0 = A; the same for G)
    every inv_freq steps (and at step 0):
        A^-1 <- (A_t + sqrt(damping) I)^-1,  G^-1 <- (G_t + sqrt(damping) I)^-1   (Cholesky)
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

from mkor_optax import kronecker as kr
from mkor_optax import sharding


class KFACState(NamedTuple):
  """``count``; per layer path, stacked ``(S, d, d)``: the factor EMAs
  ``a_cov``/``g_cov`` and their damped inverses ``a_inv``/``g_inv``."""

  count: jax.Array
  a_cov: dict
  g_cov: dict
  a_inv: dict
  g_inv: dict


def covariance_shapes(lp: kr.LayerPlan) -> dict:
  """The covariance statistics a planned layer needs (only its factored sides)."""
  d, out = lp.dims, {}
  if lp.has_r:
    out['A'] = d.stack + (d.d_in_aug, d.d_in_aug)
  if lp.has_l:
    out['G'] = d.stack + (d.d_out, d.d_out)
  return out


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


def scale_by_kfac(
    *,
    damping: float = 1e-3,
    relative_damping: bool = False,
    gamma: float = 0.95,
    inv_freq: int = 10,
    axis_name: Optional[str] = None,
    factor_dtype: Any = None,
    max_factor_dim: int = 4096,
    shard_factors: bool = True,
    exclude: kr.Exclude = None,
    layouts: Optional[dict] = None,
) -> optax.GradientTransformationExtraArgs:
  """K-FAC preconditioning of every captured Dense/DenseGeneral/Conv layer.

  Args:
    damping: Tikhonov damping ``mu`` (> 0, finite); each factor gets ``sqrt(mu)``.
    relative_damping: multiply each factor's ``sqrt(mu)`` by its mean
      eigenvalue ``tr(F)/d``, which makes the preconditioned update invariant
      to the scale of the inputs and of the loss (``False``: absolute, the
      default as in K-FAC/KAISA).
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
  """
  kr.validate(
      damping=(damping, lambda v: v > 0, 'must be > 0'),
      **kr.common_checks(gamma=gamma, inv_freq=inv_freq, max_factor_dim=max_factor_dim),
  )
  dtype = kr.resolve_dtype('factor_dtype', factor_dtype)
  excluded = kr.exclude_predicate(exclude)

  def init(params):
    plan = kr.plan_layers(params, layouts=layouts, excluded=excluded,
                          max_factor_dim=max_factor_dim, who='scale_by_kfac')
    r_sizes, l_sizes = kr.side_sizes(plan)
    mesh = sharding.partitioned_mesh(params) if shard_factors else None
    zeros = lambda sizes: sharding.place_factors(
        {k: jnp.zeros((s, n, n), jnp.float32) for k, (n, s) in sizes.items()}, mesh)
    eyes = lambda sizes: sharding.place_factors(
        {k: kr.identity_stack(n, s, dtype) for k, (n, s) in sizes.items()}, mesh)
    return sharding.place_state(KFACState(jnp.zeros([], jnp.int32), zeros(r_sizes), zeros(l_sizes),
                                          eyes(r_sizes), eyes(l_sizes)), params)

  def update(updates, state, params=None, *, stats=None, **extra_args):
    del params, extra_args
    plan = kr.plan_layers(updates, layouts=layouts, excluded=excluded,
                          max_factor_dim=max_factor_dim, sides=(state.a_cov, state.g_cov), who='scale_by_kfac')
    prep = kr.prepare(updates, stats, plan, excluded, 'scale_by_kfac', axis_name,
                      covariance_shapes, 'COVARIANCE')
    first = state.count == 0
    kr.report_if(~prep.finite, 'scale_by_kfac: non-finite gradients or statistics: '
                 'the covariances and inverses are left as they were')

    def ema(old, key):
      out = {}
      for k, f in old.items():
        if k not in prep.stats:
          out[k] = f
          continue
        stat = prep.stats[k][key].astype(jnp.float32)
        new = jnp.where(first, stat, gamma * f.astype(jnp.float32) + (1 - gamma) * stat)
        out[k] = jnp.where(prep.finite & prep.present[k], new, f).astype(f.dtype)
      return out

    a_cov, g_cov = ema(state.a_cov, 'A'), ema(state.g_cov, 'G')
    root = jnp.sqrt(jnp.asarray(damping, jnp.float32))

    def inverted(old):
      def inv(covs, olds):
        out = {}
        for k, f in covs.items():
          new = damped_inverse(f, root, relative_damping)
          out[k] = jnp.where(jnp.all(jnp.isfinite(new)), new, olds[k]).astype(dtype)
        return out
      return inv(a_cov, old[0]), inv(g_cov, old[1])

    do_refresh = jnp.logical_and(state.count % inv_freq == 0, prep.finite)
    a_inv, g_inv = jax.lax.cond(do_refresh, inverted, lambda old: old,
                                (state.a_inv, state.g_inv))
    out = {k: kr.rescale_to(kr.precondition(g, a_inv.get(k), g_inv.get(k)), g, prep.sq_norms[k])
           for k, (_, g) in prep.grads.items()}
    return kr.write_layers(prep, out), KFACState(kr.increment(state.count), a_cov, g_cov, a_inv,
                                                  g_inv)

  return optax.GradientTransformationExtraArgs(init, update)


def kfac(
    learning_rate: optax.ScalarOrSchedule,
    *,
    weight_decay: float = 0.01,
    backend: Optional[optax.GradientTransformation] = None,
    damping: float = 1e-3,
    relative_damping: bool = False,
    gamma: float = 0.95,
    inv_freq: int = 10,
    axis_name: Optional[str] = None,
    factor_dtype: Any = None,
    max_factor_dim: int = 4096,
    shard_factors: bool = True,
    exclude: kr.Exclude = None,
    layouts: Optional[dict] = None,
) -> optax.GradientTransformationExtraArgs:
  """K-FAC with a LAMB backend: ``optax.chain(scale_by_kfac(...), backend)``,
  as :func:`mkor_optax.mkor`. Works with ``optax.inject_hyperparams``."""
  from mkor_optax.mkor import default_backend
  return sharding.on_params_mesh(optax.chain(
      scale_by_kfac(damping=damping, relative_damping=relative_damping, gamma=gamma, inv_freq=inv_freq, axis_name=axis_name,
                    factor_dtype=factor_dtype, max_factor_dim=max_factor_dim,
                    shard_factors=shard_factors, exclude=exclude, layouts=layouts),
      backend or default_backend(learning_rate, weight_decay)))