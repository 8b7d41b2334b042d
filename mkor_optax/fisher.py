r"""The true Fisher's targets: the loss at targets drawn from the model itself.

Martens & Grosse (2015), *Optimizing Neural Networks with Kronecker-factored
Approximate Curvature*, ICML, arXiv:1503.05671, section 5: statistics of the
gradient at targets sampled from the model's predictive distribution have
the Gauss-Newton matrix as their expectation (the true Fisher), where those
of the data's labels (the empirical Fisher) do not.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax

# The losses whose predictive distribution sampled_loss knows.
FISHER_LOSSES = ('sigmoid_cross_entropy', 'softmax_cross_entropy', 'squared_error')


def _draw(sample, key, shape: tuple, axis_name: Optional[str]):
  """``sample(key, shape)``, or inside ``pmap``/``shard_map`` over
  ``axis_name`` this device's rows of the draw for the whole batch (the
  devices' rows stacked along the leading axis in device order)."""
  if axis_name is None:
    return sample(key, shape)
  rows = shape[0]
  full = sample(key, (jax.lax.axis_size(axis_name) * rows,) + tuple(shape[1:]))
  return jax.lax.dynamic_slice_in_dim(full, jax.lax.axis_index(axis_name) * rows, rows, axis=0)


def sampled_loss(loss: str, outputs: jax.Array, key: jax.Array, *, weights=None,
                 axis_name: Optional[str] = None) -> jax.Array:
  r"""The loss at targets drawn from the model's own predictive distribution.

  Its gradient in the outputs has, per example, the covariance of the
  Gauss-Newton matrix :math:`H` of the named loss (the true Fisher of its
  likelihood), so statistics captured from it are the factors of the true
  Fisher, the curvature that :func:`~mkor_optax.scale_by_quadratic_step`
  models:

  * ``'sigmoid_cross_entropy'``: :math:`t \sim \mathrm{Bernoulli}(\sigma(z))`
    per output, :math:`\sum \mathrm{BCE}(z, t)`;
  * ``'softmax_cross_entropy'``: one class :math:`c \sim \mathrm{softmax}(z)`
    over the last axis, :math:`\sum \mathrm{CE}(z, e_c)`;
  * ``'squared_error'``: :math:`t = y + \varepsilon`,
    :math:`\varepsilon \sim N(0, I)`, :math:`\tfrac12 \sum (y - t)^2`.

  Summed over the outputs (each position's loss times its weight, with
  ``weights``) and divided by the leading (batch) axis's size.
  The targets do not depend on the parameters (no gradient flows through
  the draw). The loss's overall scale does not matter to MKOR's scale-free
  factors. The draws are ``u < sigmoid(z)`` with ``u`` uniform,
  ``argmax(z + gumbel)``, and ``y + normal``: those of
  ``jax.random.bernoulli``, ``jax.random.categorical`` and
  ``jax.random.normal`` with the same key.

  Args:
    loss: ``'sigmoid_cross_entropy'``, ``'softmax_cross_entropy'`` or
      ``'squared_error'``.
    outputs: the model's outputs ``(batch, ..., d)`` (logits for the
      cross-entropies).
    key: a ``jax.random`` key, a fresh one every step (the same on every
      device).
    weights: ``None``, or a weight per position, of the shape of
      ``outputs`` without its last axis (``(batch, length)`` for a
      sequence's logits), as the loss weights its positions: a masked LM's
      mask (1 on the positions it predicts, 0 elsewhere), a padding mask.
      A position of weight 0 adds nothing to the statistics.
    axis_name: inside ``pmap`` or ``shard_map`` over a data axis whose
      devices each hold an equal slice of the batch (along the leading axis,
      in device order): the noise is drawn for the whole batch and each
      device takes its own rows, so the targets are those that one device
      would draw for the whole batch. The loss is still this device's mean.

  Returns:
    The scalar loss at the sampled targets.

  Example:
    >>> logits = model.apply({'params': params}, x)
    >>> mkor_optax.sampled_loss('sigmoid_cross_entropy', logits, jax.random.PRNGKey(0)).shape
    ()
  """
  if loss not in FISHER_LOSSES:
    raise ValueError(f'sampled_loss: loss must be one of {FISHER_LOSSES}, got {loss!r}')
  outputs = jnp.asarray(outputs)
  if outputs.ndim < 1:
    raise ValueError(f'sampled_loss: outputs need a leading batch axis, got shape {outputs.shape}')
  if weights is not None:
    weights = jnp.asarray(weights)
    if weights.shape != outputs.shape[:-1]:
      raise ValueError(f'sampled_loss: weights must have the shape of outputs without its last axis, '
                       f'{outputs.shape[:-1]}, got {weights.shape}')
    weights = jax.lax.stop_gradient(weights.astype(jnp.float32))
  def total_of(per_entry, last_axis=True):  # the (weighted) sum over every entry
    if weights is None:
      return jnp.sum(per_entry)
    return jnp.sum(weights * (jnp.sum(per_entry, axis=-1) if last_axis else per_entry))
  fixed = jax.lax.stop_gradient(outputs.astype(jnp.float32))
  z = outputs.astype(jnp.float32)
  noise = lambda sample: _draw(lambda k, s: sample(k, s, jnp.float32), key, fixed.shape, axis_name)
  if loss == 'sigmoid_cross_entropy':
    t = (noise(jax.random.uniform) < jax.nn.sigmoid(fixed)).astype(jnp.float32)
    total = total_of(optax.sigmoid_binary_cross_entropy(z, t))
  elif loss == 'softmax_cross_entropy':
    c = jnp.argmax(fixed + noise(jax.random.gumbel), axis=-1)
    total = total_of(optax.softmax_cross_entropy_with_integer_labels(z, c), last_axis=False)
  else:
    t = fixed + noise(jax.random.normal)
    total = 0.5 * total_of(jnp.square(z - t))
  return total / outputs.shape[0]
