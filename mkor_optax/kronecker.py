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

import contextlib
import math
import os
import re
import sys
import threading
import warnings
from typing import Callable, Iterable, Mapping, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mkor_optax import lowrank
from mkor_optax.numerics import NumericalWarning, all_finite, norm_ratio, report_if, safe_norm  # noqa: F401 (re-exported)
from mkor_optax.layers import varying_axes
from mkor_optax.paths import get_at, path_str, rebox_like, set_at, unbox

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


_QKV = ('query', 'key', 'value')
AMBIGUOUS = 'ambiguous'  # infer_layout's answer when shapes and names do not decide
UNSUPPORTED = 'unsupported'  # a kernel of a layer the capture cannot precondition


def infer_layout(module_params: Mapping, path: tuple = ()):
  """A layer's :class:`Layout` from its parameter shapes and Flax names.

  With a bias: the smallest number of stacking axes ``s`` such that the bias
  is ``kernel.shape[:s] + kernel.shape[-o:]`` (exact for Dense, Conv and
  DenseGeneral with bias, stacked or not, unless a stacking size equals an
  input size). Without a bias, a 2-D kernel is a Dense matrix; a kernel of
  more axes is read from the module's name, as Flax names them:

  * ``query``/``key``/``value`` (``nn.MultiHeadDotProductAttention``):
    ``(d_model, heads, head_dim)``, two output axes;
  * ``out`` (its output projection): ``(heads, head_dim, d_model)``, one;
  * ``Dense_<i>``: a 2-D kernel, any further leading axes are stacking axes
    (``nn.scan``/``nn.vmap`` over ``nn.Dense``);
  * a name containing ``conv`` (``Conv_<i>``, ``ConvTranspose_<i>``,
    ``conv_init``...): a convolution, ``(*window, c_in, c_out)``, unstacked;
  * ``Einsum_<i>``: :data:`UNSUPPORTED` (not a single matrix in general);
  * anything else: :data:`AMBIGUOUS` (``init`` then asks for ``layouts=``).

  Returns ``None`` for leaves that are not a layer's kernel.
  """
  kernel = module_params.get('kernel')
  if kernel is None or np.ndim(kernel) < 2:
    return None
  kshape = tuple(np.shape(kernel))
  name = str(path[-1]) if path else ''
  if re.fullmatch(r'Einsum_\d+', name):
    return UNSUPPORTED
  bias = module_params.get('bias')
  if bias is not None:
    bshape = tuple(np.shape(bias))
    for s in range(len(bshape)):
      o = len(bshape) - s
      if (o >= 1 and s + o < len(kshape) and kshape[:s] == bshape[:s]
          and kshape[len(kshape) - o:] == bshape[s:]):
        return Layout(s, o, True)
    return UNSUPPORTED
  n = len(kshape)
  if n == 2:
    return Layout(0, 1, False)
  if name in _QKV:
    return Layout(n - 3, 2, False)
  if name == 'out':
    return Layout(n - 3, 1, False)
  if re.fullmatch(r'Dense_\d+', name):
    return Layout(n - 2, 1, False)
  if 'conv' in name.lower():
    return Layout(0, 1, False)
  return AMBIGUOUS


def to_matrix(kernel, bias, d: Dims):
  """``(S, d_in[+1], d_out)`` float32 stack of ``[kernel; bias]`` matrices."""
  m = kernel.reshape((d.n_stack, d.d_in, d.d_out)).astype(jnp.float32)
  if d.has_bias:
    m = jnp.concatenate([m, bias.reshape((d.n_stack, 1, d.d_out)).astype(jnp.float32)], axis=1)
  return m


def from_matrix(m, kernel_like, bias_like, d: Dims):
  """Inverse of :func:`to_matrix` (or of :func:`row_blocks`, for a tuple),
  back to the leaves' shapes and dtypes."""
  if isinstance(m, tuple):
    kernel_rows, bias_row = m if d.has_bias else (m[0], None)
  else:
    kernel_rows, bias_row = m[:, :d.d_in], m[:, d.d_in] if d.has_bias else None
  kernel = kernel_rows.reshape(kernel_like.shape).astype(kernel_like.dtype)
  bias = None
  if d.has_bias:
    bias = bias_row.reshape(bias_like.shape).astype(bias_like.dtype)
  return kernel, bias


