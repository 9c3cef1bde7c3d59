"""Flat buffers made of parameter segments: how an engine's 1-D partition maps back to parameters.

Pure data. An engine adapter (DeepSpeed ZeRO, Megatron's distributed optimizer) builds one
FlatSegment per parameter of the buffer, on every rank and in the same order, including
parameters whose piece on this rank is empty: their statistics may still be shared.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .layout import FlatPartition, ShardLayout, clip_ranges


@dataclass(frozen=True)
class FlatSegment:
    """Parameter `name`'s local piece: buffer[start : start + layout.local_numel].

    options: the parameter's MOGA settings (role and any per-group hyper-parameters); its "lr",
    if given, is relative to `base_lr` of the buffer, so LR schedules on the buffer's group apply.
    """

    start: int
    layout: ShardLayout
    name: str
    options: Mapping = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return self.layout.local_numel


def partition_ranges(offset: int, numel: int, partition_size: int, world_size: int,
                     base: int = 0) -> tuple[tuple[int, int], ...]:
    """Each rank's [start, end) of the flattened parameter that sits at buffer[offset : offset + numel]
    of a flat buffer whose ranks own equal parts: rank k owns [base + k * partition_size, +partition_size)
    (ZeRO and FSDP1: base 0; Megatron's distributed optimizer: each bucket at its offset). Ranges are
    clipped to the parameter, empty where a rank owns none of it; `world_size` ranges."""
    return clip_ranges([base + k * partition_size for k in range(world_size + 1)], offset, numel)


def partition_segments(shapes: list[tuple[int, ...]], offsets: list[int], partition_size: int, rank: int,
                       world_size: int, names: list[str], options: list[Mapping],
                       layouts: list[ShardLayout | None] | None = None, group: str = "dp") -> list[FlatSegment]:
    """Segments of rank `rank`'s partition of a flat buffer cut into equal `partition_size` parts.

    shapes/offsets: each parameter's global shape and its start in the flat buffer (padding may
    sit between parameters). layouts: optional per-parameter layout carrying row_blocks.
    """
    out = []
    for i, (shape, offset) in enumerate(zip(shapes, offsets)):
        numel = 1
        for s in shape:
            numel *= s
        ranges = partition_ranges(offset, numel, partition_size, world_size)
        blocks = layouts[i].row_blocks if layouts and layouts[i] is not None else None
        layout = ShardLayout(tuple(shape), flat=FlatPartition(ranges, rank, group) if world_size > 1 else None,
                             row_blocks=blocks)
        start = offset + ranges[rank][0] - rank * partition_size
        if ranges[rank][0] == ranges[rank][1]:
            start = max(0, min(start, partition_size))
        out.append(FlatSegment(start, layout, names[i], options[i]))
    return out
