"""Layout fuzz cases: a random sharded layout, stepped on N gloo ranks, checked element-wise
against the float64 reference (core/reference.py) on the gathered tensors.

A `Case` is plain data (picklable, hashable): global shapes and roles, a TP x DP grid, flat cut
points over each TP rank's flattened parameters, how the engine declares the pieces, a dtype, a
backend, a lr schedule and one non-finite gradient. `run_rank` is what each rank does; `check`
rebuilds the global tensors from every rank's pieces and compares them with `reference`. The
tests (tests/test_fuzz_layouts.py) draw cases with hypothesis; `REGRESSIONS` holds the shrunk
failures, which `python -m moga_dist.bench gpu` also runs on CUDA (`run_regressions`).
Shards are cut here by plain slicing of index tensors, not by moga_dist.core.plan.
"""
from __future__ import annotations

import math
import traceback
from dataclasses import dataclass

import torch

from .core.layout import FlatPartition, RowBlocks, ShardLayout, TensorParallelSplit, clip_ranges
from .core.reference import reference_step

HP = {"momentum": 0.9, "weight_decay": 0.1}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
# Max |got - want| / Σ_steps max |step| per dtype, after subtracting 2 ulps of the weights' dtype
# (the reference rounds to the parameter dtype each step, as the optimizer does).
TOLERANCE = {"float32": 2e-5, "bfloat16": 2e-2, "float64": 1e-12}
ULP = {"float32": 2.0 ** -23, "bfloat16": 2.0 ** -7, "float64": 2.0 ** -52}


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: its global shape and role, its TP split (dim, Megatron stride) and row blocks."""

    shape: tuple[int, ...]
    role: str = "hidden"
    tp_dim: int | None = None
    stride: int = 1
    blocks: RowBlocks | None = None


@dataclass(frozen=True)
class Case:
    """One fuzz example. Rank r is TP rank r % tp, DP rank r // tp. bounds: dp + 1 cut points over
    the concatenated TP-local flattened parameters (None: no flat partition). mode: "params" (one
    tensor per piece, empty ones included, `layouts=`), "megatron" (non-empty pieces declared with
    order keys, the others as ghosts), "zero" (one flat buffer, declare_flat_buffer). lrs: the lr
    of each step (a schedule); nan: (step, param, global flat element) of a NaN gradient or None."""

    tp: int
    dp: int
    params: tuple[ParamSpec, ...]
    bounds: tuple[int, ...] | None = None
    mode: str = "params"
    norm: str = "row"
    dtype: str = "float32"
    backend: str = "torch"
    lrs: tuple[float, ...] = (0.02, 0.03, 0.01)
    nan: tuple[int, int, int] | None = None
    seed: int = 0

    @property
    def world(self) -> int:
        return self.tp * self.dp


def tp_slice(t: torch.Tensor, dim: int, rank: int, world: int, stride: int) -> torch.Tensor:
    """Megatron's strided split: each of `stride` parts cut into `world` chunks; chunk `rank` of each."""
    if t.shape[dim] == 0:
        return t
    return torch.cat([part.chunk(world, dim)[rank] for part in t.chunk(stride, dim)], dim)


