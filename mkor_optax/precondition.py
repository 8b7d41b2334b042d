r"""A layer's gradient as matrices, Kronecker preconditioning, and the rescale.

The kernel gradient ``G`` ``(*stack, *in_axes, *out_axes)`` and bias gradient
``g_b`` of a planned layer are viewed as ``S`` matrices
``G_aug = [G; g_b]`` of shape ``(d_in + 1, d_out)`` (:func:`to_matrix`),
preconditioned per stack entry as

.. math::  U = R^{-1}\, G_{aug}\, L^{-1}

with ``R^-1`` the input-side and ``L^-1`` the output-side factor inverse (a
missing side is the identity), and rescaled to the Frobenius norm of the raw
``G_aug`` (:func:`rescale_to`), so that the next transform of the chain sees
the gradient's scale with the curvature's direction.
"""

from __future__ import annotations

import jax.numpy as jnp

from mkor_optax.layout import Dims, LayerPlan
from mkor_optax.paths import get_at, set_at
from mkor_optax.sharding import gathered, placed_like


def to_matrix(kernel, bias, d: Dims):
  """``(S, d_in[+1], d_out)`` float32 stack of ``[kernel; bias]`` matrices."""
  m = gathered(kernel).reshape((d.n_stack, d.d_in, d.d_out)).astype(jnp.float32)
  if d.has_bias:
    m = jnp.concatenate([m, gathered(bias).reshape((d.n_stack, 1, d.d_out)).astype(jnp.float32)],
                        axis=1)
  return m


def from_matrix(m, kernel_like, bias_like, d: Dims):
  """Inverse of :func:`to_matrix` (or of :func:`row_blocks`, for a tuple),
  back to the leaves' shapes and dtypes."""
  if isinstance(m, tuple):
    kernel_rows, bias_row = m if d.has_bias else (m[0], None)
  else:
    kernel_rows, bias_row = m[:, :d.d_in], m[:, d.d_in] if d.has_bias else None
  kernel = placed_like(kernel_rows.reshape(kernel_like.shape).astype(kernel_like.dtype), kernel_like)
  bias = None
  if d.has_bias:
    bias = placed_like(bias_row.reshape(bias_like.shape).astype(bias_like.dtype), bias_like)
  return kernel, bias


def row_blocks(module, d: Dims) -> tuple:
  """``(kernel (S, d_in, d_out)[, bias (S, 1, d_out)])`` float32: the row
  blocks of :func:`to_matrix`'s matrix, without concatenating them."""
  out = (module['kernel'].reshape((d.n_stack, d.d_in, d.d_out)).astype(jnp.float32),)
  if d.has_bias:
    out += (module['bias'].reshape((d.n_stack, 1, d.d_out)).astype(jnp.float32),)
  return out


def precondition(g_aug, r_inv=None, l_inv=None):
  """``R^-1 @ G_aug @ L^-1`` per stack entry (dense sides); a missing side is the identity."""
  u = g_aug
  if r_inv is not None:
    u = jnp.einsum('sij,sjk->sik', r_inv.astype(jnp.float32), u)
  if l_inv is not None:
    u = jnp.einsum('sij,sjk->sik', u, l_inv.astype(jnp.float32))
  return u


def rescale_to(u, g_aug, g_sq=None):
  """Scales each ``u[s]`` to the Frobenius norm of ``g_aug[s]``; 0 stays 0.
  ``g_sq``: the ``(S,)`` squared norms of ``g_aug`` when already known."""
  un = jnp.sqrt(jnp.sum(jnp.square(u), axis=(1, 2), keepdims=True))
  if g_sq is None:
    g_sq = jnp.sum(jnp.square(g_aug), axis=(1, 2))
  gn = jnp.sqrt(g_sq)[:, None, None]
  scale = jnp.where(un > 0, gn / jnp.where(un > 0, un, 1.0), 0.0)
  return u * scale


def layer_grads(updates, lp: LayerPlan):
  """``(the layer's gradient mapping, its (S, d_in[+1], d_out) matrix)``."""
  module = get_at(updates, lp.path)
  return module, to_matrix(module['kernel'], module.get('bias'), lp.dims)


def write_layer(updates, lp: LayerPlan, module, u):
  """``updates`` with the layer's leaves replaced by the matrix (or row blocks) ``u``."""
  kernel, bias = from_matrix(u, module['kernel'], module.get('bias'), lp.dims)
  updates = set_at(updates, lp.path + ('kernel',), kernel)
  if bias is not None:
    updates = set_at(updates, lp.path + ('bias',), bias)
  return updates
