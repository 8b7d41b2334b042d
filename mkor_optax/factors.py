"""A layer side's factor inverse: dense ``(S, d, d)`` or low-rank-plus-identity.

The only module that tells the two forms apart. Sides narrower than
``low_rank_min_dim`` (or every side, without ``low_rank``) hold a dense
inverse refreshed by :func:`mkor_optax.rank1.refresh_inverse_checked`;
wider ones a :class:`~mkor_optax.lowrank.LowRankInverse`
``c I + Q diag(s) Q^T`` refreshed by :func:`mkor_optax.lowrank.refresh_checked`
(the same rule in the basis ``Q``). Both precondition and rescale through
:func:`precondition_rescaled`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mkor_optax import lowrank, rank1
from mkor_optax.numerics import report_resets, safe_norm  # noqa: F401 (report_resets: re-exported)
from mkor_optax.precondition import precondition, rescale_to

DENSE_16_BIT = (
    'factor_dtype: {dtype} is only for low-rank factors (low_rank set and low_rank_min_dim <= '
    'low_rank, e.g. low_rank=8, low_rank_min_dim=0): a dense factor inverse stored in 16 bits '
    'cannot stay positive definite, since rounding each entry to 8 significant bits moves its '
    'eigenvalues by about 0.4% of the largest times the width, more than the small eigenvalues '
    'that carry the curvature, and the refreshes compound it (measured: smallest eigenvalue '
    '-0.06 after 300 steps on inputs x1000). A low-rank factor keeps its eigenvalues c and s '
    'in float32 and only the orthonormal basis Q in 16 bits, re-orthonormalised at every '
    'refresh, which stays positive definite. Sides no wider than low_rank stay dense float32.')


def side_shape(factor) -> tuple:
  """``(S, d)`` of one side's state entry (dense, low-rank, a covariance pair
  or an ``(S, d)`` vector: each has a ``shape`` that starts with ``(S, d)``)."""
  return tuple(factor.shape[:2])


def identity(n: int, s: int, *, rank, min_dim, dtype):
  """``I`` for a side of width ``n`` and ``s`` stack entries: low-rank when
  ``rank < n`` and ``n >= min_dim``, else dense (16-bit dense: refused)."""
  if rank is not None and rank < n and n >= int(min_dim):
    return lowrank.identity(n, rank, s, dtype)
  if jnp.finfo(dtype).bits < 32 and n > (rank or 0):
    raise ValueError(DENSE_16_BIT.format(dtype=dtype.name))
  # a side no wider than the rank is dense and kept in float32 (nothing to save)
  return jnp.broadcast_to(jnp.eye(n, dtype=jnp.promote_types(dtype, jnp.float32)), (s, n, n))


def refresh_checked(p, v, *, gamma, zeta, epsilon, refresh: str, widths=None, **dense):
  r"""``(refreshed p, per-entry reset flag)`` for either form.

  ``v`` is one statistic per stack entry, ``(S, d)``, or ``k`` sketches,
  ``(S, k, d)``. Sketches refresh the factor with their average outer
  product,

  .. math::  F_t = \gamma F_{t-1} + \frac{1-\gamma}{k} \sum_j v_j v_j^T

  (``refresh='ema'``; ``'blend'`` blends ``P`` toward ``I`` once, then takes
  the ``k`` terms ``v_j v_j^T / k``), as ``k`` rank-1 steps: the first is the
  rule itself with ``v_1 / sqrt(k)`` (stabiliser included); each further one
  adds its term without decay, which is the ``'blend'`` rule at ``gamma = 1``
  and ``zeta = 1`` (no blend, no stabiliser) with ``v_j`` scaled by
  ``sqrt((1 - gamma) / k)`` (``ema``) or ``1 / sqrt(k)`` (``blend``). The
  ``k`` steps run in one ``lax.scan`` whose inputs say each step's rule, so
  the program holds one copy of the rule whatever ``k`` is. Each step keeps
  its own safety checks. A dense ``p`` takes all ``k`` terms at once instead
  (:func:`mkor_optax.rank1.refresh_inverse_rank_k_checked`, the Woodbury
  identity: the same factor, one pass over ``p`` instead of ``k`` in a loop).
  ``widths`` ``(S,)``: dense sides zero-padded to a common width
  (:func:`refresh_relative_many`). ``dense``: a dense rule's ``scale`` and
  ``keep`` (:func:`mkor_optax.rank1.refresh_inverse_checked`).
  """
  low = isinstance(p, lowrank.LowRankInverse)
  rule = functools.partial(lowrank.refresh_checked if low else rank1.refresh_inverse_checked,
                           widths=widths, **dense)
  if v.ndim == 2:
    return rule(p, v, gamma=gamma, zeta=zeta, epsilon=epsilon, refresh=refresh)
  k = v.shape[1]
  if k == 1:
    return rule(p, v[:, 0], gamma=gamma, zeta=zeta, epsilon=epsilon, refresh=refresh)
  if not low:  # all k terms at once (Woodbury), no loop
    return rank1.refresh_inverse_rank_k_checked(p, v, gamma=gamma, zeta=zeta, epsilon=epsilon,
                                                refresh=refresh, widths=widths, **dense)
  weight = jnp.sqrt((1.0 - gamma) / k) if refresh == 'ema' else 1.0 / np.sqrt(k)
  first = jnp.arange(k) == 0  # the rule itself; then additive blend steps
  steps = (jnp.swapaxes(v, 0, 1),  # (k, S, d)
           jnp.where(first, gamma, 1.0).astype(jnp.float32),
           jnp.where(first, zeta, 1.0).astype(jnp.float32),
           first & (refresh == 'ema'),  # the step's rule: ema?
           jnp.where(first, 1.0 / np.sqrt(k), weight).astype(jnp.float32))

  def step(carry, x):
    p, reset = carry
    v_j, gamma_j, zeta_j, ema_j, scale_j = x
    p, again = rule(p, v_j * scale_j, gamma=gamma_j, zeta=zeta_j, epsilon=epsilon, refresh=ema_j)
    return (p, reset | again), None

  reset = jnp.zeros(v.shape[:1], bool)
  (p, reset), _ = jax.lax.scan(step, (p, reset), steps)
  return p, reset


def scaled(p, factor):
  """``factor * P`` for either form (``factor``: ``(S,)``)."""
  if isinstance(p, lowrank.LowRankInverse):
    return lowrank.LowRankInverse(p.c * factor, p.q, p.s * factor[:, None])
  return (p * factor[:, None, None].astype(p.dtype)).astype(p.dtype)


MAX_MOVED = 1e3


def max_abs(p, widths=None):
  """``max|P_ij|`` per stack entry of either form (``widths``: zero-padded
  sides' own widths)."""
  if isinstance(p, lowrank.LowRankInverse):
    return lowrank.max_abs(p, widths)
  return jnp.max(jnp.abs(p.astype(jnp.float32)), axis=(-2, -1))


def statistic_rms(v, widths=None):
  """``sqrt(mean_j |v_j|^2 / d)`` per stack entry of one statistic ``(S, d)``
  or ``k`` sketches ``(S, k, d)``: the square root of the mean eigenvalue of
  ``(1/k) sum_j v_j v_j^T``, overflow-safe. ``widths`` ``(S,)``: each
  entry's own ``d`` (zero-padded statistics)."""
  flat = v.reshape(v.shape[0], -1).astype(jnp.float32)
  if widths is None:
    return safe_norm(flat, axis=-1) / np.sqrt(flat.shape[-1])
  k = flat.shape[-1] // v.shape[-1]
  return safe_norm(flat, axis=-1) / jnp.sqrt((k * jnp.asarray(widths)).astype(jnp.float32))


def ema_rms(rms, v_rms, gamma):
  """``sqrt(gamma rms^2 + (1 - gamma) v_rms^2)``, overflow-safe; ``v_rms``
  where ``rms`` is 0 (no statistic yet: the EMA starts at the first one)."""
  a, b = jnp.sqrt(gamma) * rms, jnp.sqrt(1.0 - gamma) * v_rms
  top = jnp.maximum(a, b)
  unit = jnp.where(top > 0, top, 1.0)
  both = top * jnp.sqrt(jnp.square(a / unit) + jnp.square(b / unit))
  return jnp.where(rms > 0, both, v_rms)


def refresh_relative(p, rms, v, *, damping, gamma, zeta, epsilon, refresh: str, widths=None,
                     keep=None):
  r"""The scale-free refresh: ``(p, rms, reset)`` after the statistic ``v``.

  ``rms`` ``(S,)`` tracks the side's scale, ``n_t = rms_t^2``, an EMA of the
  statistics' mean eigenvalue ``|v|^2 / d`` (:func:`statistic_rms`) with the
  factor's momentum, started at the first statistic. The stored inverse is
  kept in units of ``damping * n_t``,

  .. math::  \hat P_t = \lambda n_t F_t^{-1},

  so the rule of :func:`refresh_checked` runs on the unit-free statistic
  ``w = v / sqrt(lambda n_t)`` (mean eigenvalue ``1/lambda``) after the old
  inverse is moved to the new units (``\hat P / \rho`` with
  ``rho = n_{t-1} / n_t``). Its identity start is then the prior
  ``F_{-1} = lambda n_0 I``, and its stabiliser tests ``max|\hat P|``, both
  relative to the side's own scale: multiplying every ``v`` by ``c``
  multiplies ``n`` by ``c^2`` and leaves ``\hat P`` exactly as it was.
  Before the first non-zero statistic the prior stays as it was; a moved
  inverse is capped at ``MAX_MOVED * max(epsilon, 1)`` (statistics that jump
  by orders of magnitude make the old factor negligible, not infinite).
  ``damping=None`` is the absolute form: ``P = F^{-1}``, ``rms`` unused.
  ``widths``: zero-padded dense sides (:func:`refresh_relative_many`).
  ``keep`` ``(S,)``: entries returned as they are (reset flag ``False``).
  A dense inverse is moved, refreshed and kept in the rule's one write.
  """
  keep = jnp.zeros(rms.shape, bool) if keep is None else jnp.broadcast_to(keep, rms.shape)
  rule = dict(gamma=gamma, zeta=zeta, epsilon=epsilon, refresh=refresh, widths=widths)
  if damping is None:
    new, reset = _refreshed(p, v, None, keep, rule)
    return new, rms, reset
  new_rms = ema_rms(rms, statistic_rms(v, widths), gamma)
  moved = (rms > 0) & (new_rms > 0)
  rho = jnp.where(moved, jnp.square(rms / jnp.where(moved, new_rms, 1.0)), 1.0)
  unit = jnp.sqrt(jnp.asarray(damping, jnp.float32)) * new_rms
  inv_unit = jnp.where(unit > 0, 1.0 / jnp.where(unit > 0, unit, 1.0), 0.0)
  w = v.astype(jnp.float32) * inv_unit.reshape((-1,) + (1,) * (v.ndim - 1))
  # A side whose statistics jump by many orders of magnitude would move its
  # old inverse past float32's range; its old factor is then negligible,
  # and is floored so that the moved inverse stays within MAX_MOVED * epsilon.
  grow = jnp.where(moved, 1.0 / jnp.where(moved, rho, 1.0), 1.0)
  top = max_abs(p, widths)
  grow = jnp.minimum(grow, MAX_MOVED * jnp.maximum(epsilon, 1.0) / jnp.where(top > 0, top, 1.0))
  grow = jnp.maximum(grow, 0.0)
  kept = keep | ~(new_rms > 0)  # no statistic yet (all zero): the prior stays as it was
  new, reset = _refreshed(p, w, grow, kept, rule)
  return new, jnp.where(keep, rms, new_rms), reset


def _refreshed(p, v, scale, keep, rule):
  """:func:`refresh_checked` of ``scale * p`` (``None``: ``p``), the ``keep``
  entries returned as ``p`` is (reset flag ``False``); a dense ``p`` is
  scaled, refreshed and kept in the rule's one write."""
  if not isinstance(p, lowrank.LowRankInverse):
    return refresh_checked(p, v, **rule, scale=scale, keep=keep)
  new, reset = refresh_checked(p if scale is None else scaled(p, scale), v, **rule)
  return _by_entry(keep, p, new), reset & ~keep


def _by_entry(flag, new, old):
  """``new`` where the ``(S,)`` ``flag`` holds, else ``old``, entry by entry
  of the stack axis (arrays or pytrees of ``(S, ...)`` arrays)."""
  return jax.tree.map(lambda a, b: jnp.where(flag.reshape((-1,) + (1,) * (a.ndim - 1)), a, b),
                      new, old)


# Sides refreshed together: a group of narrow sides is zero-padded to its
# widest member when that holds at most PAD_WASTE times their entries, or at
# most PAD_FREE entries in all (a refresh of that size costs less than the
# fixed cost of the kernels it saves, and every group is one more copy of
# the refresh to compile). A dense side holds d^2 entries, a low-rank one
# d k; dense sides wider than GROUP_MAX_DIM are refreshed alone (their
# arithmetic, not the kernel count, is the cost).
PAD_WASTE = 2.0
PAD_FREE = 2 ** 18
GROUP_MAX_DIM = 1024


def _groups(widths: list, rank=None) -> list:
  """Indices of ``widths`` (sides, ``(S, d)`` each) in groups padded to a
  common width, narrowest first (the rule of :data:`PAD_WASTE`): dense
  sides, or low-rank sides of rank ``rank`` (no width limit: a padded basis
  row costs ``k`` entries, not ``d``)."""
  order = sorted(range(len(widths)), key=lambda i: widths[i][1])
  size = (lambda d: d * d) if rank is None else (lambda d: d * rank)
  groups, current, entries = [], [], 0
  for i in order:
    s, d = widths[i]
    if rank is None and d > GROUP_MAX_DIM:
      groups.append([i])
      continue
    count = sum(widths[j][0] for j in current) + s
    padded = count * size(d)  # every entry padded to d, the widest so far
    if current and padded > PAD_FREE and padded > PAD_WASTE * (entries + s * size(d)):
      groups.append(current)
      current, entries = [], 0
    current.append(i)
    entries += s * size(d)
  if current:
    groups.append(current)
  return groups


def _pad(a, width, n):
  """``a`` zero-padded to ``width`` on its last ``n`` axes."""
  return jnp.pad(a, [(0, 0)] * (a.ndim - n) + [(0, width - a.shape[-1])] * n)


def _padded(p, width):
  """A side's inverse zero-padded to ``width``: a dense ``(S, d, d)`` one on
  both axes, a low-rank one on its basis' rows (``c`` then covers the padded
  coordinates, which no statistic reaches and the result drops)."""
  if isinstance(p, lowrank.LowRankInverse):
    return p._replace(q=jnp.pad(p.q, [(0, 0), (0, width - p.q.shape[1]), (0, 0)]))
  return _pad(p, width, 2)


def _cropped(p, width):
  """:func:`_padded` undone: the first ``width`` coordinates."""
  if isinstance(p, lowrank.LowRankInverse):
    return p._replace(q=p.q[:, :width])
  return p[:, :width, :width]


def refresh_relative_many(jobs: list, **rule) -> list:
  r""":func:`refresh_relative` of many sides at once: ``jobs`` is a list of
  ``(p, rms, v, keep)``, ``keep`` a scalar bool (the side stays as it was,
  its reset flag ``False``); the result is the list of ``(p, rms, reset)``.

  Each side is refreshed exactly as alone, but dense sides go through one
  program per group instead of one per side: their ``(S, d, d)`` inverses
  and statistics are zero-padded to the group's widest side and stacked
  (the stabiliser's and the reset's identity cover each side's own
  coordinates only, and its scale divides by its own ``d``, so a padded
  block stays exactly zero; the groups: :data:`PAD_WASTE`). A model's
  refresh then compiles to a few programs, not two per layer. Low-rank
  sides of one rank are grouped alike, their bases padded with zero rows
  (the stabiliser's test reads only each side's own rows). ``rule``: the
  keyword arguments of :func:`refresh_relative`.
  """
  out = [None] * len(jobs)
  # dense sides together; low-rank ones by rank, basis dtype and statistic kind
  kinds: dict = {}
  for i, (p, _, v, _) in enumerate(jobs):
    low = isinstance(p, lowrank.LowRankInverse)
    kinds.setdefault(None if not low else (p.rank, p.q.dtype, v.shape[1:-1]), []).append(i)
  batches = [[members[j] for j in g] for key, members in kinds.items()
             for g in _groups([side_shape(jobs[i][0]) for i in members], key[0] if key else None)]
  cat = lambda *xs: jnp.concatenate(xs, axis=0) if len(xs) > 1 else xs[0]
  for members in batches:
    ps, rmss, vs, keeps = zip(*(jobs[i] for i in members))
    sizes = [r.shape[0] for r in rmss]
    width = max(side_shape(p)[1] for p in ps)
    widths = None
    if any(side_shape(p)[1] < width for p in ps):
      widths = jnp.concatenate([jnp.full((s,), side_shape(p)[1], jnp.int32) for s, p in zip(sizes, ps)])
      ps, vs = [_padded(p, width) for p in ps], [_pad(v, width, 1) for v in vs]
    p_old, rms_old = jax.tree.map(cat, *ps), cat(*rmss)
    keep = cat(*(jnp.broadcast_to(k, (s,)) for k, s in zip(keeps, sizes)))
    # In a cond, whose result XLA materialises once: otherwise it fuses the
    # refresh's elementwise tail into each side's slice below, the same
    # arithmetic compiled once per side (most of a small model's compile time).
    p, rms, reset = jax.lax.cond(
        jnp.all(keep), lambda v: (p_old, rms_old, jnp.zeros_like(keep)),
        lambda v: refresh_relative(p_old, rms_old, v, widths=widths, keep=keep, **rule), cat(*vs))
    start = 0
    for i, s in zip(members, sizes):
      cut = lambda a: a[start:start + s]
      p_i = jax.tree.map(cut, p)
      if widths is not None:
        p_i = _cropped(p_i, side_shape(jobs[i][0])[1])
      out[i] = (p_i, cut(rms), cut(reset))
      start += s
  return out


def power(p, exponent):
  r"""``P^exponent`` of a side's inverse ``P = F^{-1}``, in the form ``p`` has.

  A :class:`~mkor_optax.lowrank.LowRankInverse` ``c I + Q diag(s) Q^T`` has
  eigenvalues ``c + s_i`` on ``Q``'s columns and ``c`` elsewhere, so

  .. math::  P^e = c^e I + Q \operatorname{diag}((c + s)^e - c^e) Q^T

  at no more cost than ``P`` itself; a dense ``P`` goes through ``eigh``
  (``O(d^3)`` per call; its eigenvalues are floored at ``1e-30``). ``e = 1``
  (or ``None``) returns ``p``; ``1/2`` and ``1/4`` are the inverse square and
  fourth roots of the factor ``F`` (the Shampoo family's power).
  """
  if exponent is None or (isinstance(exponent, (int, float)) and exponent == 1):
    return p
  one = jnp.asarray(exponent) == 1  # an array under optax.inject_hyperparams: keep P exactly
  if isinstance(p, lowrank.LowRankInverse):
    c = jnp.maximum(p.c, 1e-30)
    top = jnp.maximum(c[:, None] + p.s, 1e-30)
    c_e = c ** exponent
    return lowrank.LowRankInverse(jnp.where(one, p.c, c_e), p.q,
                                  jnp.where(one, p.s, top ** exponent - c_e[:, None]))

  def rooted(p):
    lam, vec = jnp.linalg.eigh(p.astype(jnp.float32))
    lam = jnp.maximum(lam, 1e-30) ** exponent
    return jnp.einsum('sij,sj,skj->sik', vec, lam, vec).astype(p.dtype)

  if isinstance(exponent, (int, float)):
    return rooted(p)
  return jax.lax.cond(one, lambda p: p, rooted, p)  # no eigh on steps where it is 1


def in_statistic_units(u, rms_per_side, damping, exponent=1.0):
  """``u = P_R^e G P_L^e`` (a matrix or its row blocks) back in the
  statistics' units: divided by ``(damping n)^e`` per preconditioned side
  (``n = rms^2``, ``(S,)``), since the stored ``P = damping n F^-1``; so it is
  ``F_R^-e G F_L^-e``. ``damping=None`` (``P = F^-1`` already): ``u``."""
  if damping is None or not rms_per_side:
    return u
  n = [jnp.asarray(damping, jnp.float32) * jnp.square(rms) for rms in rms_per_side]
  units = functools.reduce(jnp.multiply, [jnp.where(v > 0, 1.0 / jnp.where(v > 0, v, 1.0), 1.0)
                                          for v in n]) ** exponent
  scale = lambda b: b * units.reshape(-1, 1, 1).astype(b.dtype)
  return tuple(scale(b) for b in u) if isinstance(u, tuple) else scale(u)


def precondition_rescaled(g_aug, r_inv=None, l_inv=None, blocks=None, g_sq=None, rescale=True):
  """``rescale_to(precondition(g_aug, r_inv, l_inv), g_aug)`` where a side may
  also be a :class:`~mkor_optax.lowrank.LowRankInverse`: the dense sides are
  applied first, then the low-rank ones with the rescale folded in
  (:func:`mkor_optax.lowrank.precondition_rescaled`). ``blocks``, the row
  blocks of ``g_aug`` (:func:`~mkor_optax.precondition.row_blocks`), lets a
  layer with only low-rank sides skip the kernel/bias concatenation; the
  result is then the tuple of its row blocks, which
  :func:`~mkor_optax.precondition.from_matrix` takes as well. ``g_sq``: the
  ``(S,)`` squared norms of ``g_aug`` when already known. ``rescale=False``:
  ``R^-1 G L^-1`` itself, not rescaled.
  """
  low_r = r_inv if isinstance(r_inv, lowrank.LowRankInverse) else None
  low_l = l_inv if isinstance(l_inv, lowrank.LowRankInverse) else None
  if low_r is None and low_l is None:
    u = precondition(g_aug, r_inv, l_inv)
    return rescale_to(u, g_aug, g_sq) if rescale else u
  g_norm = None
  if rescale:
    g_sq = jnp.sum(jnp.square(g_aug), axis=(1, 2)) if g_sq is None else g_sq
    g_norm = jnp.sqrt(g_sq)
  dense_r = None if low_r is not None else r_inv
  dense_l = None if low_l is not None else l_inv
  if dense_r is None and dense_l is None and blocks is not None:
    return tuple(lowrank.precondition_rescaled(list(blocks), low_r, low_l, g_norm, g_sq))
  h = precondition(g_aug, dense_r, dense_l)
  h_sq = g_sq if dense_r is None and dense_l is None and rescale else None
  return lowrank.precondition_rescaled([h], low_r, low_l, g_norm, h_sq)[0]