def tp_local_numel(spec: ParamSpec, tp: int) -> int:
    split = spec.tp_dim is not None and tp > 1
    return math.prod(s // tp if split and d == spec.tp_dim else s for d, s in enumerate(spec.shape))


def flat_ranges(case: Case) -> list[tuple[tuple[int, int], ...]] | None:
    """Per parameter, each DP rank's [start, end) of its TP-local flattened tensor."""
    if case.bounds is None:
        return None
    out, offset = [], 0
    for spec in case.params:
        n = tp_local_numel(spec, case.tp)
        out.append(clip_ranges(list(case.bounds), offset, n))
        offset += n
    return out


def local_piece(case: Case, i: int, x: torch.Tensor, t: int, d: int) -> torch.Tensor:
    """TP rank t, DP rank d's piece of parameter i's global tensor `x` (flat when partitioned)."""
    spec = case.params[i]
    if spec.tp_dim is not None and case.tp > 1:
        x = tp_slice(x, spec.tp_dim, t, case.tp, spec.stride)
    ranges = flat_ranges(case)
    if ranges is not None:
        s, e = ranges[i][d]
        x = x.reshape(-1)[s:e]
    return x.contiguous().clone()


def layout_of(case: Case, i: int, t: int, d: int) -> ShardLayout:
    spec, ranges = case.params[i], flat_ranges(case)
    tp = TensorParallelSplit(spec.tp_dim, t, case.tp, spec.stride) if spec.tp_dim is not None and case.tp > 1 \
        else None
    flat = FlatPartition(ranges[i], d) if ranges is not None else None
    return ShardLayout(spec.shape, tp=tp, flat=flat, row_blocks=spec.blocks)


def global_tensors(case: Case) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Initial weights and per-step gradients (float64, from the case's seed), NaN placed."""
    gen = torch.Generator().manual_seed(case.seed)
    inits = [torch.randn(s.shape, generator=gen, dtype=torch.float64) for s in case.params]
    grads = [[torch.randn(s.shape, generator=gen, dtype=torch.float64) for s in case.params] for _ in case.lrs]
    if case.nan is not None:
        step, i, e = case.nan
        grads[step][i].view(-1)[e] = float("nan")
    return inits, grads


def groups_of(world: int, tp: int) -> list[list[list[int]]]:
    """[tp groups, dp groups] as rank lists of the grid (TP ranks adjacent, Megatron's order)."""
    dp = world // tp
    return [[[d * tp + t for t in range(tp)] for d in range(dp)], [[d * tp + t for d in range(dp)] for t in range(tp)]]


def run_rank(rank: int, case: Case, groups: dict, device: str = "cpu") -> dict:
    """Step the case on this rank. Returns {"pieces": final local piece per parameter (None where
    the rank holds none of it), "refused": steps that raised NonFiniteGradientError, "error"}."""
    from .core.flat import FlatSegment
    from .core.optimizer import MOGA, NonFiniteGradientError

    t, d = rank % case.tp, rank // case.tp
    dtype = DTYPES[case.dtype]
    inits, grads = global_tensors(case)
    n = len(case.params)
    pieces = [local_piece(case, i, inits[i], t, d).to(device, dtype) for i in range(n)]
    layouts = [layout_of(case, i, t, d) for i in range(n)]
    kw = dict(lr=case.lrs[0], norm=case.norm, **HP, process_groups=groups, backend=case.backend)
    refused: list[int] = []
    try:
        if case.mode == "zero":
            buf = torch.nn.Parameter(torch.cat([p.reshape(-1) for p in pieces]) if pieces else torch.zeros(0))
            opt = MOGA([buf], **kw)
            starts = [sum(p.numel() for p in pieces[:i]) for i in range(n)]
            opt.declare_flat_buffer(buf, [FlatSegment(starts[i], layouts[i], f"p{i}", {"role": s.role})
                                          for i, s in enumerate(case.params)], base_lr=case.lrs[0])
            tensors = [buf]
        else:
            held = [i for i in range(n) if case.mode == "params" or pieces[i].numel() > 0]
            tensors = [torch.nn.Parameter(pieces[i]) for i in held]
            idle = torch.nn.Parameter(torch.zeros(1, device=device))     # never has a gradient
            opt = MOGA([{"params": [p], "role": case.params[i].role} for i, p in zip(held, tensors)]
                       + [{"params": [idle]}], **kw)
            for i, p in zip(held, tensors):
                opt.declare(p, layout=layouts[i], order_key=i)
            if case.mode == "megatron":
                opt.declare_ghosts([(i, layouts[i], {"role": case.params[i].role, "dtype": dtype})
                                    for i in range(n) if i not in held])
        for k, lr in enumerate(case.lrs):
            for g in opt.param_groups:
                g["lr"] = lr                                   # a schedule's effect
            local = [local_piece(case, i, grads[k][i], t, d).to(device, dtype) for i in range(n)]
            if case.mode == "zero":
                buf.grad = torch.cat([g.reshape(-1) for g in local]) if local else torch.zeros(0)
            else:
                for i, p in zip(held, tensors):
                    p.grad = local[i]
            try:
                opt.step()
            except NonFiniteGradientError:
                refused.append(k)
        if case.mode == "zero":
            out = list(buf.detach().cpu().split([p.numel() for p in pieces]))
        else:
            out = [None] * n
            for i, p in zip(held, tensors):
                out[i] = p.detach().cpu()
        return {"pieces": out, "refused": refused, "error": None}
    except Exception:       # noqa: BLE001 - reported to the test, which fails on it
        return {"pieces": None, "refused": refused, "error": f"rank {rank}: {traceback.format_exc()}"}


def reference(case: Case) -> tuple[list[torch.Tensor], list[float]]:
    """Float64 MOGA on the whole tensors: (final weights, Σ over steps of the largest |step|) per
    parameter. The NaN step is refused (weights kept, the NaN entry's momentum restarts at 0);
    weights are rounded to the parameter dtype after every step, as the optimizer stores them."""
    dtype = DTYPES[case.dtype]
    inits, grads = global_tensors(case)
    out, moved = [], []
    for i, spec in enumerate(case.params):
        w = inits[i].to(dtype).double()
        m, travel = torch.zeros_like(w), 0.0
        for k, lr in enumerate(case.lrs):
            g = grads[k][i].to(dtype).double()
            if case.nan is not None and case.nan[0] == k:
                if case.nan[1] == i:
                    m.view(-1)[case.nan[2]] = 0.0
                continue
            new, m = reference_step(w, g, m, spec.role, row_blocks=spec.blocks, lr=lr, norm=case.norm, **HP)
            new = new.to(dtype).double()
            travel += (new - w).abs().max().item() if w.numel() else 0.0
            w = new
        out.append(w)
        moved.append(travel)
    return out, moved


def check(case: Case, results: list[dict]) -> tuple[float, float]:
    """Raise AssertionError unless every rank finished, refused exactly the NaN step, and the
    gathered weights equal the reference. Returns the max |got - want| / Σ_steps max |step|, and
    the same beyond the 2-ulp slack the assertion allows for the weights' rounding."""
    for r in results:
        assert r["error"] is None, r["error"]
    expected = [case.nan[0]] if case.nan is not None else []
    for rank, r in enumerate(results):
        assert r["refused"] == expected, (rank, r["refused"], expected)
    want, moved = reference(case)
    worst = (0.0, 0.0)
    for i, spec in enumerate(case.params):
        numel = math.prod(spec.shape)
        if numel == 0:
            continue
        got = torch.full((numel,), float("nan"), dtype=torch.float64)
        idx = torch.arange(numel).view(spec.shape)
        for rank, r in enumerate(results):
            piece = r["pieces"][i]
            if piece is not None:
                got[local_piece(case, i, idx, rank % case.tp, rank // case.tp).reshape(-1)] = \
                    piece.double().reshape(-1)
        assert not torch.isnan(got).any(), (i, "elements no rank returned")
        got = got.view(spec.shape)
        # Relative to how far the steps moved the weights (two steps may cancel out), after 2 ulps.
        update = moved[i]
        slack = 2 * ULP[case.dtype] * want[i].abs().max().item()
        diff = (got - want[i]).abs().max().item()
        err = max(diff - slack, 0.0) / max(update, 1e-30)
        assert err <= TOLERANCE[case.dtype], f"param {i} {spec}: error {err:.3g} > {TOLERANCE[case.dtype]}"
        worst = (max(worst[0], diff / max(update, 1e-30)), max(worst[1], err))
    return worst


# Layouts found wrong once (issue 20 and the fuzzer's shrunk failures); they run in the default
# tests and in `python -m moga_dist.bench gpu` on CUDA.
REGRESSIONS: tuple[Case, ...] = (
    # Triton mis-updated flat-partitioned rows: phase A stores only the rows a rank touches, and
    # the arena was not zeroed without column/sign pieces, so last step's sums came back (1.8e-1).
    Case(1, 3, (ParamSpec((32, 20)),), (0, 110, 250, 640), backend="triton", lrs=(0.02, 0.03, 0.01, 0.02)),
    # A rank holding the matrix only as a ghost never joined the all-reduce: the others hung.
    Case(1, 3, (ParamSpec((32, 20)),), (0, 110, 640, 640), mode="megatron"),
    # float64 pieces had fp32 statistics (~1e-8 from float64).
    Case(1, 3, (ParamSpec((7, 5)), ParamSpec((4,), "vector")), (0, 12, 30, 39), dtype="float64", nan=(1, 0, 3)),
    # The checker's own first failure: two sign-like steps of a 1x1 matrix cancel, so errors are
    # measured against the distance the steps travelled, not the net update.
    Case(1, 4, (ParamSpec((1, 3)), ParamSpec((1, 1)), ParamSpec((1, 3))), (0, 4, 4, 4, 7), mode="megatron",
         backend="triton", lrs=(0.02, 0.02), seed=190),
)


def _regression_rank(rank: int, world: int, cases: list[Case], device: str, results) -> None:
    import datetime

    import torch.distributed as dist

    grids = {}
    for tp in sorted({c.tp for c in cases}):
        mine = {}
        for key, lists in zip(("tp", "dp"), groups_of(world, tp)):
            for ranks in lists:
                # A bounded timeout: a hang fails the check instead of blocking it.
                g = dist.new_group(ranks, timeout=datetime.timedelta(seconds=60)) if len(ranks) > 1 else None
                if rank in ranks and g is not None:
                    mine[key] = g
        grids[tp] = mine
    for k, case in enumerate(cases):
        results[k, rank] = run_rank(rank, case, grids[case.tp], device)


def run_regressions(device: str = "cuda", cases: tuple[Case, ...] = REGRESSIONS) -> float:
    """Run `cases` on gloo ranks (one spawn per world size) with the tensors on `device`, check
    each against the float64 reference; returns the max error beyond 2 ulps, raises AssertionError on the first
    wrong case. What `python -m moga_dist.bench gpu` runs on CUDA (a test runs it on CPU)."""
    import torch.multiprocessing as mp

    from .testing import spawn

    worst = 0.0
    for world in sorted({c.world for c in cases}):
        batch = [c for c in cases if c.world == world]
        results = mp.Manager().dict()
        spawn(world, _regression_rank, batch, device, results)
        for k, case in enumerate(batch):
            err = check(case, [results[k, r] for r in range(world)])[1]
            print(f"layouts: {case.backend} {case.dtype} world={world} mode={case.mode} max_rel_err={err:.2e}")
            worst = max(worst, err)
    return worst
