"""MOGA inside DeepSpeed ZeRO-3 (`DeepSpeedZeroOptimizer_Stage3`), exact.

ZeRO-3 partitions every parameter on its own: rank r of the parameter's data-parallel group
holds elements [r * part, (r + 1) * part) of the flattened parameter (part = ceil(numel / world),
the last rank padded). The parameters are cut into sub-groups (`sub_group_size`), and each
sub-group's fp32 master copy is one flat tensor, the concatenation of its parameters' partitions.
That tensor is what MOGA updates: one FlatSegment per parameter, at the running sum of the
partitions before it, with a FlatPartition of the parameter over the group. Only statistics of
rows (or columns) cut by a partition boundary are all-reduced, as at ZeRO-1/2.

ZeRO-3 steps its inner optimizer once per sub-group and per optimizer step (not per micro-batch:
gradient accumulation happens in the partitioned gradient buffers), putting that sub-group's flat
tensor alone into the param group for the call and emptying the group again afterwards. With
several sub-groups that would rebuild MOGA's step program at every call (each call sees other
tensors) and give each sub-group its own non-finite verdict, so a NaN in the last sub-group would
leave the earlier ones stepped. `one_step_for_all_sub_groups` makes the sub-group loop step MOGA
once, at the last sub-group, over every sub-group's flat: one program (cached across steps), one
verdict, one statistics all-reduce. The cost: every sub-group's fp32 gradient partition is alive
during the step (4 B x parameters / DP), where ZeRO-3 holds one sub-group's at a time.
"""
from __future__ import annotations

import dataclasses

from ..core.flat import FlatSegment, partition_segments
from ..core.optimizer import MOGA
from ..core.param_spec import ParamSpec
from ..core.tensors import FlatBuffer
from .deepspeed_wrappers import HeldTensor, forget, remember, spec_of

STAGE3_CLASS = "DeepSpeedZeroOptimizer_Stage3"


def check_stage3(engine) -> None:
    """Refuse, naming the config key, ZeRO-3 settings under which MOGA's tensors are not the
    per-sub-group fp32 flats mapped here (or are not verified with MOGA)."""
    offload = getattr(engine.zero_offload_param(), "device", None)
    refused = [("zero_optimization.offload_param", offload is not None and str(offload).split(".")[-1] != "none",
                "parameters offloaded by ZeRO-3 are not verified with MOGA; remove the offload_param block"),
               ("zero_optimization.zero_hpz_partition_size", engine.zero_hpz_partition_size() > 1,
                "ZeRO++ secondary partitions are not verified with MOGA; remove it")]
    for key, bad, advice in refused:
        if bad:
            raise ValueError(f"{key} is set: not supported with MOGA under ZeRO-3: {advice}")


def stage3_segments(shapes: list[tuple[int, ...]], parts: list[int], rank: int, world: int,
                    specs: list[ParamSpec]) -> list[FlatSegment]:
    """Segments of one ZeRO-3 sub-group's flat fp32 tensor on group rank `rank`.

    shapes: each parameter's full shape; parts: its partition size per rank (ceil(numel/world)).
    The flat tensor is the parameters' partitions back to back ([sum(parts)] elements)."""
    out, offset = [], 0
    for shape, part, spec in zip(shapes, parts, specs):
        seg, = partition_segments([shape], [0], part, rank, world, [spec.name], [{**spec.options, "role": spec.role}],
                                  [spec.layout])
        out.append(dataclasses.replace(seg, start=offset + seg.start))
        offset += part
    return out


def adopt_stage3(ds_optimizer, moga: MOGA, specs: dict[int, ParamSpec]) -> None:
    """Declare each sub-group's fp32 flat tensor of `ds_optimizer` (ZeRO-3's wrapper) on MOGA."""
    import torch.distributed as dist

    kind = type(ds_optimizer).__name__
    if kind != STAGE3_CLASS:
        raise ValueError(f"DeepSpeed wrapped MOGA in {kind} under ZeRO-3, which moga_dist does not map back to "
                         f"parameters; supported: {STAGE3_CLASS}")
    groups = ds_optimizer.sub_group_process_groups
    if any(g is not groups[0] for g in groups):
        raise ValueError("ZeRO-3 partitions MOGA's sub-groups over different process groups; moga_dist maps "
                         "one data-parallel group only")
    group = groups[0]
    forget(moga)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    # ZeRO-3 keeps MOGA's groups empty between steps and puts each group's sub-group flats into it,
    # in sub-group order, only to step (ZeRO-3's own loop: one flat at slot 0; the single-step
    # loop below: all of them): the slots are described now, the flats declared at the first step.
    slots: list[list[FlatBuffer]] = [[] for _ in moga.param_groups]
    for i, (params, buffer) in enumerate(zip(ds_optimizer.fp16_groups, ds_optimizer.fp32_partitioned_groups_flat)):
        segments = stage3_segments([tuple(p.ds_shape) for p in params], [int(p.partition_numel()) for p in params],
                                   rank, world, [spec_of(specs, p) for p in params])
        holder = moga.param_groups[ds_optimizer.sub_group_to_group_id[i]]
        slots[ds_optimizer.sub_group_to_group_id[i]].append(
            FlatBuffer(segments, float(holder.get("initial_lr", holder["lr"]))))
        remember(moga, HeldTensor(buffer, segments, list(params)))
    moga.declare_engine(slots, process_groups={"dp": group})
    if len(ds_optimizer.fp16_groups) > 1:
        one_step_for_all_sub_groups(ds_optimizer, moga)


def one_step_for_all_sub_groups(ds_optimizer, moga: MOGA) -> None:
    """Make ZeRO-3's per-sub-group loop (prepare gradient, clip, step, copy back to the partitioned
    parameters, release gradient) step MOGA once: the steps, copy-backs and releases of sub-groups
    0..n-2 wait for sub-group n-1, whose step is one MOGA step over all flats. A refused step
    (NonFiniteGradientError) then leaves every sub-group's fp32 flat and partitioned parameters as
    they were. Idempotent (adopt may run again on the same wrapper)."""
    if getattr(ds_optimizer, "_moga_one_step", False):
        return
    last = len(ds_optimizer.fp16_groups) - 1
    reassign = ds_optimizer._reassign_or_swap_out_partitioned_parameters
    release = ds_optimizer._release_sub_group

    def optimizer_step(sub_group_id: int) -> None:
        if sub_group_id != last:
            return
        flats: dict[int, list] = {}
        for i, flat in enumerate(ds_optimizer.fp32_partitioned_groups_flat):
            flats.setdefault(ds_optimizer.sub_group_to_group_id[i], []).append(flat)
        held = {g: moga.param_groups[g]["params"] for g in flats}
        try:
            for g, tensors in flats.items():
                moga.param_groups[g]["params"] = tensors
            moga.step()
        finally:
            for g, params in held.items():
                moga.param_groups[g]["params"] = params

    def reassign_all(sub_group_id: int) -> None:
        if sub_group_id == last:
            for i in range(last + 1):
                reassign(i)

    def release_all(sub_group_id: int, timer_names) -> None:
        if sub_group_id == last:
            for i in range(last + 1):
                release(i, timer_names)

    ds_optimizer._optimizer_step = optimizer_step
    ds_optimizer._reassign_or_swap_out_partitioned_parameters = reassign_all
    ds_optimizer._release_sub_group = release_all
    ds_optimizer._moga_one_step = True
