"""Where factor state lives when the parameters are sharded over a mesh.

With model-parallel parameters (``jax.jit`` over a mesh, ``nn.Partitioned``
or ``nn.with_partitioning`` kernels), a replicated factor state would put
every layer's factors on every device. Instead, when ``init`` sees at least
one parameter leaf that is *partitioned* (a ``NamedSharding`` that is not
fully replicated), each factor array is split over all devices of that
mesh, along the first axis whose size they divide:

* a :class:`~mkor_optax.lowrank.LowRankInverse` ``Q`` ``(S, d, k)``: the rank
  axis ``k``, else ``d``, else the stack ``S``; its ``c`` and ``s`` vectors are
  replicated (``S + S k`` numbers);
* a dense ``(S, d, d)`` inverse or covariance: ``d``, else ``S``;
* otherwise (an odd ``d_in + 1`` dense side and an unstacked layer, say)
  the array stays replicated.

So memory per device falls like ``1 / devices`` for every factor that can be
split. Data-parallel set-ups (replicated parameters, ``pmap``,
``shard_map``) are left alone: factors follow the parameters there. The
placement is applied with ``jax.device_put`` to concrete arrays at ``init``
and as a ``with_sharding_constraint`` on traced ones (``init`` under ``jit``,
and the refreshed factors in ``update``), so the sharding survives jitted
steps; the numbers computed do not depend on it.
"""

from __future__ import annotations

from typing import Optional

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding
import optax

from mkor_optax import lowrank
from mkor_optax.paths import unbox


def partitioned_mesh(params) -> Optional[jax.sharding.Mesh]:
  """The mesh of the first partitioned parameter leaf, or ``None``.

  ``None`` too on a mesh with explicit axes (``jax.make_mesh``'s default),
  where every array's placement is part of its type: there the factors stay
  replicated (the layers' statistics and gradients are gathered whole for
  them, and each update is placed back like its parameter)."""
  for leaf in jax.tree.leaves(unbox(params)):
    sharding = getattr(leaf, 'sharding', None)
    if (isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer)
        and isinstance(sharding, NamedSharding) and sharding.mesh.size > 1
        and not sharding.is_fully_replicated):
      explicit = jax.sharding.AxisType.Explicit in tuple(getattr(sharding.mesh, 'axis_types', ()))
      return None if explicit else sharding.mesh
  return None


def _split_axis(shape, order, n) -> Optional[int]:
  for axis in order:
    if shape[axis] % n == 0:
      return axis
  return None


def array_spec(shape, order, mesh) -> PartitionSpec:
  """Splits the first axis of ``order`` that the mesh's size divides over all
  its axes; replicated when none does."""
  axis = _split_axis(shape, order, mesh.size)
  spec = [None] * len(shape)
  if axis is not None:
    spec[axis] = tuple(mesh.axis_names)
  return PartitionSpec(*spec)


def _place(x, spec, mesh):
  sharding = NamedSharding(mesh, spec)
  if isinstance(x, jax.core.Tracer):
    return jax.lax.with_sharding_constraint(x, sharding)
  return jax.device_put(x, sharding)


def place_factor(f, mesh):
  """One side's entry (dense ``(S, d, d)`` arrays or low-rank) placed on ``mesh``."""
  if mesh is None:
    return f
  if isinstance(f, lowrank.LowRankInverse):
    replicated = PartitionSpec()
    return lowrank.LowRankInverse(_place(f.c, replicated, mesh),
                                  _place(f.q, array_spec(f.q.shape, (2, 1, 0), mesh), mesh),
                                  _place(f.s, replicated, mesh))
  # a dense (S, d, d) array, or a tuple of them (a K-FAC covariance and its inverse)
  return jax.tree.map(lambda x: _place(x, array_spec(np.shape(x), (1, 0), mesh), mesh), f)


