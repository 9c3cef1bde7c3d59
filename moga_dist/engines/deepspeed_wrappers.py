"""How MOGA is put inside each optimizer wrapper DeepSpeed builds around it (ZeRO stages 0-2).

DeepSpeed hands the client optimizer other tensors than the model's parameters:

| wrapper (config)                                   | MOGA's param groups then hold                     |
|----------------------------------------------------|---------------------------------------------------|
| none (ZeRO-0, fp32)                                | the model's parameters                            |
| FP16_UnfusedOptimizer (ZeRO-0, bf16)               | one fp32 copy per parameter                       |
| DeepSpeedZeroOptimizer (ZeRO-1/2)                  | one fp32 partition of a flat buffer per group     |
| BF16_Optimizer (ZeRO-1, bf16, grad_accum_dtype fp32)| one fp32 partition of a flat buffer per group     |

Each parameter's role, settings and layout are captured (`describe`) before DeepSpeed regroups
them and declared again on whatever tensor holds the parameter afterwards (`adopt`), so the
update is the one single-process MOGA computes. Only MOGA's public engine interface is used.
"""
from __future__ import annotations

import dataclasses
import itertools
import weakref
from dataclasses import dataclass

import torch

from ..core.flat import FlatSegment, partition_segments
from ..core.optimizer import MOGA
from ..core.param_groups import assign_roles
from ..core.param_spec import ParamSpec
from ..core.tensors import FlatBuffer

_NOT_OPTIONS = ("params", "param_names", "initial_lr", "role")


@dataclass(frozen=True)
class HeldTensor:
    """A tensor MOGA updates for DeepSpeed and the parameter pieces it holds: segment k is
    tensor[start : start + numel] = the flattened parameter's [flat range) (all of it when the
    segment's layout has no FlatPartition). params[k]: the model's tensor segment k belongs to
    (what the forward pass reads). What checkpoints read and write in model space."""

    tensor: torch.Tensor
    segments: list[FlatSegment]
    params: list[torch.Tensor]


_HELD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def held_tensors(moga: MOGA) -> list[HeldTensor]:
    """Every tensor `adopt` (or ZeRO-3's adopt_stage3) declared on `moga`, in declaration order."""
    held = _HELD.get(moga)
    if not held:
        raise ValueError("this MOGA was not put inside a DeepSpeed engine by moga_dist (import moga_dist before "
                         "deepspeed.initialize)")
    return held


def forget(moga: MOGA) -> None:
    """Drop what an earlier adoption of `moga` recorded."""
    _HELD.pop(moga, None)


def remember(moga: MOGA, held: HeldTensor) -> None:
    """Record a declared tensor for held_tensors (a fresh adoption starts a fresh list)."""
    _HELD.setdefault(moga, []).append(held)


def describe(moga: MOGA, model: torch.nn.Module) -> dict[int, ParamSpec]:
    """{id(parameter): ParamSpec} for every parameter of MOGA's groups; a spec's options are its
    group's settings with "lr" the group's unscheduled lr (so a merged group's schedule keeps every
    parameter's lr ratio), the role in ParamSpec.role.

    A group without a role (e.g. the Hugging Face Trainer's weight-decay / no-decay split) gets
    each parameter's role from the model's structure, as `param_groups(model)` would assign it."""
    names = {}
    for name, param in model.named_parameters():
        names.setdefault(id(param), name)
    roles = None     # from the model's structure only where a group has none (zero.Init's placeholders have no shape)
    specs = {}
    for group in moga.param_groups:
        options = {k: v for k, v in group.items() if k not in _NOT_OPTIONS}
        options["lr"] = group.get("initial_lr", group["lr"])
        given = group.get("param_names") or [None] * len(group["params"])
        for param, given_name in zip(group["params"], given):
            name = given_name or names.get(id(param)) or f"param{len(specs)}"
            # settings declared for this tensor (moga_dist.take_roles declares roles) win over its group's
            mine = {**options, **moga.options_of(param)}
            role = mine.pop("role", None) or group.get("role")
            if role is None:
                roles = assign_roles(model) if roles is None else roles
                role = roles.get(names.get(id(param)))
            specs[id(param)] = ParamSpec(name, role, moga.layout_of(param), options=mine)
    return specs


def merge_groups(moga: MOGA, specs: dict[int, ParamSpec]) -> None:
    """Fold MOGA's groups into one, so ZeRO keeps one flat buffer and calls step() once per
    step (one all-reduce of all shared statistics). Each parameter keeps its settings through
    its ParamSpec; a schedule on the merged group scales every parameter's lr alike."""
    groups = moga.param_groups
    ratios = {g["lr"] / g.get("initial_lr", g["lr"]) for g in groups if g.get("initial_lr", g["lr"])}
    if len(ratios) > 1:
        raise ValueError("MOGA's param groups are at different points of their lr schedules "
                         f"(lr/initial_lr = {sorted(ratios)}); build the lr scheduler after deepspeed.initialize")
    params = [p for g in groups for p in g["params"]]
    merged = {"params": params, "param_names": [specs[id(p)].name for p in params], "lr": groups[0]["lr"]}
    if "initial_lr" in groups[0]:
        merged["initial_lr"] = groups[0]["initial_lr"]
    moga.replace_param_groups([merged])


