"""`python -m moga_dist.bench train`: the main job with MOGA and with DeepSpeed's AdamW, side by
side in one invocation (alternating A/B/A/B on the same 2 gloo ranks), tokens/s of each."""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile

import torch.multiprocessing as mp


def _worker(rank, world, port, preset, steps, rounds, base, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    from moga_dist.train.config import load
    from moga_dist.train.loop import run

    import torch.distributed as dist
    results = {"moga": [], "adamw": []}
    for r in range(rounds):
        for name in ("moga", "adamw"):
            common = [f"training.steps={steps}", "training.eval_every=1000000", "checkpoint.every=1000000",
                      f"optimizer.name={name}", f"output_dir='{base}/{name}{r}'"]
            summary = run(load(preset, common))
            results[name].append(summary["tokens_per_s"])
            if dist.is_initialized():
                dist.barrier()
    if rank == 0:
        queue.put(results)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m moga_dist.bench train", description=__doc__)
    ap.add_argument("--config", default="configs/tiny_cpu.toml")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--nproc", type=int, default=2)
    args = ap.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    # One scratch directory for every rank: ZeRO writes per-rank files into the same checkpoint.
    with tempfile.TemporaryDirectory(prefix="moga_bench_") as base:
        mp.start_processes(_worker, args=(args.nproc, port, args.config, args.steps, args.rounds, base, queue),
                           nprocs=args.nproc, join=True, start_method="spawn")
    res = queue.get()
    moga, adamw = statistics.median(res["moga"]), statistics.median(res["adamw"])
    print(f"rounds: moga {[round(x) for x in res['moga']]} adamw {[round(x) for x in res['adamw']]} tokens/s")
    print(f"train: moga_tokens_per_s={moga:.0f} adamw_tokens_per_s={adamw:.0f} moga/adamw={moga / adamw:.3f}")
