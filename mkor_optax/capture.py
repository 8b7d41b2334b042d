"""Capturing per-layer statistics from an unmodified Flax model.

:func:`value_and_grad` runs the user's loss function under
``flax.linen.intercept_methods``. Every call of a registered layer
(:mod:`mkor_optax.layers`) is routed through a *tap*: a ``jax.custom_vjp``
identity on the layer output with one extra input, a zero-valued dummy that
rides in the ``params`` collection next to the layer's kernel. The dummy does
not change the output; its cotangent is the statistic. So the statistics come
out of the backward pass as ordinary gradients, which is why this works
unchanged under ``jax.jit``, ``nn.remat`` (no Python-side recording, nothing
to leak) and ``nn.scan``-over-layers (the dummy is stacked like the kernel
and split per layer by the scan, because the scan splits ``params``), and why a
layer called several times pools all its calls: the cotangents of a shared
input add up.

A *statistic kind* (:class:`StatKind`) decides what the dummy holds. The
rank-1 kind used by MKOR (SPEC 1.1) collects, per layer,

    a = (1/N) sum_rows x_row            (with a trailing 1 when there is a bias)
    g = s * sum_rows dL/dy_row          (s = 1 dense, 1/P conv)

which for a loss that is a mean over examples is the mean per-example output
gradient. Other kinds (full covariances for K-FAC) plug in with their own
``zeros/forward/backward/finalize``.
"""

from __future__ import annotations

import functools
import sys
import threading
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mkor_optax import kronecker as kr
from mkor_optax import layers as layers_lib
from mkor_optax.kronecker import Layout
from mkor_optax.paths import DELETE, get_at, path_str, set_at, unbox

TAP = '__mkor_tap__'


class LayerInfo(NamedTuple):
  """A captured layer as seen by one trace of the model."""

  path: tuple
  kernel_shape: tuple  # as the layer saw it (per layer under nn.scan)
  d_in: int
  d_out: int
  out_ndim: int
  has_bias: bool


class StatKind:
  """What a tap collects. Subclass and override all four methods.

  ``zeros(info)`` gives the dummy (a dict of float32 arrays) for one layer;
  ``forward(call)`` computes, from a :class:`~mkor_optax.layers.LayerCall`,
  the forward-pass part as a dict; ``backward(fwd, dy_rows, g_scale, devices)``
  returns a dict with the dummy's structure (its cotangent) from the forward
  part and the output gradient rows ``(rows, d_out)``; ``devices`` is the
  number of ``shard_map`` devices the batch is split over (1 elsewhere), whose
  loss there is the ``pmean`` of the per-device losses; ``finalize(ct, info)``
  turns the summed cotangent (leading stacking axes possible) into the
  statistics. Cotangents of a replicated dummy are summed over devices.
  """

  def zeros(self, info: LayerInfo) -> dict:
    raise NotImplementedError

  def forward(self, call: layers_lib.LayerCall) -> dict:
    raise NotImplementedError

  def backward(self, fwd: dict, dy_rows: jax.Array, g_scale: float, devices: int) -> dict:
    raise NotImplementedError

  def finalize(self, ct: dict, info: LayerInfo) -> dict:
    raise NotImplementedError


class Rank1(StatKind):
  """MKOR's and Eva's statistics: the mean input ``a`` and output gradient ``g``."""

  def zeros(self, info):
    return {'input_sum': jnp.zeros((info.d_in,), jnp.float32),
            'rows': jnp.zeros((), jnp.float32),
            'g': jnp.zeros((info.d_out,), jnp.float32)}

  def forward(self, call):
    return {'input_sum': call.sum_of_inputs(), 'rows': jnp.asarray(call.rows, jnp.float32)}

  def backward(self, fwd, dy_rows, g_scale, devices):
    del devices  # linear in dy: the sum over devices is already the global statistic
    g = g_scale * jnp.sum(dy_rows.astype(jnp.float32), axis=0)
    return {'input_sum': fwd['input_sum'], 'rows': fwd['rows'], 'g': g}

  def finalize(self, ct, info):
    rows = jnp.maximum(ct['rows'], 1.0)[..., None]
    a = ct['input_sum'] / rows
    if info.has_bias:
      a = jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), a.dtype)], axis=-1)
    return {'a': a, 'g': ct['g']}


RANK1 = Rank1()


_active = threading.local()  # [module, re-entered] for the layer calls in progress