def adopt(ds_optimizer, moga: MOGA, specs: dict[int, ParamSpec]) -> None:
    """Describe to MOGA, slot by slot (`MOGA.declare_engine`), the tensors `ds_optimizer`
    (DeepSpeed's wrapper, or MOGA itself) put into its param groups."""
    kind = type(ds_optimizer).__name__
    forget(moga)
    held: dict[int, object] = {}            # id(tensor in MOGA's groups) -> its ParamSpec or FlatBuffer
    process_groups = {}
    if ds_optimizer is moga:
        _copies(moga, [(p, p) for g in moga.param_groups for p in g["params"]], specs, held)
    elif kind == "FP16_UnfusedOptimizer":
        pairs = [pair for lows, highs in zip(ds_optimizer.fp16_groups, ds_optimizer.fp32_groups)
                 for pair in zip(lows, highs)]
        _copies(moga, pairs, specs, held)
    elif kind == "DeepSpeedZeroOptimizer":
        for i, buffer in enumerate(ds_optimizer.single_partition_of_fp32_groups):
            # Shapes from ZeRO's meta copies: the bit16 parameters' own data may be released.
            shapes = [tuple(m.shape) for m in ds_optimizer.round_robin_bit16_meta[i]]
            process_groups["dp"] = ds_optimizer.real_dp_process_group[i]
            held[id(buffer)] = _partition(moga, buffer, ds_optimizer.round_robin_bit16_groups[i], shapes,
                                          list(ds_optimizer.round_robin_bit16_offsets[i]),
                                          int(ds_optimizer.partition_size[i]), process_groups["dp"], specs)
    elif kind == "BF16_Optimizer":
        for i, buffer in enumerate(ds_optimizer.fp32_groups_flat_partition):
            params = ds_optimizer.bf16_groups[i]
            # The bf16 flat buffer holds the group's parameters back to back, padding at the end.
            offsets = list(itertools.accumulate([p.numel() for p in params], initial=0))[:-1]
            group = process_groups["dp"] = ds_optimizer.real_dp_process_group[i]
            size = ds_optimizer.bf16_groups_flat[i].numel() // torch.distributed.get_world_size(group)
            held[id(buffer)] = _partition(moga, buffer, params, [tuple(p.shape) for p in params], offsets, size,
                                          group, specs)
    else:
        raise ValueError(f"DeepSpeed wrapped MOGA in {kind}, which moga_dist does not know how to map back to "
                         "parameters; supported: ZeRO stages 0-2 in fp32 or bf16")
    slots = []
    for group in moga.param_groups:
        unknown = [tuple(p.shape) for p in group["params"] if id(p) not in held]
        if unknown:
            raise ValueError(f"DeepSpeed's {kind} put tensors of shapes {unknown[:3]} into MOGA's groups that "
                             "moga_dist cannot map back to parameters")
        slots.append([held[id(p)] for p in group["params"]])
    moga.declare_engine(slots, process_groups=process_groups)


def _copies(moga: MOGA, pairs: list[tuple[torch.Tensor, torch.Tensor]], specs, held: dict) -> None:
    """(model parameter, tensor MOGA updates for it): the latter is the parameter, with its layout
    and role (its group's other settings stay the group's)."""
    for original, copy in pairs:
        spec = dataclasses.replace(spec_of(specs, original), options={})
        held[id(copy)] = spec
        remember(moga, HeldTensor(copy, [FlatSegment(0, spec.layout, spec.name)], [original]))


def _partition(moga: MOGA, buffer, params, shapes, offsets, partition_size, group, specs) -> FlatBuffer:
    """This rank's `buffer` = [rank * partition_size, +partition_size) of the flat concatenation
    of `params` (of `shapes`, at `offsets`): one segment per parameter, on every rank in the same order."""
    import torch.distributed as dist

    chosen = [spec_of(specs, p) for p in params]
    segments = partition_segments(shapes, offsets, partition_size,
                                  dist.get_rank(group), dist.get_world_size(group), [s.name for s in chosen],
                                  [{**s.options, "role": s.role} for s in chosen], [s.layout for s in chosen])
    remember(moga, HeldTensor(buffer, segments, list(params)))
    return FlatBuffer(segments, _base_lr(moga, buffer))


def _base_lr(moga: MOGA, buffer) -> float:
    """The unscheduled lr of the group holding `buffer` (segment lrs are relative to it)."""
    group = next(g for g in moga.param_groups if any(p is buffer for p in g["params"]))
    return float(group.get("initial_lr", group["lr"]))


def spec_of(specs: dict[int, ParamSpec], param: torch.Tensor) -> ParamSpec:
    """The ParamSpec `describe` captured for `param`; raises naming its shape if MOGA was not given it."""
    spec = specs.get(id(param))
    if spec is None:
        raise ValueError(f"DeepSpeed optimizes a parameter of shape {tuple(param.shape)} that MOGA was not given; "
                         "build MOGA over all trainable parameters, e.g. MOGA(moga_dist.param_groups(model))")
    return spec
