"""Low-rank-plus-identity factor inverses for wide layers (beyond the paper).

An MKOR factor inverse starts at the identity, and each refresh
(:func:`mkor_optax.mkor.refresh_inverse`) blends it affinely toward ``I`` and
subtracts one rank-1 term. After ``t`` refreshes it is therefore exactly

    P = c I + Q diag(s) Q^T,      Q (d, k) with orthonormal columns,  rank t.

:class:`LowRankInverse` keeps ``P`` in this form with a fixed number ``k`` of
columns: memory ``O(d k)`` instead of ``d^2``, a refresh in ``O(d k^2 + k^3)``
instead of ``O(d^2)``, and ``P @ X`` for a ``(d, n)`` matrix in ``O(d n k)``
instead of ``O(d^2 n)`` (Woodbury's identity read backwards: the inverse is
stored, never inverted).

One refresh, the same rule as the dense one written in the basis ``Q``:

1. stabiliser: ``P`` is symmetric positive definite, so its largest absolute
   entry is on the diagonal (``|P_ij| <= sqrt(P_ii P_jj)``), and
   ``P_ii = c + sum_j s_j Q_ij^2`` costs ``O(d k)``. If it exceeds
   ``epsilon``, ``P' = zeta P + (1 - zeta) I`` (``refresh='blend'`` also
   blends ``gamma P + (1-gamma) I``), i.e. ``c' = alpha c + beta``, ``s' = alpha s``.
2. ``p = Q^T v``, ``r = v - Q p`` (Gram-Schmidt, done twice), ``q = r/|r|``:
   ``u = P' v = c' v + Q (s' p) = [Q q] w`` with ``w = [c' p + s' p; c' |r|]``.
3. ``P+ = kappa P' - lam u u^T = kappa c' I + [Q q] M [Q q]^T`` with the
   ``(k+1)``-square ``M = diag(kappa s', 0) - lam w w^T`` (``kappa``, ``lam``
   as in the dense rule).
4. ``M = V diag(m) V^T`` (``eigh``); keep the ``k`` eigenpairs of largest
   ``|m|``: ``Q <- [Q q] V_keep``, ``s <- m_keep``, ``c <- kappa c'``.

Truncation: the first ``k`` refreshes are exact (the rank is then at most
``k`` and the dropped eigenvalue is 0). After that each refresh drops the one
direction in which ``P`` differs least from ``c I``: by Eckart-Young this is
the best rank-``k`` approximation of ``P - c I``, an error of ``|m_dropped|``
in spectral norm at that refresh (the directions dropped are the oldest and
weakest statistics, which the stabiliser's blend toward ``I`` also fades).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mkor_optax.numerics import blend_first, rank1_coefficients, unit_statistic


class LowRankInverse(NamedTuple):
  """``P = c I + Q diag(s) Q^T`` per stack entry: ``c`` ``(S,)``,
  ``q`` ``(S, d, k)`` (orthonormal columns), ``s`` ``(S, k)``.

  ``c`` and ``s`` are float32; ``q`` is stored in the factor dtype.
  """

  c: jax.Array
  q: jax.Array
  s: jax.Array

  @property
  def shape(self) -> tuple:
    """Shape of the dense ``(S, d, d)`` stack this represents."""
    n, d, _ = self.q.shape
    return (n, d, d)

  @property
  def rank(self) -> int:
    return self.q.shape[-1]


def identity(d: int, rank: int, n_stack: int, dtype) -> LowRankInverse:
  """``P = I``: ``c = 1``, ``s = 0`` and ``Q`` the first ``rank`` unit vectors."""
  if not 0 < rank < d:
    raise ValueError(f'low-rank factor: need 0 < rank < d, got rank {rank} for d {d}')
  q = jnp.broadcast_to(jnp.eye(d, rank, dtype=dtype), (n_stack, d, rank))
  return LowRankInverse(jnp.ones((n_stack,), jnp.float32), q,
                        jnp.zeros((n_stack, rank), jnp.float32))


def to_dense(p: LowRankInverse) -> jax.Array:
  """The ``(S, d, d)`` matrices (for tests and inspection)."""
  q = p.q.astype(jnp.float32)
  eye = jnp.eye(q.shape[1], dtype=jnp.float32)
  return p.c[:, None, None] * eye + jnp.einsum('sik,sk,sjk->sij', q, p.s, q)


def max_abs(p: LowRankInverse, widths=None) -> jax.Array:
  """``max_ij |P_ij|`` per stack entry, as the largest diagonal entry (``P`` SPD).
  ``widths`` ``(S,)``: each entry's own ``d`` (a basis zero-padded beyond it)."""
  q = p.q.astype(jnp.float32)
  diag = jnp.einsum('sik,sk->si', q * q, p.s)
  if widths is not None:
    diag = jnp.where(jnp.arange(q.shape[1]) < jnp.asarray(widths)[:, None], diag, -jnp.inf)
  return p.c + jnp.max(diag, axis=-1)


