"""Shard layouts as data: where a rank's local tensor sits inside a parameter's global matrix.

Owns the description only (frozen dataclasses of ints and group *keys*); it must not import
torch.distributed, deepspeed or megatron. Process groups are named by a key ("tp", "dp", ...)
that the optimizer resolves, so layouts stay hashable, comparable and checkpointable.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class TensorParallelSplit:
    """A tensor-parallel split of the global matrix along `dim`.

    Megatron semantics: the global extent N along `dim` is cut into `stride` equal parts (e.g.
    SwiGLU gate|up, stride 2); each part is cut into `world_size` chunks and rank r holds chunk r
    of every part, concatenated. stride=1 is a plain contiguous split.
    """

    dim: int
    rank: int
    world_size: int
    stride: int = 1
    group: str = "tp"

    def __post_init__(self):
        if self.dim not in (0, 1):
            raise ValueError(f"TensorParallelSplit.dim={self.dim!r}: allowed 0 (rows) or 1 (columns)")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"TensorParallelSplit.rank={self.rank} outside [0, world_size={self.world_size})")
        if self.stride < 1:
            raise ValueError(f"TensorParallelSplit.stride={self.stride}: must be >= 1")

    def local_extent(self, global_extent: int) -> int:
        """Size along `dim` of the rank-local tensor."""
        if global_extent % (self.world_size * self.stride):
            raise ValueError(
                f"global extent {global_extent} along dim {self.dim} is not divisible by "
                f"world_size*stride = {self.world_size}*{self.stride}")
        return global_extent // self.world_size

    def to_global(self, local_index: int, global_extent: int) -> int:
        """Global index along `dim` of local index `local_index` (scalar)."""
        part_len = global_extent // self.stride          # one of the `stride` parts
        chunk = part_len // self.world_size              # this rank's share of one part
        part, offset = divmod(local_index, chunk)
        return part * part_len + self.rank * chunk + offset


@dataclass(frozen=True)
class RowBlocks:
    """Row blocks of a fused weight (Q/K/V, gate/up), as a pattern repeated down the global rows.

    `pattern` is a tuple of (rows, block_id) segments; it repeats `repeats` times and must cover
    the global d_out exactly. The column variant normalizes each block with its own d_out.
    """

    pattern: tuple[tuple[int, int], ...]
    repeats: int = 1

    def __post_init__(self):
        if not self.pattern or any(n <= 0 or b < 0 for n, b in self.pattern):
            raise ValueError(f"RowBlocks.pattern={self.pattern!r}: need (rows>0, block_id>=0) segments")

    @staticmethod
    def fused(*sizes: int) -> "RowBlocks":
        """Blocks stacked once, e.g. `fused(ffn, ffn)` for SwiGLU [gate; up]."""
        return RowBlocks(tuple((n, b) for b, n in enumerate(sizes)), 1)

    @staticmethod
    def qkv(num_query_groups: int, heads_per_group: int, head_dim: int) -> "RowBlocks":
        """Megatron's fused linear_qkv: rows interleaved per query group as [q_g, k_g, v_g]."""
        return RowBlocks(((heads_per_group * head_dim, 0), (head_dim, 1), (head_dim, 2)), num_query_groups)

    @property
    def num_blocks(self) -> int:
        return 1 + max(b for _, b in self.pattern)

    @property
    def period(self) -> int:
        return sum(n for n, _ in self.pattern)

    def block_rows(self) -> list[int]:
        """Global number of rows in each block (that block's d_out)."""
        rows = [0] * self.num_blocks
        for n, b in self.pattern:
            rows[b] += n * self.repeats
        return rows

    def block_of_global_row(self, row: int) -> int:
        offset = row % self.period
        for n, b in self.pattern:
            if offset < n:
                return b
            offset -= n
        raise AssertionError("unreachable")


