"""SONew: sparsified online Newton with a tridiagonal or banded preconditioner.

Devvrit, Duvvuri, Anil, Gupta, Hsieh, Dhillon (2023), *A Computationally
Efficient Sparsified Online Newton Method*, NeurIPS 2023, arXiv:2311.10085. Needs no capture: it works on every parameter tensor,
flattened to a vector of ``n`` entries ``g``.

State per tensor: EMAs ``m`` of ``g`` (``b1``), ``d`` of ``g_i^2`` and
``e_k`` of ``g_i g_{i+k}`` for ``k = 1..band`` (``b2``), bias-corrected, with
``damping`` added to ``d`` (by default relative: times the largest absolute
row sum of the band). They are the band of a statistics matrix ``S``;
the preconditioner ``X`` is the inverse of its maximum-determinant
positive-definite completion, ``X = L D L^T`` with ``L`` unit lower banded:

    tridiagonal (band = 1), O(n), no n x n matrix:
        psi_i = e_i / d_{i+1};  c_i = d_i - e_i psi_i  (c_{n-1} = d_{n-1})
        c_i <= 0: the edge is dropped (psi_i = 0, D_i = 1/d_i), else D_i = 1/c_i
    banded (band = b), O(n b^3): psi_i solves S[J, J] psi_i = S[J, i] over the
        next b entries J = i+1..i+b, c_i = d_i - S[i, J] psi_i, same rule;
    L_{i+k, i} = -psi_i[k-1];  direction u = X m = L (D (L^T m)).

Grafting: ``u`` is rescaled per tensor to the norm of an Adam
(``m / (sqrt(d) + graft_eps)``, default), SGD (``g``) or momentum (``m``)
direction. Memory: ``(2 + band) n`` floats per tensor.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mkor_optax import checks, docstrings
from mkor_optax.eager import compiled_when_eager
from mkor_optax import numerics

_GRAFTS = ('adam', 'sgd', 'momentum')


class SONewState(NamedTuple):
  """SONew's state: per parameter leaf, flattened to ``n`` entries, the
  EMAs (float32, not bias-corrected).

  Attributes:
    count: ``()`` int32, updates done.
    m: per leaf ``(n,)``, the EMA of the gradient.
    d: per leaf ``(n,)``, the EMA of its squared entries ``g_i^2``.
    e: per leaf ``(n, band)``, the EMAs of the products ``e[i, k-1] ~ g_i g_{i+k}``.

  Example:
    >>> state = mkor_optax.scale_by_sonew().init(params)
    >>> state._fields
    ('count', 'm', 'd', 'e')
  """

  count: jax.Array
  m: object
  d: object
  e: object


def check_shapes(updates, m_tree):
  """``ValueError`` naming every leaf whose gradient size differs from the
  state's (a model changed after ``init``), or a different tree."""
  if jax.tree.structure(updates) != jax.tree.structure(m_tree):
    raise ValueError('scale_by_sonew: the gradients are not shaped like the parameters given to '
                     f'init: {jax.tree.structure(updates)} vs {jax.tree.structure(m_tree)}')
  bad = []
  for (path, g), m in zip(jax.tree_util.tree_leaves_with_path(updates), jax.tree.leaves(m_tree)):
    if int(np.size(g)) != m.shape[0]:
      bad.append(f'{jax.tree_util.keystr(path)}: gradient {tuple(np.shape(g))} '
                 f'({int(np.size(g))} entries), state {m.shape[0]} entries')
  if bad:
    raise ValueError('scale_by_sonew: gradients of another shape than at init for '
                     + '; '.join(bad) + ': re-run init after changing the model.')


def tridiagonal_factors(d, e):
  """``(psi, D)`` of ``X = L D L^T`` for diagonal ``d`` ``(n,)`` and
  off-diagonal ``e`` ``(n,)`` (``e[n-1]`` unused), in O(n)."""
  d_next = jnp.concatenate([d[1:], jnp.ones((1,), d.dtype)])
  e = e.at[-1].set(0.0)
  psi = e / d_next
  c = d - e * psi
  keep = c > 0
  return jnp.where(keep, psi, 0.0), jnp.where(keep, 1.0 / jnp.where(keep, c, 1.0), 1.0 / d)