def precondition(g_aug, r_inv=None, l_inv=None):
  """``R^-1 @ G_aug @ L^-1`` per stack entry; a missing side is the identity."""
  u = g_aug
  if r_inv is not None:
    u = jnp.einsum('sij,sjk->sik', r_inv.astype(jnp.float32), u)
  if l_inv is not None:
    u = jnp.einsum('sij,sjk->sik', u, l_inv.astype(jnp.float32))
  return u


def precondition_rescaled(g_aug, r_inv=None, l_inv=None, blocks=None, g_sq=None):
  """``rescale_to(precondition(g_aug, r_inv, l_inv), g_aug)`` where a side may
  also be a :class:`~mkor_optax.lowrank.LowRankInverse`: the dense sides are
  applied first, then the low-rank ones with the rescale folded in
  (:func:`mkor_optax.lowrank.precondition_rescaled`). ``blocks``, the row
  blocks of ``g_aug`` (:func:`row_blocks`), lets a layer with only low-rank
  sides skip the kernel/bias concatenation; the result is then the tuple of
  its row blocks, which :func:`from_matrix` takes as well. ``g_sq``: the
  ``(S,)`` squared norms of ``g_aug`` when already known (``Prepared.sq_norms``).
  """
  low_r = r_inv if isinstance(r_inv, lowrank.LowRankInverse) else None
  low_l = l_inv if isinstance(l_inv, lowrank.LowRankInverse) else None
  if low_r is None and low_l is None:
    return rescale_to(precondition(g_aug, r_inv, l_inv), g_aug, g_sq)
  if g_sq is None:
    g_sq = jnp.sum(jnp.square(g_aug), axis=(1, 2))
  g_norm = jnp.sqrt(g_sq)
  dense_r = None if low_r is not None else r_inv
  dense_l = None if low_l is not None else l_inv
  if dense_r is None and dense_l is None and blocks is not None:
    return tuple(lowrank.precondition_rescaled(list(blocks), low_r, low_l, g_norm, g_sq))
  h = precondition(g_aug, dense_r, dense_l)
  h_sq = g_sq if dense_r is None and dense_l is None else None
  return lowrank.precondition_rescaled([h], low_r, low_l, g_norm, h_sq)[0]


def row_blocks(module, d: Dims) -> tuple:
  """``(kernel (S, d_in, d_out)[, bias (S, 1, d_out)])`` float32: the row
  blocks of :func:`to_matrix`'s matrix, without concatenating them."""
  out = (module['kernel'].reshape((d.n_stack, d.d_in, d.d_out)).astype(jnp.float32),)
  if d.has_bias:
    out += (module['bias'].reshape((d.n_stack, 1, d.d_out)).astype(jnp.float32),)
  return out


def rescale_to(u, g_aug, g_sq=None):
  """Scales each ``u[s]`` to the Frobenius norm of ``g_aug[s]``; 0 stays 0.
  ``g_sq``: the ``(S,)`` squared norms of ``g_aug`` when already known."""
  un = jnp.sqrt(jnp.sum(jnp.square(u), axis=(1, 2), keepdims=True))
  if g_sq is None:
    g_sq = jnp.sum(jnp.square(g_aug), axis=(1, 2))
  gn = jnp.sqrt(g_sq)[:, None, None]
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


_LAYOUTS_FIX = ('pass layouts=mkor_optax.layer_layouts(loss_fn, params, *batch) (the exact '
                'layouts, read from one abstract trace of the model) or exclude=[...] them')


def _nnx_layout_hints(params) -> dict:
  if 'flax.nnx' not in sys.modules:
    return {}
  from mkor_optax import nnx as nnx_capture  # noqa: PLC0415 (imports this module)
  return nnx_capture.layout_hints(params)


