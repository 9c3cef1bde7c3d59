"""The only module that talks to torch.distributed: summing partial statistics across ranks.

All slots of one step that need the same process group are packed into one buffer and summed
with one all_reduce; flat-partition (data-parallel) groups go first, tensor-parallel groups
second, so a statistic split both ways is complete after the two stages. Groups are always
explicit handles looked up by the layout's group key; WORLD is never used implicitly.
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
    def total_bytes(self) -> int:
        return sum(self.payload_bytes.values()) + sum(self.flag_bytes.values())

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

    def check_group(self, key: str, expected_size: int) -> None:
        """Raise unless `key` names a group of `expected_size` ranks."""
        if key not in self.process_groups:
            raise ValueError(f"layout needs process group {key!r} (size {expected_size}); pass "
                             f"process_groups={{{key!r}: <group>}} (known: {sorted(self.process_groups)})")
        size = group_size(self.process_groups[key])
        if size != expected_size:
            raise ValueError(f"process group {key!r} has {size} ranks but the layout says {expected_size}")

    def reduce(self, items: list[tuple[Plan, torch.Tensor]], nonfinite: float = 0.0) -> float:
        """Sum, in place, each stats tensor's slots listed in its plan, across the plan's groups.

        `items` must come in the same order on every rank of a group (MOGA sorts them by a global
        key); a rank that holds nothing of a parameter passes zeros for it (a "ghost").
        `nonfinite` (> 0: this rank saw a non-finite gradient) rides in one extra slot of every
        collective; the return value is its sum over every rank this rank heard from (DP stage,
        then TP stage: across both, every rank of a TP x DP grid), so ranks refuse a step together."""
        stage_of: dict[str, int] = {}
        for plan, _ in items:
            stage_of.update(plan.group_stage)
        flag = torch.tensor([float(nonfinite)])
        for key in sorted(stage_of, key=lambda k: (stage_of[k], k)):
            views = [stats[s:e] for plan, stats in items for s, e in plan.group_slots.get(key, ())]
            if not views:
                continue
            self._all_reduce(key, views, flag)
        return float(flag)

    def _all_reduce(self, key: str, views: list[torch.Tensor], flag: torch.Tensor) -> None:
        import torch.distributed as dist

        buf = torch.cat([*views, flag])
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