def _make_interceptor(mode: str, record: dict, kind: StatKind):
  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != '__call__' or layers_lib.capture_disabled():
      return next_fun(*args, **kwargs)
    stack = getattr(_active, 'stack', None)
    if stack is None:
      stack = _active.stack = []
    adapter = layers_lib.adapter_for(module)
    if adapter is None or module.scope is None or not module.has_variable('params', 'kernel'):
      return next_fun(*args, **kwargs)
    read = adapter(module, args, kwargs)
    if read is None:
      return next_fun(*args, **kwargs)
    y, innermost = layers_lib.call_innermost(stack, module, lambda: next_fun(*args, **kwargs))
    if not innermost:
      return y
    call = read(y)
    path = tuple(module.scope.path)
    if mode == 'discover':
      d_out = int(np.prod(call.kernel_shape[len(call.kernel_shape) - call.out_ndim:]))
      d_in = int(np.prod(call.kernel_shape)) // d_out
      info = LayerInfo(path, tuple(call.kernel_shape), d_in, d_out, call.out_ndim, call.has_bias)
      old = record.get(path)
      if old is not None and old != info:
        raise ValueError(f'layer {path_str(path)!r} is called with inconsistent shapes: '
                         f'{old} vs {info}')
      record[path] = info
      return y
    if not module.has_variable('params', TAP):
      # a call with another parameter tree (a teacher, a frozen copy): not ours
      return y
    record.setdefault('tapped', set()).add(path)
    return _tap(module.get_variable('params', TAP), y, kind.forward(call), kind,
                call.out_ndim, call.g_scale)

  return interceptor


def _tap(dummy, y, fwd, kind, out_ndim, g_scale):
  """Identity on ``y``; the cotangent of ``dummy`` is the layer's statistic."""
  axes = layers_lib.varying_axes(y)
  devices = int(np.prod([jax.lax.axis_size(a) for a in axes]))
  dummy = {k: dummy[k] for k in dummy}  # a plain dict even inside FrozenDict params
  dummy, fwd = layers_lib.cast_varying((dummy, fwd), axes)

  @jax.custom_vjp
  def tap(dummy, y, fwd):
    del dummy, fwd
    return y

  def tap_fwd(dummy, y, fwd):
    del dummy
    return y, fwd

  def tap_bwd(fwd, ct_y):
    d_out = int(np.prod(ct_y.shape[ct_y.ndim - out_ndim:]))
    ct_dummy = kind.backward(fwd, ct_y.reshape(-1, d_out), g_scale, devices)
    ct_fwd = jax.tree.map(lambda t: jnp.zeros(t.shape, t.dtype), fwd)
    return layers_lib.cast_varying(ct_dummy, axes), ct_y, layers_lib.cast_varying(ct_fwd, axes)

  tap.defvjp(tap_fwd, tap_bwd)
  return tap(dummy, y, fwd)


def discover(fun: Callable, params, *args, **kwargs) -> dict:
  """Traces ``fun(params, *args)`` abstractly; returns ``{path: LayerInfo}``
  for every registered layer it calls (``LayerInfo.kernel_shape`` as the layer
  saw it; ``path`` its module path)."""
  record: dict = {}
  with nn.intercept_methods(_make_interceptor('discover', record, RANK1)):
    jax.eval_shape(lambda p: fun(p, *args, **kwargs), params)
  return record


def _locate(params, info: LayerInfo):
  """``(prefix, stack)``: where ``info``'s kernel is in ``params`` (at its module
  path, or under ``'params'`` when ``params`` is a whole variables dict) and
  the stacking axes ``nn.scan``/``nn.vmap`` added; ``None`` if it is not there."""
  for prefix in ((), ('params',)):
    kernel = get_at(params, prefix + info.path + ('kernel',))
    if kernel is None:
      continue
    outer = tuple(np.shape(unbox(kernel)))
    n = len(outer) - len(info.kernel_shape)
    if n < 0 or outer[n:] != info.kernel_shape:
      raise ValueError(
          f'layer {path_str(info.path)!r}: its kernel in params has shape {outer}, which is not '
          f'(stacking axes first) + the shape the layer used, {info.kernel_shape}. Lifted '
          f'transforms must stack parameters on axis 0 (variable_axes={{"params": 0}}).')
    return prefix, outer[:n]
  return None


def layer_layouts(fun: Callable, params, *args, **kwargs) -> dict:
  """The exact :class:`~mkor_optax.kronecker.Layout` of every captured layer.

  Pass the result as ``scale_by_mkor(layouts=...)`` when ``init`` says a
  layout cannot be told from the parameter shapes and names alone.
  """
  out = {}
  for path, info in discover(fun, params, *args, **kwargs).items():
    where = _locate(params, info)
    if where is not None:
      prefix, stack = where
      out[path_str(prefix + path)] = Layout(len(stack), info.out_ndim, info.has_bias)
  return out


