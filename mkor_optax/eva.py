"""Eva: Kronecker-vector preconditioning from the rank-1 statistics only.

Zhang, Shi, Li (2023), *Eva: Practical Second-Order Optimization with
Kronecker-Vectorized Approximation*, ICLR 2023 (extended as arXiv:2308.02123).

Per second-order layer, with the rank-1 ``a`` and ``g`` (MKOR's batch
means, which ``mkor_optax.value_and_grad(loss_fn)``, the default capture,
returns next to its sketches, and ``kind=mkor_optax.RANK1`` alone; Eva
reads the means, never the sketches, whose EMA would average to zero),
keep only their EMAs (``a_0 = a``; ``a_t = gamma a_{t-1} + (1 - gamma) a``,
likewise ``g``), no matrices, and precondition every step with the closed-form inverse of
``a a^T (x) g g^T + lambda I`` (Sherman-Morrison on a rank-1 Kronecker term),
in this library's ``(d_in + 1, d_out)`` orientation::

    U = (G - (a^T G g) / (|a|^2 |g|^2 + lambda) * a g^T) / lambda

A side larger than ``max_factor_dim`` is the identity: ``a a^T (x) I`` gives
``U = (G - a (a^T G) / (|a|^2 + lambda)) / lambda`` (and symmetrically for
``g``). Then a global rescale: all preconditioned layers together are scaled
to the joint Frobenius norm of their raw gradients (in place of Eva's KL
clipping). Memory and communication: 2d numbers per layer.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from mkor_optax import checks, docstrings
from mkor_optax import kronecker as kr
from mkor_optax.mkor import mkor, scale_by_mkor  # (their Args: descriptions)
from mkor_optax.numerics import norm_ratio, safe_norm, unit_statistic


class EvaState(NamedTuple):
  """Eva's state.

  Attributes:
    count: ``()`` int32, updates done.
    input_side: layer path -> ``(S, d_in + 1)`` float32, the EMA of ``a``.
    output_side: layer path -> ``(S, d_out)`` float32, the EMA of ``g``.

  Example:
    >>> state = mkor_optax.scale_by_eva().init(params)
    >>> state._fields
    ('count', 'input_side', 'output_side')
  """

  count: jax.Array
  input_side: dict
  output_side: dict
  KIND = 'RANK1'


def kronecker_vector_precondition(grad, a, g, damping):
  """``(a a^T (x) g g^T + damping I)^-1 vec(grad)`` for ``grad`` ``(S, d_in, d_out)``;
  ``a`` or ``g`` ``None`` means that side's factor is the identity.

  Written in the unit vectors ``a_hat = a/|a|``, ``g_hat = g/|g|``
  (overflow-safe for statistics of any finite scale)::

      (a^T G g) / (|a|^2 |g|^2 + lambda) a g^T
          = (a_hat^T G g_hat) / (1 + lambda / (|a|^2 |g|^2)) a_hat g_hat^T
  """
  if a is not None:
    a, inv_a = unit_statistic(a)
  if g is not None:
    g, inv_g = unit_statistic(g)
  if a is not None and g is not None:
    coef = jnp.einsum('si,sij,sj->s', a, grad, g) / (1.0 + damping * inv_a * inv_g)
    return (grad - coef[:, None, None] * a[:, :, None] * g[:, None, :]) / damping
  if a is not None:
    at_g = jnp.einsum('si,sij->sj', a, grad) / (1.0 + damping * inv_a)[:, None]
    return (grad - a[:, :, None] * at_g[:, None, :]) / damping
  g_g = jnp.einsum('sij,sj->si', grad, g) / (1.0 + damping * inv_g)[:, None]
  return (grad - g_g[:, :, None] * g[:, None, :]) / damping


def eva_rule(*, damping, gamma) -> kr.FactorRule:
  """Eva's :class:`~mkor_optax.kronecker.FactorRule`: EMAs of ``a`` and ``g``,
  the Kronecker-vector inverse, one joint rescale of all layers."""

  def init_side(width, n_stack):
    return jnp.zeros((n_stack, width), jnp.float32)

  def precondition(sides, prep):
    a, g = sides
    pre = {k: kronecker_vector_precondition(m, a.get(k), g.get(k), damping)
           for k, (_, m) in prep.grads.items()}
    if not pre:
      return {}
    # one rescale of all preconditioned layers together, overflow-safe
    joint = lambda ms: jnp.stack([safe_norm(m) for m in ms])
    scale = norm_ratio(joint([m for _, m in prep.grads.values()]), joint(list(pre.values())))
    return {k: u * scale for k, u in pre.items()}

  return kr.FactorRule(init_side, lambda sides, prep: kr.ema_sides(sides, prep, gamma), precondition)


@docstrings.filled(scale_by_mkor)
def scale_by_eva(
    *,
    damping: float = 0.03,
    gamma: float = 0.95,
    axis_name: Optional[str] = None,
    max_factor_dim: int = kr.MAX_FACTOR_DIM,
    exclude: kr.Exclude = None,
    layouts: Optional[dict] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Eva: Kronecker-vector preconditioning from vector statistics only.

  Eva (Zhang, Shi and Li, 2023) keeps, per captured layer, only the EMAs
  of MKOR's two vector statistics, no matrices, and preconditions with the
  damped inverse of their rank-1 Kronecker product, which has a closed
  form: memory and communication are :math:`2d` numbers per layer, and
  nothing is refreshed or inverted. Other parameters pass through unchanged.

  For a layer :math:`y = x W + b`, with :math:`\bar G = [G; g_b]` its kernel
  and bias gradients stacked (:math:`(d_{in}+1) \times d_{out}`), the mean
  input :math:`a` (a 1 appended) and the mean output gradient :math:`g`, every
  step updates their EMAs (starting at the first statistics) and applies
  :math:`(\tilde a \tilde a^\top \otimes \tilde g \tilde g^\top + \lambda I)^{-1}`
  to :math:`\operatorname{vec}(\bar G)` by Sherman-Morrison:

  .. math::

     \tilde a_t &= \gamma\, \tilde a_{t-1} + (1-\gamma)\, a, \qquad
     \tilde g_t = \gamma\, \tilde g_{t-1} + (1-\gamma)\, g, \\
     U &= \frac{1}{\lambda} \Big( \bar G - \frac{\tilde a_t^\top \bar G\, \tilde g_t}
          {\|\tilde a_t\|^2 \|\tilde g_t\|^2 + \lambda}\, \tilde a_t \tilde g_t^\top \Big).

  A side wider than ``max_factor_dim`` is the identity (an identity output
  side, :math:`\tilde a \tilde a^\top \otimes I`, gives
  :math:`U = (\bar G - \tilde a \tilde a^\top \bar G / (\|\tilde a\|^2 + \lambda)) / \lambda`).
  Then all preconditioned layers together are rescaled to the joint
  Frobenius norm of their raw gradients, in place of Eva's KL clipping:
  :math:`U_l \leftarrow U_l\, \|(\bar G_1, \dots, \bar G_L)\|_F / \|(U_1, \dots, U_L)\|_F`.

  Args:
    damping: the damping :math:`\lambda` (> 0).
    gamma: decay :math:`\gamma` of the EMAs of :math:`a` and :math:`g`, in (0, 1).
    axis_name: data-parallel axis (``pmap``/``shard_map``) over which
      :math:`a` and :math:`g` are averaged before the EMAs. Gradients are
      the caller's to average, as with any optax transform.
    {scale_by_mkor: max_factor_dim, exclude, layouts}

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update(grads, state,
    params=None, *, stats)`` with the ``stats`` of
    ``mkor_optax.value_and_grad(loss_fn)`` (the default capture, whose batch
    means Eva reads) or of ``value_and_grad(..., kind=mkor_optax.RANK1)``
    (the means alone, cheaper where nothing else reads the sketches).

  Example:
    >>> opt = optax.chain(mkor_optax.scale_by_eva(damping=0.1), optax.sgd(1e-2))
    >>> state = opt.init(params)
    >>> grad_fn = mkor_optax.value_and_grad(loss_fn, kind=mkor_optax.RANK1)
    >>> loss, grads, stats = grad_fn(params, x, y)
    >>> updates, state = opt.update(grads, state, params, stats=stats)
    >>> bool(jnp.isfinite(updates['layers_0']['kernel']).all())
    True

  References:
    {EVA_REFERENCE}

  See Also:
    :func:`eva` (this transform chained into LAMB), :func:`scale_by_mkor`
    (the same statistics, accumulated into factor inverses),
    :func:`scale_by_kfac`.
  """
  checks.validate(
      damping=(damping, lambda v: v > 0, 'must be > 0'),
      **checks.common_checks(gamma=gamma, inv_freq=1, max_factor_dim=max_factor_dim),
  )
  return kr.scale_by_kronecker(eva_rule(damping=damping, gamma=gamma), EvaState,
                               who='scale_by_eva', kind='RANK1', axis_name=axis_name,
                               max_factor_dim=max_factor_dim, exclude=exclude, layouts=layouts,
                               guarded='the statistics EMAs are left as they were')


