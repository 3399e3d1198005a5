"""The device mesh and the one table that maps logical axis names to mesh axes.

Changing parallelism means changing `cfg.mesh` (or these rules), never model code. Order of the mesh axes,
outer to inner: data, stage, fsdp, context, tensor — so the fastest-communicating (innermost, neighbouring)
devices carry tensor parallelism, as in the Llama 3 paper.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax.errors import ConfigError

MESH_AXES = ("data", "stage", "fsdp", "context", "tensor")

# Logical name -> mesh axis (or axes). Batch is split over both data-parallel axes; parameters are split
# over fsdp on their embed dimension, over tensor on heads / mlp / vocab (Megatron-style: column-parallel q/k/v,
# gate and up, row-parallel o and down, vocabulary-parallel embedding and logits), and over stage on the layer stack
# (each pipeline stage holds its own layers).
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", "context"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("layers", "stage"),
)


def mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Resolves the one axis given as -1 to the devices left over, and checks the product."""
    sizes = {axis: int(mesh_cfg[axis]) for axis in MESH_AXES}
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ConfigError(f"mesh: only one axis may be -1, got {free}: give explicit sizes to all but one")
    bad = [f"mesh.{axis}={size}" for axis, size in sizes.items() if size == 0 or size < -1]
    if bad:
        raise ConfigError(f"{', '.join(bad)}: mesh sizes must be positive (or -1 for 'the rest')")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if num_devices % fixed:
            raise ConfigError(
                f"mesh: the fixed axes multiply to {fixed}, which does not divide the {num_devices} devices; "
                f"change the mesh sizes"
            )
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        shape = " x ".join(f"{axis}={size}" for axis, size in sizes.items())
        raise ConfigError(
            f"mesh {shape} needs {fixed} devices but {num_devices} are available: "
            f"make the product equal {num_devices}, or set one axis (e.g. mesh.data) to -1"
        )
    return sizes


def make_mesh(mesh_cfg: Mapping[str, int], devices: list | None = None) -> Mesh:
    """A mesh over all devices (or `devices`) with automatic (GSPMD) sharding propagation. Devices of several TPU
    slices (multislice) are laid out with the data axis across slices, so that only data parallelism's gradient
    reduction crosses the slower data-centre network."""
    devices = jax.devices() if devices is None else devices
    sizes = mesh_shape(mesh_cfg, len(devices))
    shape = tuple(sizes[axis] for axis in MESH_AXES)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    slices = len({getattr(device, "slice_index", 0) for device in devices})
    if slices == 1:
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    return Mesh(multislice_grid(shape, devices, slices), MESH_AXES, axis_types=auto)


def multislice_grid(shape: tuple[int, ...], devices: list, slices: int) -> np.ndarray:
    """The device array of a mesh of `shape` (axes MESH_AXES) over `slices` slices: data split across them."""
    if shape[0] % slices:
        raise ConfigError(f"the devices span {slices} TPU slices, and data parallelism runs across slices: mesh.data "
                          f"({shape[0]}) must be a multiple of {slices}; e.g. mesh.data={slices} and the other axes "
                          "within a slice")
    within = (shape[0] // slices, *shape[1:])
    across = (slices, *(1 for _ in shape[1:]))
    return mesh_utils.create_hybrid_device_mesh(within, across, devices)


def logical_to_spec(names: tuple[str | None, ...], rules=LOGICAL_RULES) -> PartitionSpec:
    """PartitionSpec for one array's logical names; a mesh axis is used at most once per array."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name in names:
        if name is not None and name not in table:
            raise ConfigError(f"logical axis {name!r} has no rule in parallel/mesh.py LOGICAL_RULES")
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(axis for axis in axes if axis not in used)
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec)


def param_shardings(abstract_state: nnx.State, mesh: Mesh) -> dict:
    """NamedShardings, as a pure dict matching the parameters, from each Param's logical axis names.

    A dimension that its mesh axes do not divide is kept whole (replicated over them): with fewer KV heads than
    the tensor axis, each device keeps all KV heads and uses those its query heads read, as Megatron does."""

    def sharding(variable: nnx.Variable) -> NamedSharding:
        names = variable.get_metadata().get("out_sharding") or (None,) * variable.ndim
        spec = logical_to_spec(tuple(names))
        return NamedSharding(mesh, PartitionSpec(*(
            axes if dim % _axes_size(mesh, axes) == 0 else None for dim, axes in zip(variable.shape, spec))))

    shardings = jax.tree.map(sharding, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(shardings)


def _axes_size(mesh: Mesh, axes: str | tuple[str, ...] | None) -> int:
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return math.prod(mesh.shape[name] for name in names)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Pins an activation's sharding by logical names, under the ambient mesh (`jax.set_mesh`)."""
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of [batch, length] inputs."""
    return NamedSharding(mesh, logical_to_spec(("batch", "length")))


def batch_share(mesh: Mesh) -> tuple[int, int]:
    """(index, count): this process's devices hold block `index` of `count` equal blocks of every global batch's rows,
    which is what it must read. The batch axes (data, fsdp) split the rows; the others (stage, context, tensor) give
    each of their devices all the rows of its batch shard, so processes apart only along those read the same rows
    (one pipeline stage per host, say), and one process alone reads them all."""
    rows = _axes_size(mesh, logical_to_spec(("batch",))[0])
    held = sorted({index[0].start or 0 for index in
                   NamedSharding(mesh, logical_to_spec(("batch",))).addressable_devices_indices_map((rows,)).values()})
    if held != list(range(held[0], held[0] + len(held))) or rows % len(held) or held[0] % len(held):
        raise ConfigError(f"the devices of process {jax.process_index()} hold batch shards {held} of {rows}, not one "
                          "block of them: order the mesh so that each host's devices hold consecutive batch shards "
                          "(mesh.data and mesh.fsdp outermost across hosts)")
    return held[0] // len(held), rows // len(held)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