def untapped(params):
  """``params`` without the capture's entries.

  Inside a loss passed to :func:`value_and_grad`, ``params`` carries one
  extra ``'__mkor_tap__'`` entry per captured layer (the statistics ride in
  it). A loss that combines ``params`` leaf by leaf with another tree of the
  model's structure (an L2-SP or EWC penalty, a pruning mask) uses
  ``untapped(params)`` for that; gradients flow through it unchanged.
  Outside the capture it returns ``params`` as it is.
  """
  def strip(node):
    if not hasattr(node, 'items'):
      return node
    if TAP not in node and not any(hasattr(v, 'items') for v in node.values()):
      return node
    items = {k: strip(v) for k, v in node.items() if k != TAP}
    return items if type(node) is dict else type(node)(items)
  return strip(params)


def _is_nnx_module(x) -> bool:
  nnx = sys.modules.get('flax.nnx')
  return nnx is not None and isinstance(x, nnx.Module)


def value_and_grad(fun: Callable, argnums: int = 0, has_aux: bool = False, *,
                   kind: StatKind = RANK1):
  """Like ``jax.value_and_grad``, returning the layer statistics as well.

  The same function serves Flax NNX: when the differentiated argument is an
  ``nnx.Module``, ``fun(model, *args)`` is differentiated by
  :func:`mkor_optax.nnx.value_and_grad` (``nnx.value_and_grad`` with the
  statistics; ``grads`` is then an ``nnx.State``).

  Args:
    fun: a loss ``fun(params, *args)`` returning a scalar (or ``(loss, aux)``
      with ``has_aux``) that calls an unmodified linen model as
      ``model.apply({'params': params, ...}, ...)`` (or as
      ``model.apply(variables, ...)`` when the differentiated argument is the
      whole variables dict). The loss should be a mean over examples (then
      ``g`` is the mean per-example gradient). The model may also be applied
      with other parameter trees (a teacher, an EMA target, a frozen copy):
      only the calls with the differentiated tree are captured.
    argnums: which positional argument holds the parameters (an int, as
      the optimizer preconditions one parameter tree).
    has_aux: as in ``jax.value_and_grad``.
    kind: the statistic kind (default: MKOR's rank-1 means).

  Returns:
    A function ``(*args, **kwargs) -> (value, grads, stats)`` where
    ``value`` and ``grads`` are what ``jax.value_and_grad(fun, argnums,
    has_aux)`` gives and ``stats`` maps each captured layer's path ``'a/b/c'``
    (where ``params['a']['b']['c']['kernel']`` is its kernel) to
    ``{'a': (*stack, d_in[+1]), 'g': (*stack, d_out)}``.

  Raises:
    ValueError: naming every captured layer that did not receive its tap (its
      parameters went through a transform that dropped or re-arranged them);
      under ``shard_map``, for a loss that is not the same on every device
      (not ``lax.pmean``-ed), whose statistics and gradients would be wrong.
  """
  if not kr.is_int(argnums):
    raise TypeError(f'value_and_grad: argnums must be an int (one parameter tree), got {argnums!r}')

  @functools.wraps(fun)
  def wrapped(*args, **kwargs):
    if len(args) <= argnums:
      raise TypeError(f'value_and_grad: argnums={argnums} but only {len(args)} positional '
                      'argument(s) were given')
    params = args[argnums]
    if _is_nnx_module(params):  # an NNX model: mkor_optax.nnx.value_and_grad
      from mkor_optax import nnx as nnx_capture  # noqa: PLC0415
      return nnx_capture.value_and_grad(fun, argnums, has_aux, kind=kind)(*args, **kwargs)
    call = lambda p: fun(*args[:argnums], p, *args[argnums + 1:], **kwargs)
    infos = discover(call, params)
    tapped = {}
    tapped_params = params
    for path, info in infos.items():
      where = _locate(params, info)
      if where is None:
        continue
      prefix, stack = where
      dummy = jax.tree.map(lambda z: jnp.zeros(stack + z.shape, z.dtype), kind.zeros(info))
      tapped_params = set_at(tapped_params, prefix + path + (TAP,), dummy)
      tapped[path] = (prefix, info)

    record: dict = {}

    def inner(p):
      with nn.intercept_methods(_make_interceptor('tap', record, kind)):
        try:
          return call(p)
        except (ValueError, TypeError) as e:
          if TAP not in str(e):
            raise
          raise ValueError(
              f'the loss combines params with another tree leaf by leaf ({e}). The capture adds '
              f"'{TAP}' entries to params; use mkor_optax.untapped(params) in that "
              'combination (for example jax.tree.map(f, mkor_optax.untapped(params), other)).'
          ) from e

    value, grads = jax.value_and_grad(inner, has_aux=has_aux)(tapped_params)
    seen = record.get('tapped', set())
    missing = sorted(path_str(p) for p in tapped if p not in seen)
    if missing:
      raise ValueError(
          f'could not capture statistics for layer(s) {missing}: their parameters did not '
          'reach the layer with the capture tap. Pass params to apply unchanged as '
          "{'params': params}; for nn.scan/nn.vmap stack 'params' (variable_axes={'params': 0}).")
    loss = value[0] if has_aux else value
    local = layers_lib.varying_axes(loss)
    if local:
      raise ValueError(
          f'under shard_map the loss differs between devices along {sorted(local)}: make it the '
          f'mean over devices, lax.pmean(local_loss, {sorted(local)[0]!r}), so that gradients '
          'and statistics are those of the whole batch.')
    stats = {}
    for path, (prefix, info) in tapped.items():
      stats[path_str(prefix + path)] = kind.finalize(get_at(grads, prefix + path + (TAP,)), info)
      grads = set_at(grads, prefix + path + (TAP,), DELETE)
    return value, grads, stats

  return wrapped


