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
from mkor_optax import kronecker as kr
from mkor_optax.layers import varying_axes
from mkor_optax.mkor import EPSILON, GAMMA, LOW_RANK, LOW_RANK_MIN_DIM, ZETA, scale_by_mkor
from mkor_optax.quadratic import gauss_newton, scale_by_quadratic_step
from mkor_optax.tap import SKETCH

# Measured on the digits autoencoder, 3 seeds, steps to LAMB's final loss
# (results/adaptive_step/adaptive_mkor.md): the natural gradient wants less
# relative damping than the LAMB-backed default (1), and refreshes every 5
# steps paid for themselves.
ADAPTIVE_DAMPING = 0.0625
ADAPTIVE_INV_FREQ = 5
# The losses whose predictive distribution sampled_loss knows.
FISHER_LOSSES = ('sigmoid_cross_entropy', 'softmax_cross_entropy', 'squared_error')


def _draw(sample, key, shape: tuple, axis_name: Optional[str]):
  """``sample(key, shape)``, or inside ``pmap``/``shard_map`` over
  ``axis_name`` this device's rows of the draw for the whole batch (the
  devices' rows stacked along the leading axis in device order)."""
  if axis_name is None:
    return sample(key, shape)
  rows = shape[0]
  full = sample(key, (jax.lax.axis_size(axis_name) * rows,) + tuple(shape[1:]))
  return jax.lax.dynamic_slice_in_dim(full, jax.lax.axis_index(axis_name) * rows, rows, axis=0)


def sampled_loss(loss: str, outputs: jax.Array, key: jax.Array, *, weights=None,
                 axis_name: Optional[str] = None) -> jax.Array:
  r"""The loss at targets drawn from the model's own predictive distribution.

  Its gradient in the outputs has, per example, the covariance of the
  Gauss-Newton matrix :math:`H` of the named loss (the true Fisher of its
  likelihood), so statistics captured from it are the factors of the true
  Fisher, the curvature that :func:`~mkor_optax.scale_by_quadratic_step`
  models:

  * ``'sigmoid_cross_entropy'``: :math:`t \sim \mathrm{Bernoulli}(\sigma(z))`
    per output, :math:`\sum \mathrm{BCE}(z, t)`;
  * ``'softmax_cross_entropy'``: one class :math:`c \sim \mathrm{softmax}(z)`
    over the last axis, :math:`\sum \mathrm{CE}(z, e_c)`;
  * ``'squared_error'``: :math:`t = y + \varepsilon`,
    :math:`\varepsilon \sim N(0, I)`, :math:`\tfrac12 \sum (y - t)^2`.

  Summed over the outputs (each position's loss times its weight, with
  ``weights``) and divided by the leading (batch) axis's size.
  The targets do not depend on the parameters (no gradient flows through
  the draw). The loss's overall scale does not matter to MKOR's scale-free
  factors. The draws are ``u < sigmoid(z)`` with ``u`` uniform,
  ``argmax(z + gumbel)``, and ``y + normal``: those of
  ``jax.random.bernoulli``, ``jax.random.categorical`` and
  ``jax.random.normal`` with the same key.

  Args:
    loss: ``'sigmoid_cross_entropy'``, ``'softmax_cross_entropy'`` or
      ``'squared_error'``.
    outputs: the model's outputs ``(batch, ..., d)`` (logits for the
      cross-entropies).
    key: a ``jax.random`` key, a fresh one every step (the same on every
      device).
    weights: ``None``, or a weight per position, of the shape of
      ``outputs`` without its last axis (``(batch, length)`` for a
      sequence's logits), as the loss weights its positions: a masked LM's
      mask (1 on the positions it predicts, 0 elsewhere), a padding mask.
      A position of weight 0 adds nothing to the statistics.
    axis_name: inside ``pmap`` or ``shard_map`` over a data axis whose
      devices each hold an equal slice of the batch (along the leading axis,
      in device order): the noise is drawn for the whole batch and each
      device takes its own rows, so the targets are those that one device
      would draw for the whole batch. The loss is still this device's mean.

  Returns:
    The scalar loss at the sampled targets.

  Example:
    >>> logits = model.apply({'params': params}, x)
    >>> mkor_optax.sampled_loss('sigmoid_cross_entropy', logits, jax.random.PRNGKey(0)).shape
    ()
  """
  if loss not in FISHER_LOSSES:
    raise ValueError(f'sampled_loss: loss must be one of {FISHER_LOSSES}, got {loss!r}')
  outputs = jnp.asarray(outputs)
  if outputs.ndim < 1:
    raise ValueError(f'sampled_loss: outputs need a leading batch axis, got shape {outputs.shape}')
  if weights is not None:
    weights = jnp.asarray(weights)
    if weights.shape != outputs.shape[:-1]:
      raise ValueError(f'sampled_loss: weights must have the shape of outputs without its last axis, '
                       f'{outputs.shape[:-1]}, got {weights.shape}')
    weights = jax.lax.stop_gradient(weights.astype(jnp.float32))
  def total_of(per_entry, last_axis=True):  # the (weighted) sum over every entry
    if weights is None:
      return jnp.sum(per_entry)
    return jnp.sum(weights * (jnp.sum(per_entry, axis=-1) if last_axis else per_entry))
  fixed = jax.lax.stop_gradient(outputs.astype(jnp.float32))
  z = outputs.astype(jnp.float32)
  noise = lambda sample: _draw(lambda k, s: sample(k, s, jnp.float32), key, fixed.shape, axis_name)
  if loss == 'sigmoid_cross_entropy':
    t = (noise(jax.random.uniform) < jax.nn.sigmoid(fixed)).astype(jnp.float32)
    total = total_of(optax.sigmoid_binary_cross_entropy(z, t))
  elif loss == 'softmax_cross_entropy':
    c = jnp.argmax(fixed + noise(jax.random.gumbel), axis=-1)
    total = total_of(optax.softmax_cross_entropy_with_integer_labels(z, c), last_axis=False)
  else:
    t = fixed + noise(jax.random.normal)
    total = 0.5 * total_of(jnp.square(z - t))
  return total / outputs.shape[0]


