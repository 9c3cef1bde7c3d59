"""Spawning gloo process groups inside pytest (no torchrun needed)."""
import os
import socket
import sys
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo")
    import faulthandler
    faulthandler.enable(all_threads=True)   # a rank that crashes in C++ still shows where
    import torch
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        # Drain work an engine left in flight (DeepSpeed's async all-gathers): a gloo worker that
        # drops a finished work during interpreter shutdown needs the GIL and aborts the process.
        dist.barrier()
    except BaseException:
        # mp.spawn reports only the first rank it sees fail, often a peer that aborted because
        # this rank left a collective: print every rank's own traceback so the cause is visible.
        traceback.print_exc()
        sys.stderr.flush()
        raise
    finally:
        dist.destroy_process_group()


def spawn(world: int, fn, *args) -> None:
    """Run fn(rank, world, *args) on `world` gloo ranks; a failure on any rank fails the caller."""
    mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)
