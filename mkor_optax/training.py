"""A Flax ``TrainState`` whose ``apply_gradients`` hands the statistics on.

``flax.training.train_state.TrainState.apply_gradients(grads=..., **kwargs)``
passes its keyword arguments to ``replace``, not to the optimizer, so a
TrainState loop cannot give ``tx.update`` its ``stats=``. This subclass takes
``stats`` (and MKOR-H's ``value``, and any other extra argument of the
transform through ``extra_args``) and forwards them; everything else is
Flax's. A TrainState loop becomes a two-line change::

    state = mkor_optax.TrainState.create(apply_fn=model.apply, params=params,
                                         tx=mkor_optax.mkor(1e-2))
    loss, grads, stats = mkor_optax.value_and_grad(loss_fn)(state.params, x, y)
    state = state.apply_gradients(grads=grads, stats=stats)
"""

from __future__ import annotations

from typing import Any, Optional

import optax
from flax.training import train_state

_OWG = getattr(train_state, 'OVERWRITE_WITH_GRADIENT', '_overwrite_with_gradient')


class TrainState(train_state.TrainState):
  """``flax.training.train_state.TrainState`` for optimizers that take statistics.

  ``apply_gradients(grads=..., stats=..., value=...)`` hands ``stats`` and
  ``value`` to the optimizer's ``update``; everything else is Flax's.

  Example:
    >>> state = mkor_optax.TrainState.create(apply_fn=model.apply, params=params,
    ...                                      tx=mkor_optax.mkor(1e-2))
    >>> loss, grads, stats = mkor_optax.value_and_grad(loss_fn)(state.params, x, y)
    >>> state = state.apply_gradients(grads=grads, stats=stats)
    >>> int(state.step)
    1
  """

  def apply_gradients(self, *, grads, stats: Optional[dict] = None, value: Any = None,
                      extra_args: Optional[dict] = None, **kwargs):
    """One optimizer step: ``tx.update(grads, opt_state, params, stats=..., value=...)``.

    Args:
      grads: gradients shaped like ``params``.
      stats: the statistics from :func:`mkor_optax.value_and_grad` (omit for
        transforms that take none, such as SONew or plain optax ones).
      value: the loss, for transforms that take it (MKOR-H, optax's
        ``reduce_on_plateau``...).
      extra_args: any other extra keyword arguments for ``tx.update``.
      **kwargs: other fields to ``replace`` (``batch_stats=...``), as in Flax.

    Returns:
      The new state: ``step`` plus one, the updated ``params`` and ``opt_state``.
    """
    extra = dict(extra_args or {})
    if stats is not None:
      extra['stats'] = stats
    if value is not None:
      extra['value'] = value
    overwrite = _OWG in grads
    grads_opt = grads['params'] if overwrite else grads
    params_opt = self.params['params'] if overwrite else self.params
    if overwrite and 'stats' in extra:
      # the statistics were captured on the whole tree: their keys start with 'params/'
      extra['stats'] = {k[len('params/'):] if k.startswith('params/') else k: v
                        for k, v in extra['stats'].items()}
    updates, opt_state = self.tx.update(grads_opt, self.opt_state, params_opt, **extra)
    new_params = optax.apply_updates(params_opt, updates)
    if overwrite:
      new_params = {'params': new_params, _OWG: grads[_OWG]}
    return self.replace(step=self.step + 1, params=new_params, opt_state=opt_state, **kwargs)
