"""`python -m moga_dist.bench train`: the main job with MOGA and with DeepSpeed's AdamW, side by
side in one invocation (alternating A/B/A/B on the same 2 gloo ranks), tokens/s of each."""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile

import torch.multiprocessing as mp

from moga_dist.testing import spawn


def _worker(rank, world, preset, steps, rounds, base, queue):
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
    queue = mp.get_context("spawn").SimpleQueue()
    # One scratch directory for every rank: ZeRO writes per-rank files into the same checkpoint.
    with tempfile.TemporaryDirectory(prefix="moga_bench_") as base:
        # The training loop brings up its own process group (as under a real launcher).
        spawn(args.nproc, _worker, args.config, args.steps, args.rounds, base, queue, init_process_group=False)
    res = queue.get()
    moga, adamw = statistics.median(res["moga"]), statistics.median(res["adamw"])
    print(f"rounds: moga {[round(x) for x in res['moga']]} adamw {[round(x) for x in res['adamw']]} tokens/s")
    print(f"train: moga_tokens_per_s={moga:.0f} adamw_tokens_per_s={adamw:.0f} moga/adamw={moga / adamw:.3f}")
