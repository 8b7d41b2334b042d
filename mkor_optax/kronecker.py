r"""One Kronecker-factored transform that every method is a rule of.

:func:`scale_by_kronecker` does what MKOR, K-FAC and Eva share, in the
pipeline's order:

1. *plan* (``init``): the second-order layers of the parameters and which of
   their two sides get a factor (:mod:`mkor_optax.layout`);
2. *statistics* (``update``): the ``stats=`` of ``mkor_optax.value_and_grad``
   checked against the plan, gathered, averaged over ``axis_name``
   (:mod:`mkor_optax.statistics`), with the layers' gradient matrices
   ``[G; g_b]`` (:mod:`mkor_optax.precondition`) and one finiteness flag;
3. *factor rule*: the method's :class:`FactorRule` refreshes each side's
   state from the statistics (a non-finite step leaves it as it was);
4. *precondition*: the rule turns each gradient matrix into an update;
5. the updates are written back in the gradients' structure and handed to
   the next transform of the chain (the *backend*, LAMB by default).

A new Kronecker method is one :class:`FactorRule` and its public signature.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mkor_optax import checks, sharding
from mkor_optax.eager import compiled_when_eager
from mkor_optax.factors import side_shape
from mkor_optax.layout import INPUT, OUTPUT, SIDES, Exclude, exclude_predicate, plan_from_state, plan_layers
from mkor_optax.numerics import all_finite, collect, fold_into_first, receipt_total, report_if
from mkor_optax.paths import rebox_like, unbox
from mkor_optax.precondition import layer_grads, row_blocks, write_layer
from mkor_optax.sketch import ROW_FIELDS, ROWS
from mkor_optax.statistics import (CANCELLED_FIX, NAMES, TAILS, cancelled_means, check_stats, holds_rows,
                                   gather_stats, kind_of, missing_stats)

__all__ = ['Exclude', 'FactorRule', 'Prepared', 'scale_by_kronecker', 'with_backend',
           'default_backend', 'decay_mask', 'stats_template', 'INPUT', 'OUTPUT', 'SIDES']

# The cancelled-mean warning is given in the first steps only (see step()).
CANCELLED_STEPS = 10
# Defaults shared by the Kronecker methods' signatures.
INV_FREQ = 10
MAX_FACTOR_DIM = 4096


class Prepared(NamedTuple):
  """What a rule's ``refresh`` and ``precondition`` see in one ``update``."""

  plan: dict      # layer -> LayerPlan, the layers with statistics this step
  stats: dict     # layer -> {INPUT/OUTPUT: (S, ...) float statistic}, averaged over the data axis
  grads: dict     # layer -> (module gradient mapping, (S, d_in[+1], d_out) float32 matrix)
  sq_norms: dict  # layer -> (S,) squared Frobenius norms of those matrices
  finite: jax.Array  # all statistics and gradients finite
  present: dict   # layer -> scalar bool: False where mkor_optax.MultiSteps saw no
                  # statistics for the layer in the whole accumulation (keep its factors)
  count: jax.Array  # the state's step counter (updates done before this one)
  updates: Any    # the incoming updates, boxes (nn.Partitioned...) kept
  cancelled: dict = {}  # layer -> scalar bool: its mean output gradient is cancellation
                        # noise (statistics.cancelled_means), not curvature

  def blocks(self, layer) -> tuple:
    """The row blocks ``(kernel[, bias])`` of the layer's gradient matrix."""
    return row_blocks(self.grads[layer][0], self.plan[layer].dims)

  def keep_unless_fresh(self, layer, new, old):
    """``new`` when this step's statistics of ``layer`` are finite and
    present, else ``old`` (arrays or pytrees of arrays)."""
    ok = self.finite & self.present[layer]
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


class FactorRule(NamedTuple):
  """A Kronecker method: what each layer side holds, and how it moves.

  * ``init_side(width, n_stack)``: the state entry of one side;
  * ``refresh(sides, prep)``: ``sides`` is ``(input, output)``, each
    ``{layer: entry}``; returns them after this step's statistics (entries of
    layers without statistics, and every entry on a non-finite step, as they
    were);
  * ``precondition(sides, prep)``: ``{layer: update matrix}`` for every
    layer of ``prep.grads``;
  * ``scaled``: the state also holds a scale per side entry, ``(S,)``
    float32 zeros at ``init``; ``sides`` is then ``(input, output,
    input_scale, output_scale)`` (MKOR's scale-free factors).
  """

  init_side: Callable[[int, int], Any]
  refresh: Callable[[tuple, Prepared], tuple]
  precondition: Callable[[tuple, Prepared], dict]
  scaled: bool = False


