"""Backends (torch loop, CPU C++, Triton) against the float64 reference; device placement; the
sync-free step; launches per step. Triton runs on CPU through its interpreter (conftest.py)."""
import pytest
import torch

from moga_dist import MOGA, ShardLayout, TensorParallelSplit
from moga_dist.core.reference import reference_step
from moga_dist.kernels import triton as K

# Rows longer than a Triton block (1024), widths that are no multiple of a block or tile, an empty
# weight and a zero-width one, odd vectors.
SHAPES = [((3, 2100), "hidden"), ((37, 23), "hidden"), ((0, 5), "hidden"), ((4, 0), "hidden"),
          ((19,), "vector"), ((9, 7), "embedding")]


def _steps(backend, norm, dtype=torch.float32, steps=3, sync_free=False, nan_at=None):
    gen = torch.Generator().manual_seed(7)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s, _ in SHAPES]
    groups = [{"params": [p], "role": r} for p, (_, r) in zip(params, SHAPES)]
    opt = MOGA(groups, lr=0.02, norm=norm, backend=backend, sync_free=sync_free)
    ref = [(p.detach().double().clone(), torch.zeros(p.shape, dtype=torch.float64)) for p in params]
    for k in range(steps):
        grads = [torch.randn(s, generator=gen).to(dtype) for s, _ in SHAPES]
        if k == nan_at:
            grads[1][2, 3] = float("nan")
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        if k != nan_at:
            ref = [reference_step(w, g.double(), m, r, lr=0.02, norm=norm) for (w, m), g, (_, r)
                   in zip(ref, grads, SHAPES)]
            ref = [(w.to(dtype).double(), m) for w, m in ref]
    return opt, params, ref


@pytest.mark.parametrize("norm", ["row", "col"])
@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_backend_matches_float64_on_odd_and_empty_shapes(backend, norm):
    opt, params, ref = _steps(backend, norm)
    for p, (w, _) in zip(params, ref):
        assert p.shape == w.shape
        if p.numel():
            err = (p.double() - w).abs().max().item()
            assert err <= 2e-6 * max(1.0, w.abs().max().item()), (backend, norm, tuple(p.shape), err)
    used = set(opt.last_program.backend_of.values())
    assert backend in used, used          # the backend asked for really computed pieces


@pytest.mark.parametrize("norm", ["row", "col"])
def test_triton_bf16_rounds_like_the_reference(norm):
    # bf16 weights: the oracle rounds to bf16 after each step like the kernel; both round to nearest
    # even, so they agree to one bf16 ulp of the element's magnitude plus the steps' movement.
    _, params, ref = _steps("triton", norm, dtype=torch.bfloat16)
    for p, (w, _) in zip(params, ref):
        if p.numel():
            assert p.dtype == torch.bfloat16
            assert ((p.double() - w).abs() <= 2 ** -7 * (w.abs() + 3 * 0.02 * 20)).all()


def test_allocations_land_on_the_parameters_device():
    # Every buffer MOGA makes (arena, ghosts, verdict) must name the parameters' device: under a
    # meta default device, one that does not would be created on meta and the step would fail.
    p = torch.nn.Parameter(torch.randn(6, 4))
    v = torch.nn.Parameter(torch.randn(4))
    opt = MOGA([{"params": [p]}, {"params": [v], "role": "vector"}], lr=0.02)
    p.grad, v.grad = torch.randn(6, 4), torch.randn(4)
    with torch.device("meta"):
        opt.step()
    assert opt.state[p]["momentum_buffer"].device.type == "cpu" and torch.isfinite(p).all()


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_sync_free_step_never_asks_the_host(backend):
    opt, params, _ = _steps(backend, "row", sync_free=True, steps=1)
    for p in params:
        p.grad = torch.randn(p.shape)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    names = [e.name for e in prof.events()]
    assert not [n for n in names if n in ("aten::item", "aten::_local_scalar_dense", "aten::is_nonzero")], \
        sorted(set(names))


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_sync_free_skips_a_non_finite_step_on_every_tensor_and_counts_it(backend):
    opt, params, ref = _steps(backend, "row", sync_free=True, steps=3, nan_at=1)
    assert float(opt.skipped_steps) == 1.0
    # The NaN entry's momentum cannot be recovered and restarts at 0 (documented), which changes
    # its row's later updates; every other row (row norms are independent) equals skipping the batch.
    params[1], ref[1] = params[1][[0, 1, *range(3, 37)]], (ref[1][0][[0, 1, *range(3, 37)]], None)
    for p, (w, _) in zip(params, ref):
        if p.numel():
            err = (p.double() - w).abs().max().item()
            assert err <= 1e-5 * max(1.0, w.abs().max().item()), (tuple(p.shape), err)


