"""torch FSDP1 (`FullyShardedDataParallel`) adapter: MOGA over FSDP1's flat shards is exact MOGA.

FSDP1 concatenates a unit's parameters into one `FlatParameter` (padding between them when
use_orig_params=True, then at the end so it splits evenly) and gives each rank of its process
group an equal slice. The optimizer sees either the FlatParameter (use_orig_params=False) or the
original parameters as 1-D views of this rank's slice, possibly empty (use_orig_params=True).
Either way each original parameter is a `FlatPartition` of its flattened global matrix, exactly
what ZeRO gives the DeepSpeed adapter, so the core's flat partitions do the rest:

| MOGA's groups hold                       | declared as                                            |
|------------------------------------------|--------------------------------------------------------|
| a FlatParameter (use_orig_params=False)  | a flat buffer: one FlatSegment per original parameter   |
| an original parameter (use_orig_params=True) | its FlatPartition layout; a ghost where this rank holds none of it |

Sharded strategies (FULL_SHARD, SHARD_GRAD_OP, HYBRID_SHARD: the statistics group is FSDP's
shard group) partition over the handle's process group; NO_SHARD holds whole tensors. Roles of
the original parameters come from the module tree (embedding modules, the output head by
`param_groups`' rules, >= 2-D weights hidden), since a flattened shard's shape says nothing.
CPU offload of parameters is refused (not verified: the step would run on CPU shards while the
statistics all-reduce uses FSDP's device group).

`install()` (run when moga_dist is imported) registers `adopt` with the core, so a MOGA built
before or after wrapping (Accelerate, Lightning, litgpt) is mapped at its first step; `attach`
does it explicitly. Only MOGA's public interface and torch's FSDP1 metadata are used.
"""
from __future__ import annotations

import gc
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..core.adopters import is_fsdp1_flattened, register
from ..core.flat import FlatSegment, partition_segments
from ..core.optimizer import MOGA
from ..core.param_groups import HEAD_NAMES, is_embedding_module, structural_role

_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()     # MOGA -> [root modules]
_DONE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()         # MOGA -> ids it was mapped for


@dataclass(frozen=True)
class FlatParamInfo:
    """One FSDP1 FlatParameter as MOGA sees it (the same on every rank but `rank`).

    names/shapes/offsets: each original parameter's FQN (relative to its FSDP unit), global shape
    and start in the unsharded flat parameter; roles: its role by the module tree; partition_size:
    elements per rank (the padded unsharded size / world_size); group: FSDP's (shard) group, None
    for NO_SHARD; params: the original parameters (use_orig_params=True) or None."""

    flat_param: torch.Tensor
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    roles: tuple[str, ...]
    partition_size: int
    rank: int
    world_size: int
    group: object
    params: tuple | None

    @property
    def group_key(self) -> str:
        """The key the layouts name FSDP's process group by (distinct per set of ranks)."""
        return "fsdp1" if self.group is None else "fsdp1:" + ",".join(map(str, dist.get_process_group_ranks(self.group)))

    def segments(self) -> list[FlatSegment]:
        """This rank's slice of the flat parameter as one segment per original parameter, role in options."""
        return partition_segments([*self.shapes], [*self.offsets], self.partition_size, self.rank, self.world_size,
                                  [*self.names], [{"role": r} for r in self.roles], group=self.group_key)


