"""An adaptive step: learning rate and momentum from a local quadratic model.

Martens & Grosse (2015), *Optimizing Neural Networks with Kronecker-factored
Approximate Curvature*, ICML, arXiv:1503.05671, sections 6.4-7 (the step that
kfac-jax takes). Given the incoming direction ``u`` (a preconditioned
gradient, from :func:`mkor_optax.scale_by_mkor` or any transform), the
proposal ``D = -u`` and the previous update ``d0``, the update is
``d = alpha D + mu d0`` with ``(alpha, mu)`` minimising the damped quadratic
model of the loss around the current parameters::

    M(d) = L + g^T d + 1/2 d^T (C + lambda I) d

where ``g`` is the raw gradient and ``C`` the Gauss-Newton matrix
``J^T H J`` (``J`` the Jacobian of the model outputs, ``H`` the Hessian of
the loss in the outputs, positive semi-definite for the usual convex losses).
That is the 2 x 2 system::

    [D'(C+lI)D   D'(C+lI)d0] [alpha]     [g'D ]
    [d0'(C+lI)D d0'(C+lI)d0] [mu   ] = - [g'd0]

(1 x 1 with ``mu = 0`` on the first step). ``C`` enters only through ``J D``
and ``J d0``: two Jacobian-vector products a step, no matrix.

Damping ``lambda`` follows Levenberg-Marquardt: every ``adapt_every`` steps
the reduction ratio ``rho = (L(theta + d) - L(theta)) / (M(d) - M(0))`` is
computed (one more loss evaluation); ``rho > 3/4`` multiplies ``lambda`` by
``omega = decay ** adapt_every``, ``rho < 1/4`` divides it by ``omega``.

The update is the whole step (no learning rate follows). Extra arguments of
``update``: ``grad`` (the raw gradient), ``curvature`` (from
:func:`gauss_newton`), and, for the damping adaptation, ``value`` (the loss)
and ``value_fn`` (the loss as a function of the parameters, on the same batch).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from mkor_optax import checks, docstrings
from mkor_optax.numerics import all_finite, fold_into_first, report_if


class QuadraticStepState(NamedTuple):
  """The adaptive step's state.

  Attributes:
    count: ``()`` int32, updates done.
    damping: ``()`` float32, the current damping ``lambda``.
    previous: the last update (float32, shaped like the parameters).
    alpha: ``()`` float32, the last step's scale of the proposal.
    mu: ``()`` float32, the last step's scale of the previous update.
    rho: ``()`` float32, the last measured reduction ratio (NaN when not measured).

  Example:
    >>> state = mkor_optax.scale_by_quadratic_step().init(params)
    >>> float(state.damping) > 0
    True
  """

  count: jax.Array
  damping: jax.Array
  previous: optax.Updates
  alpha: jax.Array
  mu: jax.Array
  rho: jax.Array


def _dot(a, b):
  return sum(jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@docstrings.filled()
def gauss_newton(outputs_fn: Callable, loss_of_outputs: Callable) -> Callable:
  r"""The Gauss-Newton Gram matrix of a loss ``loss_of_outputs(outputs_fn(params))``.

  The curvature that :func:`scale_by_quadratic_step` fits its step to, as
  the Gram matrix of a few directions :math:`v_i` in the Gauss-Newton
  matrix :math:`C = J^\top H J` (:math:`J` the Jacobian of the outputs in the
  parameters, :math:`H` the Hessian of the loss in the outputs):

  .. math::  \text{gram}_{ij} = v_i^\top J^\top H J\, v_j = (J v_i)^\top H\, (J v_j),

  with no matrix formed: one Jacobian-vector product of the model and one
  Hessian-vector product of the loss per direction.

  Args:
    outputs_fn: ``params -> outputs`` (the model on this step's batch).
    loss_of_outputs: ``outputs -> scalar loss`` (convex in the outputs for a
      positive semi-definite ``C``: mean squared error, softmax or sigmoid
      cross-entropy).

  Returns:
    ``gram(params, vectors) -> (k, k)``: ``v_i^T J^T H J v_j`` for a list of
    ``k`` parameter-shaped ``vectors``, from ``k`` Jacobian-vector products of
    the model (one forward pass, the ``k`` tangents batched) and ``k``
    Hessian-vector products of the loss in its outputs.

  Example:
    >>> gram = mkor_optax.gauss_newton(lambda p: model.apply({'params': p}, x),
    ...                                lambda out: jnp.mean((out - y) ** 2))
    >>> g = jax.grad(loss_fn)(params, x, y)
    >>> gram(params, [g, g]).shape
    (2, 2)

  References:
    {KFAC_REFERENCE}

  See Also:
    :func:`scale_by_quadratic_step` (its ``curvature`` argument).
  """

  def gram(params, vectors):
    # one forward pass, its tangents for all k directions at once (vmap)
    stacked = jax.tree.map(lambda p, *t: jnp.stack([v.astype(p.dtype) for v in t]), params, *vectors)
    outputs, push = jax.linearize(outputs_fn, params)
    jvps = jax.vmap(push)(stacked)
    _, hess = jax.linearize(jax.grad(loss_of_outputs), outputs)
    hjvs = jax.vmap(hess)(jvps)
    flat = lambda tree: jnp.concatenate([x.reshape(x.shape[0], -1).astype(jnp.float32)
                                         for x in jax.tree.leaves(tree)], axis=1)
    return flat(jvps) @ flat(hjvs).T

  return gram


def _check_update_args(params, grad, curvature, value, value_fn):
  if params is None or grad is None or curvature is None:
    raise ValueError(
        'scale_by_quadratic_step.update needs params, grad= (the raw gradient) and '
        'curvature= (mkor_optax.gauss_newton(outputs_fn, loss_of_outputs)).')
  if value is not None and jnp.ndim(value) != 0:
    raise ValueError(f'scale_by_quadratic_step: value= must be the scalar loss, got shape '
                     f'{jnp.shape(value)} (reduce it, e.g. with jnp.mean)')
  if value_fn is not None:
    out_shape = jax.eval_shape(value_fn, params).shape
    if out_shape != ():
      raise ValueError(f'scale_by_quadratic_step: value_fn must return the scalar loss, got '
                       f'shape {out_shape}')


def _fit(grad, proposal, prev, lam, gram, momentum: bool):
  """``(alpha, mu, predicted decrease, gram, g.p, p.p)`` minimising the damped model."""
  gp = _dot(grad, proposal)
  pp = _dot(proposal, proposal)
  if momentum:
    gq, qq, pq = _dot(grad, prev), _dot(prev, prev), _dot(proposal, prev)
    a = jnp.array([[gram[0, 0] + lam * pp, gram[0, 1] + lam * pq],
                   [gram[1, 0] + lam * pq, gram[1, 1] + lam * qq]])
    b = -jnp.array([gp, gq])
    two = jnp.linalg.solve(a, b)
    one = b[0] / a[0, 0]
    use_two = jnp.logical_and(qq > 0, jnp.all(jnp.isfinite(two)))
    alpha = jnp.where(use_two, two[0], one)
    mu = jnp.where(use_two, two[1], 0.0)
    predicted = 0.5 * (alpha * gp + mu * gq)
  else:
    alpha = -gp / (gram[0, 0] + lam * pp)
    mu = jnp.zeros([], jnp.float32)
    predicted = 0.5 * alpha * gp
  return alpha, mu, predicted, gram, gp, pp


def _adapt(lam, omega, measure, params, step, value, value_fn, predicted):
  """Levenberg-Marquardt: ``lambda`` down by ``omega`` where the reduction
  ratio ``rho`` exceeds 0.75, up where it is below 0.25 (or NaN)."""
  def ratio(_):
    moved = jax.tree.map(lambda p, d: (p + d).astype(p.dtype), params, step)
    return ((jnp.asarray(value_fn(moved), jnp.float32) - jnp.asarray(value, jnp.float32))
            / predicted)

  rho = jax.lax.cond(measure, ratio, lambda _: jnp.float32(jnp.nan), None)
  lam = jnp.where(measure & (rho > 0.75), lam * omega, lam)
  lam = jnp.where(measure & ~(rho >= 0.25), lam / omega, lam)  # NaN rho counts as bad
  return lam, rho


@docstrings.filled()
def scale_by_quadratic_step(
    *,
    damping: float = 1e-3,
    adapt_every: int = 5,
    decay: float = 0.95,
    min_damping: float = 1e-8,
    max_damping: float = 1e4,
    momentum: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""Step size and momentum chosen each step by a damped quadratic model.

  The step that kfac-jax takes (Martens and Grosse, 2015, section 7), as a
  transform that follows any preconditioner in a chain. Instead of a
  learning rate, each step scales the incoming direction and mixes in the
  previous update by the amounts that minimise a damped Gauss-Newton model
  of the loss around the current parameters. It is the whole step: nothing
  follows it in the chain.

  With the incoming (preconditioned) update :math:`u`, the proposal
  :math:`D = -u`, the previous update :math:`d_0`, the raw gradient
  :math:`g` and the Gauss-Newton matrix :math:`C = J^\top H J` (:math:`J`
  the Jacobian of the model's outputs, :math:`H` the Hessian of the loss in
  them), the update is :math:`d = \alpha D + \mu d_0` with

  .. math::

     M(d) = g^\top d + \tfrac{1}{2}\, d^\top \tilde C\, d, \qquad \tilde C = C + \lambda I,

     \begin{pmatrix} D^\top \tilde C D & D^\top \tilde C d_0 \\
                     d_0^\top \tilde C D & d_0^\top \tilde C d_0 \end{pmatrix}
     \begin{pmatrix} \alpha \\ \mu \end{pmatrix}
     = - \begin{pmatrix} g^\top D \\ g^\top d_0 \end{pmatrix},

  the minimiser of :math:`M(\alpha D + \mu d_0)` (:math:`\mu = 0` on the
  first step or without ``momentum``). :math:`C` enters only through
  :math:`J D` and :math:`J d_0`: two Jacobian-vector products a step, no
  matrix. Every ``adapt_every`` steps the damping follows
  Levenberg-Marquardt, from one more loss evaluation:

  .. math::

     \rho = \frac{L(\theta + d) - L(\theta)}{M(d)}, \qquad
     \lambda \leftarrow \begin{cases} \omega \lambda & \rho > 3/4 \\
                                      \lambda / \omega & \rho < 1/4 \end{cases},
     \qquad \omega = \text{decay}^{k},

  with :math:`k` = ``adapt_every``, kept within ``[min_damping, max_damping]``.

  Args:
    damping: the initial damping :math:`\lambda` (> 0).
    adapt_every: adapt ``lambda`` every this many steps (needs ``value`` and
      ``value_fn``; without them ``lambda`` stays fixed).
    decay: per-step Levenberg-Marquardt factor, in (0, 1); ``lambda`` moves
      by ``decay ** adapt_every`` at each adaptation.
    min_damping, max_damping: bounds of ``lambda``.
    momentum: include the previous update (``mu``); ``False`` fits ``alpha`` only.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with ``update(updates,
    state, params, *, grad, curvature, value=None, value_fn=None)``. A step
    whose model predicts no decrease is a zero update and raises ``lambda``;
    one whose gradient, direction or curvature is not finite is a zero update
    and leaves the state as it was (with a ``NumericalWarning``).

  Example:
    >>> opt = optax.chain(mkor_optax.scale_by_kfac(), mkor_optax.scale_by_quadratic_step())
    >>> state = opt.init(params)
    >>> kind = mkor_optax.COVARIANCE
    >>> loss, grads, stats = mkor_optax.value_and_grad(loss_fn, kind=kind)(params, x, y)
    >>> curvature = mkor_optax.gauss_newton(lambda p: model.apply({'params': p}, x),
    ...                                     lambda out: jnp.mean((out - y) ** 2))
    >>> updates, state = opt.update(grads, state, params, stats=stats, grad=grads,
    ...                             curvature=curvature, value=loss,
    ...                             value_fn=lambda p: loss_fn(p, x, y))
    >>> bool(loss_fn(optax.apply_updates(params, updates), x, y) < loss)
    True

  References:
    {KFAC_REFERENCE}

  See Also:
    :func:`gauss_newton` (the ``curvature`` argument),
    :func:`scale_by_kfac` and :func:`scale_by_mkor` (directions to follow).
  """
  checks.validate(
      damping=(damping, lambda v: v > 0, 'must be > 0'),
      adapt_every=(adapt_every, None, ''),
      decay=(decay, lambda v: 0.0 < v < 1.0, 'must be in (0, 1)'),
      min_damping=(min_damping, lambda v: v > 0, 'must be > 0'),
      max_damping=(max_damping, lambda v: v > 0, 'must be > 0'),
  )

  def init(params):
    zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    return QuadraticStepState(jnp.zeros([], jnp.int32), f32(damping), zeros, f32(0.0),
                              f32(0.0), f32(jnp.nan))

  def update(updates, state, params=None, *, grad=None, curvature=None, value=None,
             value_fn=None, **extra_args):
    del extra_args
    _check_update_args(params, grad, curvature, value, value_fn)
    proposal = jax.tree.map(lambda u: -u.astype(jnp.float32), updates)
    alpha, mu, predicted, gram, gp, pp = _fit(grad, proposal, state.previous, state.damping,
                                              curvature(params, [proposal, state.previous]
                                                        if momentum else [proposal]), momentum)
    # non-finite inputs (a NaN gradient entry, an overflowing curvature): a zero
    # update and the state as it was (0 * NaN is NaN, so zero by selection)
    inputs_ok = all_finite(gram, jnp.stack([gp, pp]), grad, proposal)
    ok = jnp.logical_and(jnp.isfinite(predicted), predicted < 0) & inputs_ok
    alpha, mu = jnp.where(ok, alpha, 0.0), jnp.where(ok, mu, 0.0)
    step = jax.tree.map(lambda d, d0: jnp.where(ok, alpha * d + mu * d0, 0.0), proposal,
                        state.previous)
    receipt = report_if(~inputs_ok, 'scale_by_quadratic_step: non-finite gradient, direction '
                        'or curvature: a zero update, the state left as it was')
    lam, rho = state.damping, jnp.float32(jnp.nan)
    omega = jnp.asarray(decay, jnp.float32) ** adapt_every
    if value is not None and value_fn is not None:
      measure = jnp.logical_and(ok, state.count % adapt_every == 0)
      lam, rho = _adapt(lam, omega, measure, params, step, value, value_fn, predicted)
    lam = jnp.where(ok, lam, lam / omega)
    lam = jnp.clip(lam, min_damping, max_damping)
    out = fold_into_first(jax.tree.map(lambda d, u: d.astype(u.dtype), step, updates), receipt)
    new_state = QuadraticStepState(checks.increment(state.count) + receipt,
                                   lam.astype(jnp.float32), step, alpha.astype(jnp.float32),
                                   mu.astype(jnp.float32), rho)
    return out, jax.tree.map(lambda new, old: jnp.where(inputs_ok, new, old), new_state, state)

  return optax.GradientTransformationExtraArgs(init, update)