def banded_factors(d, e):
  """``(psi (n, b), D (n,))`` for a band ``b = e.shape[1]`` (n solves of b x b)."""
  n, b = e.shape
  idx = np.arange(n)[:, None] + 1 + np.arange(b)[None, :]        # J = i+1..i+b
  valid = idx < n
  d_pad = jnp.concatenate([d, jnp.ones((b,), d.dtype)])
  e_pad = jnp.concatenate([e, jnp.zeros((b, b), e.dtype)])
  p, q = np.meshgrid(np.arange(b), np.arange(b), indexing='ij')
  lag = np.abs(p - q)                                              # S[J_p, J_q] = e[J_min, lag-1]
  first = idx[:, np.minimum(p, q)]                                 # (n, b, b)
  s_jj = jnp.where(lag == 0, d_pad[first], e_pad[first, np.maximum(lag - 1, 0)])
  # entries beyond the end of the vector: identity rows, zero right-hand side
  s_jj = jnp.where(valid[:, :, None] & valid[:, None, :], s_jj, jnp.eye(b, dtype=d.dtype))
  rhs = jnp.where(valid, e, 0.0)                                   # S[J, i] = e[i, :]
  psi = jnp.linalg.solve(s_jj, rhs[..., None])[..., 0]
  c = d - jnp.sum(rhs * psi, axis=-1)
  keep = c > 0
  return (jnp.where(keep[:, None], psi, 0.0),
          jnp.where(keep, 1.0 / jnp.where(keep, c, 1.0), 1.0 / d))


def apply_ldl(psi, dinv, m):
  """``u = L (D (L^T m))`` with ``L_{i+k, i} = -psi[i, k-1]``, in O(n b)."""
  n, b = psi.shape
  m_pad = jnp.concatenate([m, jnp.zeros((b,), m.dtype)])
  ahead = m_pad[np.arange(n)[:, None] + 1 + np.arange(b)[None, :]]   # m_{i+1..i+b}
  w = dinv * (m - jnp.sum(psi * ahead, axis=-1))
  # (L w)_j = w_j - sum_k psi[j-k, k-1] w_{j-k}
  contrib = psi * w[:, None]                                           # at row i + k
  u = w
  for k in range(1, b + 1):
    u = u - jnp.concatenate([jnp.zeros((k,), m.dtype), contrib[:n - k, k - 1]])[:n]
  return u


def _shift(d_raw, e_hat, damping):
  """``damping`` times the largest absolute row sum of the banded statistics."""
  n, band = e_hat.shape
  below = sum(jnp.concatenate([jnp.zeros((k,)), jnp.abs(e_hat[:n - k, k - 1])])[:n]
              for k in range(1, band + 1))
  return damping * jnp.max(d_raw + jnp.sum(jnp.abs(e_hat), axis=-1) + below)


