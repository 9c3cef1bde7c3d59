"""The core's collectives: summing partial statistics (and the non-finite verdict) across ranks.

All slots of one step that need the same process group are packed into one buffer and summed
with one all_reduce; flat-partition (data-parallel) groups go first, tensor-parallel groups
second (`StatReducer.reduce_order`), so a statistic split both ways is complete after both. Groups are always
explicit handles looked up by the layout's group key; WORLD is never used implicitly. Buffers
live on the statistics' device (NCCL for CUDA tensors, gloo for CPU ones).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from .plan import Plan


@dataclass
class CommCounter:
    """What this rank handed to collectives: calls and payload bytes per group key."""

    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    payload_bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))   # statistics
    flag_bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))      # non-finite verdicts

    def reset(self) -> None:
        self.calls.clear()
        self.payload_bytes.clear()
        self.flag_bytes.clear()

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())


def group_size(group) -> int:
    """World size of a process group handle (1 when torch.distributed is not initialized)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


class StatReducer:
    """Sums the shared slots of many plans' statistics, one all_reduce per group key per call."""

    def __init__(self, process_groups: dict | None = None):
        self.process_groups = dict(process_groups or {})
        self.counter = CommCounter()
        # The groups every step reduces over, and when: group key -> 0 (flat/DP, first) or 1 (TP, second).
        self.reduce_order: dict[str, int] = {}

    @property
    def groups_in_order(self) -> list[str]:
        """The keys of the groups every step reduces over, in the order it reduces them."""
        return sorted(self.reduce_order, key=lambda k: (self.reduce_order[k], k))

    def check_group(self, key: str, expected_size: int, order: int) -> None:
        """Raise unless `key` names a group of `expected_size` ranks; from now on every step
        reduces over it (`order` 0: with the flat/DP groups, first; 1: with the TP groups, second),
        so its ranks agree on every verdict."""
        if key not in self.process_groups:
            raise ValueError(f"layout needs process group {key!r} (size {expected_size}); pass "
                             f"process_groups={{{key!r}: <group>}} (known: {sorted(self.process_groups)})")
        size = group_size(self.process_groups[key])
        if size != expected_size:
            raise ValueError(f"process group {key!r} has {size} ranks but the layout says {expected_size}")
        self.reduce_order[key] = order

    def reduce(self, items: list[tuple[Plan, torch.Tensor]], flag: torch.Tensor) -> None:
        """Sum, in place, each stats tensor's slots listed in its plan, and the verdict `flag`
        [1] (> 0: non-finite), across every declared group: one all_reduce per group per step,
        DP groups then TP groups, so across both every rank of a TP x DP grid hears every verdict.

        `items` must come in the same order on every rank of a group (MOGA sorts them by a global
        key); a rank that holds nothing of a parameter passes zeros for it (a "ghost"). A group
        with no shared slot this step still carries the flag (4 bytes): no rank is left waiting."""
        for key in self.groups_in_order:
            if key not in self.process_groups:
                raise ValueError(f"process group {key!r} is not set: a copied or unpickled MOGA keeps its layouts "
                                 f"but not process-group handles; call set_process_group({key!r}, group)")
            views = [stats[s:e] for plan, stats in items for s, e in plan.group_slots.get(key, ())]
            if group_size(self.process_groups[key]) > 1:
                self._all_reduce(key, views, flag)

    def _all_reduce(self, key: str, views: list[torch.Tensor], flag: torch.Tensor) -> None:
        import torch.distributed as dist

        # float64 statistics (float64 pieces) make the whole buffer float64: one all-reduce still,
        # and every rank packs the same dtype since a parameter has one dtype on every rank.
        dtype = torch.float64 if any(v.dtype == torch.float64 for v in views) else torch.float32
        buf = torch.cat([*(v.to(dtype) for v in views), flag.to(dtype)])
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.process_groups[key])
        self.counter.calls[key] += 1
        self.counter.payload_bytes[key] += (buf.numel() - 1) * buf.element_size()
        self.counter.flag_bytes[key] += buf.element_size()
        offset = 0
        for v in views:
            v.copy_(buf[offset:offset + v.numel()])
            offset += v.numel()
        flag.copy_(buf[offset:])


def sum_across(buf: torch.Tensor, group) -> None:
    """buf <- sum of buf over the ranks of `group`, in place (one all-reduce). The Megatron adapter
    assembles distributed-optimizer checkpoints with it: each rank fills its own disjoint ranges."""
    import torch.distributed as dist

    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
