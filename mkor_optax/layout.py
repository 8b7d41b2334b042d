r"""Which parameters are second-order layers, and how their kernels split.

A second-order layer's kernel of shape ``(*stack, *in_axes, *out_axes)``
(``stack``: the axes ``nn.scan``/``nn.vmap`` add) and optional bias of shape
``(*stack, *out_axes)`` are viewed as ``S = prod(stack)`` matrices of shape
``(d_in + 1, d_out)`` (the bias as an extra input row, as in K-FAC). A
:class:`Layout` says how the axes split; :func:`plan_layers` finds every
layer of a parameter tree and decides which of its two sides get a factor:

* the *input side*, ``d_in + 1`` wide (MKOR's ``R``, K-FAC's ``A``), fed by
  the layer inputs ``a``;
* the *output side*, ``d_out`` wide (MKOR's ``L``, K-FAC's ``G``), fed by the
  gradients ``g`` of the layer outputs.

Layouts come, in order, from ``layouts=``, from a registered hint provider
(the NNX capture registers one that reads the owning modules), and from the
parameter shapes and Flax names (:func:`infer_layout`).
"""

from __future__ import annotations

import re
import warnings
from typing import Callable, Iterable, Mapping, NamedTuple, Optional, Union

import numpy as np

from mkor_optax import checks
from mkor_optax.paths import get_at, path_str, unbox

Exclude = Union[None, str, Iterable[str], Callable[[str], bool]]

INPUT, OUTPUT = 'input', 'output'  # the two sides of a layer, everywhere
SIDES = (INPUT, OUTPUT)


class Layout(NamedTuple):
  """How a kernel leaf splits into a matrix: leading stacking axes, then the
  input axes (flattened into ``d_in``), then the output axes (into ``d_out``).

  Attributes:
    stack_ndim: how many leading axes stack independent layers (``nn.scan``,
      ``nn.vmap``), each with factors of its own.
    out_ndim: how many trailing axes are output features.
    has_bias: whether the layer has a bias, which adds a row to the input side.

  Example:
    >>> opt = mkor_optax.mkor(1e-2, layouts={'layers_0': mkor_optax.Layout(0, 1, True)})
    >>> mkor_optax.layer_layouts(loss_fn, params, x, y)['layers_0']
    Layout(stack_ndim=0, out_ndim=1, has_bias=True)
  """

  stack_ndim: int
  out_ndim: int
  has_bias: bool


class Dims(NamedTuple):
  """A layer's matrix view: ``stack`` axes, ``d_in`` (without the bias row), ``d_out``."""

  stack: tuple
  d_in: int
  d_out: int
  has_bias: bool

  @property
  def n_stack(self) -> int:
    return int(np.prod(self.stack))

  @property
  def d_in_aug(self) -> int:
    return self.d_in + int(self.has_bias)

  def width(self, side: str) -> int:
    """The width of ``side``'s factor: ``d_in + 1`` (with a bias) or ``d_out``."""
    return self.d_in_aug if side == INPUT else self.d_out


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


def _bias_layout(kshape: tuple, bshape: tuple):
  for s in range(len(bshape)):
    o = len(bshape) - s
    if (o >= 1 and s + o < len(kshape) and kshape[:s] == bshape[:s]
        and kshape[len(kshape) - o:] == bshape[s:]):
      return Layout(s, o, True)
  return UNSUPPORTED


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
    return _bias_layout(kshape, tuple(np.shape(bias)))
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


def exclude_predicate(exclude: Exclude) -> Callable[[str], bool]:
  """``exclude`` (regexes searched in ``'a/b/c'`` paths, or a predicate) as a predicate."""
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


# --------------------------------------------------------------- hint providers

_HINT_PROVIDERS: list = []


def register_hint_provider(provider: Callable[[object], dict]):
  """Registers ``provider(params) -> {path: Layout or UNSUPPORTED}``, asked
  before the shapes and names are read (the NNX capture registers one that
  reads the modules owning the kernels). Registering twice is a no-op."""
  if provider not in _HINT_PROVIDERS:
    _HINT_PROVIDERS.append(provider)


def layout_hints(params) -> dict:
  hints: dict = {}
  for provider in _HINT_PROVIDERS:
    for k, v in provider(params).items():
      hints.setdefault(k, v)
  return hints


# ------------------------------------------------------------------------ plan

class LayerPlan(NamedTuple):
  """A planned layer: its ``path`` in the tree, its :class:`Dims`, and
  which sides hold a factor."""

  path: tuple
  dims: Dims
  has_r: bool  # input side
  has_l: bool  # output side

  def has(self, side: str) -> bool:
    return self.has_r if side == INPUT else self.has_l


def module_paths(tree, prefix=()):
  """Paths of every mapping in ``tree`` that holds a ``'kernel'`` leaf."""
  if not hasattr(tree, 'items'):
    return
  if 'kernel' in tree and not hasattr(tree['kernel'], 'items'):
    yield prefix
  for k, v in tree.items():
    if hasattr(v, 'items'):
      yield from module_paths(v, prefix + (k,))


