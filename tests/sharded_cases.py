"""Workers for the sharded-vs-unsharded tests. Shards are cut here with plain slicing, independent
of moga_dist.core.plan, and every rank checks the gathered result and its own communication."""
import json
import math
import os

import torch
import torch.distributed as dist

from moga_dist import MOGA, FlatPartition, RowBlocks, ShardLayout, TensorParallelSplit
from moga_dist.core.layout import clip_ranges

STEPS = 3
HP = dict(lr=0.02, momentum=0.9, weight_decay=0.1)


def tp_slice(t, dim, rank, world, stride):
    """Megatron's strided split: each of `stride` parts cut into `world` chunks; take chunk `rank`."""
    parts = t.chunk(stride, dim)
    return torch.cat([part.chunk(world, dim)[rank] for part in parts], dim)


class Spec:
    def __init__(self, shape, role="hidden", tp_dim=None, stride=1, blocks=None):
        self.shape, self.role, self.tp_dim, self.stride, self.blocks = shape, role, tp_dim, stride, blocks


def cases(world):
    w = world
    tp_params = [Spec((4 * w, 10), tp_dim=0), Spec((9, 3 * w), tp_dim=1),
                 Spec((6 * w, 7), tp_dim=0, stride=2, blocks=RowBlocks.fused(3 * w, 3 * w)),
                 Spec((8 * w, 6), tp_dim=0, blocks=RowBlocks.qkv(w, 2, 2)),
                 Spec((5 * w, 6), "embedding", tp_dim=0), Spec((3 * w, 6), "head", tp_dim=0),
                 Spec((6,), "vector")]
    flat_params = [Spec((13, 7)), Spec((5, 11), blocks=RowBlocks.fused(2, 3)),
                   Spec((16, 5), blocks=RowBlocks.qkv(2, 2, 2)), Spec((3, 4)), Spec((10, 4), "embedding"),
                   Spec((6, 5), "head"), Spec((7,), "vector")]
    out = [("tp", w, 1, tp_params, None), ("flat_even", 1, w, flat_params, "even"),
           ("flat_uneven_empty_rank", 1, w, flat_params, "uneven")]
    if w == 4:
        mixed = [Spec((8, 6), tp_dim=0), Spec((7, 10), tp_dim=1),
                 Spec((12, 5), tp_dim=0, stride=2, blocks=RowBlocks.fused(6, 6)),
                 Spec((16, 6), tp_dim=0, blocks=RowBlocks.qkv(2, 2, 2)), Spec((5,), "vector"),
                 Spec((6, 4), "head", tp_dim=0)]
        out.append(("tp2_x_dp2", 2, 2, mixed, "even"))
    return out


def tp_local_shape(spec, tp_world):
    shape = list(spec.shape)
    if spec.tp_dim is not None:
        shape[spec.tp_dim] //= tp_world
    return tuple(shape)


