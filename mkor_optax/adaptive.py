r"""MKOR with the adaptive step: the natural gradient, stepped by a quadratic model.

Martens & Grosse (2015), *Optimizing Neural Networks with Kronecker-factored
Approximate Curvature*, ICML, arXiv:1503.05671 (sections 5 and 6.4-7: the
true Fisher's factors, the step length and momentum from the quadratic model,
as kfac-jax takes them); Mozaffari et al. (2023), *MKOR*, NeurIPS,
arXiv:2306.01685 (the factor inverses by rank-1 refreshes).

The recipe has three parts, each in its own place:

* the direction: :func:`~mkor_optax.scale_by_mkor` with ``rescale=False``,
  :math:`F_R^{-1} \bar G F_L^{-1}` per layer, in the statistics' own units;
* its statistics: those of the model's **own** predictive distribution (the
  true Fisher), not of the data's labels. Their output side is the gradient of
  the loss at targets sampled from the model (:func:`sampled_loss`). For the
  losses below that is the Gauss-Newton matrix in expectation, the matrix the
  step's quadratic model uses; the empirical Fisher (the statistics of the
  labels' gradient) is not, and measured far fewer steps' worth
  (results/adaptive_step);
* the length: :func:`~mkor_optax.scale_by_quadratic_step`, the step size
  and momentum that minimise the damped Gauss-Newton model along the
  direction and the previous update.

:func:`adaptive_mkor` chains the two transforms; :func:`adaptive_inputs`
computes, from the model's outputs and the loss of the outputs, everything
their ``update`` needs.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from mkor_optax import capture, checks, docstrings
from mkor_optax.fisher import FISHER_LOSSES, sampled_loss
from mkor_optax import kronecker as kr
from mkor_optax.layers import cast_varying, statistics_only, varying_axes
from mkor_optax.mkor import EPSILON, GAMMA, LOW_RANK, LOW_RANK_MIN_DIM, ZETA, scale_by_mkor
from mkor_optax.quadratic import gauss_newton, scale_by_quadratic_step
from mkor_optax.sketch import SKETCH, Sketch

# Measured on the digits autoencoder, 3 seeds, steps to LAMB's final loss
# (results/adaptive_step/adaptive_mkor.md): the natural gradient wants less
# relative damping than the LAMB-backed default (1), and refreshes every 5
# steps paid for themselves.
ADAPTIVE_DAMPING = 0.0625
ADAPTIVE_INV_FREQ = 5
# The sampled pass's statistic kind (adaptive_inputs with fisher=): 8
# sketches per side, formed in that pass, which runs on refresh steps only.
# Over 3 seeds they took 90 steps to LAMB's loss against 4 sketches' 107 on
# the autoencoder, 104 against 137 on the CNN, at the same cost per step
# (results/adaptive_step/adaptive_race_autoencoder.md, _cnn_sketch8.md).
FISHER_KIND = Sketch(8)


def _is_nnx_module(x) -> bool:
  try:
    from flax import nnx
  except ImportError:  # pragma: no cover
    return False
  return isinstance(x, nnx.Module)


def _statistics(loss, kind, model):
  """The layer statistics of ``loss`` at ``model`` alone (no parameter
  gradient, so a convolution's input cotangent takes the form that stays
  fast inside the transform's ``lax.cond``: :func:`mkor_optax.layers.statistics_only`)."""
  with statistics_only():
    return capture.value_and_grad(loss, kind=kind)(model)[2]


def adaptive_inputs(outputs_fn: Callable, loss_of_outputs: Callable, params, key=None, *,
                    fisher: Optional[str] = None, weights=None, has_aux: bool = False,
                    kind: Any = None, curvature_on: Optional[tuple] = None,
                    axis_name: Optional[str] = None, lazy: bool = True):
  r"""The loss, the gradient and every extra argument of :func:`adaptive_mkor`'s update.

  From the model on this step's batch (``outputs_fn(params) -> outputs``)
  and the loss of its outputs (``loss_of_outputs(outputs) -> scalar``):

  * the loss :math:`L` and the gradient :math:`g` of
    ``loss_of_outputs(outputs_fn(params))``;
  * the layer statistics for the factors: with ``fisher`` (the name of
    ``loss_of_outputs``'s distribution, as :func:`sampled_loss` takes it), those
    of :func:`sampled_loss`, the true Fisher, from one more forward and
    backward pass. With ``lazy`` (default) that pass is handed over as
    ``stats_fn``, which :func:`adaptive_mkor` runs only on the steps that
    refresh the factors (one in ``inv_freq``); ``lazy=False`` runs it here
    and returns ``stats`` (for other chains, such as
    :func:`~mkor_optax.scale_by_kfac` with the quadratic step). With
    ``fisher=None``: ``stats``, those of the loss itself, from the same pass
    as :math:`g` (the empirical Fisher: no extra pass, more steps);
  * ``curvature`` (:func:`~mkor_optax.gauss_newton`), ``grad``, ``value`` and
    ``value_fn`` for :func:`~mkor_optax.scale_by_quadratic_step`.

  With ``axis_name`` (inside ``pmap`` or ``shard_map`` over a data axis,
  each device holding an equal slice of the batch along its leading axis)
  the loss, the gradient, the curvature products and ``value_fn`` are
  averaged over it (under ``shard_map`` the differentiated losses are
  averaged inside, as its capture needs), so they are the whole batch's, the targets of
  ``fisher`` are drawn for the whole batch (:func:`sampled_loss`), and the
  statistics are averaged by the transform's own ``axis_name``: the step is
  the one a single device takes on the whole batch.

  Args:
    outputs_fn: ``params -> outputs``, the model applied to this step's
      batch (``lambda p: model.apply({'params': p}, x)``), or for an NNX
      model ``model -> outputs`` (``lambda m: m(x)``).
    loss_of_outputs: ``outputs -> scalar``, the mean loss over the batch,
      convex in the outputs (``optax.sigmoid_binary_cross_entropy``,
      ``optax.softmax_cross_entropy``, a squared error).
    params: the parameters, or an ``nnx.Module`` (then ``grads`` is the
      ``nnx.State`` of its ``nnx.Param`` variables, for
      ``nnx.Optimizer(model, adaptive_mkor(), wrt=nnx.Param).update(model,
      grads, **extra)``).
    key: a ``jax.random`` key, fresh every step (needed with ``fisher``).
    fisher: ``None``, or the name of ``loss_of_outputs``'s distribution:
      ``'sigmoid_cross_entropy'``, ``'softmax_cross_entropy'`` or
      ``'squared_error'``.
    weights: with ``fisher``, the weight of each output position in the
      sampled loss (:func:`sampled_loss`), as ``loss_of_outputs`` weights
      them: a masked LM's mask, a padding mask. ``None``: every position alike.
    has_aux: ``outputs_fn`` returns ``(outputs, aux)``, such as a linen
      model with BatchNorm in training mode,
      ``lambda p: model.apply({'params': p, 'batch_stats': stats}, x,
      mutable=['batch_stats'])``, whose new batch statistics are ``aux``.
      The first value returned is then ``(loss, aux)`` (``aux`` of the
      gradient's pass), as ``jax.value_and_grad(..., has_aux=True)`` gives.
    kind: the statistic kind. By default ``Sketch(8)`` with ``fisher``
      (``mkor_optax.adaptive.FISHER_KIND``: 8 sketches per side, formed in
      the sampled pass on the steps that refresh), :data:`SKETCH` without.
    curvature_on: ``None`` (the whole batch), or ``(outputs_fn,
      loss_of_outputs)`` of a part of it, such as its first quarter of rows
      (``(lambda p: model.apply({'params': p}, x[:n]), lambda out: loss(out,
      y[:n]))``, a mean loss as above): the Gauss-Newton products of the
      quadratic model are computed on that part alone, an unbiased estimate of
      the whole batch's at a fraction of their cost (curvature mini-batches
      smaller than the gradient's, as in Hessian-free optimisation, Martens
      2010). The gradient, the statistics and the loss stay the whole batch's.
      With ``has_aux`` its ``outputs_fn`` returns ``(outputs, aux)`` too.
    axis_name: the data-parallel axis (``pmap``'s or ``shard_map``'s), or ``None``.
    lazy: with ``fisher``, return ``stats_fn`` (computed by the transform
      when a refresh is due) instead of ``stats``. ``False`` under
      :class:`mkor_optax.MultiSteps`, which accumulates ``stats`` over the
      micro-batches (and refuses ``stats_fn``).

  Returns:
    ``(loss, grads, extra)`` (``((loss, aux), grads, extra)`` with
    ``has_aux``): pass ``opt.update(grads, state, params, **extra)``.

  Example:
    >>> opt = mkor_optax.adaptive_mkor()
    >>> state = opt.init(params)
    >>> loss, grads, extra = mkor_optax.adaptive_inputs(
    ...     lambda p: model.apply({'params': p}, x), lambda out: jnp.mean((out - y) ** 2),
    ...     params, jax.random.PRNGKey(0), fisher='squared_error')
    >>> updates, state = opt.update(grads, state, params, **extra)
    >>> bool(loss_fn(optax.apply_updates(params, updates), x, y) < loss)
    True
  """
  if fisher is not None and fisher not in FISHER_LOSSES:
    raise ValueError(f'adaptive_inputs: fisher must be None or one of {FISHER_LOSSES}, got {fisher!r}')
  if weights is not None and fisher is None:
    raise ValueError('adaptive_inputs: weights= weights the sampled targets of fisher=; the labels\' '
                     'Fisher (fisher=None) takes its weights from loss_of_outputs itself')
  if curvature_on is not None and (not isinstance(curvature_on, tuple) or len(curvature_on) != 2
                                   or not all(callable(f) for f in curvature_on)):
    raise ValueError('adaptive_inputs: curvature_on must be None or a pair (outputs_fn, '
                     f'loss_of_outputs) of a part of the batch, got {curvature_on!r}')
  if fisher is not None and key is None:
    raise ValueError('adaptive_inputs: fisher= samples targets; pass key= (a fresh '
                     'jax.random key every step)')
  mean = (lambda v: v) if axis_name is None else (lambda v: jax.lax.pmean(v, axis_name))
  model = params  # the statistics are captured from what the user differentiates
  capture_from = lambda: model
  curvature_outputs, curvature_loss = curvature_on or (outputs_fn, loss_of_outputs)
  of_tree = lambda f: f  # an outputs function of the parameters' pytree
  value_and_grad = jax.value_and_grad
  if _is_nnx_module(model):  # an NNX model: the curvature from its nnx.Param state
    from flax import nnx
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    of_tree = lambda f: (lambda state: f(nnx.merge(graphdef, state, rest)))
    # the sampled pass on a copy (it may run inside the transform's cond,
    # and its BatchNorm statistics are not the batch's)
    capture_from = lambda: nnx.merge(graphdef, *jax.tree.map(lambda v: v, (params, rest)))  # this trace's
    value_and_grad = nnx.value_and_grad
  # Under shard_map (the loss varies over the axis) the differentiated losses
  # are averaged inside: the gradient of the replicated parameters is then the
  # whole batch's, as the capture requires. Under pmap each device's gradient
  # is averaged below instead (and no collective runs inside the statistics'
  # lax.cond).
  inside = lambda v: (jax.lax.pmean(v, axis_name) if axis_name in varying_axes(v) else v)
  only = (lambda f: (lambda m: f(m)[0])) if has_aux else (lambda f: f)  # the outputs alone

  def model_loss(m):
    out = outputs_fn(m)
    if has_aux:
      return inside(loss_of_outputs(out[0])), out[1]
    return inside(loss_of_outputs(out))

  loss_fn = lambda p: loss_of_outputs(only(of_tree(outputs_fn))(p))
  gram = gauss_newton(only(of_tree(curvature_outputs)), curvature_loss)
  if kind is None:
    kind = SKETCH if fisher is None else FISHER_KIND
  if fisher is None:
    value, grads, stats = capture.value_and_grad(model_loss, kind=kind, has_aux=has_aux)(model)
    given = dict(stats=stats)
  else:
    sampled = lambda m: inside(sampled_loss(fisher, only(outputs_fn)(m), key, weights=weights,
                                            axis_name=axis_name))
    stats_fn = lambda: _statistics(sampled, kind, capture_from())
    given = dict(stats_fn=stats_fn) if lazy else dict(stats=stats_fn())
    # (one jitted step: XLA merges this forward pass with the curvature's,
    # unless curvature_on gives the curvature a part of the batch)
    value, grads = value_and_grad(model_loss, has_aux=has_aux)(model)
  loss, aux = value if has_aux else (value, None)
  loss, grads = mean(loss), mean(grads)
  extra = dict(given, grad=grads, value=loss, curvature=lambda p, vs: mean(gram(p, vs)),
               value_fn=lambda p: mean(loss_fn(p)))
  return ((loss, aux) if has_aux else loss), grads, extra


@docstrings.filled()
def adaptive_mkor(
    *,
    damping: float = ADAPTIVE_DAMPING,
    gamma: float = GAMMA,
    zeta: float = ZETA,
    epsilon: float = EPSILON,
    inv_freq: int = ADAPTIVE_INV_FREQ,
    axis_name: Optional[str] = None,
    max_factor_dim: int = kr.MAX_FACTOR_DIM,
    low_rank: Optional[int] = LOW_RANK,
    low_rank_min_dim: int = LOW_RANK_MIN_DIM,
    step_damping: float = 1e-2,
    adapt_every: int = 5,
    decay: float = 0.95,
    momentum: bool = True,
    rescale: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""MKOR's natural gradient, stepped by the damped quadratic model (no learning rate).

  .. math::

     D = -F_R^{-1} \bar G F_L^{-1}, \qquad
     d = \alpha D + \mu d_0, \qquad
     (\alpha, \mu) = \arg\min\, g^\top d + \tfrac12 d^\top (C + \lambda_s I)\, d,

  per layer :math:`F_R, F_L` MKOR's scale-free Kronecker factors
  (:func:`scale_by_mkor` with ``rescale=False`` by default, relative damping
  ``damping``), :math:`C` the Gauss-Newton matrix, :math:`d_0` the previous
  update and :math:`\lambda_s` the step's Levenberg-Marquardt damping
  (:func:`scale_by_quadratic_step`). The two dampings are separate: the
  factors' is relative to each side's own scale (what the inverse trusts of
  its statistics), the step's is absolute in the loss's units (how far the
  quadratic model is trusted) and adapts itself. Feed it the true Fisher's
  statistics: :func:`adaptive_inputs` with ``fisher=`` the loss's
  distribution.

  Args:
    damping: the factors' relative damping :math:`\lambda` (see
      :func:`scale_by_mkor`).
    gamma, zeta, epsilon: :func:`scale_by_mkor`'s factor EMA and stabiliser.
    inv_freq: refresh the factor inverses every this many steps.
    axis_name: the data-parallel axis for the statistics (pass the same to
      :func:`adaptive_inputs`).
    max_factor_dim, low_rank, low_rank_min_dim: :func:`scale_by_mkor`'s
      factor forms. (Dense inverses on the CNN's 289-wide side,
      ``low_rank_min_dim=1024``, took fewer steps on two seeds of three but
      cost more per step, and two of the three runs ended at a higher loss
      than they had reached.)
    step_damping: the quadratic model's initial damping :math:`\lambda_s`
      (it was ``1e-3``, at which the masked LM diverged on one seed of three
      in its first 8 steps, fitting momenta below -1, and the CNN on one
      late in its run; ``1e-2`` takes the same steps on the autoencoder and
      a few more on the CNN).
    adapt_every, decay: its Levenberg-Marquardt adaptation.
    momentum: fit :math:`\mu` as well as :math:`\alpha`.
    rescale: rescale each layer's direction to its gradient's norm
      (:func:`scale_by_mkor`'s ``rescale``) before the quadratic model
      scales it: one :math:`\alpha` then serves layers whose natural-gradient
      lengths differ by orders of magnitude (convolutions behind a
      BatchNorm against a plain head).

  Returns:
    ``optax.chain(scale_by_mkor(rescale=rescale, ...), scale_by_quadratic_step(...))``
    whose ``update(grads, state, params, *, stats=None, stats_fn=None, grad,
    curvature, value, value_fn)`` takes what :func:`adaptive_inputs` returns:
    ``stats``, or ``stats_fn``, a function of no arguments that returns
    them, called only on the steps that refresh the factors (zeros, unread,
    on the others). Inside :class:`mkor_optax.MultiSteps` (gradient
    accumulation; pass ``lazy=False`` to :func:`adaptive_inputs` so that
    the statistics of every micro-batch are accumulated) the step's
    gradient is the micro-batches' mean, and its curvature products and
    loss evaluations are those of the last micro-batch.

  Example:
    >>> opt = mkor_optax.adaptive_mkor()
    >>> state = opt.init(params)
    >>> key = jax.random.PRNGKey(0)
    >>> loss, grads, extra = mkor_optax.adaptive_inputs(
    ...     lambda p: model.apply({'params': p}, x), lambda out: jnp.mean((out - y) ** 2),
    ...     params, key, fisher='squared_error')
    >>> updates, state = opt.update(grads, state, params, **extra)

  References:
    {KFAC_REFERENCE}

    {MKOR_REFERENCE}
  """
  checks.validate(step_damping=(step_damping, lambda v: v > 0, 'must be > 0'))
  inner = optax.chain(
      scale_by_mkor(damping=damping, gamma=gamma, zeta=zeta, epsilon=epsilon, inv_freq=inv_freq,
                    axis_name=axis_name, max_factor_dim=max_factor_dim, low_rank=low_rank,
                    low_rank_min_dim=low_rank_min_dim, rescale=rescale),
      scale_by_quadratic_step(damping=step_damping, adapt_every=adapt_every, decay=decay,
                              momentum=momentum))

  def update(updates, state, params=None, *, stats=None, stats_fn=None, **extra):
    if (stats is None) == (stats_fn is None):
      raise ValueError('adaptive_mkor: pass stats= or stats_fn= (from mkor_optax.adaptive_inputs), '
                       'one of the two')
    if checks.accumulating():  # inside mkor_optax.MultiSteps, on its k-th micro-batch
      if stats_fn is not None:
        raise ValueError(
            'adaptive_mkor inside mkor_optax.MultiSteps: stats_fn= would refresh the factors from '
            'the last micro-batch alone. Pass lazy=False to adaptive_inputs, so that MultiSteps '
            'accumulates the statistics of every micro-batch.')
      # the updates are the micro-batches' mean gradient: the quadratic model's
      # linear term (its curvature and loss are the last micro-batch's)
      extra = dict(extra, grad=updates)
    if stats_fn is not None:  # the statistics' pass only where the factors refresh
      varying = []  # what each statistic varies over (under shard_map, the rows of a lazy capture)

      def probe():
        out = stats_fn()
        varying.append(jax.tree.map(varying_axes, out))
        return out

      shapes = jax.eval_shape(probe)
      zeros = lambda: jax.tree.map(lambda s, v: cast_varying(jnp.zeros(s.shape, s.dtype), v),
                                   shapes, varying[0])
      stats = jax.lax.cond(state[0].count % inv_freq == 0, stats_fn, zeros)
    return inner.update(updates, state, params, stats=stats, **extra)

  return optax.GradientTransformationExtraArgs(inner.init, update)
