"""Kernel + bias <-> matrix, Kronecker preconditioning and norm rescaling.

A second-order layer's kernel of shape ``(*stack, *in_axes, *out_axes)``
(``stack``: the axes ``nn.scan``/``nn.vmap`` add) and optional bias of shape
``(*stack, *out_axes)`` are viewed as ``S = prod(stack)`` matrices

    G_aug = [G; g_b]  of shape (d_in + 1, d_out)       (SPEC 1.1, K-FAC's bias row)

and preconditioned as ``U = R^-1 G_aug L^-1`` (SPEC 1.5), then rescaled to the
Frobenius norm of the raw ``G_aug`` (SPEC 1.6).

Also the bookkeeping every Kronecker-factored transform shares: which
parameter subtrees are second-order layers (:func:`plan_layers`, honouring
``exclude``, ``layouts`` and ``max_factor_dim``), and the checks that the
statistics handed to ``update`` match them (:func:`check_stats`).
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Mapping, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from mkor_optax.paths import get_at, set_at

Exclude = Union[None, str, Iterable[str], Callable[[str], bool]]


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


# ------------------------------------------------------- which layers, checked

def exclude_predicate(exclude: Exclude) -> Callable[[str], bool]:
  if exclude is None:
    return lambda path: False
  if callable(exclude):
    return exclude
  patterns = [exclude] if isinstance(exclude, str) else list(exclude)
  for p in patterns:
    if not isinstance(p, str):
      raise ValueError(f'exclude: expected regular expressions (str), got {p!r}')
  compiled = [re.compile(p) for p in patterns]
  return lambda path: any(c.search(path) for c in compiled)


class LayerPlan(NamedTuple):
  path: tuple
  dims: Dims
  has_r: bool
  has_l: bool


def _module_paths(tree, prefix=()):
  """Paths of every mapping in ``tree`` that holds a ``'kernel'`` leaf."""
  if not hasattr(tree, 'items'):
    return
  if 'kernel' in tree and not hasattr(tree['kernel'], 'items'):
    yield prefix
  for k, v in tree.items():
    if hasattr(v, 'items'):
      yield from _module_paths(v, prefix + (k,))


def plan_layers(params, *, layouts: Optional[dict], excluded: Callable[[str], bool],
                max_factor_dim: int) -> dict:
  """``{path_str: LayerPlan}`` for every second-order layer of ``params``."""
  plan = {}
  layouts = layouts or {}
  for path in _module_paths(params):
    name = '/'.join(str(p) for p in path)
    if excluded(name):
      continue
    module = get_at(params, path)
    layout = layouts.get(name) or infer_layout(module)
    if layout is None:
      continue
    d = dims(np.shape(module['kernel']), layout)
    if d.has_bias and 'bias' not in module:
      raise ValueError(f'layer {name!r}: layout says it has a bias but params has none')
    has_r, has_l = d.d_in_aug <= max_factor_dim, d.d_out <= max_factor_dim
    if has_r or has_l:
      plan[name] = LayerPlan(path, d, has_r, has_l)
  return plan


def rank1_shapes(lp: LayerPlan) -> dict:
  """Shapes of the rank-1 statistics (``mkor_optax.RANK1``) of one layer."""
  d = lp.dims
  return {'a': d.stack + (d.d_in_aug,), 'g': d.stack + (d.d_out,)}


def side_sizes(plan: dict):
  """``({path: (d_in+1, S)}, {path: (d_out, S)})`` of the factored sides."""
  r = {k: (lp.dims.d_in_aug, lp.dims.n_stack) for k, lp in plan.items() if lp.has_r}
  l = {k: (lp.dims.d_out, lp.dims.n_stack) for k, lp in plan.items() if lp.has_l}
  return r, l


def check_stats(stats, plan: dict, params, excluded: Callable[[str], bool], who: str,
                shapes: Callable[['LayerPlan'], dict] = rank1_shapes, kind: str = 'RANK1'):
  """Raises ``ValueError`` naming the layer if ``stats`` does not match ``plan``.

  ``shapes(layer_plan)`` gives the statistics one layer must have; ``kind`` names
  the ``mkor_optax.value_and_grad(kind=...)`` that produces them.
  """
  if stats is None:
    raise ValueError(
        f'{who}.update needs the layer statistics: call it as update(grads, state, params, '
        f'stats=stats) with stats from mkor_optax.value_and_grad(loss_fn, kind=mkor_optax.{kind}).')
  if not hasattr(stats, 'keys'):
    raise ValueError(f'{who}: stats must be the dict returned by mkor_optax.value_and_grad')
  for name in stats:
    if name not in plan and not excluded(name):
      kernel = get_at(params, tuple(name.split('/')) + ('kernel',)) if params is not None else None
      if params is not None and kernel is None:
        raise ValueError(f'{who}: stats has layer {name!r} but params has no kernel there')
  for name, lp in plan.items():
    if name not in stats:
      raise ValueError(
          f'{who}: no statistics for layer {name!r}. It has a kernel but was not captured '
          '(not called in the loss, or not a Dense/DenseGeneral/Conv layer): exclude it with '
          f'exclude=[{name!r}] or register its class with mkor_optax.register_layer.')
    d = lp.dims
    want = shapes(lp)
    if not hasattr(stats[name], 'get') or any(k not in stats[name] for k in want):
      raise ValueError(
          f'{who}: statistics for layer {name!r} lack {sorted(want)}: compute them with '
          f'mkor_optax.value_and_grad(loss_fn, kind=mkor_optax.{kind}).')
    got = {k: tuple(np.shape(stats[name][k])) for k in want}
    if got != want:
      raise ValueError(
          f'{who}: statistics for layer {name!r} have shapes {got}, but its parameters were '
          f'read as {want} (layout {d}). If the layout was guessed wrongly, pass '
          'layouts=mkor_optax.layer_layouts(loss_fn, params, *batch) to the optimizer.')


def all_finite(*trees) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for t in trees for x in jax.tree.leaves(t)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def layer_grads(updates, lp: LayerPlan):
  module = get_at(updates, lp.path)
  g = to_matrix(module['kernel'], module.get('bias'), lp.dims)
  return module, g


def write_layer(updates, lp: LayerPlan, module, u):
  kernel, bias = from_matrix(u, module['kernel'], module.get('bias'), lp.dims)
  updates = set_at(updates, lp.path + ('kernel',), kernel)
  if bias is not None:
    updates = set_at(updates, lp.path + ('bias',), bias)
  return updates


def validate(**checks):
  """Raises ``ValueError('name: message')`` for the first failed ``name=(ok, message)``."""
  for name, (ok, msg) in checks.items():
    if not ok:
      raise ValueError(f'{name}: {msg}')


def common_checks(*, gamma, inv_freq, max_factor_dim, factor_dtype) -> dict:
  """The ``validate`` checks every Kronecker-factored transform shares."""
  is_int = lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool)
  return dict(
      gamma=(0.0 < gamma < 1.0, f'must be in (0, 1), got {gamma!r}'),
      inv_freq=(is_int(inv_freq) and inv_freq >= 1, f'must be an integer >= 1, got {inv_freq!r}'),
      max_factor_dim=(is_int(max_factor_dim) and max_factor_dim >= 1,
                      f'must be an integer >= 1, got {max_factor_dim!r}'),
      factor_dtype=(jnp.issubdtype(jnp.dtype(factor_dtype), jnp.floating),
                    f'must be a floating dtype, got {factor_dtype!r}'),
  )


def gather_stats(stats, plan: dict, axis_name: Optional[str],
                 shapes: Callable[['LayerPlan'], dict] = rank1_shapes) -> dict:
  """The ``shapes`` statistics of the planned layers, stacking axes flattened
  to one (``(S, ...)``), averaged over ``axis_name`` when given."""
  out = {}
  for name, lp in plan.items():
    out[name] = {k: stats[name][k].reshape((lp.dims.n_stack,) + stats[name][k].shape[len(lp.dims.stack):])
                 for k in shapes(lp)}
  if axis_name is not None:
    out = jax.lax.pmean(out, axis_name)
  return out


def identity_stack(n: int, s: int, dtype):
  return jnp.broadcast_to(jnp.eye(n, dtype=dtype), (s, n, n))


class Prepared(NamedTuple):
  """What a Kronecker-factored ``update`` starts from (see :func:`prepare`)."""

  plan: dict      # path -> LayerPlan
  stats: dict     # path -> {name: (S, ...)}, averaged over the data axis
  grads: dict     # path -> (module grads mapping, (S, d_in[+1], d_out) float32)
  finite: jax.Array


def prepare(updates, stats, plan_of, excluded, who: str, axis_name: Optional[str],
            shapes: Callable[['LayerPlan'], dict] = rank1_shapes, kind: str = 'RANK1') -> Prepared:
  """Plans the layers of ``updates``, checks ``stats`` against them, gathers
  (and averages) the statistics and the layers' gradient matrices, and says
  whether all of them are finite."""
  plan = plan_of(updates)
  check_stats(stats, plan, updates, excluded, who, shapes, kind)
  gathered = gather_stats(stats, plan, axis_name, shapes)
  grads = {k: layer_grads(updates, lp) for k, lp in plan.items()}
  return Prepared(plan, gathered, grads, all_finite(gathered, [g for _, g in grads.values()]))


def write_layers(updates, prep: Prepared, matrices: dict):
  """``updates`` with each planned layer replaced by its ``(S, d_in[+1], d_out)`` matrix."""
  for k, lp in prep.plan.items():
    updates = write_layer(updates, lp, prep.grads[k][0], matrices[k])
  return updates