def plan_layers(params, *, layouts: Optional[dict], excluded: Callable[[str], bool],
                max_factor_dim=None, sides=None, who: str = 'mkor_optax') -> dict:
  """``{path_str: LayerPlan}`` for every second-order layer of ``params``.

  At ``init`` (``sides=None``) a side is factored when it is at most
  ``max_factor_dim``; kernels whose layout cannot be told raise one
  ``ValueError`` naming all of them, kernels of unsupported layers and an
  empty plan give one warning. In ``update``, ``sides=(r_side, l_side)`` are
  the state's ``{layer: factor}`` dicts (so nothing static is recomputed
  from hyperparameters, which ``optax.inject_hyperparams`` may turn into
  arrays). There a state layer missing from ``params``, a layer whose shape
  differs from its factor's, and (with a Python ``max_factor_dim``) a layer
  of ``params`` that the state lacks are errors naming them.
  """
  hints = _nnx_layout_hints(params)  # NNX: the layouts of the modules owning the kernels
  params = unbox(params)
  layouts = layouts or {}
  plan, ambiguous, unsupported, unknown, reshaped = {}, [], [], [], []
  for path in _module_paths(params):
    name = path_str(path)
    if excluded(name):
      continue
    module = get_at(params, path)
    layout = layouts.get(name) or hints.get(name) or infer_layout(module, path)
    if layout is None:
      continue
    if isinstance(layout, str):
      if sides is None:
        (ambiguous if layout == AMBIGUOUS else unsupported).append(name)
      continue
    d = dims(np.shape(module['kernel']), layout)
    if d.has_bias and 'bias' not in module:
      raise ValueError(f'layer {name!r}: layout says it has a bias but params has none')
    if sides is None:
      limit = int(max_factor_dim)
      has_r, has_l = d.d_in_aug <= limit, d.d_out <= limit
    else:
      has_r, has_l = name in sides[0], name in sides[1]
      if not (has_r or has_l) and is_concrete(max_factor_dim) and min(
          d.d_in_aug, d.d_out) <= max_factor_dim:
        unknown.append(name)
      for held, size, side in ((has_r, d.d_in_aug, 0), (has_l, d.d_out, 1)):
        if held and side_shape(sides[side][name]) != (d.n_stack, size):
          reshaped.append(f'{name!r}: gradients give {(d.n_stack, size)} (stack, width) on the '
                          f'{("input", "output")[side]} side, the state holds '
                          f'{side_shape(sides[side][name])}')
    if has_r or has_l:
      plan[name] = LayerPlan(path, d, has_r, has_l)
  if sides is not None:
    lost = sorted((set(sides[0]) | set(sides[1])) - set(plan))
    if lost:
      raise ValueError(f'{who}: the optimizer state has factors for layer(s) {lost}, which the '
                       'gradients do not have: init and update must see the same parameter tree')
    if unknown:
      raise ValueError(f'{who}: the gradients have layer(s) {sorted(unknown)}, for which the '
                       'optimizer state holds no factors (init saw another parameter tree, or the '
                       'model changed after init): re-run init on the parameters you train, or '
                       'exclude=[...] these layers.')
    if reshaped:
      raise ValueError(f'{who}: layer(s) changed shape since init: ' + '; '.join(reshaped)
                       + '. Re-run init after changing the model.')
    return plan
  if ambiguous:
    raise ValueError(
        f'{who}.init: cannot tell how the bias-free kernel(s) {ambiguous} split into stacking, '
        f'input and output axes from their shapes and names; {_LAYOUTS_FIX}.')
  if unsupported:
    warnings.warn(
        f'{who}: layer(s) {unsupported} are not a single (d_in, d_out) matrix that the capture '
        'knows (nn.Einsum, DenseGeneral with batch_dims, ...): they pass through unpreconditioned.',
        stacklevel=3)
  if not plan:
    warnings.warn(f'{who}.init: no second-order layer (a mapping with a 2-D or larger "kernel") '
                  'in params: the transform passes every gradient through unchanged.',
                  stacklevel=3)
  return plan


def side_shape(factor) -> tuple:
  """``(S, d)`` of one side's state entry: a dense ``(S, d, d)`` factor, a
  :class:`~mkor_optax.lowrank.LowRankInverse` or an ``(S, d)`` vector (Eva)."""
  if isinstance(factor, lowrank.LowRankInverse):
    return tuple(factor.q.shape[:2])
  return tuple(np.shape(factor)[:2])


