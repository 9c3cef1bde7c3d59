"""MOGA as a torch.optim citizen: the generic checks torch's OptimizerInfo tests run, that apply."""
import copy
import pickle

import pytest
import torch

from moga_dist import MOGA, NonFiniteGradientError, ShardLayout, TensorParallelSplit, param_groups
from moga_dist.core.reference import reference_step


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(10, 6), torch.nn.Linear(6, 8), torch.nn.Linear(8, 10)).to(dtype)


def _step(model, opt, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 10, (3, 4), generator=gen)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    opt.step()


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_steps_like_the_original(how):
    model = _model()
    opt = MOGA(param_groups(model, head="2"), lr=0.02, backend="torch")
    _step(model, opt, 1)
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    assert opt2.backend == "torch"
    _step(model, opt, 2)
    _step(model2, opt2, 2)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_a_copy_keeps_layouts_but_asks_for_process_groups():
    p = torch.nn.Parameter(torch.randn(4, 6))
    opt = MOGA([p], layouts={p: ShardLayout((4, 6), tp=TensorParallelSplit(1, 0, 1))})
    clone = copy.deepcopy(opt)
    q = clone.param_groups[0]["params"][0]
    assert clone.layout_of(q) == opt.layout_of(p)


def test_complex_parameters_are_refused():
    with pytest.raises(ValueError, match="complex"):
        MOGA([torch.nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))])


@pytest.mark.parametrize("shape", [(5, 0), (0, 0), (2, 0, 3), (0,), ()])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_empty_and_zero_dimension_shapes_step(shape, backend):
    p = torch.nn.Parameter(torch.randn(shape))
    opt = MOGA([p], backend=backend)
    p.grad = torch.randn(shape)
    opt.step()
    assert p.shape == shape and torch.isfinite(p).all()


def test_float64_parameters_keep_float64():
    p = torch.nn.Parameter(torch.randn(7, 5, dtype=torch.float64))
    before = p.detach().clone()
    opt = MOGA([p], lr=0.0, weight_decay=0.0)
    p.grad = torch.randn(7, 5, dtype=torch.float64)
    opt.step()
    assert torch.equal(p, before)                      # lr 0: not rounded to float32 either
    assert opt.state[p]["momentum_buffer"].dtype == torch.float64
    opt.param_groups[0]["lr"] = 0.02
    g = torch.randn(7, 5, dtype=torch.float64)
    p.grad = g
    m = opt.state[p]["momentum_buffer"].clone()
    opt.step()
    want, _ = reference_step(before, g, m, "hidden", lr=0.02, weight_decay=0.0)
    assert (p - want).abs().max().item() <= 1e-6 * (want - before).abs().max().item()


def test_a_refused_step_does_not_advance_the_step_counter():
    p = torch.nn.Parameter(torch.randn(3, 4))
    opt = MOGA([p])
    p.grad = torch.full((3, 4), float("nan"))
    with pytest.raises(NonFiniteGradientError):
        opt.step()
    assert opt.state[p]["step"] == 0
    p.grad = torch.randn(3, 4)
    opt.step()
    assert opt.state[p]["step"] == 1


def test_switching_backend_between_steps_reaches_the_step():
    p = torch.nn.Parameter(torch.randn(6, 5))
    opt = MOGA([p])
    p.grad = torch.randn(6, 5)
    opt.step()
    assert set(opt.last_program.backend_of.values()) == {"cpu"}
    opt.backend = "torch"
    p.grad = torch.randn(6, 5)
    opt.step()
    assert set(opt.last_program.backend_of.values()) == {"torch"}


def test_lookahead_buffer_does_not_outlive_the_step():
    p = torch.nn.Parameter(torch.randn(6, 5))
    opt = MOGA([p], lookahead=0.9)
    p.grad = torch.randn(6, 5)
    opt.step()
    assert all(pc.lookahead_buffer is None and pc.grad is None for pc in opt.last_program.pieces)


def test_closure_zero_grad_and_no_gradient():
    model = _model()
    opt = MOGA(param_groups(model, head="2"))
    x = torch.randint(0, 10, (2, 3))

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
        loss.backward()
        return loss

    assert torch.is_tensor(opt.step(closure))
    opt.zero_grad()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()                                          # no gradients: nothing moves
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
