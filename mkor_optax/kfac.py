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

from mkor_optax import checks, docstrings
from mkor_optax import kronecker as kr
from mkor_optax.mkor import mkor, scale_by_mkor  # (their Args: descriptions)
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
    input_side: layer path -> a ``CovarianceFactor`` of ``A`` (``d_in + 1``
      square): ``cov`` ``(S, d, d)`` float32, the EMA of the covariance, and
      ``inv`` ``(S, d, d)`` (``factor_dtype``), its damped inverse at the last refresh.
    output_side: layer path -> a ``CovarianceFactor`` of ``G`` (``d_out`` square).

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


@docstrings.filled(scale_by_mkor)
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
  r"""K-FAC preconditioning (KAISA-like): full Kronecker factors, inverted.

  K-FAC (Martens and Grosse, 2015) approximates each layer's block of the
  Fisher matrix by the Kronecker product of two covariances, of the layer's
  inputs and of its output gradients, and preconditions the layer's gradient
  with their damped inverses, recomputed every ``inv_freq`` steps as KAISA
  (Pauloski et al., 2021) schedules them. It runs on the same capture as MKOR,
  whose rank-1 refreshes it is the baseline for: the two differ only in their
  curvature (the update is rescaled like MKOR's, instead of KAISA's KL
  clipping). Other parameters pass through unchanged.

  For a layer :math:`y = x W + b`, with :math:`\bar G = [G; g_b]` its kernel
  and bias gradients stacked, :func:`value_and_grad` (kind
  :data:`COVARIANCE`) gives, over the :math:`R` rows of a batch, the input
  covariance :math:`A` (``'A'``, a 1 appended to each input row
  :math:`x`) and the output-gradient covariance :math:`\Gamma` (``'G'``,
  :math:`h` the per-example gradient of the loss with respect to the
  layer's output row); convolutions use their im2col patches (Grosse and
  Martens, 2016). Every step the factors' EMAs are updated (starting at the
  first statistics), at step 0 and every ``inv_freq`` steps they are
  inverted with the damping :math:`\mu` split between them (by Cholesky, in
  float32), and every step the gradient is preconditioned:

  .. math::

     A &= \frac{1}{R} \sum_{\text{rows}} \bar x \bar x^\top, \qquad
     \Gamma = \frac{1}{R} \sum_{\text{rows}} h h^\top, \\
     A_t &= \gamma A_{t-1} + (1-\gamma) A, \qquad
     \Gamma_t = \gamma \Gamma_{t-1} + (1-\gamma)\, \Gamma, \\
     \tilde A^{-1} &= \big(A_t + \sqrt{\mu}\, n_A I\big)^{-1}, \qquad
     \tilde \Gamma^{-1} = \big(\Gamma_t + \sqrt{\mu}\, n_\Gamma I\big)^{-1}, \\
     U &= \tilde A^{-1} \bar G\, \tilde \Gamma^{-1}, \qquad
     U \leftarrow U\, \frac{\|\bar G\|_F}{\|U\|_F}.

  With the relative damping (default), each factor's :math:`\sqrt{\mu}` is
  scaled by its mean eigenvalue :math:`n_F = \operatorname{tr}(F_t) / d_F`
  (:math:`F` = :math:`A` or :math:`\Gamma`, of width :math:`d_F`): for the normalised factors
  :math:`F / n_F` that is the same :math:`\sqrt{\mu}` on both sides, Martens
  and Grosse's pi-adjusted factored damping (section 6.3), and the update
  does not depend on the scale of the inputs or of the loss;
  ``relative_damping=False`` sets :math:`n_F = 1`. Cost per refresh
  :math:`O(d^3)`, memory :math:`4 d^2` per layer (factors and inverses);
  with ``axis_name`` the factors' :math:`d^2` entries are averaged across
  devices (MKOR's statistics are vectors).

  Args:
    damping: the Tikhonov damping :math:`\mu` (> 0, finite), split between
      the factors: each gets :math:`\sqrt{\mu}`, times its mean eigenvalue
      with ``relative_damping``.
    relative_damping: multiply each factor's :math:`\sqrt{\mu}` by its mean
      eigenvalue :math:`\operatorname{tr}(F)/d` (default: the pi-adjusted
      factored damping, relative to the product of the factors' scales),
      which makes the preconditioned update invariant to the scale of the
      inputs and of the loss; ``False``: absolute, as in K-FAC/KAISA
      (earlier releases' default, with ``damping=1e-3``).
    gamma: decay :math:`\gamma` of the factor EMAs, in (0, 1).
    inv_freq: recompute the inverses at step 0 and every ``inv_freq`` steps.
    axis_name: data-parallel axis (``pmap``/``shard_map``) over which
      :math:`A` and :math:`\Gamma` are averaged before the EMAs.
      Gradients are the caller's to average, as with any optax transform.
    factor_dtype: storage dtype of the damped inverses (``None``: float32).
      The covariance EMAs are always kept in float32 and the inversion runs in
      float32: a bfloat16 covariance of inputs with a large mean loses its
      small eigenvalues and its Cholesky factor turns NaN. A non-finite
      inverse is never stored (the previous one is kept).
    {scale_by_mkor: max_factor_dim, shard_factors, exclude, layouts}

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update(grads, state,
    params=None, *, stats)`` with ``stats`` of kind :data:`COVARIANCE`; its
    state is a :class:`KFACState`.

  Example:
    >>> opt = optax.chain(mkor_optax.scale_by_kfac(damping=1e-2), optax.sgd(1e-2))
    >>> state = opt.init(params)
    >>> kind = mkor_optax.COVARIANCE
    >>> loss, grads, stats = mkor_optax.value_and_grad(loss_fn, kind=kind)(params, x, y)
    >>> updates, state = opt.update(grads, state, params, stats=stats)
    >>> stats['layers_0']['A'].shape  # (d_in + 1) x (d_in + 1)
    (4, 4)

  References:
    {KFAC_REFERENCE}

    R. Grosse, J. Martens, `A Kronecker-factored approximate Fisher matrix
    for convolution layers <https://arxiv.org/abs/1602.01407>`_, ICML 2016.

    J. G. Pauloski et al., `KAISA: An Adaptive Second-Order Optimizer
    Framework for Deep Neural Networks <https://arxiv.org/abs/2107.01739>`_,
    SC 2021.

  See Also:
    :func:`kfac` (this transform chained into LAMB), :func:`scale_by_mkor`
    (the same factors from vector statistics, refreshed by rank-1 updates),
    :func:`scale_by_quadratic_step` (kfac-jax's adaptive step, to follow it),
    :class:`Covariance` (the statistics).
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


@docstrings.filled(mkor, scale_by_kfac)
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
  r"""K-FAC with a LAMB backend: ``optax.chain(scale_by_kfac(...), backend)``.

  The K-FAC preconditioner (:func:`scale_by_kfac`, where its factors and
  their damping are written out) turns each captured layer's gradient
  :math:`\bar G` into

  .. math::

     U_t = \tilde A^{-1} \bar G_t\, \tilde\Gamma^{-1}\,
           \|\bar G_t\|_F / \|\tilde A^{-1} \bar G_t\, \tilde\Gamma^{-1}\|_F,

  :math:`\tilde A^{-1}` and :math:`\tilde\Gamma^{-1}` the damped inverses of
  the input and output-gradient covariances at their last refresh.

  {LAMB}

  Works with ``optax.inject_hyperparams``.

  Args:
    {mkor: learning_rate, weight_decay, backend}
    {scale_by_kfac}

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` takes ``stats=``
    of kind :data:`COVARIANCE`. Its state is the chain's: ``(KFACState, the
    backend's state)``.

  Example:
    >>> opt = mkor_optax.kfac(1e-2)
    >>> state = opt.init(params)
    >>> grad_fn = mkor_optax.value_and_grad(loss_fn, kind=mkor_optax.COVARIANCE)
    >>> loss, grads, stats = grad_fn(params, x, y)
    >>> updates, state = opt.update(grads, state, params, stats=stats)
    >>> bool(loss_fn(optax.apply_updates(params, updates), x, y) < loss)
    True

  References:
    {KFAC_REFERENCE}

    {LAMB_REFERENCE}

  See Also:
    :func:`scale_by_kfac` (the preconditioner alone), :func:`mkor` (the same
    factors from vector statistics), :func:`eva`, :func:`sonew`.
  """
  kw = dict(locals())
  for k in ('learning_rate', 'weight_decay', 'backend'):
    del kw[k]
  return kr.with_backend(scale_by_kfac(**kw), backend, learning_rate, weight_decay)
