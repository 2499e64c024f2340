"""Logical axis names -> physical mesh axes: the one place where sharding is decided.

Every parameter carries `logical_axes` metadata (one name or None per dimension). `RULES` maps each
logical name to mesh axes of the Mesh ('data', 'fsdp', 'tensor', 'expert'). A mesh axis is dropped for
a dimension it does not divide, and never used twice in one spec, so tiny test models shard on any mesh.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "expert")

RULES: Mapping[str, tuple[str, ...]] = {
    # activations
    "batch": ("data", "fsdp", "expert"),
    "length": (),
    # weights
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "expert": ("expert",),
}


def make_mesh(shape: Mapping[str, int] | None = None, devices=None) -> Mesh:
  """A Mesh over ('data', 'fsdp', 'tensor', 'expert'); unspecified axes have size 1.

  `shape` may leave one axis at -1 to take the remaining devices, e.g. {'fsdp': -1, 'tensor': 2}.
  """
  devices = np.asarray(jax.devices() if devices is None else devices)
  shape = dict(shape or {"fsdp": -1})
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected a subset of {MESH_AXES}")
  sizes = [shape.get(a, 1) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {shape}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    sizes[sizes.index(-1)] = devices.size // known
  if math.prod(sizes) != devices.size:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {devices.size}")
  return Mesh(devices.reshape(sizes), MESH_AXES)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Mapping[str, tuple[str, ...]] = RULES) -> P:
  """PartitionSpec for an array of `shape` whose dimensions carry `logical_axes`."""
  if len(logical_axes) != len(shape):
    raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
  used: set[str] = set()
  spec = []
  for name, dim in zip(logical_axes, shape):
    if name is not None and name not in rules:
      raise KeyError(f"logical axis {name!r} has no rule; known: {sorted(rules)}")
    axes = []
    for axis in rules.get(name, ()) if name else ():
      size = mesh.shape[axis]
      if axis in used or size == 1 or dim % (size * math.prod(mesh.shape[a] for a in axes)):
        continue
      axes.append(axis)
    used.update(axes)
    spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
  return P(*spec)


def variable_sharding(var: nnx.Variable, mesh: Mesh, rules=RULES) -> NamedSharding:
  """NamedSharding of one (abstract) variable, from its `logical_axes` metadata."""
  shape = var.get_value().shape
  axes = getattr(var, "logical_axes", None) or (None,) * len(shape)
  return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))


def state_shardings(abstract_state: nnx.State, mesh: Mesh, rules=RULES):
  """NamedSharding for every variable of an (abstract) nnx state."""
  return jax.tree.map(lambda v: variable_sharding(v, mesh, rules), abstract_state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation when a mesh is active (`jax.set_mesh`); a no-op otherwise.

  Activations shard their batch (data parallel + FSDP) and keep the model width whole: FSDP gathers
  weights, not activations.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, x.shape, mesh))