def _is_nnx_module(x) -> bool:
  try:
    from flax import nnx
  except ImportError:  # pragma: no cover
    return False
  return isinstance(x, nnx.Module)


def adaptive_inputs(outputs_fn: Callable, loss_of_outputs: Callable, params, key=None, *,
                    fisher: Optional[str] = None, weights=None, has_aux: bool = False,
                    kind: Any = SKETCH,
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
    kind: the statistic kind (:data:`SKETCH` by default).
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
  if fisher is not None and key is None:
    raise ValueError('adaptive_inputs: fisher= samples targets; pass key= (a fresh '
                     'jax.random key every step)')
  mean = (lambda v: v) if axis_name is None else (lambda v: jax.lax.pmean(v, axis_name))
  model = params  # the statistics are captured from what the user differentiates
  capture_from = lambda: model
  tree_outputs = outputs_fn
  value_and_grad = jax.value_and_grad
  if _is_nnx_module(model):  # an NNX model: the curvature from its nnx.Param state
    from flax import nnx
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tree_outputs = lambda state: outputs_fn(nnx.merge(graphdef, state, rest))
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

  loss_fn = lambda p: loss_of_outputs(only(tree_outputs)(p))
  gram = gauss_newton(only(tree_outputs), loss_of_outputs)
  if fisher is None:
    value, grads, stats = capture.value_and_grad(model_loss, kind=kind, has_aux=has_aux)(model)
    given = dict(stats=stats)
  else:
    sampled = lambda m: inside(sampled_loss(fisher, only(outputs_fn)(m), key, weights=weights,
                                            axis_name=axis_name))
    stats_fn = lambda: capture.value_and_grad(sampled, kind=kind)(capture_from())[2]
    given = dict(stats_fn=stats_fn) if lazy else dict(stats=stats_fn())
    # (one jitted step: XLA merges this forward pass with the curvature's)
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
    step_damping: float = 1e-3,
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
  (:func:`scale_by_mkor` with ``rescale=False``, relative damping
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
    step_damping: the quadratic model's initial damping :math:`\lambda_s`.
    adapt_every, decay: its Levenberg-Marquardt adaptation.
    momentum: fit :math:`\mu` as well as :math:`\alpha`.
    rescale: rescale each layer's direction to its gradient's norm
      (:func:`scale_by_mkor`'s ``rescale``) before the quadratic model
      scales it: one :math:`\alpha` then serves layers whose natural-gradient
      lengths differ by orders of magnitude (convolutions behind a
      BatchNorm against a plain head).

  Returns:
    ``optax.chain(scale_by_mkor(rescale=False, ...), scale_by_quadratic_step(...))``
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
      shapes = jax.eval_shape(stats_fn)
      zeros = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
      stats = jax.lax.cond(state[0].count % inv_freq == 0, stats_fn, zeros)
    return inner.update(updates, state, params, stats=stats, **extra)

  return optax.GradientTransformationExtraArgs(inner.init, update)
