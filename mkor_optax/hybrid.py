"""MKOR-H: MKOR until second-order steps stop paying, then first-order for good.

The MKOR paper (Mozaffari et al. 2023, arXiv:2306.01685) switches MKOR off by
hand once the loss flattens; MKOR-H makes the switch itself. The rule here, evaluated inside the jitted update
from the loss passed as optax's extra argument ``value=``:

* keep an EMA of the loss, ``m_t = beta m_{t-1} + (1 - beta) loss_t``,
  bias-corrected (``m_t / (1 - beta^(t+1))``); non-finite losses are skipped;
* at the end of every ``window`` steps, the decrease per step over that
  window, ``r = (m_start - m_end) / window``, is compared with the largest
  ``r`` seen so far, ``r_peak``. Both are differences of the same loss, so
  the rule does not change when the loss is shifted (a log-likelihood that
  crosses zero) or scaled;
* a window with ``r < threshold * r_peak`` is a strike, any other window
  clears the strikes; after ``patience`` strikes in a row the switch is
  made: ``switch_step`` is set to the next step, and from then on the
  transform passes gradients through unchanged, doing no refresh and no
  preconditioning (a ``lax.cond``), so the chain runs its backend alone.

Defaults ``window=50, threshold=0.1, patience=2, beta=0.9``: the EMA
(memory ~10 steps) smooths minibatch noise without lagging a window behind;
comparing with the peak rate rather than the previous window makes a
steadily falling loss (constant rate) never switch, while a loss falling 10x
slower than at its fastest for two consecutive windows (100 steps) does: the
regime where the paper found curvature no longer bought speed (a loss
decaying like ``exp(-k t)`` gets there ``ln(10)/k`` steps after its peak).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from mkor_optax import checks, docstrings, sharding
from mkor_optax.eager import compiled_when_eager
from mkor_optax import kronecker as kr
from mkor_optax.mkor import (DAMPING, EPSILON, GAMMA, INV_FREQ, LOW_RANK, LOW_RANK_MIN_DIM, ZETA, MKORState, mkor,
                             mkor_args, scale_by_mkor)


class MKORHState(NamedTuple):
  """MKOR-H's state.

  Attributes:
    mkor: the :class:`MKORState` (frozen after the switch).
    count: ``()`` int32, updates done (steps whose loss was not finite, or
      whose update MKOR refused, are not counted).
    loss_ema: ``()`` float32, the EMA of the finite losses (not bias-corrected).
    finite_count: ``()`` int32, the finite losses seen (the EMA's bias correction).
    window_start: ``()`` float32, the corrected EMA at the current window's start.
    peak_rate: ``()`` float32, the largest loss decrease per step of a window so far.
    strikes: ``()`` int32, the windows in a row that fell short of the peak rate.
    switch_step: ``()`` int32, -1 while MKOR is on, else the first first-order step.

  Example:
    >>> state = mkor_optax.scale_by_mkor_h().init(params)
    >>> int(state.switch_step)  # -1 until the switch
    -1
  """

  mkor: MKORState
  count: jax.Array
  loss_ema: jax.Array
  finite_count: jax.Array
  window_start: jax.Array
  peak_rate: jax.Array
  strikes: jax.Array
  switch_step: jax.Array


@docstrings.filled(scale_by_mkor)
def scale_by_mkor_h(
    *,
    window: int = 50,
    threshold: float = 0.1,
    patience: int = 2,
    beta: float = 0.9,
    damping: Optional[float] = DAMPING,
    gamma: float = GAMMA,
    zeta: float = ZETA,
    epsilon: float = EPSILON,
    inv_freq: int = INV_FREQ,
    refresh: str = 'ema',
    axis_name: Optional[str] = None,
    factor_dtype: Any = None,
    max_factor_dim: int = kr.MAX_FACTOR_DIM,
    low_rank: Optional[int] = LOW_RANK,
    low_rank_min_dim: int = LOW_RANK_MIN_DIM,
    factor_power: float = 1.0,
    shard_factors: bool = True,
    exclude: kr.Exclude = None,
    layouts: Optional[dict] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""MKOR-H: MKOR preconditioning that switches itself off once it stops paying.

  The MKOR paper's hybrid (Mozaffari et al., 2023): second-order steps help
  most early in training, so once the loss decreases much more slowly than
  it did at its fastest, the transform hands over to the first-order
  transform that follows it in the chain, for good. The paper made that
  switch by hand; the rule here makes it inside the jitted update, from the
  loss passed as optax's extra argument ``value=``.

  Until the switch, the update is :func:`scale_by_mkor`'s. The rule keeps a
  bias-corrected EMA :math:`\hat m` of the finite losses :math:`\ell` (a
  non-finite loss is skipped, and :math:`s` counts the finite ones), and at
  the end of every ``window`` steps compares the loss decrease per step
  over the window with the largest one seen:

  .. math::

     m_s &= \beta\, m_{s-1} + (1-\beta)\, \ell_s, \qquad
     \hat m = m_s / (1-\beta^s), \\
     r &= (\hat m_{\text{window start}} - \hat m_{\text{window end}}) / \text{window},
     \qquad r_{\text{peak}} = \max(r_{\text{peak}}, r).

  A window with :math:`r < \text{threshold} \cdot r_{\text{peak}}` is a
  strike, any other window clears the strikes, and ``patience`` strikes in a
  row switch: from the next step on the transform hands its gradients on
  unchanged (:math:`U = \bar G`), with no refresh and no preconditioning. Both
  rates are differences of the same loss, so shifting the loss (a
  log-likelihood that crosses zero) or scaling it does not change the
  rule. At the defaults a steadily falling loss (constant rate) never
  switches, and one falling ten times slower than at its fastest for two
  windows (100 steps) does.

  Args:
    window: steps per window over which the loss decrease rate is measured.
    threshold: a window whose rate :math:`r` is below ``threshold`` times
      the peak rate is a strike, in (0, 1).
    patience: consecutive strikes that trigger the (permanent) switch.
    beta: decay :math:`\beta` of the loss EMA, in [0, 1).
    {scale_by_mkor: damping, gamma, zeta, epsilon, inv_freq, refresh, axis_name, factor_dtype, max_factor_dim, low_rank, low_rank_min_dim, factor_power, shard_factors, exclude, layouts}

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose update is
    ``update(grads, state, params=None, *, stats, value)`` with ``value`` the
    step's loss; its state is an :class:`MKORHState`.

  Example:
    >>> opt = optax.chain(mkor_optax.scale_by_mkor_h(window=20), optax.adam(1e-3))
    >>> state = opt.init(params)
    >>> loss, grads, stats = mkor_optax.value_and_grad(loss_fn)(params, x, y)
    >>> updates, state = opt.update(grads, state, params, stats=stats, value=loss)
    >>> int(state[0].switch_step)  # -1: still second-order
    -1

  References:
    {MKOR_REFERENCE}

  See Also:
    :func:`mkor_h` (this transform chained into LAMB), :func:`scale_by_mkor`
    (MKOR without the switch).
  """
  checks.validate(
      window=(window, None, ''),
      threshold=(threshold, lambda v: 0.0 < v < 1.0, 'must be in (0, 1)'),
      patience=(patience, None, ''),
      beta=(beta, lambda v: 0.0 <= v < 1.0, 'must be in [0, 1)'),
  )
  inner = scale_by_mkor(**mkor_args(locals()))

  def init(params):
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    i32 = lambda v: jnp.asarray(v, jnp.int32)
    return MKORHState(inner.init(params), i32(0), f32(0.0), i32(0), f32(0.0), f32(0.0), i32(0),
                      i32(-1))

  def update(updates, state, params=None, *, stats=None, value=None, **extra_args):
    if value is None:
      raise ValueError('scale_by_mkor_h.update needs the loss: update(grads, state, params, '
                       'stats=stats, value=loss)')
    if jnp.ndim(value) != 0:
      raise ValueError(f'scale_by_mkor_h: value= must be the scalar loss of the step, got shape '
                       f'{jnp.shape(value)} (reduce it, e.g. with jnp.mean, before update)')
    del extra_args
    return step(updates, state, stats, value)

  @compiled_when_eager
  def step(updates, state, stats, value):
    switched = state.switch_step >= 0
    new_updates, mkor_state = jax.lax.cond(
        switched,
        lambda: (updates, state.mkor),
        lambda: inner.update(updates, state.mkor, stats=stats))

    loss = jnp.asarray(value, jnp.float32)
    finite = jnp.isfinite(loss)
    ema = jnp.where(finite, beta * state.loss_ema + (1 - beta) * loss, state.loss_ema)
    seen = state.finite_count + finite.astype(jnp.int32)
    level = ema / (1 - beta ** jnp.maximum(seen, 1).astype(jnp.float32))
    first = jnp.logical_and(finite, state.finite_count == 0)
    window_start = jnp.where(first, loss, state.window_start)
    # a step that the preconditioner refused (non-finite gradients or
    # statistics) or whose loss is not finite is not counted
    taken = finite & (switched | (mkor_state.count != state.mkor.count))
    t = jnp.where(taken, checks.increment(state.count), state.count)
    at_end = jnp.logical_and(taken & (t % window == 0), seen > 0)
    rate = (window_start - level) / window
    peak = jnp.where(at_end, jnp.maximum(state.peak_rate, rate), state.peak_rate)
    strike = rate < threshold * peak
    strikes = jnp.where(at_end, jnp.where(strike, state.strikes + 1, 0), state.strikes)
    switch_now = jnp.logical_and(~switched, jnp.logical_and(at_end, strikes >= patience))
    new_state = MKORHState(
        mkor=mkor_state, count=t, loss_ema=ema, finite_count=seen,
        window_start=jnp.where(at_end, level, window_start), peak_rate=peak, strikes=strikes,
        switch_step=jnp.where(switch_now, t, state.switch_step))
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init, update)


