"""`python -m moga_dist.bench comm`: real gloo steps on one LLaMA-7B layer, counting what each rank
hands to collectives, beside the analytic minimum and an all-gather-based matrix optimizer.

Layer (Megatron layout): linear_qkv [3*4096, 4096] (MHA: 32 groups of [q, k, v], column-parallel),
linear_proj [4096, 4096] (row-parallel), linear_fc1 [2*11008, 4096] ([gate; up], column-parallel,
stride 2), linear_fc2 [4096, 11008] (row-parallel), two RMSNorm gains [4096] (replicated).
Bytes are all-reduce payloads per rank (fp32 partial sums); `verdict` is the one extra fp32 slot
per collective that carries the non-finite-gradient verdict; `allgather_equivalent` is what each rank
receives when the TP/DP-sharded matrices are all-gathered in bf16 (Muon's default in Megatron).
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moga_dist import MOGA, FlatPartition, RowBlocks, ShardLayout, TensorParallelSplit
from moga_dist.testing import spawn

from .comm_bytes import allgather_equivalent
from .comm_dtensor import run_fsdp_layout

HIDDEN, FFN, HEADS, HEAD_DIM = 4096, 11008, 32, 128


def layer_specs(hidden=HIDDEN, ffn=FFN, heads=HEADS, head_dim=HEAD_DIM):
    """(name, global_shape, tp_dim, stride, row_blocks) of one LLaMA layer."""
    return [
        ("linear_qkv", (3 * heads * head_dim, hidden), 0, 1, RowBlocks.qkv(heads, 1, head_dim)),
        ("linear_proj", (hidden, heads * head_dim), 1, 1, None),
        ("linear_fc1", (2 * ffn, hidden), 0, 2, RowBlocks.fused(ffn, ffn)),
        ("linear_fc2", (hidden, ffn), 1, 1, None),
        ("input_layernorm", (hidden,), None, 1, None),
        ("pre_mlp_layernorm", (hidden,), None, 1, None),
    ]


def _block_ids(rows: int, blocks: RowBlocks | None) -> list[int]:
    return [0] * rows if blocks is None else [blocks.block_of_global_row(r) for r in range(rows)]


def dp_bounds(sizes: list[int], dp: int, zero3: bool) -> list[tuple[list[int], int]]:
    """Per parameter, (buffer boundaries of the dp ranks, the parameter's offset in that buffer):
    ZeRO-1/2 cut one flat buffer of all parameters into dp equal parts; ZeRO-3 cuts each parameter
    into ceil(n / dp) slices."""
    if zero3:
        return [([k * -(-n // dp) for k in range(dp + 1)], 0) for n in sizes]
    part, out, start = -(-sum(sizes) // dp), [], 0
    for n in sizes:
        out.append(([k * part for k in range(dp + 1)], start))
        start += n
    return out


def analytic_minimum(specs, norm: str, tp: int, dp: int, zero3: bool = False) -> int:
    """Floats a rank must all-reduce per step: by arithmetic on the layout, not by the planner.

    TP: the normalized axis crosses ranks for row-parallel weights (rows) or column-parallel ones
    (one statistic per block and column). Flat DP partitions (of the TP-local buffer, or of each
    parameter under ZeRO-3): statistics touched on both sides of each partition boundary."""
    total = 0
    if tp > 1:
        for _, shape, tp_dim, _, blocks in specs:
            if len(shape) != 2:
                continue
            if norm == "row" and tp_dim == 1:
                total += shape[0]
            if norm == "col" and tp_dim == 0:
                total += (1 if blocks is None else blocks.num_blocks) * shape[1]
    if dp > 1:
        sizes = [math.prod(_local(shape, tp_dim, tp)) for _, shape, tp_dim, _, _ in specs]
        for (_, shape, tp_dim, _, blocks), n, (bounds, start) in zip(specs, sizes, dp_bounds(sizes, dp, zero3)):
            for k in range(1, dp):
                o = bounds[k] - start
                if not 0 < o < n or len(shape) != 2:
                    continue
                rows, cols = _local(shape, tp_dim, tp)
                r, c = divmod(o, cols)
                if norm == "row":
                    total += 1 if c else 0
                    continue
                ids = _block_ids(shape[0], blocks)[:rows]   # TP-local row order is symmetric
                left = {(b, j) for b in set(ids[:r]) for j in range(cols)} | {(ids[r], j) for j in range(c)}
                right = {(ids[r], j) for j in range(c, cols)} | \
                    {(b, j) for b in set(ids[r + 1:]) for j in range(cols)}
                total += len(left & right)
    return total


def _local(shape, tp_dim, tp):
    out = list(shape)
    if tp_dim is not None and tp > 1:
        out[tp_dim] //= tp
    return tuple(out)


def _worker(rank, world, tp, dp, norm, steps, queue, zero3=False):
    groups = {}
    for key, members in (("tp", [[d * tp + t for t in range(tp)] for d in range(dp)]),
                         ("dp", [[d * tp + t for d in range(dp)] for t in range(tp)])):
        for ranks in members:
            g = dist.new_group(ranks)
            if rank in ranks:
                groups[key] = g
    t, d = rank % tp, rank // tp
    specs = layer_specs()
    sizes = [math.prod(_local(shape, tp_dim, tp)) for _, shape, tp_dim, _, _ in specs]
    gen = torch.Generator().manual_seed(rank)
    params, layouts = [], {}
    for (name, shape, tp_dim, stride, blocks), n, (bounds, start) in zip(specs, sizes, dp_bounds(sizes, dp, zero3)):
        split = TensorParallelSplit(tp_dim, t, tp, stride) if tp_dim is not None and tp > 1 else None
        flat = None
        local = _local(shape, tp_dim, tp)
        if dp > 1:
            flat = FlatPartition.from_bounds(bounds, start, n, d)
            ranges = flat.ranges
            local = (ranges[d][1] - ranges[d][0],)
        p = torch.nn.Parameter(torch.randn(local, generator=gen) * 0.02)
        layouts[p] = ShardLayout(shape, tp=split, flat=flat, row_blocks=blocks)
        params.append(p)
    roles = [{"params": [p], "role": "hidden" if len(s[1]) == 2 else "vector"} for p, s in zip(params, specs)]
    opt = MOGA(roles, lr=1e-3, norm=norm, layouts=layouts, process_groups=groups)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    opt.step()                       # warm-up (kernel load, plans)
    opt.reducer.counter.reset()
    dist.barrier(groups.get("tp") or groups["dp"])
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step()
    elapsed = (time.perf_counter() - t0) / steps
    c = opt.reducer.counter
    queue.put((rank, sum(c.payload_bytes.values()) // steps, c.total_calls / steps, dict(c.calls), elapsed,
               sum(c.flag_bytes.values()) // steps))


def run_layout(tp: int, dp: int, norm: str, steps: int, zero3: bool = False) -> dict:
    """Spawn tp*dp gloo ranks; per-rank bytes/collectives per step, with minimum and equivalents."""
    world = tp * dp
    queue = mp.get_context("spawn").SimpleQueue()
    spawn(world, _worker, tp, dp, norm, steps, queue, zero3)
    per_rank = sorted(queue.get() for _ in range(world))
    specs = layer_specs()
    groups_used = {k for r in per_rank for k in r[3]}
    return {"tp": tp, "dp": dp, "norm": norm, "bytes": max(r[1] for r in per_rank),
            "minimum": 4 * analytic_minimum(specs, norm, tp, dp, zero3),
            "allgather_equivalent": allgather_equivalent(specs, tp, dp),
            "verdict_bytes": max(r[5] for r in per_rank),
            "collectives_per_step": max(r[2] for r in per_rank), "groups": len(groups_used),
            "step_s": max(r[4] for r in per_rank)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m moga_dist.bench comm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--norms", nargs="+", default=["col", "row"], choices=["row", "col"])
    ap.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=True,
                    help="also the FSDP2 and FSDP2 x TP rows (torchtitan layer; comm_dtensor.py)")
    args = ap.parse_args(argv)
    print(f"{'layout':>10} {'norm':>4} {'bytes/rank':>11} {'minimum':>9} {'verdict':>7} {'allgather_eq':>13} "
          f"{'ratio':>8} {'coll/step':>9} {'step s':>7}")
    last = None
    for tp, dp, zero3 in ((2, 1, False), (1, 2, False), (4, 1, False), (1, 2, True)):
        for norm in args.norms:
            r = run_layout(tp, dp, norm, args.steps, zero3)
            ratio = r["allgather_equivalent"] / max(r["bytes"], 1)
            name = f"ZeRO3 DP{dp}" if zero3 else f"TP{tp}xDP{dp}"
            print(f"{name:>10} {norm:>4} {r['bytes']:>11} {r['minimum']:>9} {r['verdict_bytes']:>7} "
                  f"{r['allgather_equivalent']:>13} {ratio:>8.0f} {r['collectives_per_step']:>9.0f} "
                  f"{r['step_s']:>7.2f}", flush=True)
            last = r if not zero3 else last
    if args.fsdp:

        for dp, tp in ((2, 1), (2, 2)):
            for norm in args.norms:
                r = run_fsdp_layout(dp, tp, norm, args.steps)
                ratio = f"{r['allgather_equivalent'] / r['bytes']:.0f}" if r["bytes"] else "inf"
                print(f"{f'FSDP2 {dp}x{tp}':>10} {norm:>4} {r['bytes']:>11} {r['minimum']:>9} {r['verdict_bytes']:>7} "
                      f"{r['allgather_equivalent']:>13} {ratio:>8} "
                      f"{r['collectives_per_step']:>9.0f} {r['step_s']:>7.2f}", flush=True)
    print(f"comm: bytes={last['bytes']} minimum={last['minimum']} "
          f"allgather_equivalent={last['allgather_equivalent']} collectives_per_step={last['collectives_per_step']:.0f}")
