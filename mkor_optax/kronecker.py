"""Kernel + bias <-> matrix, Kronecker preconditioning and norm rescaling.

A second-order layer's kernel of shape ``(*stack, *in_axes, *out_axes)``
(``stack``: the axes ``nn.scan``/``nn.vmap`` add) and optional bias of shape
``(*stack, *out_axes)`` are viewed as ``S = prod(stack)`` matrices

    G_aug = [G; g_b]  of shape (d_in + 1, d_out)       (SPEC 1.1, K-FAC's bias row)

and preconditioned as ``U = R^-1 G_aug L^-1`` (SPEC 1.5), then rescaled to the
Frobenius norm of the raw ``G_aug`` (SPEC 1.6).
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np


class Layout(NamedTuple):
  """How a kernel leaf splits: ``stack_ndim`` leading stacking axes, then the
  input axes, then ``out_ndim`` output axes; ``has_bias`` adds the bias row."""

  stack_ndim: int
  out_ndim: int
  has_bias: bool


class Dims(NamedTuple):
  stack: tuple
  d_in: int  # without the bias row
  d_out: int
  has_bias: bool

  @property
  def n_stack(self) -> int:
    return int(np.prod(self.stack))

  @property
  def d_in_aug(self) -> int:
    return self.d_in + int(self.has_bias)


def dims(kernel_shape, layout: Layout) -> Dims:
  kernel_shape = tuple(kernel_shape)
  stack = kernel_shape[:layout.stack_ndim]
  core = kernel_shape[layout.stack_ndim:]
  d_out = int(np.prod(core[len(core) - layout.out_ndim:]))
  d_in = int(np.prod(core[:len(core) - layout.out_ndim]))
  return Dims(stack, d_in, d_out, layout.has_bias)


def infer_layout(module_params: Mapping) -> Optional[Layout]:
  """Guesses a layer's layout from its parameter shapes alone.

  With a bias: the smallest number of stacking axes ``s`` such that the bias
  is ``kernel.shape[:s] + kernel.shape[-o:]`` (exact for Dense, Conv and
  DenseGeneral with bias, stacked or not, unless a stacking size equals an
  input size). Without a bias: no stacking, one output axis (exact for Dense,
  Conv and attention output projections; wrong for bias-free q/k/v projections
  and bias-free stacked layers, which need ``layouts=`` from
  :func:`mkor_optax.layer_layouts`; a mismatch is reported at the first update).
  """
  kernel = module_params.get('kernel')
  if kernel is None or np.ndim(kernel) < 2:
    return None
  kshape = tuple(np.shape(kernel))
  bias = module_params.get('bias')
  if bias is None:
    return Layout(0, 1, False)
  bshape = tuple(np.shape(bias))
  for s in range(len(bshape)):
    o = len(bshape) - s
    if o >= 1 and s + o < len(kshape) and kshape[:s] == bshape[:s] and kshape[len(kshape) - o:] == bshape[s:]:
      return Layout(s, o, True)
  return None


def to_matrix(kernel, bias, d: Dims):
  """``(S, d_in[+1], d_out)`` float32 stack of ``[kernel; bias]`` matrices."""
  m = kernel.reshape((d.n_stack, d.d_in, d.d_out)).astype(jnp.float32)
  if d.has_bias:
    m = jnp.concatenate([m, bias.reshape((d.n_stack, 1, d.d_out)).astype(jnp.float32)], axis=1)
  return m


def from_matrix(m, kernel_like, bias_like, d: Dims):
  """Inverse of :func:`to_matrix`, back to the leaves' shapes and dtypes."""
  kernel = m[:, :d.d_in].reshape(kernel_like.shape).astype(kernel_like.dtype)
  bias = None
  if d.has_bias:
    bias = m[:, d.d_in].reshape(bias_like.shape).astype(bias_like.dtype)
  return kernel, bias


def precondition(g_aug, r_inv=None, l_inv=None):
  """``R^-1 @ G_aug @ L^-1`` per stack entry; a missing side is the identity."""
  u = g_aug
  if r_inv is not None:
    u = jnp.einsum('sij,sjk->sik', r_inv.astype(jnp.float32), u)
  if l_inv is not None:
    u = jnp.einsum('sij,sjk->sik', u, l_inv.astype(jnp.float32))
  return u


def rescale_to(u, g_aug):
  """Scales each ``u[s]`` to the Frobenius norm of ``g_aug[s]``; 0 stays 0."""
  un = jnp.sqrt(jnp.sum(jnp.square(u), axis=(1, 2), keepdims=True))
  gn = jnp.sqrt(jnp.sum(jnp.square(g_aug), axis=(1, 2), keepdims=True))
  scale = jnp.where(un > 0, gn / jnp.where(un > 0, un, 1.0), 0.0)
  return u * scale