def orthonormalised(p: LowRankInverse) -> LowRankInverse:
  """The same ``P`` with ``Q`` exactly orthonormal in float32: ``Q = Q_o R``
  (QR), then ``R diag(s) R^T = V diag(m) V^T`` gives ``Q_o V`` and ``m``.
  A basis stored in 16 bits drifts from orthonormal by its rounding at every
  refresh; without this the drift accumulates and ``P`` turns indefinite."""
  q_o, r = jnp.linalg.qr(p.q.astype(jnp.float32))
  core = jnp.einsum('sij,sj,skj->sik', r, p.s, r)
  m, v = jnp.linalg.eigh(0.5 * (core + jnp.swapaxes(core, -1, -2)))
  return LowRankInverse(p.c, jnp.einsum('sij,sjk->sik', q_o, v), m)


def refresh(p: LowRankInverse, v: jax.Array, *, gamma, zeta, epsilon, refresh: str) -> LowRankInverse:
  """One refresh of ``p`` with the statistic ``v`` ``(S, d)`` (module docstring)."""
  return refresh_checked(p, v, gamma=gamma, zeta=zeta, epsilon=epsilon, refresh=refresh)[0]


def refresh_checked(p: LowRankInverse, v: jax.Array, *, gamma, zeta, epsilon, refresh: str,
                    widths=None):
  """:func:`refresh` and a ``(S,)`` flag of the entries whose eigenvalues had
  to be raised to the floor (or that were not finite and were kept).

  Safety, beyond the rule itself: the statistic enters as its unit vector
  and ``1/|v|^2`` (overflow-safe, as the dense rule); with a 16-bit ``Q``
  the basis is re-orthonormalised first (:func:`orthonormalised`); and the
  eigenvalues ``c + s_i`` of the result are kept at or above
  ``eps(Q's dtype) * max(c, c + s)``, so the stored ``P`` is positive
  definite by construction. ``widths`` ``(S,)``: sides whose basis rows and
  statistic are zero-padded beyond their own width (the padded rows stay
  zero; only the stabiliser's test reads the width).
  """
  stored = p
  if jnp.finfo(p.q.dtype).bits < 32:
    p = orthonormalised(p)
  q = p.q.astype(jnp.float32)
  v, inv_sq = unit_statistic(v.astype(jnp.float32))
  top = max_abs(p, widths)
  big = top > epsilon
  alpha = jnp.where(big, zeta, 1.0)
  beta = jnp.where(big, 1.0 - zeta, 0.0)
  alpha, beta = blend_first(alpha, beta, gamma, refresh)
  c1 = alpha * p.c + beta
  s1 = alpha[:, None] * p.s
  proj = jnp.einsum('sik,si->sk', q, v)
  r = v - jnp.einsum('sik,sk->si', q, proj)
  again = jnp.einsum('sik,si->sk', q, r)  # second Gram-Schmidt pass
  r = r - jnp.einsum('sik,sk->si', q, again)
  rn = jnp.linalg.norm(r, axis=-1)
  # v (numerically) inside span(Q): no new direction; the dropped c'|r| is
  # below 1e-4 of |v| (= 1).
  fresh = rn > 1e-4
  new_col = jnp.where(fresh[:, None], r / jnp.where(fresh, rn, 1.0)[:, None], 0.0)
  w = jnp.concatenate([(c1[:, None] + s1) * proj, jnp.where(fresh, c1 * rn, 0.0)[:, None]], axis=-1)
  vu = c1 * jnp.sum(v * v, axis=-1) + jnp.sum(s1 * proj * proj, axis=-1)  # v^T P' v
  kappa, lam = rank1_coefficients(vu, inv_sq, gamma, refresh, alpha * top + beta)
  diag = jnp.concatenate([kappa[:, None] * s1, jnp.zeros_like(s1[:, :1])], axis=-1)
  m = jax.vmap(jnp.diag)(diag) - lam[:, None, None] * (w[:, :, None] * w[:, None, :])
  m = 0.5 * (m + jnp.swapaxes(m, -1, -2))
  evals, evecs = jnp.linalg.eigh(m)
  keep = jnp.argsort(-jnp.abs(evals), axis=-1)[:, :p.rank]
  evals = jnp.take_along_axis(evals, keep, axis=-1)
  evecs = jnp.take_along_axis(evecs, keep[:, None, :], axis=-1)
  basis = jnp.concatenate([q, new_col[:, :, None]], axis=-1)
  q_new = jnp.einsum('sij,sjk->sik', basis, evecs)
  c_new = kappa * c1
  top = jnp.maximum(c_new, c_new + jnp.max(evals, axis=-1))
  floor = jnp.finfo(stored.q.dtype).eps * top
  low = jnp.any(c_new[:, None] + evals < floor[:, None], axis=-1)
  evals = jnp.maximum(evals, (floor - c_new)[:, None])
  out = LowRankInverse(c_new, q_new.astype(stored.q.dtype), evals)
  ok = jnp.isfinite(c_new) & jnp.all(jnp.isfinite(evals), -1) & jnp.all(jnp.isfinite(q_new), (1, 2))
  keep_old = lambda new, old: jnp.where(ok.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
  return jax.tree.map(keep_old, out, stored), low | ~ok


def precondition_rescaled(blocks, r, l, g_norm: jax.Array, h_sq=None) -> list:
  """``R h L`` rescaled to the Frobenius norm ``g_norm`` ``(S,)``, where ``h``
  ``(S, m, n)`` is given as row blocks (``[kernel rows, bias row]``, so the
  two are never concatenated) and ``r``/``l`` are each a
  :class:`LowRankInverse` or ``None`` (the identity). Returns the output's
  row blocks. One matrix product over ``h``'s size, besides ``Q^T h`` and ``h Q``.

  With ``R = c_r I + Q_r S_r Q_r^T`` and ``L = c_l I + Q_l S_l Q_l^T``::

      R h L = alpha h + Q_r X + Y Q_l^T,          alpha = c_r c_l,
      A = Q_r^T h,  B = h Q_l,  X = c_l S_r A + S_r (A Q_l) S_l Q_l^T,  Y = c_r B S_l

  and its squared norm needs only ``k``-sized products::

      alpha^2 |h|^2 + <X, Q_r^T Q_r X> + <Y Q_l^T Q_l, Y>
        + 2 alpha (<A, X> + <B, Y>) + 2 <X Q_l, Q_r^T Y>

  so the rescale ``s`` is known before the output exists, and the output is
  ``(s alpha) h + [Q_r, Y] [s X; s Q_l^T]``. A zero result stays zero.
  ``h_sq``: ``|h|^2`` ``(S,)`` when the caller has it. ``g_norm=None``:
  ``R h L`` itself (``s = 1``, no norm computed).
  """
  h0 = blocks[0]
  n_stack, dtype = h0.shape[0], h0.dtype
  one = jnp.ones((n_stack,), dtype)
  c_r = one if r is None else r.c
  c_l = one if l is None else l.c
  alpha = c_r * c_l
  total = lambda terms: sum(jnp.sum(t, axis=(1, 2)) for t in terms)
  if r is not None:
    q_r = r.q.astype(dtype)
    bounds = np.cumsum([0] + [h.shape[1] for h in blocks])
    q_rows = [q_r[:, lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]
    a = sum(jnp.einsum('smk,smn->skn', q, h) for q, h in zip(q_rows, blocks))
    x = c_l[:, None, None] * r.s[:, :, None] * a
  if l is not None:
    q_l = l.q.astype(dtype)
    bs = [jnp.einsum('smn,snk->smk', h, q_l) for h in blocks]
    ys = [(c_r[:, None, None] * b) * l.s[:, None, :] for b in bs]
  if r is not None and l is not None:
    core = r.s[:, :, None] * jnp.einsum('skn,snj->skj', a, q_l) * l.s[:, None, :]
    x = x + jnp.einsum('skj,snj->skn', core, q_l)
  s = one
  if g_norm is not None:  # the squared norm of R h L from k-sized products
    sq = jnp.square(alpha) * (total(jnp.square(h) for h in blocks) if h_sq is None else h_sq)
    if r is not None:
      gram = jnp.einsum('smk,smj->skj', q_r, q_r)
      sq += total([x * jnp.einsum('skj,sjn->skn', gram, x), 2.0 * alpha[:, None, None] * a * x])
    if l is not None:
      gram = jnp.einsum('snk,snj->skj', q_l, q_l)
      sq += total(jnp.einsum('smk,skj->smj', y, gram) * y for y in ys)
      sq += 2.0 * alpha * total(b * y for b, y in zip(bs, ys))
    if r is not None and l is not None:
      qy = sum(jnp.einsum('smk,smj->skj', q, y) for q, y in zip(q_rows, ys))
      sq += 2.0 * total([jnp.einsum('skn,snj->skj', x, q_l) * qy])
    norm = jnp.sqrt(jnp.maximum(sq, 0.0))
    s = jnp.where(norm > 0, g_norm / jnp.where(norm > 0, norm, 1.0), 0.0)
  rhs = []
  if r is not None:
    rhs.append(s[:, None, None] * x)
  if l is not None:
    rhs.append(s[:, None, None] * jnp.swapaxes(q_l, 1, 2))
  rhs = jnp.concatenate(rhs, axis=1)
  out = []
  for i, h in enumerate(blocks):
    lhs = ([q_rows[i]] if r is not None else []) + ([ys[i]] if l is not None else [])
    low = jnp.einsum('smk,skn->smn', jnp.concatenate(lhs, axis=-1), rhs)
    out.append((s * alpha)[:, None, None] * h + low)
  return out
