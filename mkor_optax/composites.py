"""Composite layers: modules that multiply their children's kernels themselves.

``nn.OptimizedLSTMCell`` keeps its eight gate kernels in parameter-only
children and multiplies them as one concatenated matrix, so no child call has
an output to tap. The capture recomputes such a module from the same
parameters the way its plain counterpart computes it (``nn.LSTMCell``: one
product per gate kernel, :func:`optimized_lstm`), so each gate kernel is a
Dense layer with factors of its own.
"""

from __future__ import annotations

from typing import Callable, Optional

import flax.linen as nn

# module type -> (children whose kernels it multiplies, recompute function)
_COMPOSITES: dict[type, tuple] = {}


def composite_for(module) -> Optional[Callable]:
  """The recompute function when ``module`` is a composite whose child kernels
  all exist (in ``init`` they do not yet: the module then runs as it is)."""
  entry = next((_COMPOSITES[c] for c in type(module).__mro__ if c in _COMPOSITES), None)
  if entry is None:
    return None
  children, fn = entry
  params = module.variables.get('params', {})
  return fn if all('kernel' in params.get(c, {}) for c in children) else None


_LSTM_GATES = ('i', 'f', 'g', 'o')


def optimized_lstm(module, args, kwargs, dense):
  r"""``nn.OptimizedLSTMCell`` as ``nn.LSTMCell`` computes it, one product per gate:

  .. math::
     z_k = h W_{hk} + b_{hk} + x W_{ik}, \quad
     c' = \sigma(z_f) c + \sigma(z_i) \tanh(z_g), \quad
     h' = \sigma(z_o) \tanh(c')

  (``gate_fn`` and ``activation_fn`` as the cell has them). ``dense(name,
  x)`` is the capture's product ``x W (+ b)`` with child ``name``'s
  parameters, in the cell's ``dtype``.
  """
  carry = args[0] if args else kwargs['carry']
  inputs = args[1] if len(args) > 1 else kwargs['inputs']
  c, h = carry
  z = {k: dense('h' + k, h) + dense('i' + k, inputs) for k in _LSTM_GATES}
  new_c = module.gate_fn(z['f']) * c + module.gate_fn(z['i']) * module.activation_fn(z['g'])
  new_h = module.gate_fn(z['o']) * module.activation_fn(new_c)
  return (new_c, new_h), new_h


_COMPOSITES[nn.OptimizedLSTMCell] = (tuple(p + k for p in 'ih' for k in _LSTM_GATES),
                                     optimized_lstm)
