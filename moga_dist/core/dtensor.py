"""DTensor parameters (FSDP2's `fully_shard`, TP's `parallelize_module`, both on a 2-D mesh): their
placements and device mesh read as a ShardLayout plus one process group per sharded mesh dim.

A placement maps onto what the core already expresses:
  Shard(1)                       -> TensorParallelSplit(dim=1) (an even split of d_in)
  Shard(0), one mesh dim         -> FlatPartition of whole rows of the (TP-local) matrix; its
                                    ranges follow torch.chunk, so FSDP2's uneven last shard (even
                                    an empty one) is exact. Every row is local: MOGA-row sends
                                    nothing; columns need one all-reduce of partial sums.
  Shard(0) on two mesh dims      -> the outer one a TensorParallelSplit(dim=0), the inner one the
                                    row partition of the TP-local matrix. FSDP2 over TP marks its
                                    dim _StridedShard (sharded after TP, "right to left").
  Replicate                      -> nothing to reduce (the gradient is brought to Replicate).
The step then works on `to_local()` views; momentum is a DTensor of the parameter's placements,
so state_dict() and torch.distributed.checkpoint see (and reshard) DTensors.

torch.distributed.tensor is torch, not an engine; this module only reads meshes and group
handles (collectives stay in collectives.py), except the gradient's own redistribution.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial, Replicate

from .layout import FlatPartition, ShardLayout, TensorParallelSplit


@dataclass(frozen=True)
class MeshLayout:
    """A DTensor parameter as MOGA sees it: its layout (None for vectors, whose sign update needs
    none) and {group key: ProcessGroup} for every key the layout names."""

    layout: ShardLayout | None
    groups: dict


@dataclass(frozen=True)
class _ShardDim:
    mesh_dim: int
    tensor_dim: int
    split_factor: int       # > 1: FSDP2's _StridedShard, sharded after the mesh dims to its right


def is_dtensor(t) -> bool:
    """Whether `t` is a DTensor (a parameter, gradient or momentum)."""
    return isinstance(t, DTensor)


def local_view(t):
    """This rank's local tensor of a DTensor (sharing its storage); any other tensor (or None)
    unchanged."""
    return t.to_local() if isinstance(t, DTensor) else t


def group_key(mesh, mesh_dim: int) -> str:
    """The key a layout names mesh dim `mesh_dim`'s process group by: the dim's name, e.g. "dp"."""
    names = mesh.mesh_dim_names
    return names[mesh_dim] if names else f"mesh_dim{mesh_dim}"


def chunk_ranges(extent: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) of each of torch.chunk's `parts` pieces of `extent` (DTensor's Shard and FSDP2
    cut this way: ceil-sized pieces, the last ones short or empty)."""
    size = -(-extent // parts)
    return [(min(k * size, extent), min((k + 1) * size, extent)) for k in range(parts)]


def dtensor_layout(param: DTensor) -> MeshLayout:
    """The ShardLayout of DTensor `param` on this rank and the groups it names.

    param: global shape [d_out, d_in, ...] (>2-D weights are [d_out, prod(rest)]); local shape
    from its placements. Raises ValueError naming the placement for what MOGA cannot do exactly
    (Partial parameters, an uneven Shard(1) or outer Shard(0), more than two shards)."""
    mesh, placements = param.device_mesh, tuple(param.placements)
    shape, local_shape = tuple(param.shape), tuple(param.to_local().shape)
    where = f"DTensor parameter of shape {shape} with placements {placements} on {mesh}"
    coord = mesh.get_coordinate()
    if coord is None:
        raise ValueError(f"{where}: this rank is not in its device mesh")
    shards = []
    for i, pl in enumerate(placements):
        if isinstance(pl, Partial):
            raise ValueError(f"{where}: a Partial parameter has no value; allowed Shard, Replicate")  # noqa: TRY004
        if isinstance(pl, Replicate):
            continue
        dim = getattr(pl, "dim", None)
        if dim is None:
            raise ValueError(f"{where}: placement {pl} on mesh dim {i}: allowed Shard, Replicate")
        shards.append(_ShardDim(i, dim % len(shape), int(getattr(pl, "split_factor", 1))))
    if len(shape) < 2:
        return MeshLayout(None, {})        # vectors: sign(u) is elementwise, no statistics
    groups = {}

    def key_of(s: _ShardDim) -> str:
        key = group_key(mesh, s.mesh_dim)
        groups[key] = mesh.get_group(s.mesh_dim)
        return key

    cols = [s for s in shards if s.tensor_dim == 1]
    rows = [s for s in shards if s.tensor_dim == 0]
    if len(cols) + len(rows) != len(shards) or len(cols) > 1 or len(rows) > 2 or len(shards) > 2 \
            or (cols and len(shape) != 2):
        raise ValueError(f"{where}: supported are Shard(0) on up to two mesh dims, or Shard(0) and Shard(1) "
                         "of a 2-D weight on one each")
    tp = None
    if cols:
        s = cols[0]
        n = mesh.size(s.mesh_dim)
        if shape[1] % n or s.split_factor != 1:
            raise ValueError(f"{where}: Shard(1) needs d_in={shape[1]} divisible by mesh dim size {n} "
                             "(an uneven column split is not supported)")
        tp = TensorParallelSplit(1, coord[s.mesh_dim], n, group=key_of(s))
    if len(rows) == 2:
        outer, inner = _nesting(rows, mesh, where)
        n = mesh.size(outer.mesh_dim)
        if shape[0] % n:
            raise ValueError(f"{where}: the outer Shard(0) on mesh dim {outer.mesh_dim} needs d_out={shape[0]} "
                             f"divisible by its size {n}")
        tp = TensorParallelSplit(0, coord[outer.mesh_dim], n, group=key_of(outer))
        rows = [inner]
    flat = None
    if rows:
        s = rows[0]
        if s.split_factor != 1 and len(shards) == 1:
            raise ValueError(f"{where}: _StridedShard without the shard it follows is not supported")
        local_rows = shape[0] // tp.world_size if tp is not None and tp.dim == 0 else shape[0]
        ncols = math.prod(shape[1:]) // (tp.world_size if tp is not None and tp.dim == 1 else 1)
        ranges = tuple((a * ncols, b * ncols) for a, b in chunk_ranges(local_rows, mesh.size(s.mesh_dim)))
        flat = FlatPartition(ranges, coord[s.mesh_dim], group=key_of(s))
    layout = ShardLayout(shape, tp=tp, flat=flat)
    if layout.local_numel != math.prod(local_shape):
        raise ValueError(f"{where}: derived layout holds {layout.local_numel} elements but the local tensor "
                         f"has shape {local_shape}; this sharding is not supported")
    return MeshLayout(layout, groups)


def _nesting(rows: list[_ShardDim], mesh, where: str) -> tuple[_ShardDim, _ShardDim]:
    """(outer, inner) of two Shard(0) mesh dims: left to right for plain Shard, the strided one
    inner when FSDP2 marked it _StridedShard(split_factor = the other dim's size)."""
    a, b = sorted(rows, key=lambda s: s.mesh_dim)
    if a.split_factor == 1 and b.split_factor == 1:
        return a, b
    if a.split_factor == mesh.size(b.mesh_dim) and b.split_factor == 1:
        return b, a
    raise ValueError(f"{where}: this combination of Shard(0) placements is not supported")


def check_group_key(known, key: str, group) -> None:
    """Raise if `key` already names a process group of other ranks (two meshes that name a dim
    alike but span different ranks would otherwise share statistics wrongly). known: the group
    `key` names now, or None."""
    if known is not None and known is not group and \
            dist.get_process_group_ranks(known) != dist.get_process_group_ranks(group):
        raise ValueError(f"process group key {key!r} already names ranks {dist.get_process_group_ranks(known)}, "
                         f"but a DTensor mesh dim of that name spans {dist.get_process_group_ranks(group)}; "
                         "give the device meshes distinct mesh_dim_names")


def declare_dtensors(optimizer, params) -> None:
    """Declare every DTensor in `params` to `optimizer` (a MOGA) through its public interface:
    process groups by mesh dim name, then the layout. Per-rank layout checkpoints are turned off
    when every parameter is a DTensor: their state reshards through torch.distributed.checkpoint."""
    for p in params:
        if not is_dtensor(p):
            continue
        found = dtensor_layout(p)
        for key, group in found.groups.items():
            check_group_key(optimizer.process_group(key), key, group)
            optimizer.set_process_group(key, group)
        if found.layout is not None:
            optimizer.declare(p, layout=found.layout)
    if all(is_dtensor(p) for g in optimizer.param_groups for p in g["params"]):
        optimizer.save_layouts = False


def declare_swapped_dtensors(optimizer) -> bool:
    """Declare the DTensors put into `optimizer`'s groups after it was built (Accelerate's FSDP2
    swaps every parameter for one): those it does not know, or matrices without a layout (an id
    Python reused). Returns whether any was declared."""
    tensors = optimizer.tensors
    swapped = [p for g in optimizer.param_groups for p in g["params"] if is_dtensor(p)
               and (id(p) not in tensors.known or (p.dim() >= 2 and id(p) not in tensors.layouts))]
    if swapped:
        declare_dtensors(optimizer, swapped)
        tensors.known.update(id(p) for p in swapped)
        tensors.index_names(optimizer.param_groups)
    return bool(swapped)


class LocalGradOwner:
    """Stands in for a DTensor parameter in the step program, which reads `owner.grad` each step:
    here the local gradient, first brought to the parameter's placements (a replicated norm
    weight under sequence parallelism gets a Partial gradient; summing it is the gradient sync
    any optimizer needs, not MOGA's statistics)."""

    __slots__ = ("param",)

    def __init__(self, param: DTensor):
        self.param = param

    @property
    def grad(self) -> torch.Tensor | None:
        g = self.param.grad
        if g is None:
            return None
        if tuple(g.placements) != tuple(self.param.placements):
            g = g.redistribute(self.param.device_mesh, self.param.placements)
        return g.to_local()


def step_owner(param):
    """What the step program holds for `param`: a LocalGradOwner for a DTensor, else the tensor."""
    return LocalGradOwner(param) if isinstance(param, DTensor) else param


def param_of(owner):
    """The parameter behind a step-program owner (inverse of step_owner)."""
    return owner.param if isinstance(owner, LocalGradOwner) else owner
