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


def max_abs(p: LowRankInverse) -> jax.Array:
  """``max_ij |P_ij|`` per stack entry, as the largest diagonal entry (``P`` SPD)."""
  q = p.q.astype(jnp.float32)
  return p.c + jnp.max(jnp.einsum('sik,sk->si', q * q, p.s), axis=-1)


def left(p: LowRankInverse, x: jax.Array) -> jax.Array:
  """``P @ x`` for ``x`` of shape ``(S, d, n)``."""
  q = p.q.astype(x.dtype)
  coef = jnp.einsum('sik,sin->skn', q, x) * p.s[:, :, None].astype(x.dtype)
  return p.c[:, None, None] * x + jnp.einsum('sik,skn->sin', q, coef)


def right(x: jax.Array, p: LowRankInverse) -> jax.Array:
  """``x @ P`` for ``x`` of shape ``(S, n, d)``."""
  q = p.q.astype(x.dtype)
  coef = jnp.einsum('sni,sik->snk', x, q) * p.s[:, None, :].astype(x.dtype)
  return p.c[:, None, None] * x + jnp.einsum('snk,sjk->snj', coef, q)


def refresh(p: LowRankInverse, v: jax.Array, *, gamma, zeta, epsilon, refresh: str) -> LowRankInverse:
  """One refresh of ``p`` with the statistic ``v`` ``(S, d)`` (module docstring)."""
  q = p.q.astype(jnp.float32)
  v = v.astype(jnp.float32)
  big = max_abs(p) > epsilon
  alpha = jnp.where(big, zeta, 1.0)
  beta = jnp.where(big, 1.0 - zeta, 0.0)
  if refresh == 'blend':
    alpha, beta = gamma * alpha, gamma * beta + (1.0 - gamma)
  c1 = alpha * p.c + beta
  s1 = alpha[:, None] * p.s
  proj = jnp.einsum('sik,si->sk', q, v)
  r = v - jnp.einsum('sik,sk->si', q, proj)
  again = jnp.einsum('sik,si->sk', q, r)  # second Gram-Schmidt pass
  r = r - jnp.einsum('sik,sk->si', q, again)
  rn = jnp.linalg.norm(r, axis=-1)
  # v (numerically) inside span(Q): no new direction; the dropped c'|r| is
  # below 1e-4 of |v|.
  fresh = rn > 1e-4 * jnp.linalg.norm(v, axis=-1)
  new_col = jnp.where(fresh[:, None], r / jnp.where(fresh, rn, 1.0)[:, None], 0.0)
  w = jnp.concatenate([(c1[:, None] + s1) * proj, jnp.where(fresh, c1 * rn, 0.0)[:, None]], axis=-1)
  vu = c1 * jnp.sum(v * v, axis=-1) + jnp.sum(s1 * proj * proj, axis=-1)  # v^T P' v
  if refresh == 'ema':
    ratio = (1.0 - gamma) / gamma
    kappa, lam = 1.0 / gamma, (ratio / gamma) / (1.0 + ratio * vu)
  else:
    kappa, lam = jnp.ones_like(vu), 1.0 / (1.0 + vu)
  kappa = jnp.broadcast_to(kappa, vu.shape)
  diag = jnp.concatenate([kappa[:, None] * s1, jnp.zeros_like(s1[:, :1])], axis=-1)
  m = jax.vmap(jnp.diag)(diag) - lam[:, None, None] * (w[:, :, None] * w[:, None, :])
  m = 0.5 * (m + jnp.swapaxes(m, -1, -2))
  evals, evecs = jnp.linalg.eigh(m)
  keep = jnp.argsort(-jnp.abs(evals), axis=-1)[:, :p.rank]
  evals = jnp.take_along_axis(evals, keep, axis=-1)
  evecs = jnp.take_along_axis(evecs, keep[:, None, :], axis=-1)
  basis = jnp.concatenate([q, new_col[:, :, None]], axis=-1)
  q_new = jnp.einsum('sij,sjk->sik', basis, evecs)
  return LowRankInverse(kappa * c1, q_new.astype(p.q.dtype), evals)