def rank1_shapes(lp: LayerPlan) -> dict:
  """Shapes of the rank-1 statistics (``mkor_optax.RANK1``) a layer's factored sides need."""
  d, out = lp.dims, {}
  if lp.has_r:
    out['a'] = d.stack + (d.d_in_aug,)
  if lp.has_l:
    out['g'] = d.stack + (d.d_out,)
  return out


def side_sizes(plan: dict):
  """``({path: (d_in+1, S)}, {path: (d_out, S)})`` of the factored sides."""
  r = {k: (lp.dims.d_in_aug, lp.dims.n_stack) for k, lp in plan.items() if lp.has_r}
  l = {k: (lp.dims.d_out, lp.dims.n_stack) for k, lp in plan.items() if lp.has_l}
  return r, l


def check_stats(stats, plan: dict, params, excluded: Callable[[str], bool], who: str,
                shapes: Callable[['LayerPlan'], dict] = rank1_shapes, kind: str = 'RANK1'):
  """Checks ``stats`` against ``plan``; returns the planned layers that have none.

  Raises ``ValueError`` naming every offending layer for statistics of a
  layer that ``params`` lacks, or of the wrong kind or shape (the stacking
  axes may come flattened, as ``mkor_optax.MultiSteps`` hands them on).
  Planned layers without statistics (a layer the capture does not know, or
  one the loss did not call) pass through unpreconditioned, with one warning
  naming all of them each time ``update`` is traced.
  """
  if stats is None:
    raise ValueError(
        f'{who}.update needs the layer statistics: call it as update(grads, state, params, '
        f'stats=stats) with stats from mkor_optax.value_and_grad(loss_fn, kind=mkor_optax.{kind}).')
  if not hasattr(stats, 'keys'):
    raise ValueError(f'{who}: stats must be the dict returned by mkor_optax.value_and_grad')
  plain = unbox(params) if params is not None else None
  unknown = [name for name in stats if name not in plan and not excluded(name)
             and plain is not None and get_at(plain, tuple(name.split('/')) + ('kernel',)) is None]
  if unknown:
    raise ValueError(f'{who}: stats has layer(s) {sorted(unknown)} but params has no kernel there')
  bad = []
  for name, lp in plan.items():
    if name not in stats:
      continue
    want = shapes(lp)
    if not hasattr(stats[name], 'get') or any(k not in stats[name] for k in want):
      raise ValueError(
          f'{who}: statistics for layer {name!r} lack {sorted(want)}: compute them with '
          f'mkor_optax.value_and_grad(loss_fn, kind=mkor_optax.{kind}).')
    got = {k: tuple(np.shape(stats[name][k])) for k in want}
    flat = {k: (lp.dims.n_stack,) + v[len(lp.dims.stack):] for k, v in want.items()}
    if got != want and got != flat:
      bad.append(f'{name!r}: {got}, read from its parameters as {want} ({lp.dims})')
  if bad:
    raise ValueError(
        f'{who}: statistics of the wrong shape for ' + '; '.join(bad) + '. If a layout was '
        f'guessed wrongly, {_LAYOUTS_FIX}.')
  lacking = sorted(name for name in plan if name not in stats)
  if lacking:
    warnings.warn(
        f'{who}: no statistics for layer(s) {lacking}; they pass through unpreconditioned. '
        'The capture does not know their class (register it with mkor_optax.register_layer), '
        'or the loss did not call them; exclude=[...] silences this.', stacklevel=4)
  return lacking


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


# ------------------------------------------------------------ hyperparameters

def is_concrete(value) -> bool:
  """Whether ``value`` is a Python or NumPy number (not an array that
  ``optax.inject_hyperparams`` made of it, which may be traced)."""
  return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


INT32_MAX = 2 ** 31 - 1  # step counters are int32: a period beyond this is never reached


