"""What an all-gather-based optimizer would move, the yardstick both comm benchmarks print beside
MOGA's measured bytes (one module, so comm.py and comm_dtensor.py import it without a cycle)."""
from __future__ import annotations

import math


def allgather_equivalent(specs, tp: int, dp: int) -> int:
    """Bytes a rank receives when every sharded matrix is all-gathered in bf16."""
    world = tp * dp
    total = 0
    for _, shape, tp_dim, _, _ in specs:
        if len(shape) == 2:
            total += int(math.prod(shape) * 2 * (world - 1) / world)
    return total