def _precondition_tensor(g, m, d, e, t, *, b1, b2, damping, relative_damping, graft, graft_eps):
  """One tensor's SONew step: ``(update, m, d, e)``."""
  band = e.shape[-1]  # from the state, so an array-valued band (inject_hyperparams) is fine
  gf = g.reshape(-1).astype(jnp.float32)
  n = gf.shape[0]
  g_pad = jnp.concatenate([gf, jnp.zeros((band,), jnp.float32)])
  products = gf[:, None] * g_pad[np.arange(n)[:, None] + 1 + np.arange(band)[None, :]]
  m = b1 * m + (1 - b1) * gf
  d = b2 * d + (1 - b2) * gf * gf
  e = b2 * e + (1 - b2) * products
  m_hat = m / (1 - b1 ** t)
  d_raw = d / (1 - b2 ** t)
  e_hat = e / (1 - b2 ** t)
  shift = _shift(d_raw, e_hat, damping) if relative_damping else damping
  # Safe zero: statistics that are all zero (a tensor the loss has not used
  # yet, the layer behind a zero-initialised head) give shift 0; the
  # preconditioner is then the identity on them (its direction m is 0 too).
  d_hat = d_raw + shift
  d_hat = jnp.where(d_hat > 0, d_hat, 1.0)
  if band == 1:
    psi, dinv = tridiagonal_factors(d_hat, e_hat[:, 0])
    psi = psi[:, None]
  else:
    psi, dinv = banded_factors(d_hat, e_hat)
  u = apply_ldl(psi, dinv, m_hat)
  root = jnp.sqrt(d_raw) + graft_eps
  ref = {'adam': lambda: jnp.where(root > 0, m_hat / jnp.where(root > 0, root, 1.0), 0.0),
         'sgd': lambda: gf, 'momentum': lambda: m_hat}[graft]()
  u = u * numerics.norm_ratio(ref, u)
  return u.reshape(g.shape).astype(g.dtype), m, d, e