def validate(**checks):
  """Raises ``ValueError('name: message')`` for the first failed check.

  Each check is ``name=(value, predicate, message)``. Only Python numbers are
  checked: hyperparameters that arrive as arrays (``optax.inject_hyperparams``
  stores numeric hyperparameters as arrays, traced inside ``jit``) are the
  caller's responsibility. Every Python number must be finite (``inf`` and
  ``nan`` are never a setting). ``predicate`` ``None`` means "must be a
  Python int in ``[1, 2**31 - 1]``" (a count or period, compared with the
  int32 step counter), for which an integer-valued array is also accepted.
  """
  for name, (value, ok, msg) in checks.items():
    if ok is None:
      if is_int(value):
        if not 1 <= value <= INT32_MAX:
          raise ValueError(f'{name}: must be an integer in [1, 2**31 - 1] (the step counter is '
                           f'int32), got {value!r}')
      elif not isinstance(value, (jax.Array, np.ndarray)) or not jnp.issubdtype(value.dtype, jnp.integer):
        raise ValueError(f'{name}: must be an integer >= 1, got {value!r}')
    elif is_concrete(value) and not math.isfinite(value):
      raise ValueError(f'{name}: must be finite, got {value!r}')
    elif is_concrete(value) and not ok(value):
      raise ValueError(f'{name}: {msg}, got {value!r}')
    elif not is_concrete(value) and not isinstance(value, (jax.Array, np.ndarray)):
      raise ValueError(f'{name}: must be a number, got {value!r}')


def resolve_dtype(name: str, dtype):
  """``None`` -> float32; a dtype, its name or a NumPy/JAX scalar type -> ``jnp.dtype``."""
  if dtype is None:
    return jnp.dtype(jnp.float32)
  try:
    out = jnp.dtype(dtype)
  except TypeError:
    out = None
  if out is None or not jnp.issubdtype(out, jnp.floating):
    raise ValueError(f'{name}: must be a floating dtype, got {dtype!r}')
  return out


def common_checks(*, gamma, inv_freq, max_factor_dim) -> dict:
  """The ``validate`` checks every Kronecker-factored transform shares."""
  return dict(
      gamma=(gamma, lambda v: 0.0 < v < 1.0, 'must be in (0, 1)'),
      inv_freq=(inv_freq, None, ''),
      max_factor_dim=(max_factor_dim, None, ''),
  )


# ------------------------------------------------------------- shared update

def _check_data_parallel(stats, axis_name: Optional[str], who: str):
  """Per-device statistics without ``axis_name`` would precondition every
  device differently: an error under ``shard_map`` (where it is visible),
  a warning under a named ``pmap``/``vmap`` axis (which may be intended)."""
  if axis_name is not None:
    return
  varying = frozenset().union(*[varying_axes(x) for x in jax.tree.leaves(stats)])
  if varying:
    raise ValueError(
        f'{who}: the statistics differ between devices along {sorted(varying)} (computed from a '
        f'per-device loss): pass axis_name={sorted(varying)[0]!r}, or under shard_map make the '
        'loss the lax.pmean of the per-device losses.')
  named = bound_axis_names()
  if named:
    warnings.warn(
        f'{who}: update runs under the named axes {sorted(named)} (pmap?) but axis_name=None: '
        'each device refreshes its factors from its own statistics. Pass '
        f'axis_name={sorted(named)[0]!r} to average them (and lax.pmean the gradients).',
        stacklevel=4)


def bound_axis_names() -> frozenset:
  """Named axes bound by ``pmap``/``vmap(axis_name=...)`` here (empty if unknown)."""
  try:
    from jax._src import core as jax_core  # no public API for this in jax 0.10
    return frozenset(jax_core.get_axis_env().axis_sizes)
  except Exception:  # pragma: no cover - a future jax without it
    return frozenset()


def gather_stats(stats, plan: dict, axis_name: Optional[str],
                 shapes: Callable[['LayerPlan'], dict] = rank1_shapes) -> dict:
  """The ``shapes`` statistics of the planned layers, stacking axes flattened
  to one (``(S, ...)``), averaged over ``axis_name`` when given."""
  out = {}
  for name, lp in plan.items():
    want = shapes(lp)
    out[name] = {k: jnp.reshape(stats[name][k], (lp.dims.n_stack,) + want[k][len(lp.dims.stack):])
                 for k in want}
  if axis_name is not None:
    out = jax.lax.pmean(out, axis_name)
  return out


def increment(count):
  """optax's overflow-safe step counter increment."""
  safe = getattr(optax, 'safe_increment', None) or optax.safe_int32_increment
  return safe(count)


