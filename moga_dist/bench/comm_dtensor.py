"""The FSDP2 and FSDP2 x TP rows of `python -m moga_dist.bench comm`: one torchtitan LLaMA-7B layer
(wq, wk, wv, w1, w3 column-parallel; wo, w2 row-parallel; RMSNorm gains sequence-parallel) sharded
with fully_shard (and parallelize_module), stepped by MOGA(param_groups(layer)) on real gloo ranks.

Built on the meta device and materialized after sharding, so each rank allocates only its shards.
The analytic minimum is arithmetic on the placements, not the planner: FSDP2 cuts whole rows, so
row statistics cross only a TP split of d_in (for the rows a rank holds), and column statistics
cross every group that splits the rows (the FSDP2 group, and TP for column-parallel weights).
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from moga_dist import MOGA, param_groups
from moga_dist.core.dtensor import chunk_ranges
from moga_dist.testing import spawn

from .comm_bytes import allgather_equivalent

HIDDEN, FFN = 4096, 11008


def titan_layer_specs(hidden=HIDDEN, ffn=FFN):
    """(name, global_shape, tp_dim, stride, row_blocks) of one torchtitan LLaMA layer, in the form
    comm.py's allgather_equivalent takes (tp_dim 0: column-parallel, 1: row-parallel)."""
    square = [(name, (hidden, hidden), 0, 1, None) for name in ("wq", "wk", "wv")]
    return square + [("wo", (hidden, hidden), 1, 1, None), ("w1", (ffn, hidden), 0, 1, None),
                     ("w3", (ffn, hidden), 0, 1, None), ("w2", (hidden, ffn), 1, 1, None),
                     ("attention_norm", (hidden,), None, 1, None), ("ffn_norm", (hidden,), None, 1, None)]


def analytic_minimum_fsdp(specs, norm: str, dp: int, tp: int) -> int:
    """Floats a rank must all-reduce per step under FSDP2 (dp) x TP (tp), counted per group."""
    total = 0
    for _, shape, tp_dim, _, _ in specs:
        if len(shape) != 2:
            continue
        d_out, d_in = shape
        col_parallel, row_parallel = tp > 1 and tp_dim == 0, tp > 1 and tp_dim == 1
        if norm == "row":
            # FSDP2 keeps rows whole; a TP split of d_in shares the rows this rank holds (the
            # largest FSDP2 chunk: the bench reports the busiest rank).
            total += max(b - a for a, b in chunk_ranges(d_out, dp)) if row_parallel else 0
            continue
        local_rows = d_out // tp if col_parallel else d_out
        if dp > 1 and sum(1 for a, b in chunk_ranges(local_rows, dp) if b > a) > 1:
            total += d_in // tp if row_parallel else d_in
        total += d_in if col_parallel else 0
    return total


class _Layer(nn.Module):
    def __init__(self, specs):
        super().__init__()
        for name, shape, _, _, _ in specs:
            module = nn.Linear(shape[1], shape[0], bias=False) if len(shape) == 2 else nn.RMSNorm(shape[0])
            self.add_module(name, module)


def _worker(rank, world, dp, tp, norm, steps, sizes, queue):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    specs = titan_layer_specs(*sizes)
    mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp")) if tp > 1 else \
        init_device_mesh("cpu", (dp,), mesh_dim_names=("dp",))
    with torch.device("meta"):
        layer = _Layer(specs)
    if tp > 1:
        plan = {name: ColwiseParallel() if tp_dim == 0 else RowwiseParallel() if tp_dim == 1 else SequenceParallel()
                for name, _, tp_dim, _, _ in specs}
        parallelize_module(layer, mesh["tp"], plan)
    fully_shard(layer, mesh=mesh["dp"] if tp > 1 else mesh)
    layer.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(rank)
    with torch.no_grad():
        for p in layer.parameters():
            p.to_local().copy_(torch.randn(p.to_local().shape, generator=gen) * 0.02)
            p.grad = torch.zeros_like(p)
            p.grad.to_local().copy_(torch.randn(p.to_local().shape, generator=gen) * 1e-3)
    opt = MOGA(param_groups(layer), lr=1e-3, norm=norm)
    opt.step()                       # warm-up (kernel load, plans)
    opt.reducer.counter.reset()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step()
    elapsed = (time.perf_counter() - t0) / steps
    c = opt.reducer.counter
    queue.put((rank, sum(c.payload_bytes.values()) // steps, c.total_calls / steps, elapsed,
               sum(c.flag_bytes.values()) // steps))


def run_fsdp_layout(dp: int, tp: int, norm: str, steps: int, hidden: int = HIDDEN, ffn: int = FFN) -> dict:
    """Spawn dp*tp gloo ranks (FSDP2 over dp, TP over tp); the same row fields as comm.run_layout."""

    world = dp * tp
    queue = mp.get_context("spawn").SimpleQueue()
    spawn(world, _worker, dp, tp, norm, steps, (hidden, ffn), queue)
    per_rank = sorted(queue.get() for _ in range(world))
    specs = titan_layer_specs(hidden, ffn)
    return {"tp": tp, "dp": dp, "norm": norm, "bytes": max(r[1] for r in per_rank),
            "minimum": 4 * analytic_minimum_fsdp(specs, norm, dp, tp),
            "allgather_equivalent": allgather_equivalent(specs, tp, dp),
            "verdict_bytes": max(r[4] for r in per_rank),
            "collectives_per_step": max(r[2] for r in per_rank), "step_s": max(r[3] for r in per_rank)}