def prepare(updates, stats, plan: dict, count, *, excluded, who: str, axis_name, kind) -> Prepared:
  """Checks ``stats`` against the layers of ``plan``, gathers (and averages)
  the statistics and the layers' gradient matrices, and says whether all of
  them are finite (the statistics entry by entry, the gradients by their
  squared norms, so a gradient above ~1e19 counts as non-finite too). Layers
  without statistics are dropped from the plan."""
  checks.check_accumulation(who)
  if stats is None:
    raise missing_stats(who, kind)
  kind = kind_of(stats, (kind,) if isinstance(kind, str) else tuple(kind))
  lacking = check_stats(stats, plan, updates, excluded, who, kind)
  plan = {k: lp for k, lp in plan.items() if k not in lacking}
  if plan:
    # a lazy sketch capture's rows are each device's own under shard_map
    checks.check_data_parallel({k: {f: v for f, v in stats[k].items() if f not in ROW_FIELDS}
                                for k in plan}, axis_name, who)
  gathered = gather_stats(stats, plan, axis_name, kind, count)
  names = dict(zip(NAMES[kind], SIDES))
  # a lazy sketch capture's rows stay whole (ROWS: the rule sketches them when it refreshes)
  by_side = {k: {ROWS: s} if holds_rows(s) else {names[n]: v for n, v in s.items()}
             for k, s in gathered.items()}
  plain = unbox(updates)
  grads = {k: layer_grads(plain, lp) for k, lp in plan.items()}
  # squared norms from the kernel and bias blocks (no concatenated copy read);
  # they also decide finiteness: a NaN or Inf entry makes its layer's sum NaN or Inf
  sq_norms = {k: sum(jnp.sum(jnp.square(b), axis=(1, 2)) for b in row_blocks(grads[k][0], lp.dims))
              for k, lp in plan.items()}
  present = {k: jnp.asarray(stats[k].get(checks.PRESENT, True), bool) for k in plan}
  # rows are not read here (a pass over every activation): non-finite rows make the
  # gradient non-finite, and a refresh checks what it forms from them
  checked = {k: s for k, s in gathered.items() if not holds_rows(s)}
  return Prepared(plan, by_side, grads, sq_norms, all_finite(checked, sq_norms), present, count,
                  updates)


def write_layers(prep: Prepared, matrices: dict):
  """The updates with each planned layer replaced by its ``(S, d_in[+1], d_out)``
  matrix, in the incoming tree's structure (boxes kept)."""
  out = unbox(prep.updates)
  for k, lp in prep.plan.items():
    out = write_layer(out, lp, prep.grads[k][0], matrices[k])
  return rebox_like(prep.updates, out)


def ema_sides(sides: tuple, prep: Prepared, gamma):
  """Each side's entry moved to ``gamma old + (1 - gamma) stat`` (the
  statistic itself at step 0), where the statistics are finite and present."""
  first = prep.count == 0
  out = []
  for side, entries in zip(SIDES, sides):
    new = {}
    for k, old in entries.items():
      if k not in prep.stats:
        new[k] = old
        continue
      stat = prep.stats[k][side].astype(jnp.float32)
      moved = jnp.where(first, stat, gamma * old.astype(jnp.float32) + (1 - gamma) * stat)
      new[k] = prep.keep_unless_fresh(k, moved, old).astype(old.dtype)
    out.append(new)
  return tuple(out)


