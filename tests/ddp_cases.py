"""Worker for the DDP test: MOGA under torch's DistributedDataParallel on 2 gloo ranks."""
import torch
import torch.distributed as dist

from moga_dist import MOGA, param_groups


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(12, 8), torch.nn.Linear(8, 16), torch.nn.SiLU(),
                               torch.nn.Linear(16, 12))


def batches(steps, world):
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 12, (world * 2, 5), generator=gen) for _ in range(steps)]


def loss_of(net, x):
    return torch.nn.functional.cross_entropy(net(x).flatten(0, 1), x.flatten())


def ddp_worker(rank, world, out_path):
    net = torch.nn.parallel.DistributedDataParallel(model())
    opt = MOGA(param_groups(net.module, head="3"), lr=0.02)
    for x in batches(3, world):
        opt.zero_grad()
        loss_of(net, x.chunk(world)[rank]).backward()     # DDP averages the gradients
        opt.step()
    assert all("momentum_buffer" in opt.state[p] for p in net.parameters())
    if rank == 0:
        torch.save([p.detach() for p in net.parameters()], out_path)
    dist.barrier()