def identity_stack(n: int, s: int, dtype):
  return jnp.broadcast_to(jnp.eye(n, dtype=dtype), (s, n, n))


# An optional scalar entry of a layer's statistics: False means "no statistics
# this step" (mkor_optax.MultiSteps, for a layer no micro-batch of the
# accumulation called), and the layer's factors are then left as they are.
PRESENT = 'present'


class Prepared(NamedTuple):
  """What a Kronecker-factored ``update`` starts from (see :func:`prepare`)."""

  plan: dict      # path -> LayerPlan, the layers with statistics
  stats: dict     # path -> {name: (S, ...)}, averaged over the data axis
  grads: dict     # path -> (module grads mapping, (S, d_in[+1], d_out) float32)
  sq_norms: dict  # path -> (S,) squared Frobenius norms of those matrices
  finite: jax.Array
  updates: object  # the incoming updates, boxes (nn.Partitioned...) kept
  present: dict   # path -> scalar bool: False where mkor_optax.MultiSteps saw no
                  # statistics for the layer in the whole accumulation (keep its factors)


def prepare(updates, stats, plan: dict, excluded, who: str, axis_name: Optional[str],
            shapes: Callable[['LayerPlan'], dict] = rank1_shapes, kind: str = 'RANK1') -> Prepared:
  """Checks ``stats`` against the layers of ``plan``, gathers (and averages)
  the statistics and the layers' gradient matrices, and says whether all of
  them are finite (the statistics entry by entry, the gradients by their
  squared norms, so a gradient above ~1e19 counts as non-finite too). Layers
  without statistics are dropped from the plan."""
  check_accumulation(who)
  lacking = check_stats(stats, plan, updates, excluded, who, shapes, kind)
  plan = {k: lp for k, lp in plan.items() if k not in lacking}
  if plan:
    _check_data_parallel({k: stats[k] for k in plan}, axis_name, who)
  gathered = gather_stats(stats, plan, axis_name, shapes)
  plain = unbox(updates)
  grads = {k: layer_grads(plain, lp) for k, lp in plan.items()}
  # squared norms from the kernel and bias blocks (no concatenated copy read);
  # they also decide finiteness: a NaN or Inf entry makes its layer's sum NaN or Inf
  sq_norms = {k: sum(jnp.sum(jnp.square(b), axis=(1, 2)) for b in row_blocks(grads[k][0], lp.dims))
              for k, lp in plan.items()}
  present = {k: jnp.asarray(stats[k].get(PRESENT, True), bool) for k in plan}
  return Prepared(plan, gathered, grads, sq_norms, all_finite(gathered, sq_norms), updates,
                  present)


def write_layers(prep: Prepared, matrices: dict):
  """The updates with each planned layer replaced by its ``(S, d_in[+1], d_out)``
  matrix, in the incoming tree's structure (boxes kept)."""
  out = unbox(prep.updates)
  for k, lp in prep.plan.items():
    out = write_layer(out, lp, prep.grads[k][0], matrices[k])
  return rebox_like(prep.updates, out)


def check_accumulation(who: str):
  """``optax.MultiSteps`` calls the inner transform with the current
  micro-batch's extra arguments only, so its factors would see one micro-batch
  in k: refuse, pointing at :class:`mkor_optax.MultiSteps`."""
  if accumulating():
    return
  frame = sys._getframe(1)
  while frame is not None:
    if frame.f_code.co_name == '_do_update' and frame.f_code.co_filename.endswith(
        os.path.join('transforms', '_accumulation.py')):
      raise ValueError(
          f'{who} inside optax.MultiSteps would refresh its factors from the last micro-batch '
          'only (optax hands extra arguments such as stats= to the inner transform as they '
          'are). Use mkor_optax.MultiSteps (the same signature), which accumulates the '
          'statistics over the micro-batches too.')
    frame = frame.f_back


_accumulating = threading.local()


def accumulating() -> bool:
  return getattr(_accumulating, 'on', False)


@contextlib.contextmanager
def accumulated_stats():
  """Marks the statistics handed on inside as accumulated (mkor_optax.MultiSteps)."""
  old = accumulating()
  _accumulating.on = True
  try:
    yield
  finally:
    _accumulating.on = old