def scale_by_kronecker(rule: FactorRule, state_type, *, who: str, kind,
                       axis_name: Optional[str], max_factor_dim, exclude: Exclude,
                       layouts: Optional[dict], shard_factors: bool = False,
                       guarded: str = 'the factors are left as they were'
                       ) -> optax.GradientTransformationExtraArgs:
  """The transform of ``rule``; its state is ``state_type(count, input_side,
  output_side)``, and ``input_scale, output_scale`` after them for a
  ``rule.scaled``.

  ``kind``: the statistics it reads (``'RANK1'``, ``'COVARIANCE'``, or a
  tuple of kinds the rule takes, such as ``('RANK1', 'SKETCH')``);
  ``shard_factors``: place the side entries over the mesh of partitioned
  parameters (:mod:`mkor_optax.sharding`). A step with non-finite gradients
  or statistics warns (``guarded`` says what was kept) and the rule keeps
  the state; the gradient is handed on.
  """
  excluded = exclude_predicate(exclude)

  def init(params):
    plan = plan_layers(params, layouts=layouts, excluded=excluded, max_factor_dim=max_factor_dim,
                       who=who)
    mesh = sharding.partitioned_mesh(params) if shard_factors else None
    sides = [sharding.place_factors({k: rule.init_side(lp.dims.width(side), lp.dims.n_stack)
                                     for k, lp in plan.items() if lp.has(side)}, mesh)
             for side in SIDES]
    if rule.scaled:  # replicated (place_state), never split: (S,) per entry
      sides += [{k: jnp.zeros((f.shape[0],), jnp.float32) for k, f in side.items()} for side in sides]
    return sharding.place_state(state_type(jnp.zeros([], jnp.int32), *sides), params)

  def update(updates, state, params=None, *, stats=None, **extra_args):
    del params, extra_args
    if not isinstance(state, state_type):
      raise ValueError(
          f'{who}: the state is a {type(state).__name__}, not a {state_type.__name__} (fields '
          f'{list(state_type._fields)}). A checkpoint restored without a target comes back as '
          'plain dicts and lists: restore it into opt.init(params), e.g. '
          'ocp.StandardCheckpointer().restore(path, opt.init(params)), or pass it through '
          'mkor_optax.restore_state(restored, opt.init(params)), which names what differs.')
    return step(updates, state, stats)

  @compiled_when_eager
  def step(updates, state, stats):
    sides = tuple(state[1:])
    shapes = tuple({k: side_shape(f) for k, f in side.items()} for side in sides[:2])
    plan = plan_from_state(updates, shapes, layouts=layouts, excluded=excluded,
                           max_factor_dim=max_factor_dim, who=who)
    prep = prepare(updates, stats, plan, state.count, excluded=excluded, who=who,
                   axis_name=axis_name, kind=kind)
    with collect() as receipts:  # the rule's own checks report into it too
      report_if(~prep.finite, f'{who}: non-finite gradients or statistics: {guarded}')
      zero = cancelled_means(stats, prep.plan, kind)
      prep = prep._replace(cancelled=zero)
      if zero:  # structural (a BatchNorm, attention keys) only in the first steps:
        # later, a layer's rows also cancel at an optimum of its bias (its
        # gradient, which is g, is then zero), which is no reason to warn
        names = sorted(zero)
        early = state.count < CANCELLED_STEPS
        report_if(jnp.stack([zero[k] & early for k in names]), CANCELLED_FIX.format(who=who),
                  names=names)
      sides = rule.refresh(sides, prep)
      out = rule.precondition(sides, prep)
    # a non-finite step is not counted (the refresh schedule and the EMAs'
    # first step stay where they were); the receipts keep the checks
    receipt = receipt_total(receipts)
    count = jnp.where(prep.finite, checks.increment(state.count), state.count) + receipt
    out = fold_into_first(out, receipt)  # the updates: a step may drop the new state
    return write_layers(prep, out), state_type(count, *sides)

  return optax.GradientTransformationExtraArgs(init, update)


def factored_states(opt_state) -> list:
  """The states of :func:`scale_by_kronecker` transforms inside ``opt_state``
  (each carries its statistics ``KIND``, and the ``KINDS`` it takes)."""
  is_ours = lambda x: isinstance(getattr(type(x), 'KIND', None), str) and isinstance(x, tuple)
  return [n for n in jax.tree.leaves(opt_state, is_leaf=is_ours) if is_ours(n)]


def stats_template(opt_state, sketches: Optional[int] = None) -> dict:
  """Zero statistics, ``{layer: {name: (S, ...)}}``, for every layer that a
  transform of this library holds factors for somewhere in ``opt_state``
  (states of :func:`scale_by_kronecker` carry their statistics ``KIND``, and
  the ``KINDS`` they take); ``sketches=k``: ``k`` sketches for the
  transforms that take them."""
  out: dict = {}
  for node in factored_states(opt_state):
    kind = node.KIND
    if sketches is not None and 'SKETCH' in getattr(type(node), 'KINDS', ()):
      kind = 'SKETCH'
    for entries, name in zip((node.input_side, node.output_side), NAMES[kind]):
      for layer, f in entries.items():
        s, d = side_shape(f)
        shape = (s,) + TAILS[kind](d, sketches)
        out.setdefault(layer, {})[name] = jnp.zeros(shape, jnp.float32)
  return out


# --------------------------------------------------------------------- aliases

def decay_mask(params):
  """Weight-decay mask: no decay on biases, norm scales and 1-D leaves."""
  def keep(path, leaf):
    name = getattr(path[-1], 'key', None) if path else None
    return np.ndim(leaf) >= 2 and name not in ('bias', 'scale')
  return jax.tree_util.tree_map_with_path(keep, params)


def default_backend(learning_rate, weight_decay):
  """LAMB with weight decay masked off biases and norm scales (the paper's BERT runs)."""
  check_backend_args(learning_rate, weight_decay)
  return optax.lamb(learning_rate, weight_decay=weight_decay, mask=decay_mask)


def check_backend_args(learning_rate, weight_decay):
  """An alias's Python-number settings: a finite ``learning_rate`` and a
  finite, non-negative ``weight_decay`` (arrays and schedules are the
  caller's, as under ``optax.inject_hyperparams``)."""
  if not callable(learning_rate):
    checks.validate(learning_rate=(learning_rate, lambda v: True, ''))
  checks.validate(weight_decay=(weight_decay, lambda v: v >= 0, 'must be >= 0'))


def with_backend(preconditioner, backend, learning_rate, weight_decay):
  """``optax.chain(preconditioner, backend or LAMB)``, its whole state placed
  on the mesh of partitioned parameters at ``init``."""
  if backend is not None:  # (default_backend checks them otherwise)
    check_backend_args(learning_rate, weight_decay)
  return sharding.on_params_mesh(optax.chain(
      preconditioner, backend or default_backend(learning_rate, weight_decay)))
