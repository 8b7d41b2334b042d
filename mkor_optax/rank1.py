r"""The rank-1 refresh of a dense factor inverse (Sherman-Morrison), MKOR's core.

A factor ``F`` of a layer side is an exponential moving average of rank-1
statistics ``v v^T`` (``v = a``, the mean layer input with a 1 for the bias,
on the input side; ``v = g``, the mean output gradient, on the output side).
Its inverse ``P = F^-1`` is kept and refreshed directly in ``O(d^2)``:

1. stabiliser: if ``max|P| > epsilon``, ``P <- zeta P + (1 - zeta) I``;
2. ``refresh='ema'``, the exact inverse of ``F_t = gamma F_{t-1} + (1 - gamma) v v^T``:

   .. math::

      F_t^{-1} = \frac{P}{\gamma} - \frac{(1-\gamma)/\gamma^2}{1 + ((1-\gamma)/\gamma)\, v^T P v}
                 (P v)(P v)^T

   (the MKOR paper, Mozaffari et al. 2023, prints ``gamma P``, a plus sign
   and ``gamma (1 - gamma)`` here, which is not the inverse);
   ``refresh='blend'``, the authors' code: ``P <- gamma P + (1-gamma) I``,
   then ``P <- P - (P v)(P v)^T / (1 + v^T P v)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.scipy.linalg  # noqa: F401  (solve_triangular)

from mkor_optax import checks
from mkor_optax.numerics import MIN_EIGENVALUE, blend_first, rank1_coefficients, unit_statistic

REFRESH_RULES = ('ema', 'blend')


def _stabilised(p, v, *, gamma, zeta, epsilon, refresh, scale=None):
  """What both refresh forms start from: ``(p``'s dtype, ``p`` in the compute
  dtype (at least float32), ``P = scale p`` as the rule sees it, the unit
  statistic(s) and ``1/|v|^2``, ``max|P|`` and the stabiliser's (and
  ``blend``'s) ``P' = alpha P + beta I``). ``max|P|`` is ``scale max|p|``
  exactly (rounding is monotonic and ``scale >= 0``), so ``P`` is read
  once for it."""
  if isinstance(refresh, str) and refresh not in REFRESH_RULES:
    raise ValueError(f'refresh: must be one of {REFRESH_RULES}, got {refresh!r}')
  dtype = p.dtype
  compute = jnp.promote_types(dtype, jnp.float32)
  p = p.astype(compute)
  unit, inv_sq = unit_statistic(v.astype(compute))
  top = jnp.max(jnp.abs(p), axis=(-2, -1))
  p_now = p
  if scale is not None:
    scale = scale.astype(compute)
    p_now, top = p * scale[..., None, None], top * scale
  big = top > epsilon
  alpha = jnp.where(big, zeta, 1.0).astype(compute)
  beta = jnp.where(big, 1.0 - zeta, 0.0).astype(compute)
  alpha, beta = blend_first(alpha, beta, gamma, refresh)
  return dtype, p, p_now, unit, inv_sq, top, alpha, beta


def identity_like(p, widths=None):
  """``I`` in ``p``'s compute dtype, ``(d, d)``; with ``widths`` ``(S,)``,
  one ``(S, d, d)`` identity per stack entry on its first ``widths[s]``
  coordinates and zero beyond them (a side zero-padded to ``d``: its padded
  block stays exactly zero through every refresh)."""
  eye = jnp.eye(p.shape[-1], dtype=p.dtype)
  if widths is None:
    return eye
  inside = jnp.arange(p.shape[-1]) < jnp.asarray(widths)[:, None]  # (S, d)
  return eye * inside[:, :, None].astype(p.dtype)


# A result whose entries are bounded by this fraction of its dtype's largest
# number is finite however its products round: the bound sums a few terms.
FINITE_FRACTION = 0.25


def _bounded_or_kept(new, p, p_now, dtype, bad, bound, keep):
  """The refresh's one write: ``new`` where its entry bound ``bound`` ``(S,)``
  proves it finite, else ``p_now`` (the inverse the rule started from, kept),
  and ``p`` itself where ``keep``; and the reset flags (``False`` where
  kept). The bound stands in for a finiteness test of every entry of
  ``new``, which would read the ``(S, d, d)`` result once more and make it
  a separate kernel; with it, the result is written in one pass."""
  ok = bound < FINITE_FRACTION * float(jnp.finfo(new.dtype).max)  # False where it is not finite
  if keep is None:
    keep = jnp.zeros_like(ok)
  out = jnp.where((ok & ~keep)[..., None, None], new, jnp.where(keep[..., None, None], p, p_now))
  return out.astype(dtype), (bad | ~ok) & ~keep


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
  before the rank-1 term, and a result that a bound on its entries does not
  keep within its dtype's range (so possibly not finite) keeps ``p``:
  see :func:`refresh_inverse_checked`, which also says which entries were reset.
  """
  return refresh_inverse_checked(p, v, gamma=gamma, zeta=zeta, epsilon=epsilon,
                                 refresh=refresh)[0]


