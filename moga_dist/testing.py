"""Running N gloo ranks as processes on one machine, without a launcher: what the tests and the
benchmarks use to exercise the distributed code on CPU.

Each rank gets torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), one
intra-op thread, and faulthandler, so a rank that dies in C++ still shows where. A rank that
raises prints its own traceback: mp.spawn reports only the first rank it sees fail, which is often
a peer that aborted because this rank left a collective.
"""
from __future__ import annotations

import os
import socket
import sys
import traceback


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for the rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, init: bool, fn, args) -> None:
    import faulthandler

    faulthandler.enable(all_threads=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), GLOO_SOCKET_IFNAME="lo")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if init:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        # Drain work an engine left in flight (DeepSpeed's async all-gathers): a gloo worker that
        # drops a finished work during interpreter shutdown needs the GIL and aborts the process.
        if dist.is_initialized():
            dist.barrier()
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(world: int, fn, *args, init_process_group: bool = True) -> None:
    """Run fn(rank, world, *args) on `world` processes (fn must be importable: spawn start method).

    init_process_group: create the default gloo group first (False when fn brings up its own, as
    the training loop does). A failure on any rank raises here."""
    import torch.multiprocessing as mp

    mp.start_processes(_entry, args=(world, free_port(), init_process_group, fn, args), nprocs=world,
                       join=True, start_method="spawn")
