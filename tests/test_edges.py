"""Edges of the optimizer's interface found by issue 20: float64 math end to end, complex tensors
on every path into the param groups, lr * weight_decay >= 1, a Tensor lr."""
import pytest
import torch

from moga_dist import MOGA
from moga_dist.core.reference import reference_step


def _steps(opt, params, grads):
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("norm", ["row", "col"])
def test_float64_parameters_get_float64_math(backend, norm):
    """The statistics of a float64 piece are float64 too (they were fp32: ~1e-8 from float64)."""
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(9, 7, generator=gen, dtype=torch.float64)
    grads = [[torch.randn(9, 7, generator=gen, dtype=torch.float64)] for _ in range(3)]
    p = torch.nn.Parameter(w0.clone())
    opt = MOGA([p], lr=0.02, norm=norm, backend=backend)
    _steps(opt, [p], grads)
    w, m = w0.clone(), torch.zeros_like(w0)
    for (g,) in grads:
        w, m = reference_step(w, g, m, "hidden", lr=0.02, norm=norm)
    err = ((p.detach() - w).abs().max() / (w - w0).abs().max()).item()
    assert err <= 1e-14, err
    assert all(st.dtype == torch.float64 for st in opt.last_program.stats)


def test_float64_and_fp32_pieces_share_a_program():
    """Mixed dtypes: fp32 pieces keep the fused kernels and an fp32 arena, float64 ones get their own."""
    gen = torch.Generator().manual_seed(1)
    a = torch.nn.Parameter(torch.randn(5, 4, generator=gen, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(5, 4, generator=gen))
    opt = MOGA([a, b], lr=0.02)
    a.grad, b.grad = torch.randn(5, 4, generator=gen, dtype=torch.float64), torch.randn(5, 4, generator=gen)
    w = reference_step(a.detach().clone(), a.grad, torch.zeros_like(a), "hidden", lr=0.02)[0]
    opt.step()
    assert (a.detach() - w).abs().max().item() <= 1e-15
    assert [st.dtype for st in opt.last_program.stats] == [torch.float64, torch.float32]


def _complex():
    return torch.nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))


@pytest.mark.parametrize("make", [
    lambda: MOGA([("w", _complex())]),
    lambda: MOGA([{"params": [("w", _complex())]}]),
    lambda: MOGA([("v", torch.nn.Parameter(torch.zeros(2)))]).add_param_group({"params": [("w", _complex())]}),
    lambda: MOGA([torch.nn.Parameter(torch.zeros(2))]).add_param_group({"params": _complex()}),
    lambda: MOGA([torch.nn.Parameter(torch.zeros(2))]).replace_param_groups([{"params": [_complex()]}]),
], ids=["named", "named_group", "add_named", "add_tensor", "replace_param_groups"])
def test_complex_parameters_are_refused_on_every_path(make):
    with pytest.raises(ValueError, match="complex"):
        make()


def test_a_refused_add_param_group_leaves_the_groups_as_they_were():
    opt = MOGA([("v", torch.nn.Parameter(torch.zeros(2)))])
    with pytest.raises(ValueError, match="'w' of a group is complex"):
        opt.add_param_group({"params": [("w", _complex())]})
    assert len(opt.param_groups) == 1


def test_lr_times_weight_decay_of_one_or_more_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"lr=10.0 with weight_decay=0.1 .* allowed: lr\*weight_decay < 1"):
        MOGA([torch.nn.Parameter(torch.zeros(2, 2))], lr=10.0, weight_decay=0.1)
    MOGA([torch.nn.Parameter(torch.zeros(2, 2))], lr=10.0, weight_decay=0.0)      # no decay: any lr


def test_a_schedule_raising_lr_times_weight_decay_to_one_is_refused_before_any_write():
    """A refused step's undo divides by 1 - lr*wd; at 0 or below it could not restore the weights."""
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = MOGA([p], lr=0.02, weight_decay=0.5)
    p.grad = torch.randn(4, 3)
    opt.step()
    before, mom = p.detach().clone(), opt.state[p]["momentum_buffer"].clone()
    opt.param_groups[0]["lr"] = 2.0                     # what a scheduler does
    with pytest.raises(ValueError, match=r"lr=2.0 with weight_decay=0.5"):
        opt.step()
    assert torch.equal(p.detach(), before) and torch.equal(opt.state[p]["momentum_buffer"], mom)
    assert opt.state[p]["step"] == 1


def test_a_tensor_lr_is_accepted_and_read_every_step():
    gen = torch.Generator().manual_seed(2)
    grads = [[torch.randn(4, 3, generator=gen), torch.randn(3, generator=gen)] for _ in range(3)]
    init = [torch.randn(4, 3, generator=gen), torch.randn(3, generator=gen)]
    runs = []
    for lr in (torch.tensor(0.02, dtype=torch.float64), 0.02):      # float64: the same value as the float
        params = [torch.nn.Parameter(x.clone()) for x in init]
        opt = MOGA(params, lr=lr)
        for k, step in enumerate(grads):
            if isinstance(lr, torch.Tensor):
                lr.fill_(0.02 * (k + 1))               # in place, as a capturable scheduler does
            else:
                opt.param_groups[0]["lr"] = 0.02 * (k + 1)
            _steps(opt, params, [step])
        runs.append([p.detach() for p in params])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("lr", [torch.tensor([0.1]), torch.tensor(1, dtype=torch.int64), torch.tensor(-0.1),
                                torch.tensor(0.1 + 0j)])
def test_a_bad_tensor_lr_is_refused(lr):
    with pytest.raises(ValueError, match="lr="):
        MOGA([torch.nn.Parameter(torch.zeros(2, 2))], lr=lr)
