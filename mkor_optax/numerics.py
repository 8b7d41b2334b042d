"""Numerical safety shared by every transform: overflow-safe norms, the
rank-1 refresh arithmetic in unit-vector form, finiteness checks, and
warnings raised from inside ``jit`` when a step was guarded against."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mkor_optax.eager import traced


class NumericalWarning(UserWarning):
  """A step the optimizer guarded against: non-finite gradients or
  statistics (the state was left as it was), or a factor reset. Raised by
  eager calls, and from inside ``jit`` when :class:`jit_warnings` is on (it
  is off by default), counted per message ("(3 such steps so far)") and
  attributed to the line of your step that called ``update``; filter it as
  any warning.

  Example:
    >>> issubclass(mkor_optax.NumericalWarning, UserWarning)
    True
    >>> # silence it as any warning:
    >>> # warnings.filterwarnings('ignore', category=mkor_optax.NumericalWarning)
  """


# Non-finite or guarded steps warned of so far, per message: each warning
# says how many, so the default filter (one per message and place) shows
# every one, and a user's filter decides what is shown.
_COUNTS: dict = {}
_LIBRARIES = tuple(os.path.dirname(m.__file__) + os.sep for m in (jax, optax) + tuple(
    m for m in (sys.modules.get('jaxlib'), sys.modules.get('flax')) if m is not None)) + (
        os.path.dirname(os.path.abspath(__file__)) + os.sep, os.path.dirname(threading.__file__) + os.sep)


def _user_frame():
  """``(filename, lineno, module globals)`` of the innermost caller outside
  jax, optax, flax, this library and the standard library (the user's line
  that ran the step), or ``None`` when the callback runs on another thread."""
  frame = sys._getframe(1)
  while frame is not None:
    name = os.path.abspath(frame.f_code.co_filename)
    if not name.startswith(_LIBRARIES) and not name.startswith('<frozen'):
      return frame
    frame = frame.f_back
  return None


def user_line():
  """``(filename, lineno, module globals)`` of the user's line that called
  into the library (read while tracing: under ``jit`` that is the line of
  the user's step that called ``update``), or ``None``."""
  frame = _user_frame()
  return None if frame is None else (frame.f_code.co_filename, frame.f_lineno, frame.f_globals)


def warn_numerical(message: str, where=None):
  """``NumericalWarning(message)``, counted per message ("(3 such steps so
  far)"), attributed to ``where`` (:func:`user_line`) or else to the user's
  line found on the stack now."""
  _COUNTS[message] = n = _COUNTS.get(message, 0) + 1
  text = message if n == 1 else f'{message} ({n} such steps so far)'
  where = where or user_line()
  if where is None:
    warnings.warn(text, NumericalWarning, stacklevel=3)
    return
  filename, lineno, module_globals = where
  registry = module_globals.setdefault('__warningregistry__', {})
  warnings.warn_explicit(text, NumericalWarning, filename, lineno,
                         module=module_globals.get('__name__'), registry=registry)


class jit_warnings:
  """Whether the transforms compile their :class:`NumericalWarning` checks
  into jitted steps (default ``False``: they do not).

  A bad step (non-finite gradients or statistics) is guarded either way: the
  state is kept and the step counter does not move, as
  ``optax.apply_if_finite`` keeps it. What this switch adds is the warning
  that says so from inside ``jit``. Each check is a ``jax.pure_callback`` in
  a ``lax.cond`` branch that runs only on a bad step, but its mere presence
  slows the whole compiled step on a CPU, as if XLA's CPU runtime stopped
  running its independent operations in parallel (pinned to one core, the
  penalty nearly vanishes), and a program with a host callback is not kept
  in JAX's persistent compilation cache. On the small models of the
  Benchmarks page that is a visible part of MKOR's cost per step, which that
  page gives with and without the checks. So they are off unless asked for:
  turn them on while you debug a run that diverges. Read while tracing, so
  set it before the step is first traced (``jax.jit`` keeps a function's
  first trace). Also a context manager that restores the previous setting::

    mkor_optax.jit_warnings(True)        # from now on
    with mkor_optax.jit_warnings(True):  # only for the steps traced here
      step = jax.jit(train_step).lower(state, x, y).compile()

  Eager (un-jitted) calls warn either way.

  Args:
    enabled: ``True`` puts the checks in the steps traced from now on,
      ``False`` leaves them out.

  Returns:
    The setting, usable as a context manager that restores the previous one.

  Example:
    >>> opt = mkor_optax.mkor(1e-2)
    >>> loss, grads, stats = mkor_optax.value_and_grad(loss_fn)(params, x, y)
    >>> compiled = lambda: jax.jit(lambda g, s: opt.update(g, s, params, stats=stats)).lower(
    ...     grads, opt.init(params)).as_text()
    >>> with mkor_optax.jit_warnings(True):
    ...   loud = compiled()
    >>> 'callback' in compiled(), 'callback' in loud
    (False, True)
  """

  enabled = False

  def __init__(self, enabled: bool = True):
    if not isinstance(enabled, (bool, np.bool_)):
      raise TypeError(f'jit_warnings: enabled must be True or False, got {enabled!r}')
    self._previous = jit_warnings.enabled
    jit_warnings.enabled = bool(enabled)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    jit_warnings.enabled = self._previous
    return False

  def __repr__(self):
    return f'jit_warnings({jit_warnings.enabled})'


class _Receipts(threading.local):
  def __init__(self):
    self.open = []  # a list of receipts per enclosing collect()


_receipts = _Receipts()


@contextlib.contextmanager
def collect():
  """Gathers the receipts of the :func:`report_if` calls made inside it: a
  transform's step opens one and adds ``sum(receipts)`` (zeros) to its
  counter, so that checks made deep in a factor rule are kept."""
  got: list = []
  _receipts.open.append(got)
  try:
    yield got
  finally:
    _receipts.open.pop()


def receipt_total(receipts) -> jax.Array:
  """The int32 sum of ``receipts`` (zero; ``0`` for none)."""
  return sum((jnp.asarray(r, jnp.int32) for r in receipts), jnp.zeros((), jnp.int32))


def report_if(pred, message: str, *args, names=None) -> jax.Array:
  """Warns ``NumericalWarning(message.format(*args))`` from inside ``jit``
  when any entry of ``pred`` holds. With ``names`` (one per entry of
  ``pred``), ``{names}`` in the message lists those whose entry holds.
  Outside a trace it warns directly.

  Returns a *receipt*, an int32 zero that the caller must add into one of
  the transform's outputs (an integer counter), or that an enclosing
  :func:`collect` gathers: the check is a ``jax.pure_callback`` in a
  ``lax.cond`` branch, so steps where nothing went wrong pay nothing, and a
  pure callback whose result no output depends on is removed by the
  compiler. It is a pure callback because an effect (``jax.debug.callback``)
  anywhere in a program takes every call of it off ``jit``'s C++ dispatch
  path: about 1 ms per step with an optimizer state of a few hundred arrays
  (measured on the autoencoder: 1.10 ms -> 0.39 ms per update). Under
  ``vmap`` the ``cond`` runs both branches; ``pred`` is re-checked on the host.
  """
  def warn(flag, *values):
    flag = np.asarray(flag)
    batch = flag.shape[:-1]  # () unless under vmap
    rows = flag.reshape((-1, flag.shape[-1]))
    hit = np.flatnonzero(rows.any(axis=1))
    if hit.size:
      i = hit[0]  # under vmap: the first member that holds
      pick = lambda v: np.asarray(v).reshape((-1,) + np.shape(v)[len(batch):])[i]
      shown = [pick(v).tolist() for v in values]
      named = [n for n, f in zip(names, rows[i]) if f] if names is not None else None
      warn_numerical(message.format(*shown, names=named), where)
    return np.zeros(batch, np.int32)

  where = user_line()  # while tracing: the user's line that called update
  pred = jnp.reshape(jnp.asarray(pred, bool), (-1,))
  if not traced((pred, args)):
    warn(pred, *args)  # called eagerly: an eager cond would compile its branches on every call
    out = jnp.zeros((), jnp.int32)
  elif not jit_warnings.enabled:  # no host callback in the compiled step
    out = jnp.zeros((), jnp.int32)
  else:
    def branch(flag, *values):
      return jax.pure_callback(warn, jax.ShapeDtypeStruct((), jnp.int32), flag, *values,
                               vmap_method='broadcast_all')

    out = jax.lax.cond(jnp.any(pred), branch, lambda *_: jnp.zeros((), jnp.int32), pred, *args)
  if _receipts.open:
    _receipts.open[-1].append(out)
  return out


def fold_receipt(x, receipt):
  """``x`` plus the (zero) ``receipt`` in ``x``'s dtype: an output the user
  keeps depends on the checks, so the compiler cannot remove them."""
  return x + jnp.asarray(receipt, x.dtype)


def fold_into_first(tree, receipt):
  """``tree`` with the receipt folded into its first floating-point leaf."""
  leaves, treedef = jax.tree.flatten(tree)
  for i, x in enumerate(leaves):
    if jnp.issubdtype(jnp.result_type(x), jnp.floating):
      leaves[i] = fold_receipt(x, receipt)
      break
  return treedef.unflatten(leaves)


def safe_norm(x, axis=None, keepdims=False):
  """Euclidean norm computed on ``x / max|x|``, so entries up to float32's
  largest do not overflow in the squares; 0 for a zero ``x``."""
  top = jnp.max(jnp.abs(x), axis=axis, keepdims=True)
  unit = jnp.where(top > 0, top, 1.0)
  out = top * jnp.sqrt(jnp.sum(jnp.square(x / unit), axis=axis, keepdims=True))
  return out if keepdims else jnp.squeeze(out, axis=axis)


def norm_ratio(ref, u):
  """``|ref| / |u|`` (Euclidean, overflow-safe), 0 where ``u`` is 0."""
  nu, nr = safe_norm(u), safe_norm(ref)
  return jnp.where(nu > 0, nr / jnp.where(nu > 0, nu, 1.0), 0.0)


def all_finite(*trees) -> jax.Array:
  """Whether every entry of every floating-point leaf is finite: one
  reduction over all of them (their flattened concatenation, which the
  compiler fuses into it), not one per leaf."""
  every = [x for t in trees for x in jax.tree.leaves(t)]
  floats = [x for x in every if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
  wide = jnp.result_type(*floats) if floats else None  # no entry narrowed (float64 stays)
  floats = [jnp.ravel(x).astype(wide) for x in floats]
  flags = [jnp.all(jnp.isfinite(x)) for x in every
           if jnp.issubdtype(jnp.result_type(x), jnp.complexfloating)]
  if floats:
    flags.append(jnp.all(jnp.isfinite(jnp.concatenate(floats) if len(floats) > 1 else floats[0])))
  return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


def unit_statistic(v):
  """``(v / |v|, 1 / |v|^2)`` over the last axis, overflow-safe: the refresh
  rules are written in the unit vector so that a statistic of any finite
  scale (inputs x1e20 included) gives a finite factor. A zero ``v`` gives
  ``(0, 1)``, which makes its rank-1 term exactly zero."""
  norm = safe_norm(v, axis=-1, keepdims=True)
  pos = norm > 0
  unit = jnp.where(pos, v / jnp.where(pos, norm, 1.0), 0.0)
  inv_sq = jnp.where(pos, 1.0 / jnp.square(jnp.where(pos, norm, 1.0)), 1.0)
  return unit, inv_sq[..., 0]


# The smallest eigenvalue a rank-1 term may leave along its own direction in
# a factor inverse, relative to the inverse's largest entry (its largest
# eigenvalue, up to the factor d): a float32 refresh of a d-wide inverse
# rounds every entry by about 1e-7 of the largest, which moves its
# eigenvalues by up to about d * 1e-7 of it (3e-5 for the widest dense side,
# 255, of the default low_rank_min_dim), so an eigenvalue left below that is
# noise that can turn the inverse indefinite. At 1e-4 the floor is a
# condition-number cap of 1e4 on each factor: relative damping, inactive
# for statistics of ordinary scale.
MIN_EIGENVALUE = 1e-4


def blend_first(alpha, beta, gamma, refresh):
  """The affine step ``P' = alpha P + beta I`` of a refresh rule:
  ``'ema'`` keeps the stabiliser's ``(alpha, beta)``; ``'blend'`` also blends
  toward ``I`` by ``gamma``. ``refresh`` may be a traced boolean, ``True``
  for ``'ema'`` (a refresh whose steps differ in rule, one program for all)."""
  if isinstance(refresh, str):
    return (alpha, beta) if refresh == 'ema' else (gamma * alpha, gamma * beta + (1.0 - gamma))
  return (jnp.where(refresh, alpha, gamma * alpha),
          jnp.where(refresh, beta, gamma * beta + (1.0 - gamma)))


def rank1_coefficients(vu, inv_sq, gamma, refresh, scale=1.0):
  """``(kappa, lam)`` of ``P+ = kappa P' - lam u u^T`` for the unit statistic
  (``u = P' v_hat``, ``vu = v_hat^T u``, ``inv_sq = 1/|v|^2``): the rules of
  :func:`mkor_optax.mkor.refresh_inverse` with ``|v|^2`` divided out of
  numerator and denominator. ``scale``: an upper bound on ``P'``'s entries.

  Along ``v`` the refreshed inverse is about ``inv_sq / (1 - gamma)``
  (``ema``) or ``inv_sq`` (``blend``) for a large statistic, and its largest
  entry about ``scale / gamma`` (``scale``), so ``inv_sq`` is floored to keep
  that ratio at :data:`MIN_EIGENVALUE` or above: a statistic whose squared
  norm exceeds ``gamma / ((1 - gamma) MIN_EIGENVALUE scale)`` (``1 /
  (MIN_EIGENVALUE scale)`` for ``blend``) acts as one of that norm (for
  ``gamma = 0.98`` and ``P' ~ I``: ``|v|^2 > 5e5``; a 64-wide layer's mean
  input at unit scale has ``|a|^2 ~ 10``).
  """
  scale = jnp.maximum(scale, 0.0)

  def ema():
    c = (1.0 - gamma) / gamma
    floored = jnp.maximum(inv_sq, MIN_EIGENVALUE * c * scale)
    return jnp.broadcast_to(1.0 / gamma, vu.shape), (c / gamma) / (floored + c * vu)

  def blend():
    floored = jnp.maximum(inv_sq, MIN_EIGENVALUE * scale)
    return jnp.ones_like(vu), 1.0 / (floored + vu)

  if isinstance(refresh, str):
    return ema() if refresh == 'ema' else blend()
  # a traced boolean, True for 'ema' (see blend_first)
  return tuple(jnp.where(refresh, e, b) for e, b in zip(ema(), blend()))


def report_resets(resets: dict, who: str):
  """A :class:`~mkor_optax.numerics.NumericalWarning` naming the factors that
  a refresh found indefinite or non-finite (and reset or kept)."""
  if not resets:
    return
  names = sorted(resets)
  report_if(jnp.stack([resets[k] for k in names]),
            f'{who}: factor(s) {{names}} were not positive definite (or not '
            'finite) at the refresh and were reset toward the identity (16-bit factors, or '
            'statistics beyond float32 range)', names=names)