class Covariance(StatKind):
  """K-FAC's statistics: full second moments of inputs and output gradients.

      A = (1/R) sum_rows x_aug x_aug^T          (x_aug = [x, 1] with a bias)
      G = (1/R) sum_rows h h^T,  h = n * dL/dy_row

  ``R`` rows, ``n = R * g_scale`` examples (``R/P`` for a convolution), so
  ``h`` is the per-example loss gradient for a loss that is a mean over
  examples. A layer called several times averages ``G`` over its calls. A
  side larger than ``max_dim`` is not collected (it is preconditioned by the
  identity: keep ``max_dim`` equal to the transform's ``max_factor_dim``).
  """

  def __init__(self, max_dim: int = 4096):
    self.max_dim = max_dim

  def _sides(self, d_in_aug, d_out):
    return d_in_aug <= self.max_dim, d_out <= self.max_dim

  def zeros(self, info):
    d_in = info.d_in + int(info.has_bias)
    has_a, has_g = self._sides(d_in, info.d_out)
    out = {'rows': jnp.zeros((), jnp.float32), 'calls': jnp.zeros((), jnp.float32)}
    if has_a:
      out['xx'] = jnp.zeros((d_in, d_in), jnp.float32)
    if has_g:
      out['hh'] = jnp.zeros((info.d_out, info.d_out), jnp.float32)
    return out

  def forward(self, call):
    d_out = int(np.prod(call.kernel_shape[len(call.kernel_shape) - call.out_ndim:]))
    d_in = int(np.prod(call.kernel_shape)) // d_out + int(call.has_bias)
    has_a, _ = self._sides(d_in, d_out)
    out = {'rows': jnp.asarray(call.rows, jnp.float32),
           'n': jnp.asarray(call.rows * call.g_scale, jnp.float32)}
    if has_a:
      x = call.input_rows()
      if call.has_bias:
        x = jnp.concatenate([x, jnp.ones((x.shape[0], 1), x.dtype)], axis=1)
      out['xx'] = x.T @ x
    return out

  def backward(self, fwd, dy_rows, g_scale, devices):
    # Under shard_map dL/dy carries the pmean's 1/devices: undo it, so h is the
    # per-example gradient; the sums over devices of hh and of calls then
    # average G over devices.
    out = {'rows': fwd['rows'], 'calls': jnp.ones_like(fwd['rows'])}
    if 'xx' in fwd:
      out['xx'] = fwd['xx']
    if dy_rows.shape[-1] <= self.max_dim:
      h = dy_rows.astype(jnp.float32) * (fwd['n'] * devices)
      out['hh'] = (h.T @ h) / fwd['rows']
    return out

  def finalize(self, ct, info):
    out = {}
    if 'xx' in ct:
      out['A'] = ct['xx'] / jnp.maximum(ct['rows'], 1.0)[..., None, None]
    if 'hh' in ct:
      out['G'] = ct['hh'] / jnp.maximum(ct['calls'], 1.0)[..., None, None]
    return out


COVARIANCE = Covariance()
