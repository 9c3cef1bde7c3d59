"""MOGA under DistributedDataParallel equals single-process MOGA on the same global batches."""
import pytest
import torch

from ddp_cases import batches, ddp_worker, loss_of, model
from dist_utils import spawn
from moga_dist import MOGA, param_groups


@pytest.mark.distributed
def test_ddp_equals_single_process(tmp_path):
    out = tmp_path / "ddp.pt"
    spawn(2, ddp_worker, str(out))
    net = model()
    opt = MOGA(param_groups(net, head="3"), lr=0.02)
    for x in batches(3, 2):
        opt.zero_grad()
        # the mean over both ranks' halves, as DDP's averaged gradient
        (0.5 * (loss_of(net, x.chunk(2)[0]) + loss_of(net, x.chunk(2)[1]))).backward()
        opt.step()
    got = torch.load(out, weights_only=True)
    for a, b in zip(got, net.parameters()):
        assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())