@docstrings.filled()
def scale_by_sonew(
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    damping: float = 1e-3,
    relative_damping: bool = True,
    band: int = 1,
    graft: str = 'adam',
    graft_eps: float = 1e-8,
) -> optax.GradientTransformationExtraArgs:
  r"""SONew: sparsified online Newton with a tridiagonal or banded preconditioner.

  SONew (Devvrit et al., 2023) preconditions each parameter tensor,
  flattened to a vector of :math:`n` entries, with a sparse inverse of the
  gradients' second moment: of all positive-definite matrices that agree
  with the EMA statistics :math:`S` on a band, it takes the one of maximum
  determinant, whose inverse :math:`X` has a sparse :math:`L D L^\top`
  factorisation found in :math:`O(n)` for the tridiagonal band (no
  :math:`n \times n` matrix is formed). It needs no capture (plain
  ``jax.grad`` gradients), and its direction is grafted to the per-tensor
  norm of Adam's. Memory: :math:`(2 + b)\, n` floats per tensor.

  Per tensor with gradient :math:`g` at step :math:`t`, band :math:`b`
  (:math:`k = 1, \dots, b`) and damping :math:`\delta` (by default relative:
  ``damping`` times the largest absolute row sum of the banded statistics):

  .. math::

     m_t &= \beta_1 m_{t-1} + (1-\beta_1)\, g, \qquad
     \hat m = \frac{m_t}{1-\beta_1^t}, \\
     d_{t,i} &= \beta_2 d_{t-1,i} + (1-\beta_2)\, g_i^2, \qquad
     S_{ii} = \frac{d_{t,i}}{1-\beta_2^t} + \delta, \\
     e_{t,i,k} &= \beta_2 e_{t-1,i,k} + (1-\beta_2)\, g_i g_{i+k}, \qquad
     S_{i,i+k} = \frac{e_{t,i,k}}{1-\beta_2^t}.

  For the tridiagonal band (:math:`b = 1`), with :math:`s_i = S_{ii}` and
  :math:`e_i = S_{i,i+1}`,

  .. math::

     \psi_i &= e_i / s_{i+1}, \qquad c_i = s_i - e_i \psi_i, \qquad D_i = 1 / c_i, \\
     L_{i+1,i} &= -\psi_i, \qquad u = L D L^\top \hat m,

  where an edge with :math:`c_i \le 0` is dropped (:math:`\psi_i = 0`,
  :math:`D_i = 1/s_i`). For a band :math:`b > 1`, :math:`\psi_i` solves
  :math:`S_{JJ}\, \psi_i = S_{Ji}` over the next :math:`b` entries
  :math:`J = \{i+1, \dots, i+b\}`, :math:`c_i = s_i - S_{iJ}\, \psi_i`, and
  :math:`L_{i+k,i} = -\psi_{i,k}` (:math:`O(n b^3)`). Finally the direction
  takes the norm of the graft's, :math:`u \leftarrow u\, \|r\| / \|u\|`,
  with :math:`r = \hat m / (\sqrt{\hat d} + \epsilon)` for ``'adam'``
  (:math:`\hat d` the bias-corrected :math:`d_t`, undamped),
  :math:`r = g` for ``'sgd'`` and :math:`r = \hat m` for ``'momentum'``.

  Args:
    b1: decay :math:`\beta_1` of the gradient EMA :math:`m`, in [0, 1).
    b2: decay :math:`\beta_2` of the second-moment EMAs :math:`d` and
      :math:`e`, in [0, 1).
    damping: added to the diagonal (> 0); with ``relative_damping``
      (default) it is multiplied by the largest absolute row sum of the
      banded statistics (a Gershgorin bound on their largest eigenvalue),
      which makes it invariant to the scale of the gradients.
    relative_damping: ``False`` adds ``damping`` itself, whatever the scale
      of the gradients (too small a one lets near-singular statistics
      dominate the direction).
    band: the band :math:`b`: 1 for tridiagonal (the :math:`O(n)` path),
      :math:`b > 1` for banded.
    graft: ``'adam'``, ``'sgd'`` or ``'momentum'``: whose per-tensor norm
      the direction :math:`u` takes.
    graft_eps: the :math:`\epsilon` of the Adam graft direction.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` that takes plain gradients
    (no statistics); its state is a :class:`SONewState`.

  Example:
    >>> opt = optax.chain(mkor_optax.scale_by_sonew(band=2), optax.scale(-1e-2))
    >>> state = opt.init(params)
    >>> updates, state = opt.update(jax.grad(loss_fn)(params, x, y), state, params)
    >>> updates['layers_0']['kernel'].shape
    (3, 8)
    >>> state[0].e['layers_0']['kernel'].shape  # (n, band) for the 3 x 8 kernel
    (24, 2)

  References:
    {SONEW_REFERENCE}

  See Also:
    :func:`sonew` (this transform with a learning rate), :func:`scale_by_mkor`
    and :func:`scale_by_kfac` (Kronecker factors per layer, from a capture).
  """
  checks.validate(
      b1=(b1, lambda v: 0.0 <= v < 1.0, 'must be in [0, 1)'),
      b2=(b2, lambda v: 0.0 <= v < 1.0, 'must be in [0, 1)'),
      damping=(damping, lambda v: v > 0, 'must be > 0'),
      band=(band, None, ''),
      graft_eps=(graft_eps, lambda v: v >= 0, 'must be >= 0'),
  )
  if graft not in _GRAFTS:
    raise ValueError(f'graft: must be one of {_GRAFTS}, got {graft!r}')

  def init(params):
    width = int(band)  # static: the shape of the off-diagonal statistics
    flat = lambda p, *extra: jnp.zeros((int(np.size(p)),) + extra, jnp.float32)
    return SONewState(jnp.zeros([], jnp.int32), jax.tree.map(flat, params),
                      jax.tree.map(flat, params), jax.tree.map(lambda p: flat(p, width), params))

  one = functools.partial(_precondition_tensor, b1=b1, b2=b2, damping=damping,
                          relative_damping=relative_damping, graft=graft, graft_eps=graft_eps)

  def update(updates, state, params=None, **extra_args):
    del params, extra_args
    check_shapes(updates, state.m)
    return step(updates, state)

  @compiled_when_eager
  def step(updates, state):
    t = (state.count + 1).astype(jnp.float32)
    out = jax.tree.map(lambda g, m, d, e: one(g, m, d, e, t), updates, state.m, state.d, state.e)
    treedef = jax.tree.structure(updates)
    u, m, d, e = (treedef.unflatten(x) for x in zip(*treedef.flatten_up_to(out)))
    # A step whose gradients hold NaN/Inf (or overflow float32 when squared)
    # leaves the state as it was, counter included, and hands the gradients on
    # as they are (optax.apply_if_finite downstream then skips the step).
    finite = numerics.all_finite(jax.tree.map(lambda g: jnp.sum(jnp.square(g.astype(jnp.float32))),
                                        updates))
    receipt = numerics.report_if(~finite, 'scale_by_sonew: non-finite gradients: the state is '
                                 'left as it was and the gradients are handed on unchanged')
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    count = jnp.where(finite, checks.increment(state.count), state.count) + receipt
    new_state = SONewState(count, keep(m, state.m), keep(d, state.d), keep(e, state.e))
    return numerics.fold_into_first(keep(u, updates), receipt), new_state

  return optax.GradientTransformationExtraArgs(init, update)