def refresh_inverse_checked(p, v, *, gamma, zeta, epsilon, refresh: str = 'ema', widths=None,
                            scale=None, keep=None):
  """:func:`refresh_inverse` and a boolean per stack entry: ``True`` where
  the factor was found indefinite or non-finite and reset. ``widths``
  ``(S,)``: each entry is a side of that width zero-padded to ``d`` (``p``
  zero and ``v`` zero beyond it), whose identity is its own
  (:func:`identity_like`). ``scale`` ``(S,)``, at least 0: the rule
  refreshes ``scale * p`` (formed in the same pass). ``keep`` ``(S,)``:
  entries returned as ``p`` is, unrefreshed (reset flag ``False``)."""
  dtype, p, p_now, unit, inv_sq, top, alpha, beta = _stabilised(
      p, v, gamma=gamma, zeta=zeta, epsilon=epsilon, refresh=refresh, scale=scale)
  pv = jnp.einsum('...ij,...j->...i', p_now, unit)
  u = alpha[..., None] * pv + beta[..., None] * unit
  vu = jnp.sum(unit * u, axis=-1)
  moved = jnp.any(unit != 0, axis=-1)
  bad = (moved & ~(vu > 0)) | ~jnp.isfinite(vu)
  # reset to I: P' = I, u = v_hat, v_hat^T u = 1
  alpha, beta = jnp.where(bad, 0.0, alpha), jnp.where(bad, 1.0, beta)
  u = jnp.where(bad[..., None], unit, u)
  vu = jnp.where(bad, jnp.sum(unit * unit, axis=-1), vu)
  bound_p = jnp.where(bad, 1.0, alpha * top + beta)  # bounds the entries of P'
  kappa, lam = rank1_coefficients(vu, inv_sq, gamma, refresh, bound_p)
  eye = identity_like(p, widths)
  base = jnp.where(bad[..., None, None], 0.0, alpha[..., None, None] * p_now)
  new = (kappa[..., None, None] * (base + beta[..., None, None] * eye)
         - lam[..., None, None] * (u[..., :, None] * u[..., None, :]))
  # |new_ij| <= |kappa| (|alpha| max|P| + |beta|) + |lam| max|u|^2
  bound = (jnp.abs(kappa) * (jnp.where(bad, 0.0, jnp.abs(alpha) * top) + jnp.abs(beta))
           + jnp.abs(lam) * jnp.max(jnp.square(u), axis=-1))
  return _bounded_or_kept(new, p, p_now, dtype, bad, bound, keep)