def place_factors(factors: dict, mesh) -> dict:
  """``{layer: factor}`` with every factor placed on ``mesh`` (unchanged if ``None``)."""
  if mesh is None:
    return factors
  return {k: place_factor(f, mesh) for k, f in factors.items()}


def bytes_per_device(tree) -> dict:
  """How many bytes of the arrays of ``tree`` each device holds.

  Counts the shards each device holds (a replicated array counts on every
  device), so it shows whether the factors of a model-parallel run are
  split over the mesh: with ``shard_factors=True`` (the default) the
  largest count falls like ``1 / devices``.

  Args:
    tree: a pytree of ``jax.Array`` leaves, such as an optimizer state or
      one of its parts.

  Returns:
    ``{device: bytes}`` over the devices that hold a shard of some leaf.

  Example:
    >>> state = mkor_optax.scale_by_kfac().init(params)  # on one device here
    >>> sizes = mkor_optax.sharding.bytes_per_device((state.input_side, state.output_side))
    >>> sum(sizes.values())  # covariances and inverses: 2 x 4 bytes x (4^2 + 8^2 + 9^2 + 2^2)
    1320
  """
  out: dict = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
  return out


def place_state(state, params):
  """An optimizer state whose single-device leaves are placed on the mesh
  of the partitioned ``params``, to restore a checkpoint into.

  A freshly initialised counter is not committed to a device, so ``jit``
  moves it as needed; the same leaf restored from a checkpoint (orbax
  restores into the target's shardings) is committed to one device, and the
  first step then fails with "incompatible devices". With every leaf on the
  mesh, a checkpoint restored into ``place_state(opt.init(params), params)``
  gives a state that steps. The aliases' ``init`` already places their
  whole state this way; a chain of your own needs this call.

  Args:
    state: an optimizer state (any pytree).
    params: the parameters it was initialised from, model-parallel (a mesh
      ``NamedSharding`` that is not fully replicated) or not.

  Returns:
    ``state`` with every leaf that sits on a single device (step counters,
    the backend's ``count``, ``inject_hyperparams``' values) replicated over
    the mesh of the partitioned ``params``; ``state`` itself when no
    parameter is partitioned.

  Example:
    >>> opt = optax.chain(mkor_optax.scale_by_mkor(), optax.adam(1e-3))
    >>> state = opt.init(params)
    >>> mkor_optax.sharding.place_state(state, params) is state  # params on one device
    True
  """
  mesh = partitioned_mesh(params)
  if mesh is None:
    return state
  replicated = NamedSharding(mesh, PartitionSpec())

  def move(x):
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and isinstance(
        x.sharding, SingleDeviceSharding):
      return jax.device_put(x, replicated)
    return x

  return jax.tree.map(move, state)


def on_params_mesh(tx):
  """``tx`` whose ``init`` applies :func:`place_state` to the whole state
  (the aliases' chains: the backend's counters too)."""
  return optax.GradientTransformationExtraArgs(lambda params: place_state(tx.init(params), params),
                                               tx.update)


def gathered(x):
  """``x`` whole on every device where it is split over explicit mesh axes
  (``jax.make_mesh``'s default): the capture joins a layer's statistics
  with other arrays, and under explicit axes the pieces of one join must be
  placed alike. Statistics are small (a few rows of the layer's width), so
  gathering them costs little. Elsewhere ``x`` is returned as it is."""
  return x if _explicit_spec(x) is None else jax.sharding.reshard(x, PartitionSpec())


def placed_like(x, like):
  """``x`` placed over explicit mesh axes as ``like`` is (the inverse of
  :func:`gathered` for an update that must match its parameter)."""
  spec = _explicit_spec(like)
  return x if spec is None else jax.sharding.reshard(x, spec)


def _explicit_spec(x):
  """The ``PartitionSpec`` that ``x``'s type carries when it is split over
  explicit mesh axes; ``None`` when its type carries no split."""
  spec = getattr(getattr(jax.typeof(x), 'sharding', None), 'spec', None)
  return None if spec is None or all(s is None for s in spec) else spec