@docstrings.filled(scale_by_sonew)
def sonew(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    damping: float = 1e-3,
    relative_damping: bool = True,
    band: int = 1,
    graft: str = 'adam',
    graft_eps: float = 1e-8,
) -> optax.GradientTransformationExtraArgs:
  r"""SONew: ``optax.chain(scale_by_sonew(...), scale_by_learning_rate(learning_rate))``.

  The sparsified online Newton method (Devvrit et al., 2023): the
  preconditioner :func:`scale_by_sonew` (where its banded statistics and
  their maximum-determinant inverse are written out) turns each parameter
  tensor's gradient into a grafted direction :math:`u_t`, and the
  learning rate :math:`\eta_t` scales it:

  .. math::

     u_t = L D L^\top \hat m_t\, \frac{\|r_t\|}{\|L D L^\top \hat m_t\|}, \qquad
     \theta_{t+1} = \theta_t - \eta_t\, u_t,

  :math:`\hat m_t` the bias-corrected gradient EMA and :math:`r_t` the graft
  direction (Adam's by default). A learning rate that is not finite (a
  schedule's value, or an array from ``optax.inject_hyperparams``) gives a
  zero update with a :class:`NumericalWarning`. No statistics, no backend:
  the step takes plain ``jax.grad`` gradients. Works with
  ``optax.inject_hyperparams``.

  Args:
    learning_rate: the learning rate :math:`\eta_t`, a number or a schedule.
    {scale_by_sonew}

  Returns:
    An ``optax.GradientTransformationExtraArgs`` that needs no statistics:
    plain ``jax.grad`` gradients.

  Example:
    >>> opt = mkor_optax.sonew(1e-2)
    >>> state = opt.init(params)
    >>> loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    >>> updates, state = opt.update(grads, state, params)
    >>> bool(loss_fn(optax.apply_updates(params, updates), x, y) < loss)
    True

  References:
    {SONEW_REFERENCE}

  See Also:
    :func:`scale_by_sonew` (the preconditioner alone), :func:`mkor`,
    :func:`kfac`, :func:`eva`.
  """
  return optax.chain(
      scale_by_sonew(b1=b1, b2=b2, damping=damping, relative_damping=relative_damping,
                     band=band, graft=graft, graft_eps=graft_eps),
      scale_by_finite_learning_rate(learning_rate, 'sonew'))


def scale_by_finite_learning_rate(learning_rate: optax.ScalarOrSchedule,
                                  who: str) -> optax.GradientTransformation:
  """``optax.scale_by_learning_rate`` whose step is a zero update (with a
  :class:`~mkor_optax.numerics.NumericalWarning`) when the learning rate (a
  schedule's value, or an array from ``optax.inject_hyperparams``) is not
  finite, so a bad schedule value cannot write NaN into the parameters."""
  if checks.is_concrete(learning_rate):
    checks.validate(learning_rate=(learning_rate, lambda v: True, ''))
  base = optax.scale_by_learning_rate(learning_rate)

  def update(updates, state, params=None):
    out, new_state = base.update(updates, state, params)
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    ok = jnp.all(jnp.isfinite(jnp.asarray(lr, jnp.float32)))
    receipt = numerics.report_if(~ok, f'{who}: the learning rate is not finite ({{}}): a zero '
                                 'update', lr)
    ok = ok & (receipt == 0)  # the receipt is zero; depending on it keeps the check
    return jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), out), new_state

  return optax.GradientTransformation(base.init, update)