def test_triton_launches_per_step_do_not_grow_with_the_parameter_count(monkeypatch):
    launched = []

    class Counting:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launched.append(grid)
            return self.kernel[grid]

    for name in ("rows_kernel", "cols_kernel", "sign_kernel"):
        monkeypatch.setattr(K, name, Counting(getattr(K, name)))

    def launches(n_layers, norm):
        params = [torch.nn.Parameter(torch.randn(8, 6)) for _ in range(n_layers)] + \
                 [torch.nn.Parameter(torch.randn(6)) for _ in range(n_layers)]
        opt = MOGA([{"params": params[:n_layers]}, {"params": params[n_layers:], "role": "vector"}],
                   backend="triton", norm=norm)
        for p in params:
            p.grad = torch.randn(p.shape)
        opt.step()
        launched.clear()
        opt.step()
        return len(launched)

    for norm in ("row", "col"):
        assert launches(2, norm) == launches(24, norm) <= 3


def test_triton_refused_step_is_undone_by_the_kernels():
    from moga_dist import NonFiniteGradientError

    p = torch.nn.Parameter(torch.randn(5, 7))
    opt = MOGA([p], backend="triton", lr=0.02)
    p.grad = torch.randn(5, 7)
    opt.step()
    before, mom = p.detach().clone(), opt.state[p]["momentum_buffer"].clone()
    p.grad = torch.randn(5, 7)
    p.grad[3, 1] = float("inf")
    with pytest.raises(NonFiniteGradientError):
        opt.step()
    assert torch.allclose(p, before, rtol=1e-6, atol=1e-7)
    assert torch.equal(p[3], before[3])                    # the row holding the Inf was never written
    fine = torch.isfinite(p.grad)
    assert torch.allclose(opt.state[p]["momentum_buffer"][fine], mom[fine], rtol=1e-5, atol=1e-7)
    assert opt.state[p]["step"] == 1


def test_tp_layout_on_meta_default_device_reduces_on_the_parameters_device():
    # One rank, a TP "group" of one: the layout path (plans, arena, verdict) without collectives.
    p = torch.nn.Parameter(torch.randn(4, 6))
    opt = MOGA([p], layouts={p: ShardLayout((4, 6), tp=TensorParallelSplit(1, 0, 1))})
    p.grad = torch.randn(4, 6)
    with torch.device("meta"):
        opt.step()
    assert p.device.type == "cpu"


def test_the_gpu_checks_exactness_part_runs_on_cpu_tensors():
    # bench gpu (a) on CPU tensors through Triton's interpreter: the same code the GPU check runs,
    # at a small width. The timing, 2-rank and CUDA-graph parts need a GPU.
    from moga_dist.bench.gpu import check_exactness
    from moga_dist.bench.step import llama_layer_shapes

    assert check_exactness(llama_layer_shapes(32), torch.device("cpu")) < 1e-4


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_the_functional_step_equals_the_optimizer(backend):
    from moga_dist.core.functional import Piece, moga
    from moga_dist.core.plan import build_plan
    from moga_dist.core.scaling import update_scales

    gen = torch.Generator().manual_seed(3)
    w, g = torch.randn(9, 13, generator=gen), torch.randn(9, 13, generator=gen)
    p = torch.nn.Parameter(w.clone())
    opt = MOGA([p], lr=0.02, momentum=0.9, weight_decay=0.1)
    p.grad = g.clone()
    opt.step()
    layout = ShardLayout((9, 13))
    piece = Piece(param=w.clone(), grad=g.clone(), momentum=torch.zeros(9, 13), plan=build_plan(layout, "row"),
                  exponent=2.0, beta=0.9, lookahead=None, lr=0.02, decay=1 - 0.02 * 0.1, eps=1e-8,
                  scales=update_scales("hidden", "row", (9, 13), p=2.0, q=2.0, mult=20.0))
    verdict = moga([piece], backend=backend)
    assert verdict.refused is False
    assert torch.allclose(piece.param, p.detach(), rtol=1e-6, atol=1e-7)
