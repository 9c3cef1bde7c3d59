"""Who am I: rank discovery under torchrun, the deepspeed launcher and mpirun (via mpi4py)."""
from __future__ import annotations

import os

MPI_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")


def discover() -> dict:
    """Fill RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT in os.environ and return them.

    torchrun and the deepspeed launcher set them already; under mpirun they come from mpi4py
    (MASTER_ADDR defaults to 127.0.0.1 rather than DeepSpeed's `hostname -I` guess, which picks an
    external interface)."""
    if "RANK" not in os.environ and any(v in os.environ for v in MPI_VARS):
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        rank, size = comm.Get_rank(), comm.Get_size()
        local = comm.Split_type(MPI.COMM_TYPE_SHARED)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(local.Get_rank()),
                          LOCAL_WORLD_SIZE=str(local.Get_size()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    return {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}


def cpu_threads(local_world: int) -> None:
    """Split the cores between the processes of this node."""
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local_world, 1)))
