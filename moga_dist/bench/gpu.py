"""`python -m moga_dist.bench gpu`: the GPU check, one command, a few minutes on one GPU.

(a) every backend against float64 on CUDA, fp32 and bf16, at LLaMA-7B layer shapes (row and col);
(b) a step of MOGA (Triton), fused AdamW and torch's Muon on the same 7B-layer parameters, the
    kernel launches per step, and the achieved bytes/s against the device's copy bandwidth;
(c) the two-phase distributed step, 2 ranks sharing the GPU (gloo on CUDA tensors), vs 1 rank;
(d) a sync-free step captured in a CUDA graph and replayed, vs eager;
(e) the layout fuzzer's regression list (moga_dist.layout_fuzz.REGRESSIONS) on CUDA tensors, vs float64.
The last line sums up: `gpu: moga/adamw_fused=<x> launches_per_step=<n> bandwidth_frac=<f> max_err=<e>
layouts_err=<e> graph=<ok|fail>` (one line).
"""
from __future__ import annotations

import argparse
import sys

import torch

from moga_dist import MOGA, ShardLayout, TensorParallelSplit
from moga_dist.bench.step import MIN_BYTES_PER_PARAM, llama_layer_shapes
from moga_dist.core.reference import reference_step


def _cuda_time(fn, reps: int = 20) -> float:
    """Median seconds per call, CUDA events."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


def check_exactness(shapes, device) -> float:
    """Max relative update error of every backend vs float64 after 2 steps (fp32 and bf16)."""
    worst = 0.0
    for backend in ("torch", "triton"):
        for dtype in (torch.float32, torch.bfloat16):
            for norm in ("row", "col"):
                gen = torch.Generator(device=device).manual_seed(0)
                params = [torch.nn.Parameter(torch.randn(s, device=device, generator=gen).to(dtype)) for s in shapes]
                init = [p.detach().double().clone() for p in params]
                roles = ["hidden" if len(s) == 2 else "vector" for s in shapes]
                opt = MOGA([{"params": [p], "role": r} for p, r in zip(params, roles)], lr=0.02, norm=norm,
                           backend=backend)
                ref = [(w, torch.zeros_like(w)) for w in init]
                for _ in range(2):
                    grads = [torch.randn(s, device=device, generator=gen).to(dtype) for s in shapes]
                    for p, g in zip(params, grads):
                        p.grad = g
                    opt.step()
                    ref = [reference_step(w, g.double(), m, r, lr=0.02, norm=norm) for (w, m), g, r
                           in zip(ref, grads, roles)]
                    ref = [(w.to(dtype).double(), m) for w, m in ref]
                for p, x, (w, _) in zip(params, init, ref):
                    upd = (w - x).abs().max().item()
                    err = (p.double() - w).abs().max().item()
                    ulp = (2 ** -7 if dtype == torch.bfloat16 else 2 ** -23) * w.abs().max().item()
                    worst = max(worst, max(err - 2 * ulp, 0.0) / max(upd, 1e-30))
                print(f"exact: backend={backend} dtype={str(dtype)[6:]} norm={norm} max_rel_err={worst:.2e}")
    return worst


def timing(shapes, device) -> tuple[float, int, float]:
    """MOGA (triton) / fused AdamW step time, MOGA launches per step, achieved bandwidth fraction."""
    params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    moga = MOGA(params, lr=0.01, backend="triton")
    adamw = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-3, fused=True)
    for q, p in zip(adamw.param_groups[0]["params"], params):
        q.grad = p.grad.clone()
    t_moga, t_adamw = _cuda_time(moga.step), _cuda_time(adamw.step)
    line = f"time: moga={t_moga * 1e3:.3f} ms adamw_fused={t_adamw * 1e3:.3f} ms"
    try:
        muon = torch.optim.Muon([torch.nn.Parameter(p.detach().clone()) for p in params if p.dim() == 2], lr=0.02)
        for q in muon.param_groups[0]["params"]:
            q.grad = torch.randn_like(q)
        line += f" muon={_cuda_time(muon.step, reps=5) * 1e3:.3f} ms"
    except (AttributeError, RuntimeError) as exc:
        line += f" muon=n/a ({type(exc).__name__})"
    print(line)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        moga.step()
        torch.cuda.synchronize()
    launches = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    numel = sum(p.numel() for p in params)
    src, dst = torch.randn(numel, device=device), torch.empty(numel, device=device)
    bw = 2 * 4 * numel / _cuda_time(lambda: dst.copy_(src))
    achieved = MIN_BYTES_PER_PARAM * numel / t_moga
    print(f"bandwidth: copy={bw / 1e9:.0f} GB/s moga_bound_traffic={achieved / 1e9:.0f} GB/s")
    return t_moga / t_adamw, launches, achieved / bw


def _two_rank(rank: int, world: int, shape, results) -> None:
    import torch.distributed as dist

    gen = torch.Generator().manual_seed(3)
    full = torch.randn(shape, generator=gen)
    grads = [torch.randn(shape, generator=gen) for _ in range(3)]
    local = torch.nn.Parameter(full.chunk(world, dim=1)[rank].contiguous().cuda())
    opt = MOGA([local], norm="row", backend="triton", process_groups={"tp": dist.new_group(list(range(world)))},
               layouts={local: ShardLayout(shape, tp=TensorParallelSplit(1, rank, world))})
    for g in grads:
        local.grad = g.chunk(world, dim=1)[rank].contiguous().cuda()
        opt.step()
    results[rank] = local.detach().cpu()


def distributed_check(device) -> float:
    """Row norms of a row-parallel [4096, 4096] weight at 2 ranks (two-phase Triton) vs 1 rank."""
    import torch.multiprocessing as mp

    from moga_dist.testing import spawn

    shape = (4096, 4096)
    manager = mp.Manager()
    results = manager.dict()
    spawn(2, _two_rank, shape, results)
    gen = torch.Generator().manual_seed(3)
    full = torch.nn.Parameter(torch.randn(shape, generator=gen).to(device))
    grads = [torch.randn(shape, generator=gen) for _ in range(3)]
    opt = MOGA([full], norm="row", backend="triton")
    for g in grads:
        full.grad = g.to(device)
        opt.step()
    gathered = torch.cat([results[0], results[1]], dim=1)
    err = (gathered - full.detach().cpu()).abs().max().item()
    print(f"distributed: 2 ranks vs 1 max_abs_err={err:.2e}")
    return err


def graph_check(shapes, device) -> bool:
    """A sync-free step captured in a CUDA graph and replayed equals the same steps run eagerly."""
    def make():
        torch.manual_seed(5)
        ps = [torch.nn.Parameter(torch.randn(s, device=device)) for s in shapes]
        for p in ps:
            p.grad = torch.randn_like(p)
        return ps, MOGA(ps, lr=0.01, backend="triton", sync_free=True)

    eager, opt_e = make()
    for _ in range(3):
        opt_e.step()
    graphed, opt_g = make()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        opt_g.step()                       # warm-up: builds the program and tables outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt_g.step()
    graph.replay()
    torch.cuda.synchronize()
    ok = all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(eager, graphed))
    print(f"graph: captured sync-free step replayed, equal to eager={ok}")
    return ok


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moga_dist.bench gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=4096, help="LLaMA width (4096: 7B layer shapes)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("moga_dist.bench gpu: no CUDA device here; this check needs one GPU", file=sys.stderr)
        raise SystemExit(2)
    device = torch.device("cuda")
    shapes = llama_layer_shapes(args.width)
    max_err = check_exactness(shapes, device)
    ratio, launches, frac = timing(shapes, device)
    dist_err = distributed_check(device)
    from moga_dist.layout_fuzz import run_regressions

    layout_err = run_regressions("cuda")
    try:
        graph = "ok" if graph_check(shapes, device) else "fail"
    except RuntimeError as exc:
        print(f"graph: capture failed: {exc}")
        graph = "fail"
    print(f"gpu: moga/adamw_fused={ratio:.3f} launches_per_step={launches} bandwidth_frac={frac:.2f} "
          f"max_err={max(max_err, dist_err):.2e} layouts_err={layout_err:.2e} graph={graph}")


if __name__ == "__main__":
    main()