@dataclass(frozen=True)
class FlatPartition:
    """Contiguous ranges of the flattened (TP-local, row-major) tensor owned by each rank of a group.

    `ranges[k]` is the [start, end) owned by group rank k, clipped to this tensor (empty when
    start == end); every rank carries all ranges, so all ranks agree on which statistics cross a
    boundary. Ranges must not overlap; padding outside the tensor is simply not listed.
    """

    ranges: tuple[tuple[int, int], ...]
    rank: int
    group: str = "dp"

    def __post_init__(self):
        if not 0 <= self.rank < len(self.ranges):
            raise ValueError(f"FlatPartition.rank={self.rank} outside [0, {len(self.ranges)})")
        spans = sorted((s, e) for s, e in self.ranges if e > s)
        for (s0, e0), (s1, _) in zip(spans, spans[1:]):
            if s1 < e0:
                raise ValueError(f"FlatPartition ranges overlap: {self.ranges}")
        if any(s < 0 or e < s for s, e in self.ranges):
            raise ValueError(f"FlatPartition ranges must satisfy 0 <= start <= end: {self.ranges}")

    @property
    def local_range(self) -> tuple[int, int]:
        return self.ranges[self.rank]

    @staticmethod
    def from_bounds(bounds: list[int], offset: int, numel: int, rank: int, group: str = "dp") -> "FlatPartition":
        """The partition of a tensor of `numel` elements at `offset` in a flat buffer of which
        group rank k owns [bounds[k], bounds[k+1]) (len(bounds) = world size + 1)."""
        return FlatPartition(clip_ranges(bounds, offset, numel), rank, group)


def clip_ranges(bounds: list[int], offset: int, numel: int) -> tuple[tuple[int, int], ...]:
    """Each rank's [start, end) of a tensor of `numel` elements at `offset` in a flat buffer that
    rank k owns [bounds[k], bounds[k+1]) of; empty ranges where a rank owns none of the tensor."""
    def clip(x: int) -> int:
        return min(max(x - offset, 0), numel)
    return tuple((clip(bounds[k]), clip(bounds[k + 1])) for k in range(len(bounds) - 1))


@dataclass(frozen=True)
class ShardLayout:
    """Where this rank's local tensor sits in a parameter.

    global_shape: the full logical shape (a >2-D weight is treated as [shape[0], prod(rest)]).
    tp: tensor-parallel split of the global matrix, or None.
    flat: ownership of the flattened TP-local tensor across a data-parallel group, or None (the
          rank holds the whole TP-local tensor, shaped `local_shape`).
    row_blocks: fused-weight blocks for the column variant, or None.
    """

    global_shape: tuple[int, ...]
    tp: TensorParallelSplit | None = None
    flat: FlatPartition | None = None
    row_blocks: RowBlocks | None = None

    def __post_init__(self):
        object.__setattr__(self, "global_shape", tuple(int(s) for s in self.global_shape))
        # A 1-D split is a TP-sharded bias (Megatron's column-parallel layers): rows only.
        ndim = len(self.global_shape)
        if self.tp is not None and not (ndim == 2 or (ndim == 1 and self.tp.dim == 0)):
            raise ValueError(f"tensor-parallel split needs a 2-D global_shape (or a 1-D one split along dim 0), "
                             f"got global_shape={self.global_shape} split along dim {self.tp.dim}")
        if self.tp is not None:
            self.tp.local_extent(self.global_shape[self.tp.dim])
        if self.row_blocks is not None and len(self.global_shape) >= 2 \
                and self.row_blocks.period * self.row_blocks.repeats != self.global_shape[0]:
            raise ValueError(f"row_blocks cover {self.row_blocks.period * self.row_blocks.repeats} rows, "
                             f"global d_out is {self.global_shape[0]}")
        if self.flat is not None:
            numel = math.prod(self.local_shape)
            if any(e > numel for _, e in self.flat.ranges):
                raise ValueError(f"flat ranges {self.flat.ranges} exceed the local numel {numel}")

    @property
    def global_matrix_shape(self) -> tuple[int, int] | None:
        """(d_out, d_in) of the global matrix, or None for vectors/scalars."""
        if len(self.global_shape) < 2:
            return None
        return self.global_shape[0], math.prod(self.global_shape[1:])

    @property
    def local_shape(self) -> tuple[int, ...]:
        """Shape of the TP-local tensor (before any flat partition)."""
        if self.tp is None:
            return self.global_shape
        local = list(self.global_shape)
        local[self.tp.dim] = self.tp.local_extent(self.global_shape[self.tp.dim])
        return tuple(local)

    @property
    def local_numel(self) -> int:
        """Number of elements this rank holds."""
        if self.flat is None:
            return math.prod(self.local_shape)
        s, e = self.flat.local_range
        return e - s

    def to_dict(self) -> dict:
        """Plain-data form (for checkpoints loadable with weights_only=True)."""
        return asdict(self)