def refresh_inverse_rank_k_checked(p, v, *, gamma, zeta, epsilon, refresh: str = 'ema',
                                   widths=None, scale=None, keep=None):
  r"""The refresh from ``k`` statistics at once, ``v`` ``(..., k, d)``, and a
  reset flag per stack entry: the stabiliser, then the Woodbury identity for

  .. math::

     F_+ = \kappa^{-1} \Big(F' + c \sum_j v_j v_j^T\Big), \qquad
     P_+ = \kappa \big(P' - U (W^{-1} + V P' V^T)^{-1} U^T\big), \quad U = P' V^T,

  with ``W = diag(c |v_j|^2)`` (the rows of ``V`` are the unit statistics),
  ``ema``: ``kappa = 1/gamma``, ``c = (1 - gamma) / (gamma k)``, so
  ``F_+ = gamma F' + (1 - gamma)/k sum_j v_j v_j^T``; ``blend``: ``kappa = 1``,
  ``c = 1/k`` after the blend toward ``I``. This is what ``k`` rank-1 steps
  of :func:`refresh_inverse_checked` compute (the first with ``v_1 / sqrt(k)``,
  then additive steps), in one pass over ``P`` for ``P' V^T``, a ``k x k``
  Cholesky solve and one fused write, where the sequential form reads and
  writes ``P`` ``k`` times inside a loop. The same safety rules: each term's
  weight is capped as :func:`~mkor_optax.numerics.rank1_coefficients` caps
  it (relative to a bound on ``P'``'s entries), a ``P'`` that is not positive
  definite along a statistic (``v_j^T P' v_j <= 0``) or not finite is reset
  to ``I`` first, and a result not bounded within its dtype's range keeps ``p``. The result is
  symmetric whenever ``P`` is: the correction ``Y^T Y`` sums the same ``k``
  products for entry ``(i, j)`` as for ``(j, i)`` (exactly, in the order a
  matrix product of inner size ``k`` takes; the tests check it).
  ``widths``, ``scale``, ``keep``: as in :func:`refresh_inverse_checked`.
  """
  dtype, p, p_now, unit, inv_sq, top, alpha, beta = _stabilised(
      p, v, gamma=gamma, zeta=zeta, epsilon=epsilon, refresh=refresh, scale=scale)
  compute = p.dtype
  k = v.shape[-2]  # unit (..., k, d), inv_sq (..., k)
  unit_t = jnp.swapaxes(unit, -1, -2)  # (..., d, k)
  u = alpha[..., None, None] * (p_now @ unit_t) + beta[..., None, None] * unit_t  # P' V^T
  gram = unit @ u  # V P' V^T, (..., k, k)
  diag = jnp.diagonal(gram, axis1=-2, axis2=-1)
  moved = jnp.any(unit != 0, axis=-1)
  bad = jnp.any(moved & ~(diag > 0), axis=-1) | ~jnp.all(jnp.isfinite(gram), axis=(-2, -1))
  # reset to I: P' = I, U = V^T, V P' V^T = V V^T
  alpha, beta = jnp.where(bad, 0.0, alpha), jnp.where(bad, 1.0, beta)
  u = jnp.where(bad[..., None, None], unit_t, u)
  gram = jnp.where(bad[..., None, None], unit @ unit_t, gram)
  bound_p = jnp.maximum(jnp.where(bad, 1.0, alpha * top + beta), 0.0)  # bounds the entries of P'
  if refresh == 'ema':
    kappa, c = 1.0 / gamma, (1.0 - gamma) / (gamma * k)
  else:
    kappa, c = 1.0, 1.0 / k
  # 1 / (c |v_j|^2), floored as rank1_coefficients floors one term
  inv_w = jnp.maximum(inv_sq / c, MIN_EIGENVALUE * bound_p[..., None])
  m = gram + inv_w[..., :, None] * jnp.eye(k, dtype=compute)
  chol = jnp.linalg.cholesky(0.5 * (m + jnp.swapaxes(m, -1, -2)))
  # Y = L^-1 U^T as (L^-1) U^T: a triangular solve of k columns, then a
  # matrix product; a solve of U^T's d columns costs about a LAMB step more
  # on the autoencoder's stack at k = 8 and 16 (XLA's loop over them)
  eye_k = jnp.broadcast_to(jnp.eye(k, dtype=compute), chol.shape)
  y = jax.scipy.linalg.solve_triangular(chol, eye_k, lower=True) @ jnp.swapaxes(u, -1, -2)
  # U M^-1 U^T = Y^T Y: entry (i, j) sums the same k products in the same
  # order as (j, i), so it is symmetric without a re-symmetrising pass over
  # P (a transposed read that cost more than the rest of the refresh)
  term = jnp.swapaxes(y, -1, -2) @ y
  eye = identity_like(p, widths)
  base = jnp.where(bad[..., None, None], 0.0, alpha[..., None, None] * p_now)
  new = kappa * (base + beta[..., None, None] * eye - term)
  # |new_ij| <= kappa (|alpha| max|P| + |beta| + |y_i| |y_j|) (Cauchy-Schwarz)
  bound = kappa * (jnp.where(bad, 0.0, jnp.abs(alpha) * top) + jnp.abs(beta)
                   + jnp.max(jnp.sum(jnp.square(y), axis=-2), axis=-1))
  return _bounded_or_kept(new, p, p_now, dtype, bad, bound, keep)


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
  if refresh == 'ema' and checks.is_concrete(gamma) and checks.is_concrete(zeta) and not zeta < gamma:
    raise ValueError(
        f'zeta: must be < gamma with refresh=\'ema\' (got zeta={zeta!r}, gamma={gamma!r}): '
        f'directions the statistics never visit grow by 1/gamma per refresh and the stabiliser '
        f'shrinks them by zeta, so with zeta >= gamma the factor inverse grows without bound '
        f'(exponentially for zeta > gamma) until it overflows. Lower zeta (e.g. zeta={0.9 * gamma:.3g}).')


