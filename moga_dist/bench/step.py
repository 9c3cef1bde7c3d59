"""`python -m moga_dist.bench step`: one optimizer step at LLaMA layer shapes, MOGA vs fused AdamW,
torch.optim.Muon and the memory-traffic bound, timed in the same process."""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from moga_dist import MOGA

# A row update must read g, m, p and write m, p: 5 fp32 streams.
MIN_BYTES_PER_PARAM = 20


def llama_layer_shapes(width: int) -> list[tuple[int, ...]]:
    """q, k, v, o, gate, up, down and two RMSNorm gains of one LLaMA layer (ffn = 8/3 d, to 256)."""
    ffn = 256 * -(-int(8 * width / 3) // 256)
    return [(width, width)] * 4 + [(ffn, width), (ffn, width), (width, ffn), (width,), (width,)]


def _time(fn, min_reps: int = 5, budget_s: float = 2.0, warmup: int = 2) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 1 and time.perf_counter() - start > 10 * budget_s:
            break
    return statistics.median(times)


def copy_bandwidth(numel: int) -> float:
    """Bytes per second of dst.copy_(src) (read + write) on `numel` fp32 elements."""
    src, dst = torch.randn(numel), torch.empty(numel)
    return 2 * 4 * numel / _time(lambda: dst.copy_(src), min_reps=10)


def _params(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    return params


def _interleaved(fns: dict, rounds: int = 15, warmup: int = 2) -> dict:
    """Median seconds per call of each fn, timed in alternation so machine drift hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench_width(width: int, with_muon: bool = True, rounds: int = 15) -> dict:
    """Seconds per step of each optimizer on one layer of `width`, and the traffic bound."""
    shapes = llama_layer_shapes(width)
    numel = sum(torch.Size(s).numel() for s in shapes)
    out = {"width": width, "params": numel}
    moga = MOGA(_params(shapes), lr=1e-3)
    adamw = torch.optim.AdamW(_params(shapes), lr=1e-3, fused=True)
    medians = _interleaved({"moga": moga.step, "adamw_fused": adamw.step}, rounds=rounds)
    out.update(medians)
    if with_muon:
        mats = [p for p in _params(shapes) if p.ndim == 2]
        muon = torch.optim.Muon(mats, lr=1e-3)
        out["muon"] = _time(muon.step, min_reps=1, budget_s=0.5, warmup=1)
    out["bound"] = MIN_BYTES_PER_PARAM * numel / copy_bandwidth(max(numel, 1 << 24))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m moga_dist.bench step", description=__doc__)
    ap.add_argument("--widths", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--no-muon", action="store_true", help="skip torch.optim.Muon (slow on CPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--rounds", type=int, default=15, help="alternating MOGA/AdamW timings per width")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from moga_dist.kernels import cpu as kernels
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, fused kernels "
          f"{'on' if kernels.ops() is not None else 'OFF (pure torch)'}")
    print(f"{'width':>6} {'params':>10} {'moga ms':>9} {'adamw ms':>9} {'muon ms':>9} {'bound ms':>9} "
          f"{'moga/adamw':>11} {'moga/muon':>10} {'moga/bound':>11}")
    rows = []
    for w in args.widths:
        r = bench_width(w, with_muon=not args.no_muon, rounds=args.rounds)
        rows.append(r)
        muon = r.get("muon", float("nan"))
        print(f"{w:>6} {r['params']:>10} {r['moga']*1e3:>9.2f} {r['adamw_fused']*1e3:>9.2f} {muon*1e3:>9.1f} "
              f"{r['bound']*1e3:>9.2f} {r['moga']/r['adamw_fused']:>11.3f} {r['moga']/muon:>10.4f} "
              f"{r['moga']/r['bound']:>11.3f}", flush=True)
    worst = max(rows, key=lambda r: r["moga"] / r["adamw_fused"])
    print(f"step: moga/adamw_fused={worst['moga']/worst['adamw_fused']:.3f} "
          f"moga/muon={worst['moga']/worst.get('muon', float('nan')):.4f} "
          f"moga/bound={worst['moga']/worst['bound']:.3f}")