def flat_ranges(specs, tp_world, dp_world, mode):
    """Per param, the [start, end) each DP rank owns of its TP-local flattened tensor."""
    sizes = [math.prod(tp_local_shape(s, tp_world)) for s in specs]
    total = sum(sizes)
    if mode == "even":      # ZeRO: pad the buffer to a multiple of the DP size, equal parts
        part = -(-total // dp_world)
        bounds = [min(k * part, total) for k in range(dp_world + 1)]
    else:                   # uneven, with rank 1 owning nothing
        cut = [0, total // 3, total // 3] + [total // 3 + (k + 1) * (total - total // 3) // (dp_world - 2)
                                            for k in range(dp_world - 2)] if dp_world > 2 else [0, total // 3]
        bounds = (cut + [total])[:dp_world + 1]
        bounds[-1] = total
    out, offset = [], 0
    for n in sizes:
        out.append(clip_ranges(bounds, offset, n))
        offset += n
    return out


def stat_ids(spec, norm, idx_piece):
    """Global statistic id of each global element index in a piece (None for sign roles)."""
    if spec.role not in ("hidden", "head"):
        return None
    d_out, d_in = spec.shape
    rows, cols = idx_piece // d_in, idx_piece % d_in
    if spec.role == "head" or norm == "row":
        return rows
    blocks = torch.tensor([spec.blocks.block_of_global_row(r) for r in range(d_out)]) if spec.blocks \
        else torch.zeros(d_out, dtype=torch.long)
    return blocks[rows] * d_in + cols


def run_case(rank, world, name, tp_world, dp_world, specs, mode, norm, groups, backend="auto"):
    t, d = rank % tp_world, rank // tp_world
    gen = torch.Generator().manual_seed(1234)
    inits = [torch.randn(s.shape, generator=gen) for s in specs]
    grads = [[torch.randn(s.shape, generator=gen) for s in specs] for _ in range(STEPS)]
    ranges = flat_ranges(specs, tp_world, dp_world, mode) if mode else None

    def piece(spec, i, x, tt, dd):
        if spec.tp_dim is not None and tp_world > 1:
            x = tp_slice(x, spec.tp_dim, tt, tp_world, spec.stride)
        if ranges is not None:
            s, e = ranges[i][dd]
            x = x.reshape(-1)[s:e]
        return x.clone()

    local, layouts, whole = [], {}, {}
    for i, (spec, x) in enumerate(zip(specs, inits)):
        p = torch.nn.Parameter(piece(spec, i, x, t, d))
        tp = TensorParallelSplit(spec.tp_dim, t, tp_world, spec.stride) \
            if spec.tp_dim is not None and tp_world > 1 else None
        flat = FlatPartition(ranges[i], d) if ranges is not None and dp_world > 1 else None
        layouts[p] = ShardLayout(spec.shape, tp=tp, flat=flat, row_blocks=spec.blocks)
        local.append(p)
    full = [torch.nn.Parameter(x.clone()) for x in inits]
    whole = {p: ShardLayout(s.shape, row_blocks=s.blocks) for p, s in zip(full, specs)}

    def groups_for(params):
        return [{"params": [p], "role": s.role} for p, s in zip(params, specs)]

    sharded = MOGA(groups_for(local), norm=norm, **HP, layouts=layouts, process_groups=groups, backend=backend)
    reference = MOGA(groups_for(full), norm=norm, **HP, layouts=whole)
    for step in grads:
        for i, (spec, g) in enumerate(zip(specs, step)):
            local[i].grad = piece(spec, i, g, t, d)
            full[i].grad = g.clone()
        sharded.step()
        reference.step()

    # Gather every rank's pieces and place them with the same slicing applied to index tensors.
    gathered = [None] * world
    dist.all_gather_object(gathered, [p.detach() for p in local])
    for i, (spec, x0) in enumerate(zip(specs, inits)):
        rebuilt = torch.full((math.prod(spec.shape),), float("nan"))
        idx = torch.arange(math.prod(spec.shape)).view(spec.shape)
        for r in range(world):
            rebuilt[piece(spec, i, idx, r % tp_world, r // tp_world).reshape(-1)] = gathered[r][i].reshape(-1)
        got, want = rebuilt.view(spec.shape).double(), full[i].detach().double()
        assert not torch.isnan(got).any(), (name, i, "some element owned by nobody")
        weight_err = (got - want).abs().max().item() / want.abs().max().item()
        du_got, du_want = got - x0.double(), want - x0.double()
        update_err = (du_got - du_want).abs().max().item() / du_want.abs().max().item()
        assert weight_err <= 1e-6 and update_err <= 1e-4, (name, norm, i, spec.shape, weight_err, update_err)

    # Communication: exactly the statistics that span two or more ranks of a group.
    expected = {"tp": 0, "dp": 0}
    for i, spec in enumerate(specs):
        idx = torch.arange(math.prod(spec.shape)).view(spec.shape)
        touched = {(tt, dd): set(stat_ids(spec, norm, piece(spec, i, idx, tt, dd).reshape(-1)).tolist())
                   if stat_ids(spec, norm, idx.reshape(-1)) is not None else set()
                   for tt in range(tp_world) for dd in range(dp_world)}
        if dp_world > 1:
            seen = [touched[(t, dd)] for dd in range(dp_world)]
            expected["dp"] += sum(1 for s in set().union(*seen) if sum(s in x for x in seen) > 1)
        if tp_world > 1:
            tp_local = [set().union(*(touched[(tt, dd)] for dd in range(dp_world))) for tt in range(tp_world)]
            mine = set().union(*(touched[(tt, d)] for tt in range(tp_world)))
            expected["tp"] += sum(1 for s in mine if sum(s in x for x in tp_local) > 1)
    counter = sharded.reducer.counter
    declared = {"tp": tp_world > 1, "dp": dp_world > 1}
    for key, n in expected.items():
        assert counter.payload_bytes.get(key, 0) == 4 * n * STEPS, (name, norm, key, dict(counter.payload_bytes), n)
        # One collective per declared group per step, even with nothing shared: it carries the
        # non-finite verdict (one fp32 slot), so ranks refuse together and none is left waiting.
        assert counter.calls.get(key, 0) == (STEPS if declared[key] else 0), (name, norm, key, dict(counter.calls))
        assert counter.flag_bytes.get(key, 0) == (4 * STEPS if declared[key] else 0), \
            (name, norm, key, dict(counter.flag_bytes))
    return expected


def case_ids(world):
    """The test id of every (case, norm) the worker runs at `world` ranks."""
    return [f"{name}-{norm}" for name, *_ in cases(world) for norm in ("row", "col")]


def worker(rank, world, backend="auto", out_dir=None):
    """Run every case at `world` ranks. A case whose checks fail is recorded (with out_dir: into
    out_dir/rank<r>.json, one entry per case id) and the next case runs, so each case is its own
    test (test_sharded.py); the checks follow the last collective of a case, so ranks stay in step."""
    world_group = dist.new_group(list(range(world)))
    grid = {}
    if world == 4:   # Megatron order: TP ranks adjacent
        for ranks in ([0, 1], [2, 3]):
            g = dist.new_group(ranks)
            if rank in ranks:
                grid["tp"] = g
        for ranks in ([0, 2], [1, 3]):
            g = dist.new_group(ranks)
            if rank in ranks:
                grid["dp"] = g
    outcome = {}
    for name, tp_world, dp_world, specs, mode in cases(world):
        groups = grid if (tp_world > 1 and dp_world > 1) else \
            ({"tp": world_group} if tp_world > 1 else {"dp": world_group})
        for norm in ("row", "col"):
            try:
                run_case(rank, world, name, tp_world, dp_world, specs, mode, norm, groups, backend)
                outcome[f"{name}-{norm}"] = "ok"
            except AssertionError as exc:
                if out_dir is None:
                    raise
                outcome[f"{name}-{norm}"] = f"rank {rank}: {exc!r}"
    if out_dir is not None:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
            json.dump(outcome, fh)


def nonfinite_on_one_rank(rank, world):
    """TP over all ranks: a row-parallel weight (its row statistics are shared) and a column-parallel
    one (its rows are local). A NaN in rank 0's column-parallel gradient, which no other rank's
    statistics see, must make every rank refuse the step and restore its shard; the next, finite
    step then runs on all ranks (no hang, no divergence)."""
    from moga_dist import NonFiniteGradientError

    group = dist.new_group(list(range(world)))
    gen = torch.Generator().manual_seed(rank)
    col_parallel = torch.nn.Parameter(torch.randn(2, 5, generator=gen))      # global [2*world, 5], dim 0
    row_parallel = torch.nn.Parameter(torch.randn(4, 3, generator=gen))      # global [4, 3*world], dim 1
    opt = MOGA([col_parallel, row_parallel], **HP, process_groups={"tp": group}, layouts={
        col_parallel: ShardLayout((2 * world, 5), tp=TensorParallelSplit(0, rank, world)),
        row_parallel: ShardLayout((4, 3 * world), tp=TensorParallelSplit(1, rank, world))})
    for p in (col_parallel, row_parallel):
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    before = [p.detach().clone() for p in (col_parallel, row_parallel)]
    moms = [opt.state[p]["momentum_buffer"].clone() for p in (col_parallel, row_parallel)]
    for p in (col_parallel, row_parallel):
        p.grad = torch.randn(p.shape, generator=gen)
    if rank == 0:
        col_parallel.grad[1, 2] = float("nan")
    try:
        opt.step()
    except NonFiniteGradientError as exc:
        assert ("another rank" in str(exc)) == (rank != 0), str(exc)
    else:
        raise AssertionError(f"rank {rank} stepped although rank 0's gradient held a NaN")
    for p, w, m in zip((col_parallel, row_parallel), before, moms):
        assert (p.detach() - w).abs().max().item() <= 1e-6 * w.abs().max().item(), rank
        mom = opt.state[p]["momentum_buffer"]
        fine = torch.isfinite(p.grad)
        assert torch.allclose(mom[fine], m[fine], rtol=1e-5, atol=1e-7), rank
    assert all(opt.state[p]["step"] == 1 for p in (col_parallel, row_parallel))
    for p in (col_parallel, row_parallel):
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    assert all(opt.state[p]["step"] == 2 for p in (col_parallel, row_parallel))


def nonfinite_without_shared_statistics(rank, world, port):
    """ZeRO-style flat partition whose boundary falls between two parameters, so no statistic is
    shared; a NaN in rank 1's gradient only. Every rank must refuse the step (the verdict travels
    in the step's collective anyway) and none may wait forever: the group times out in 60 s."""
    import datetime

    from moga_dist import NonFiniteGradientError

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        shapes = [(4, 5), (3, 5)]
        sizes = [20, 15]
        bounds = [0, 20, 35]                       # rank 0 owns the first matrix, rank 1 the second
        mine = [torch.nn.Parameter(torch.randn(shapes[rank]))]
        layouts = {}
        for i, p in enumerate(mine):
            k = rank
            layouts[p] = ShardLayout(shapes[k], flat=FlatPartition.from_bounds(bounds, sum(sizes[:k]), sizes[k], rank))
        opt = MOGA(mine, layouts=layouts, process_groups={"dp": dist.new_group(list(range(world)))})
        mine[0].grad = torch.randn(shapes[rank])
        if rank == 1:
            mine[0].grad[0, 0] = float("nan")
        try:
            opt.step()
        except NonFiniteGradientError as exc:
            assert ("another rank" in str(exc)) == (rank == 0), str(exc)
        else:
            raise AssertionError(f"rank {rank} stepped although rank 1's gradient held a NaN")
        assert opt.reducer.counter.payload_bytes.get("dp", 0) == 0    # nothing shared, only the verdict
    finally:
        dist.destroy_process_group()
