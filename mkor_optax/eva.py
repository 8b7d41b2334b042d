"""Eva: Kronecker-vector preconditioning from the rank-1 statistics only.

Zhang, Li, Chu, Wang (2023), *Eva: A General Vectorized Approximation
Framework for Second-order Optimization*, ICLR 2023, arXiv:2308.02123
(SPEC section 3).

Per second-order layer, with the rank-1 ``a`` and ``g`` of
``mkor_optax.value_and_grad`` (the same statistics as MKOR), keep only their
EMAs (``a_0 = a``; ``a_t = gamma a_{t-1} + (1 - gamma) a``, likewise ``g``),
no matrices, and precondition every step with the closed-form inverse of
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

from mkor_optax import kronecker as kr
from mkor_optax import sharding
from mkor_optax.numerics import norm_ratio, safe_norm, unit_statistic


class EvaState(NamedTuple):
  """``count``; per layer path the EMAs ``a`` ``(S, d_in+1)`` and ``g`` ``(S, d_out)``."""

  count: jax.Array
  a: dict
  g: dict


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


def scale_by_eva(
    *,
    damping: float = 0.03,
    gamma: float = 0.95,
    axis_name: Optional[str] = None,
    max_factor_dim: int = 4096,
    exclude: kr.Exclude = None,
    layouts: Optional[dict] = None,
) -> optax.GradientTransformationExtraArgs:
  """Eva preconditioning of every captured Dense/DenseGeneral/Conv layer.

  Args:
    damping: ``lambda`` (> 0).
    gamma: decay of the EMAs of ``a`` and ``g``, in (0, 1).
    axis_name: data-parallel axis over which ``a`` and ``g`` are averaged.
    max_factor_dim, exclude, layouts: as in :func:`mkor_optax.scale_by_mkor`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update(grads, state,
    params=None, *, stats)`` with the rank-1 ``stats``.
  """
  kr.validate(
      damping=(damping, lambda v: v > 0, 'must be > 0'),
      **kr.common_checks(gamma=gamma, inv_freq=1, max_factor_dim=max_factor_dim),
  )
  excluded = kr.exclude_predicate(exclude)

  def init(params):
    plan = kr.plan_layers(params, layouts=layouts, excluded=excluded,
                          max_factor_dim=max_factor_dim, who='scale_by_eva')
    r_sizes, l_sizes = kr.side_sizes(plan)
    zeros = lambda sizes: {k: jnp.zeros((s, n), jnp.float32) for k, (n, s) in sizes.items()}
    return EvaState(jnp.zeros([], jnp.int32), zeros(r_sizes), zeros(l_sizes))

  def update(updates, state, params=None, *, stats=None, **extra_args):
    del params, extra_args
    plan = kr.plan_layers(updates, layouts=layouts, excluded=excluded,
                          max_factor_dim=max_factor_dim, sides=(state.a, state.g), who='scale_by_eva')
    prep = kr.prepare(updates, stats, plan, excluded, 'scale_by_eva', axis_name)
    first = state.count == 0
    kr.report_if(~prep.finite, 'scale_by_eva: non-finite gradients or statistics: '
                 'the statistics EMAs are left as they were')

    def ema(old, key):
      out = {}
      for k, v in old.items():
        if k not in prep.stats:
          out[k] = v
          continue
        stat = prep.stats[k][key]
        new = jnp.where(first, stat, gamma * v + (1 - gamma) * stat)
        out[k] = jnp.where(prep.finite & prep.present[k], new, v)
      return out

    a, g = ema(state.a, 'a'), ema(state.g, 'g')
    pre = {k: kronecker_vector_precondition(gm, a.get(k), g.get(k), damping)
           for k, (_, gm) in prep.grads.items()}
    out = {}
    if pre:  # one rescale of all preconditioned layers together, overflow-safe
      joint = lambda ms: jnp.stack([safe_norm(m) for m in ms])
      scale = norm_ratio(joint([gm for _, gm in prep.grads.values()]), joint(list(pre.values())))
      out = {k: u * scale for k, u in pre.items()}
    return kr.write_layers(prep, out), EvaState(kr.increment(state.count), a, g)

  return optax.GradientTransformationExtraArgs(init, update)


def eva(
    learning_rate: optax.ScalarOrSchedule,
    *,
    weight_decay: float = 0.01,
    backend: Optional[optax.GradientTransformation] = None,
    damping: float = 0.03,
    gamma: float = 0.95,
    axis_name: Optional[str] = None,
    max_factor_dim: int = 4096,
    exclude: kr.Exclude = None,
    layouts: Optional[dict] = None,
) -> optax.GradientTransformationExtraArgs:
  """Eva with a LAMB backend: ``optax.chain(scale_by_eva(...), backend)``.
  Works with ``optax.inject_hyperparams``."""
  from mkor_optax.mkor import default_backend
  return sharding.on_params_mesh(optax.chain(
      scale_by_eva(damping=damping, gamma=gamma, axis_name=axis_name,
                   max_factor_dim=max_factor_dim, exclude=exclude, layouts=layouts),
      backend or default_backend(learning_rate, weight_decay)))