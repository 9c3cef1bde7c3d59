"""Turns a ShardLayout into a reduction plan: runs over the local piece, statistic slots, and the
slots each process group must sum.

Pure shape arithmetic over ints and small index tensors; no collectives, no engine imports.
Statistics are laid out identically on every rank of a group (rows: one slot per TP-local row;
columns: one slot per (block, TP-local column)), so a slot index means the same thing everywhere
and packing needs no negotiation.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from .layout import ShardLayout

Interval = tuple[int, int]


@dataclass(frozen=True)
class Run:
    """A contiguous [nrows, ncols] block of the local piece starting at flat `offset`, whose
    statistics land at stats[stat_start : stat_start + (nrows if row axis else ncols)]."""

    offset: int
    nrows: int
    ncols: int
    stat_start: int
    block: int


@dataclass
class Plan:
    """How to reduce and normalize one local piece along `axis` ("row" or "col")."""

    axis: str
    runs: list[Run]
    num_stats: int
    block_rows: list[int]                       # global d_out of each block (for column scales)
    group_slots: dict[str, list[Interval]] = field(default_factory=dict)

    def each_slot_once(self) -> bool:
        """Whether the runs meet every statistic slot exactly once (a row slot per run row, a
        column slot per run column). A kernel that *stores* each run line's sum then leaves no
        slot holding last step's value, so the statistics need no zeroing; a flat-partitioned piece
        that holds some rows only does not qualify (its other slots keep the last all-reduce)."""
        counts = [0] * self.num_stats
        for run in self.runs:
            for i in range(run.stat_start, run.stat_start + (run.nrows if self.axis == "row" else run.ncols)):
                counts[i] += 1
        return all(c == 1 for c in counts)


def _intervals(sorted_indices: list[int]) -> list[Interval]:
    out: list[list[int]] = []
    for i in sorted_indices:
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return [(s, e) for s, e in out]


def _local_row_blocks(layout: ShardLayout, tp_rank: int | None = None) -> torch.Tensor:
    """Block id of every TP-local row (zeros when the weight has no row blocks)."""
    d_out = layout.global_shape[0]
    local_rows = layout.local_shape[0]
    if layout.row_blocks is None:
        return torch.zeros(local_rows, dtype=torch.long, device="cpu")
    rb = layout.row_blocks
    pattern = torch.cat([torch.full((n,), b, dtype=torch.long, device="cpu") for n, b in rb.pattern])
    global_blocks = pattern.repeat(rb.repeats)
    tp = layout.tp
    if tp is not None and tp.dim == 0:
        split = tp if tp_rank is None else dataclasses.replace(tp, rank=tp_rank)
        idx = torch.tensor([split.to_global(i, d_out) for i in range(local_rows)], dtype=torch.long, device="cpu")
    else:
        idx = torch.arange(local_rows, device="cpu")
    return global_blocks[idx]


def _segments(start: int, end: int, ncols: int) -> list[tuple[int, int, int, int]]:
    """Split flat [start, end) of a row-major matrix into (offset, row0, nrows, col0, ncols) rows
    pieces: a partial head row, whole middle rows, a partial tail row."""
    segs = []
    if end <= start:
        return segs
    first_row, first_col = divmod(start, ncols)
    last_row = (end - 1) // ncols
    if first_row == last_row:
        return [(0, first_row, 1, first_col, end - start)]
    offset = 0
    row = first_row
    if first_col:
        segs.append((0, first_row, 1, first_col, ncols - first_col))
        offset = ncols - first_col
        row += 1
    full_rows = (end - (row * ncols)) // ncols
    if full_rows:
        segs.append((offset, row, full_rows, 0, ncols))
        offset += full_rows * ncols
        row += full_rows
    if row * ncols < end:
        segs.append((offset, row, 1, 0, end - row * ncols))
    return segs


def _runs(layout: ShardLayout, axis: str, blocks: torch.Tensor, start: int, end: int) -> list[Run]:
    ncols = layout.local_shape[1] if len(layout.local_shape) == 2 else \
        math.prod(layout.local_shape[1:])
    runs = []
    for offset, row0, nrows, col0, width in _segments(start, end, ncols):
        if axis == "row":
            runs.append(Run(offset, nrows, width, row0, 0))
            continue
        # Column statistics are per block: split the segment where the block id changes.
        seg_blocks = blocks[row0:row0 + nrows]
        cuts = (torch.nonzero(seg_blocks[1:] != seg_blocks[:-1]).flatten() + 1).tolist()
        bounds = [0] + cuts + [nrows]
        for a, b in zip(bounds, bounds[1:]):
            blk = int(seg_blocks[a])
            runs.append(Run(offset + a * width, b - a, width, blk * ncols + col0, blk))
    return runs


def _touched(runs: list[Run], axis: str) -> set[int]:
    out: set[int] = set()
    for r in runs:
        n = r.nrows if axis == "row" else r.ncols
        out.update(range(r.stat_start, r.stat_start + n))
    return out


def build_plan(layout: ShardLayout, axis: str) -> Plan:
    """Plan the `axis` ("row": one statistic per row, over d_in; "col": per block and column, over
    d_out) reduction of this rank's piece of a 2-D weight."""
    if axis not in ("row", "col"):
        raise ValueError(f"axis={axis!r}: allowed 'row' or 'col'")
    if layout.global_matrix_shape is None:
        raise ValueError(f"a {axis} reduction needs a 2-D weight, got global_shape={layout.global_shape}")
    local_rows = layout.local_shape[0]
    ncols = math.prod(layout.local_shape[1:])
    local_numel = local_rows * ncols
    blocks = _local_row_blocks(layout)
    num_blocks = 1 if layout.row_blocks is None else layout.row_blocks.num_blocks
    block_rows = [layout.global_shape[0]] if layout.row_blocks is None else layout.row_blocks.block_rows()
    start, end = (0, local_numel) if layout.flat is None else layout.flat.local_range
    runs = _runs(layout, axis, blocks, start, end)
    num_stats = local_rows if axis == "row" else num_blocks * ncols
    plan = Plan(axis, runs, num_stats, block_rows)

    if layout.flat is not None:
        spans = sorted((s, e) for s, e in layout.flat.ranges if e > s)
        covered = 0
        for s, e in spans:
            if s != covered:
                raise ValueError(f"flat ranges {layout.flat.ranges} leave elements [{covered}, {s}) unowned")
            covered = e
        if covered != local_numel:
            raise ValueError(f"flat ranges {layout.flat.ranges} cover {covered} of {local_numel} elements")
        # A statistic needs the group iff two or more ranks touch it.
        counts: dict[int, int] = {}
        for s, e in spans:
            for i in _touched(_runs(layout, axis, blocks, s, e), axis):
                counts[i] = counts.get(i, 0) + 1
        shared = sorted(i for i, c in counts.items() if c > 1)
        if shared:
            plan.group_slots[layout.flat.group] = _intervals(shared)

    tp = layout.tp
    if tp is not None and tp.world_size > 1 and ((axis == "row") == (tp.dim == 1)):
        mine = _touched(runs, axis)
        # Every TP rank must reduce the same slots; Megatron layouts are symmetric, check it.
        for other in range(tp.world_size):
            if other == tp.rank or axis == "row":
                continue
            theirs = _touched(_runs(layout, axis, _local_row_blocks(layout, other), start, end), axis)
            if theirs != mine:
                raise ValueError(f"tensor-parallel ranks {tp.rank} and {other} hold different row blocks "
                                 f"for {layout}; per-block column norms need a symmetric layout")
        if mine:
            plan.group_slots[tp.group] = _intervals(sorted(mine))
    return plan