@docstrings.filled(mkor, scale_by_mkor_h)
def mkor_h(
    learning_rate: optax.ScalarOrSchedule,
    *,
    weight_decay: float = 0.01,
    backend: Optional[optax.GradientTransformation] = None,
    window: int = 50,
    threshold: float = 0.1,
    patience: int = 2,
    beta: float = 0.9,
    damping: Optional[float] = DAMPING,
    gamma: float = GAMMA,
    zeta: float = ZETA,
    epsilon: float = EPSILON,
    inv_freq: int = INV_FREQ,
    refresh: str = 'ema',
    axis_name: Optional[str] = None,
    factor_dtype: Any = None,
    max_factor_dim: int = kr.MAX_FACTOR_DIM,
    low_rank: Optional[int] = LOW_RANK,
    low_rank_min_dim: int = LOW_RANK_MIN_DIM,
    factor_power: float = 1.0,
    shard_factors: bool = True,
    exclude: kr.Exclude = None,
    layouts: Optional[dict] = None,
    reset_backend: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""MKOR-H with a LAMB backend: ``optax.chain(scale_by_mkor_h(...), backend)``.

  The MKOR paper's hybrid: MKOR (:func:`scale_by_mkor`) until the loss
  decreases much more slowly than at its fastest, then LAMB alone, for good
  (the switching rule is written out in :func:`scale_by_mkor_h`). Each
  captured layer's gradient :math:`\bar G` becomes

  .. math::

     U_t = \begin{cases}
       R^{-1} \bar G_t L^{-1}\, \|\bar G_t\|_F / \|R^{-1} \bar G_t L^{-1}\|_F
         & \text{before the switch,} \\
       \bar G_t & \text{from the switch on.}
     \end{cases}

  {LAMB}

  With ``reset_backend`` (default), the backend's state is re-initialised
  at the first first-order step, so its moments are built from plain
  gradients only (they were accumulated on preconditioned ones); on the
  digits autoencoder this lowered the final loss over 3 seeds. The state
  keeps the structure of the chain. Works with ``optax.inject_hyperparams``.

  Args:
    {mkor: learning_rate, weight_decay, backend}
    reset_backend: re-initialise the backend's state at the switch.
    {scale_by_mkor_h}

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` takes ``stats=``
    and ``value=`` (the step's loss). Its state is the chain's:
    ``(MKORHState, the backend's state)``.

  Example:
    >>> opt = mkor_optax.mkor_h(1e-2)
    >>> state = opt.init(params)
    >>> loss, grads, stats = mkor_optax.value_and_grad(loss_fn)(params, x, y)
    >>> updates, state = opt.update(grads, state, params, stats=stats, value=loss)
    >>> int(state[0].switch_step), int(state[0].count)  # no switch yet, one step taken
    (-1, 1)

  References:
    {MKOR_REFERENCE}

    {LAMB_REFERENCE}

  See Also:
    :func:`scale_by_mkor_h` (the preconditioner alone), :func:`mkor` (MKOR
    without the switch).
  """
  hybrid = scale_by_mkor_h(window=window, threshold=threshold, patience=patience, beta=beta,
                           **mkor_args(locals()))
  if backend is not None:  # (default_backend checks them otherwise)
    kr.check_backend_args(learning_rate, weight_decay)
  back = backend or kr.default_backend(learning_rate, weight_decay)
  chained = optax.chain(hybrid, back)
  if not reset_backend:
    return chained
  back = optax.with_extra_args_support(back)

  def update(updates, state, params=None, **extra_args):
    h_state, b_state = state
    first = h_state.switch_step == h_state.count  # this step is the first first-order one
    updates, h_state = hybrid.update(updates, h_state, params, **extra_args)
    fresh = back.init(params)
    b_state = jax.tree.map(lambda f, b: jnp.where(first, f, b).astype(b.dtype), fresh, b_state)
    updates, b_state = back.update(updates, b_state, params, **extra_args)
    return updates, (h_state, b_state)

  return sharding.on_params_mesh(optax.GradientTransformationExtraArgs(chained.init, update))
