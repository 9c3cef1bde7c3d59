"""MOGA's model-space checkpoint format: one name and one set of rules for every engine.

A model-space checkpoint holds MOGA's state per *model parameter*, not per rank's buffer: for
each parameter (the model's name or ShardedTensor key, its global shape), pieces [start, end) of
the flattened parameter, each with the fp32 master weight and the fp32 momentum (`momentum_buffer`),
plus the step count and MOGA's param-group settings. A reader copies, on every rank, the overlap
of each saved piece with each piece it holds now, so a checkpoint resumes at another data-parallel
world size (and, through megatron-core's dist_checkpointing, another TP/PP layout). No rank
assembles a full parameter unless asked to (`deepspeed_checkpoint.model_space_weights`).

Two containers carry the format, each engine's own:
  - DeepSpeed (deepspeed_checkpoint.py): a directory, conventionally `DIRECTORY`, of `common.pt`
    (rank 0) and `rank<k>.pt` files with {"format": FORMAT, ...}; piece fields "weight" and
    "momentum_buffer", read with torch.load(weights_only=True).
  - Megatron's distributed optimizer (megatron_distopt.py): megatron-core dist_checkpointing,
    `param_state_sharding_type` = FORMAT; per parameter ShardedTensors
    "optimizer.state.fp32_param.<key>" and "optimizer.state.momentum_buffer.<key>", one per
    row-major block of a DP rank's flat range (`flat_blocks`), so each rank writes only its own.

FORMAT is written by both. Checkpoints written before the format was shared carry the container's
old name (LEGACY): each container reads its own old name as is (the layout did not change) and
refuses the other's, and any other name, by name (`check_format`).
"""
from __future__ import annotations

import math

FORMAT = "moga-model-space-2"
DEEPSPEED, MEGATRON = "deepspeed", "megatron"
# Old format names -> the container that wrote them (same layout as FORMAT in that container).
LEGACY = {"moga-model-space-1": DEEPSPEED, "moga_model_space": MEGATRON}
DIRECTORY = "moga_model_space"        # the training job's subdirectory of a checkpoint (DeepSpeed)


def check_format(found, container: str, where: str, hint: str = "") -> None:
    """Raise ValueError unless `found` (a checkpoint's format name) is FORMAT or `container`'s own
    old name. container: DEEPSPEED or MEGATRON; where: what the error names (a path, a key);
    hint: appended to the error."""
    if found == FORMAT or LEGACY.get(found) == container:
        return
    mine = [FORMAT] + [name for name, c in LEGACY.items() if c == container]
    other = f" (written by moga_dist's {LEGACY[found]} path)" if found in LEGACY else ""
    raise ValueError(f"{where}: checkpoint format {found!r}{other}; the {container} reader of this moga_dist "
                     f"reads {', '.join(map(repr, mine))}{hint}")


def readable(container: str) -> tuple[str, ...]:
    """Every format name `container`'s reader accepts (FORMAT first)."""
    return (FORMAT, *(name for name, c in LEGACY.items() if c == container))


def flat_blocks(shape, lo: int, hi: int) -> list[tuple[tuple, tuple, int]]:
    """The row-major flat range [lo, hi) of a tensor of `shape`, as the fewest blocks that tile it:
    [(offset, block shape, flat start)], each block a contiguous run (so a `.view` of the flat range),
    at most 2·len(shape) - 1 of them (a partial row, whole rows, a partial row, recursively)."""
    shape = tuple(shape)
    if hi <= lo:
        return []
    if len(shape) <= 1:
        return [((lo,) * len(shape), (hi - lo,) * len(shape), lo)]
    inner = math.prod(shape[1:])
    first, last = -(-lo // inner), hi // inner              # whole rows [first, last)
    out = []
    if first > last:                                           # inside one row
        r = lo // inner
        return [((r, *o), (1, *s), r * inner + st) for o, s, st in flat_blocks(shape[1:], lo - r * inner, hi - r * inner)]
    if lo < first * inner:
        r = first - 1
        out += [((r, *o), (1, *s), r * inner + st) for o, s, st in flat_blocks(shape[1:], lo - r * inner, inner)]
    if last > first:
        out.append(((first,) + (0,) * (len(shape) - 1), (last - first, *shape[1:]), first * inner))
    if hi > last * inner:
        out += [((last, *o), (1, *s), last * inner + st) for o, s, st in flat_blocks(shape[1:], 0, hi - last * inner)]
    return out