def describe_handle(handle, head_modules: set[int]) -> FlatParamInfo:
    """Read FSDP1's own metadata of one FlatParamHandle; raise naming the setting MOGA refuses.

    The derived slices are checked against torch's `_shard_param_infos`, so a change of FSDP1's
    layout fails loudly instead of mapping the wrong elements."""
    fp = handle.flat_param
    if getattr(handle, "_offload_params", False):
        raise ValueError("FSDP1 with cpu_offload=CPUOffload(offload_params=True) is not supported with MOGA: "
                         "the step would run on CPU shards while its statistics all-reduce uses FSDP's device "
                         "process group (not verified). Remove the offload, or use DeepSpeed ZeRO without offload")
    sharded = bool(handle.uses_sharded_strategy)
    group = handle.process_group if sharded else None
    world = dist.get_world_size(group) if sharded else 1
    rank = dist.get_rank(group) if sharded else 0
    offsets, pos = [], 0
    for numel, is_pad in zip(fp._numels_with_padding, fp._is_padding_mask):
        if not is_pad:
            offsets.append(pos)
        pos += numel
    # _sharded_size is set when FSDP1 shards (before its lazy init, so attach() works right after
    # wrapping): the padded unsharded size / world size.
    partition = getattr(fp, "_sharded_size", fp._unpadded_unsharded_size).numel()
    roles = []
    for info, shape, fqn in zip(fp._param_infos, fp._shapes, fp._fqns):
        # param_groups' one rule, on the original shape (the flattened shard's says nothing)
        head = len(shape) >= 2 and id(info.module) in head_modules and info.param_name == "weight"
        roles.append(structural_role(len(shape), embedding=is_embedding_module(info.module, fqn.rpartition(".")[0]),
                                     head=head))
    found = FlatParamInfo(fp, tuple(fp._fqns), tuple(tuple(s) for s in fp._shapes), tuple(offsets), tuple(roles),
                          partition, rank, world, group, tuple(fp._params) if fp._params is not None else None)
    _check_against_torch(found)
    return found


def _check_against_torch(info: FlatParamInfo) -> None:
    fp = info.flat_param
    for seg, shard in zip(info.segments(), fp._shard_param_infos):
        lo, hi = seg.layout.flat.local_range if seg.layout.flat is not None else (0, seg.numel)
        mine = (hi > lo, seg.start if hi > lo else None, hi - lo if hi > lo else None)
        if info.world_size > 1 and (shard.in_shard, shard.offset_in_shard, shard.numel_in_shard) != mine \
                or info.world_size > 1 and shard.in_shard and shard.intra_param_start_idx != lo:
            raise ValueError(f"FSDP1 parameter {seg.name!r}: torch places this rank's piece at {shard}, MOGA derived "
                             f"{mine} from the flat parameter's sizes; this torch's FSDP1 layout is not supported")
    if fp.numel() != info.partition_size:
        raise ValueError(f"FSDP1 flat parameter holds {fp.numel()} elements on this rank, expected {info.partition_size} "
                         "(is the optimizer stepping between forward and backward?)")


def _head_modules(roots) -> set[int]:
    """ids of output-head modules under `roots`: get_output_embeddings(), else a module named as
    param_groups names heads (lm_head, output_layer, output)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp._common_utils import clean_tensor_name

    heads = set()
    for root in roots:
        inner = getattr(root, "module", root)
        getter = getattr(inner, "get_output_embeddings", None)
        out = getter() if callable(getter) else None
        if isinstance(out, nn.Module):
            heads.add(id(out.module) if isinstance(out, FSDP) else id(out))
            continue
        for name, module in root.named_modules():
            # Wrappers (FSDP units, activation checkpointing) forward .weight: name the inner module.
            if isinstance(module, FSDP) or type(module).__name__ == "CheckpointWrapper":
                continue
            if clean_tensor_name(name + ".").rstrip(".").split(".")[-1] in HEAD_NAMES and \
                    isinstance(getattr(module, "weight", None), torch.Tensor):
                heads.add(id(module))
    return heads


def _fsdp_units(roots=None):
    """(FSDP1 units with a handle, their root modules): under `roots`, or every live one (gc)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if roots is None:
        # type(), not isinstance: some live objects warn or fail when asked for __class__.
        units = [o for o in gc.get_objects() if issubclass(type(o), FSDP)]
        roots = [u for u in units if getattr(u, "_is_root", False)] or units
    else:
        units = [u for r in roots for u in FSDP.fsdp_modules(r)]
    return [u for u in units if getattr(u, "_handle", None) is not None], roots