@docstrings.filled(mkor, scale_by_eva)
def eva(
    learning_rate: optax.ScalarOrSchedule,
    *,
    weight_decay: float = 0.01,
    backend: Optional[optax.GradientTransformation] = None,
    damping: float = 0.03,
    gamma: float = 0.95,
    axis_name: Optional[str] = None,
    max_factor_dim: int = kr.MAX_FACTOR_DIM,
    exclude: kr.Exclude = None,
    layouts: Optional[dict] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Eva with a LAMB backend: ``optax.chain(scale_by_eva(...), backend)``.

  The Eva preconditioner (:func:`scale_by_eva`, where its statistics and
  the global rescale are written out) turns each captured layer's gradient
  :math:`\bar G` into

  .. math::

     U_t \propto \frac{1}{\lambda} \Big( \bar G_t - \frac{\tilde a_t^\top \bar G_t\, \tilde g_t}
          {\|\tilde a_t\|^2 \|\tilde g_t\|^2 + \lambda}\, \tilde a_t \tilde g_t^\top \Big),

  :math:`\tilde a_t` and :math:`\tilde g_t` the EMAs of the layer's mean input
  and mean output gradient, all layers scaled together to their raw
  gradients' joint norm.

  {LAMB}

  Works with ``optax.inject_hyperparams``.

  Args:
    {mkor: learning_rate, weight_decay, backend}
    {scale_by_eva}

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` takes the
    ``stats=`` of the default capture (or of ``kind=mkor_optax.RANK1``).

  Example:
    >>> opt = mkor_optax.eva(1e-2)
    >>> state = opt.init(params)
    >>> grad_fn = mkor_optax.value_and_grad(loss_fn)  # its means serve Eva
    >>> loss, grads, stats = grad_fn(params, x, y)
    >>> updates, state = opt.update(grads, state, params, stats=stats)
    >>> bool(loss_fn(optax.apply_updates(params, updates), x, y) < loss)
    True

  References:
    {EVA_REFERENCE}

    {LAMB_REFERENCE}

  See Also:
    :func:`scale_by_eva` (the preconditioner alone), :func:`mkor`,
    :func:`kfac`, :func:`sonew`.
  """
  return kr.with_backend(
      scale_by_eva(damping=damping, gamma=gamma, axis_name=axis_name,
                   max_factor_dim=max_factor_dim, exclude=exclude, layouts=layouts),
      backend, learning_rate, weight_decay)
