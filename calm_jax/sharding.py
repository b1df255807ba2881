"""Device meshes and logical-axis sharding (MaxText-style rules as data).

Every parameter carries logical axis names (`nnx.Param(..., axes=("embed", "mlp"))`, or
`ParamSpec.axes`); a list of rules maps each name onto mesh axes (`data`, `fsdp`, `tensor`).
Shardings are computed from that metadata and handed to `jax.jit(in_shardings=...,
out_shardings=...)` under `jax.set_mesh(mesh)`.

Axis types: meshes are built with `AxisType.Auto` on purpose. The decoder and the method
kernels are written sharding-agnostic (plain einsums, `jnp.take`, `lax.scan`); with Auto axes
the partitioner propagates shardings from the jit arguments and `shard_logical` (a
`with_sharding_constraint`) pins activations where it matters, as MaxText does. With
`AxisType.Explicit` (the `jax.make_mesh` default since 0.8.1) every op whose operand shardings
disagree must name its output sharding; the decoder's embedding lookup of a batch-sharded
token array into a vocab x embed sharded table fails with a `ShardingTypeError`.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from calm_jax.errors import UserError

DATA_AXES = ("data", "fsdp")  # axes the batch is split over
DEFAULT_MESH = (("data", -1), ("fsdp", 1), ("tensor", 1))
REPLICA = "replica"  # devices a config leaves over hold copies (`mesh_shape`)

# (logical name, mesh axis | tuple of mesh axes | None). A name may appear more than once:
# the first rule that is None or still leaves a usable mesh axis wins, so config rules put in
# front of these override them. Every logical name a Variable uses must have a rule (None =
# replicated), so a typo is an error, not a silent replica.
DEFAULT_RULES = (
    ("batch", DATA_AXES),
    ("activation_batch", DATA_AXES),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("lora_rank", None),
    ("experts", None),
)


class ShardingError(UserError):
  """A mesh, rule set or batch that cannot be laid out on the devices."""


def _axis_sizes(mesh) -> dict[str, int]:
  return dict(zip(mesh.axis_names, mesh.axis_sizes)) if mesh is not None else {}


def mesh_shape(mesh_cfg: Sequence[tuple[str, int]], num_devices: int,
               batch_size: int | None = None) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """The one mesh policy: resolves `[(axis, size), ...]` against a device count.

  Sizes >= 1 are axes the config wants fixed; at most one axis has size -1 and takes the rest of
  the devices. Devices left over are replicated, never an error: with no -1 axis the remaining
  factor, and with `batch_size` given, the part of the -1 axis that would not divide the batch
  (when the -1 axis splits the batch), go to a trailing `replica` axis that no rule maps anything
  onto. So a tiny model with a fixed 1 x 1 x 1 mesh, or a batch of 6 on 8 devices, runs: the
  former replicated on every device, the latter 2-way data-parallel and 4-way replicated. Only a
  fixed part that does not divide the devices is refused (a tensor axis of 3 on 8 devices).
  """
  try:
    pairs = [(str(name), int(size)) for name, size in mesh_cfg]
  except (TypeError, ValueError):
    raise ShardingError(f"mesh config must be a list of (axis name, size) pairs, got {mesh_cfg!r}") from None
  if not pairs:
    raise ShardingError("mesh config is empty")
  names = tuple(n for n, _ in pairs)
  if len(set(names)) != len(names) or REPLICA in names:
    raise ShardingError(f"mesh axis names must be distinct and not {REPLICA!r}: {names}")
  sizes = [s for _, s in pairs]
  bad = [(n, s) for n, s in pairs if s < 1 and s != -1]
  if bad:
    raise ShardingError(f"mesh axis sizes must be positive or -1 (the rest), got {bad}")
  if sizes.count(-1) > 1:
    raise ShardingError(f"at most one mesh axis may have size -1 (the rest), got {pairs}")
  fixed = math.prod(s for s in sizes if s != -1)
  if num_devices % fixed:
    raise ShardingError(f"mesh {pairs}: the fixed axis sizes multiply to {fixed}, which does not divide "
                        f"the {num_devices} devices")
  rest = num_devices // fixed
  if -1 in sizes:
    i = sizes.index(-1)
    size = rest
    if batch_size is not None and names[i] in DATA_AXES:
      other_dp = math.prod(s for n, s in pairs if n in DATA_AXES and s != -1)
      if batch_size % other_dp:
        raise ShardingError(f"batch size {batch_size} is not divisible by the fixed data-parallel axes of mesh "
                            f"{pairs} ({other_dp})")
      size = max(d for d in range(1, rest + 1) if rest % d == 0 and batch_size % (d * other_dp) == 0)
    sizes[i] = size
    rest //= size
  if rest > 1:
    return names + (REPLICA,), tuple(sizes) + (rest,)
  return names, tuple(sizes)


def make_mesh(mesh_cfg: Sequence[tuple[str, int]] = DEFAULT_MESH, devices=None,
              axis_type: AxisType = AxisType.Auto, batch_size: int | None = None) -> Mesh:
  """A mesh over all (or the given) devices by the policy of `mesh_shape`.

  Axes are Auto (see the module docstring for why).
  """
  devices = list(jax.devices() if devices is None else devices)
  names, sizes = mesh_shape(mesh_cfg, len(devices), batch_size)
  return jax.make_mesh(sizes, names, axis_types=(axis_type,) * len(names), devices=devices)


def _rule_table(rules) -> dict[str, list[tuple[str, ...]]]:
  table: dict[str, list[tuple[str, ...]]] = {}
  for rule in rules:
    try:
      name, target = rule
    except (TypeError, ValueError):
      raise ShardingError(f"a sharding rule must be (logical name, mesh axes or None), got {rule!r}") from None
    if target is None:
      axes: tuple[str, ...] = ()
    elif isinstance(target, str):
      axes = (target,)
    else:
      axes = tuple(target)
    table.setdefault(name, []).append(axes)
  return table


def logical_to_spec(axes: Sequence[str | None] | None, rules=DEFAULT_RULES, mesh: Mesh | None = None,
                    shape: Sequence[int] | None = None) -> P:
  """PartitionSpec for logical `axes` under `rules`.

  A mesh axis is used at most once per spec (a later dimension that wants it stays
  replicated). Given a mesh, mesh axes it lacks or of size 1 are dropped (so specs read as
  what the compiler reports); given a shape too, a mesh axis whose size does not divide the
  dimension is dropped (so tiny test models with 4 heads replicate their heads on a tensor
  axis of 8 instead of failing).
  """
  if axes is None:
    return P()
  if shape is not None and len(shape) != len(axes):
    raise ShardingError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
  table = _rule_table(rules)
  sizes = _axis_sizes(mesh)
  used: set[str] = set()
  out = []
  for i, name in enumerate(axes):
    if name is None:
      out.append(None)
      continue
    if name not in table:
      raise ShardingError(f"logical axis {name!r} has no sharding rule; known: {sorted(table)}. "
                          f"Add ({name!r}, <mesh axes or None>) to the rules.")
    chosen: tuple[str, ...] = ()
    for candidate in table[name]:
      if not candidate:  # an explicit (name, None): replicated, whatever later rules say
        break
      picked, prod = [], 1
      for ax in candidate:
        if ax in used or (mesh is not None and sizes.get(ax, 1) == 1):
          continue  # taken, absent from the mesh, or of size 1 (splits nothing)
        size = sizes.get(ax, 1)
        if shape is not None and shape[i] % (prod * size):
          continue
        picked.append(ax)
        prod *= size
      if picked:
        chosen = tuple(picked)
        break
    used.update(chosen)
    out.append(None if not chosen else chosen[0] if len(chosen) == 1 else chosen)
  while out and out[-1] is None:
    out.pop()
  return P(*out)


def _named(mesh, rules, axes, shape) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(axes, rules, mesh, shape))


def shardings_for_state(state, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for any nnx State (or pytree of Variables), from each Variable's `axes`.

  The result has the structure of `state` with each Variable's value replaced by its
  sharding, so it works for `jax.device_put(state, ...)` and as jit in/out shardings.
  Variables without `axes` metadata (RNG counters, step counts) are replicated.
  """
  def one(x):
    if isinstance(x, nnx.Variable):
      shape = getattr(x.get_value(), "shape", ())
      axes = x.get_metadata().get("axes")
      return x.replace(_named(mesh, rules, axes, shape))
    return NamedSharding(mesh, P())
  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_shardings(model_or_specs, mesh: Mesh, rules=DEFAULT_RULES) -> dict[str, Any]:
  """NamedSharding nested dict matching `model.params()`.

  Accepts a module with a `params()` method (shardings from its Params' `axes`), a
  `DecoderConfig`, or a flat `{name: ParamSpec}` dict from `param_specs`.
  """
  from calm_jax.models import DecoderConfig, ParamSpec, nest, param_specs
  if isinstance(model_or_specs, nnx.Module):
    return nnx.to_pure_dict(shardings_for_state(nnx.state(model_or_specs, nnx.Param), mesh, rules))
  specs = param_specs(model_or_specs) if isinstance(model_or_specs, DecoderConfig) else model_or_specs
  if not isinstance(specs, Mapping) or not all(isinstance(s, ParamSpec) for s in specs.values()):
    raise ShardingError(f"param_shardings takes a module, a DecoderConfig or a {{name: ParamSpec}} dict, "
                        f"got {type(model_or_specs).__name__}")
  return nest({name: _named(mesh, rules, s.axes, s.shape) for name, s in specs.items()})