def attach(model: nn.Module, optimizer: MOGA) -> MOGA:
    """Map `optimizer`'s FSDP1 tensors to the parameters of FSDP1-wrapped `model` now (the first
    step does it anyway, finding the model itself); returns the optimizer. Raises for a MOGA
    tensor FSDP1 flattened that is not in `model`, and for refused settings (CPU offload)."""
    if not isinstance(optimizer, MOGA):
        raise ValueError(f"optimizer must be a moga_dist.MOGA, got {type(optimizer).__name__}")
    _ATTACHED[optimizer] = [model]
    _DONE.pop(optimizer, None)
    optimizer.invalidate()
    adopt(optimizer)
    return optimizer


def adopt(opt: MOGA) -> None:
    """Declare every FSDP1 tensor in `opt`'s groups (the core runs this before each program build;
    a no-op when there is none or nothing changed since the last mapping)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    flagged = [p for p in params if is_fsdp1_flattened(p)]
    if not flagged:
        return
    ids = tuple(id(p) for p in params)
    if _DONE.get(opt) == ids:
        return
    units, roots = _fsdp_units(_ATTACHED.get(opt))
    wanted = {id(p) for p in flagged}
    # Only the units that hold MOGA's tensors: other live FSDP models are none of its business.
    units = [u for u in units if id(u._handle.flat_param) in wanted
             or any(id(p) in wanted for p in (u._handle.flat_param._params or ()))]
    heads = _head_modules(roots)
    infos = [describe_handle(u._handle, heads) for u in units]
    by_flat = {id(i.flat_param): i for i in infos}
    by_orig = {id(p): (i, k) for i in infos if i.params is not None for k, p in enumerate(i.params)}
    unmapped = [p for p in flagged if id(p) not in by_flat and id(p) not in by_orig]
    if unmapped:
        raise ValueError(f"{len(unmapped)} tensor(s) in MOGA's groups were flattened by torch FSDP1 but belong to no "
                         f"live FSDP1 unit (local shapes {[tuple(p.shape) for p in unmapped][:4]}); updating them "
                         "as vectors would be wrong. Call moga_dist.engines.fsdp1.attach(fsdp_model, optimizer)")
    ghosts = []
    for pos, (group, p) in enumerate((g, p) for g in opt.param_groups for p in g["params"]):
        if id(p) in by_flat:
            info = by_flat[id(p)]
            if info.group is not None:
                opt.set_process_group(info.group_key, info.group)
            opt.declare_flat_buffer(p, info.segments(), 0.0)
            opt.declare(p, order_key=pos)
        elif id(p) in by_orig:
            info, k = by_orig[id(p)]
            seg = info.segments()[k]
            if info.group is not None:
                opt.set_process_group(info.group_key, info.group)
            options = _options(group, seg.options["role"], info.shapes[k])
            opt.declare(p, layout=seg.layout, options=options, order_key=pos)
            if seg.numel == 0:      # FSDP1 gives it no gradient here, but peers share its statistics
                ghosts.append((pos, seg.layout, {**{k2: v for k2, v in group.items() if k2 != "params"}, **options}))
        else:
            opt.declare(p, order_key=pos)
    opt.declare_ghosts(ghosts)
    _DONE[opt] = ids


def _options(group: dict, structural: str, shape: tuple[int, ...]) -> dict:
    """The role an original parameter keeps: its group's, unless the group has none or calls a
    flattened >= 2-D weight a vector (param_groups run on the wrapped model sees 1-D shards)."""
    given = group.get("role")
    if given is None or (given == "vector" and len(shape) >= 2):
        return {"role": structural}
    return {"role": given}


def install() -> None:
    """Register `adopt` with the core (idempotent): every MOGA maps FSDP1 tensors at its first step."""
    register(adopt)
