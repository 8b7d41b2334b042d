"""Eager use: a transform's ``update`` compiled when it is called outside any trace.

Called eagerly, ``jax.lax.cond`` compiles its branches anew on every call
(each call builds new branch functions), so an unjitted training loop (flax's
VAE example runs one) would pay seconds of compilation per step for the
refresh schedule's ``cond``. :func:`compiled_when_eager` runs the update
through one ``jax.jit`` kept with the transform instead, compiled once per
input structure as under the user's own ``jit``; inside a trace (the user's
``jit``, ``pmap``, ``shard_map``, ``grad``) it is the plain function.
"""

from __future__ import annotations

import functools

import jax


def traced(tree) -> bool:
  """Whether any leaf of ``tree`` is a tracer (we are inside a transformation)."""
  return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


def compiled_when_eager(update):
  """``update(*arrays)`` run through a ``jax.jit`` when none of its inputs
  (pytrees of arrays, or ``None``) is traced, and as it is inside a trace."""
  compiled = jax.jit(update)

  @functools.wraps(update)
  def run(*arrays):
    return (update if traced(arrays) else compiled)(*arrays)

  return run