LAYOUTS_FIX = ('pass layouts=mkor_optax.layer_layouts(loss_fn, params, *batch) (the exact '
               'layouts, read from one abstract trace of the model) or exclude=[...] them')


def _layers(params, layouts, excluded):
  """``(name, path, layout or AMBIGUOUS/UNSUPPORTED, module)`` of every kernel."""
  hints = layout_hints(params)
  params = unbox(params)
  layouts = layouts or {}
  for path in module_paths(params):
    name = path_str(path)
    if excluded(name):
      continue
    module = get_at(params, path)
    layout = layouts.get(name) or hints.get(name) or infer_layout(module, path)
    if layout is not None:
      yield name, path, layout, module


def _layer_dims(name, module, layout) -> Dims:
  d = dims(np.shape(module['kernel']), layout)
  if d.has_bias and 'bias' not in module:
    raise ValueError(f'layer {name!r}: layout says it has a bias but params has none')
  return d


def plan_layers(params, *, layouts: Optional[dict], excluded: Callable[[str], bool],
                max_factor_dim, who: str = 'mkor_optax') -> dict:
  """``{path_str: LayerPlan}`` for every second-order layer of ``params``, at ``init``.

  A side is factored when it is at most ``max_factor_dim`` wide. Kernels
  whose layout cannot be told raise one ``ValueError`` naming all of them;
  kernels of unsupported layers and an empty plan give one warning.
  """
  plan, ambiguous, unsupported = {}, [], []
  limit = int(max_factor_dim)
  for name, path, layout, module in _layers(params, layouts, excluded):
    if isinstance(layout, str):
      (ambiguous if layout == AMBIGUOUS else unsupported).append(name)
      continue
    d = _layer_dims(name, module, layout)
    if d.d_in_aug <= limit or d.d_out <= limit:
      plan[name] = LayerPlan(path, d, d.d_in_aug <= limit, d.d_out <= limit)
  if ambiguous:
    raise ValueError(
        f'{who}.init: cannot tell how the bias-free kernel(s) {ambiguous} split into stacking, '
        f'input and output axes from their shapes and names; {LAYOUTS_FIX}.')
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


def _matches(d: Dims, held: tuple) -> bool:
  """Whether ``d`` gives every held side its ``(S, width)``."""
  return all(h is None or tuple(h) == (d.n_stack, d.width(side)) for side, h in zip(SIDES, held))


def _state_dims(module, held: tuple) -> Optional[Dims]:
  """The matrix view of ``module``'s kernel (and bias) that the state's factor
  shapes imply; ``held`` is ``(S, width)`` or ``None`` per side. ``None``
  unless exactly one ``(S, d_in, d_out, has_bias)`` fits."""
  kshape = tuple(np.shape(module['kernel']))
  bshape = tuple(np.shape(module['bias'])) if 'bias' in module else None
  fits = {}
  for k in range(len(kshape) - 1):
    for m in range(1, len(kshape) - k):
      for has_bias in (False, True):
        if has_bias and bshape != kshape[:k] + kshape[len(kshape) - m:]:
          continue
        d = dims(kshape, Layout(k, m, has_bias))
        if _matches(d, held):
          fits.setdefault((d.n_stack, d.d_in, d.d_out, has_bias), d)
  return next(iter(fits.values())) if len(fits) == 1 else None


def plan_from_state(params, shapes: tuple, *, layouts: Optional[dict],
                    excluded: Callable[[str], bool], max_factor_dim, who: str) -> dict:
  """The plan in ``update``: the layers of ``params`` that the state holds
  factors for. ``shapes``: per side, ``{layer: (S, width)}`` of the state's
  factors (nothing static is recomputed from hyperparameters, which
  ``optax.inject_hyperparams`` may turn into arrays). A layer's matrix view
  is its layout's (``layouts=``, hints, or shapes and names) when that agrees
  with the state, else the one view the state's shapes allow, so ``update``
  needs nothing remembered from ``init``. A state layer missing from
  ``params``, a layer whose shape differs from its factor's, and (with a
  Python ``max_factor_dim``) a layer of ``params`` that the state lacks are
  errors naming them."""
  plan, unknown, reshaped = {}, [], []
  for name, path, layout, module in _layers(params, layouts, excluded):
    held = tuple(tuple(s[name]) if name in s else None for s in shapes)
    d = None if isinstance(layout, str) else _layer_dims(name, module, layout)
    if any(held) and (d is None or not _matches(d, held)):
      d = _state_dims(module, held) or d
    if d is None:
      continue
    if not any(held) and checks.is_concrete(max_factor_dim) and min(d.d_in_aug, d.d_out) <= max_factor_dim:
      unknown.append(name)
    for side, h in zip(SIDES, held):
      if h is not None and h != (d.n_stack, d.width(side)):
        reshaped.append(f'{name!r}: gradients give {(d.n_stack, d.width(side))} (stack, width) '
                        f'on the {side} side, the state holds {h}')
    if any(held):
      plan[name] = LayerPlan(path, d, *(h is not None for h in held))
  lost = sorted(set().union(*shapes) - set(plan))
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