def data_parallel_size(mesh: Mesh) -> int:
  sizes = _axis_sizes(mesh)
  return math.prod(sizes.get(a, 1) for a in DATA_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the mesh's data-parallel axes, the rest replicated."""
  return NamedSharding(mesh, logical_to_spec(("batch",), [("batch", DATA_AXES)], mesh))


def shard_batch(batch, mesh: Mesh):
  """Puts every array of a (nested) batch on the mesh, split along the leading axis.

  Arrays are this process's part of the global batch (the whole batch on one host), as
  `jax.make_array_from_process_local_data` expects on multi-host runs.
  """
  sharding = batch_sharding(mesh)
  dp = data_parallel_size(mesh)
  # How many distinct batch slices this process holds when the global batch has dp rows.
  local_slices = len({idx[0].start for idx in sharding.addressable_devices_indices_map((dp,)).values()})

  def put(x):
    x = np.asarray(x) if not isinstance(x, jax.Array) else x
    if x.ndim == 0:
      raise ShardingError("shard_batch got a scalar; every batch entry needs a leading batch axis")
    b = x.shape[0]
    if b % local_slices:
      where = "" if jax.process_count() == 1 else f" (this process's part; {local_slices} slices are local)"
      raise ShardingError(f"batch size {b}{where} is not divisible by the data-parallel size {dp} "
                          f"(mesh axes {dict(_axis_sizes(mesh))})")
    return jax.make_array_from_process_local_data(sharding, x)
  return jax.tree.map(put, batch)


def shard_logical(x, axes: Sequence[str | None], rules=DEFAULT_RULES):
  """`with_sharding_constraint` by logical names under the mesh set by `jax.set_mesh`; no-op without one."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, rules, mesh, x.shape))


def rules_from_config(overrides=()) -> tuple:
  """`config.rules` entries in front of DEFAULT_RULES (the first matching rule wins)."""
  return tuple(tuple(r) for r in (overrides or ())) + tuple(DEFAULT_RULES)
