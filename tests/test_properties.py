"""Properties of MOGA's update that hold for every shape and value (hypothesis draws them):
scale invariance, permutation equivariance, zero in -> decay only out, and the exact row/column
norms of the update. Each runs on the torch loop and the fused CPU kernels."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moga_dist import MOGA

BACKENDS = ["torch", "cpu"]
dims = st.integers(min_value=1, max_value=24)
seeds = st.integers(min_value=0, max_value=2**31 - 1)
SETTINGS = settings(max_examples=20, deadline=None)


def _update(w, g, norm, backend, lr=0.05, weight_decay=0.0, momentum=0.9):
    """W_1 - W_0 after one step from zero momentum."""
    p = torch.nn.Parameter(w.clone())
    opt = MOGA([p], lr=lr, weight_decay=weight_decay, momentum=momentum, norm=norm, backend=backend)
    p.grad = g.clone()
    opt.step()
    return p.detach() - w


def _tensors(rows, cols, seed):
    gen = torch.Generator().manual_seed(seed)
    # gradients well above eps, so eps never decides a norm
    return torch.randn(rows, cols, generator=gen), torch.randn(rows, cols, generator=gen) + 0.5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["row", "col"])
@SETTINGS
@given(rows=dims, cols=dims, seed=seeds, scale=st.floats(min_value=1e-3, max_value=1e3))
def test_update_is_invariant_to_the_gradient_scale(backend, norm, rows, cols, seed, scale):
    w, g = _tensors(rows, cols, seed)
    a, b = _update(w, g, norm, backend), _update(w, g * scale, norm, backend)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["row", "col"])
@SETTINGS
@given(rows=dims, cols=dims, seed=seeds)
def test_update_is_permutation_equivariant(backend, norm, rows, cols, seed):
    w, g = _tensors(rows, cols, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    pr, pc = torch.randperm(rows, generator=gen), torch.randperm(cols, generator=gen)
    a = _update(w, g, norm, backend)
    b = _update(w[pr][:, pc].contiguous(), g[pr][:, pc].contiguous(), norm, backend)
    assert torch.allclose(a[pr][:, pc], b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("role", ["hidden", "embedding", "vector"])
@SETTINGS
@given(rows=dims, cols=dims, seed=seeds)
def test_zero_gradient_and_momentum_give_weight_decay_alone(backend, role, rows, cols, seed):
    w, _ = _tensors(rows, cols, seed)
    p = torch.nn.Parameter(w.clone())
    opt = MOGA([{"params": [p], "role": role}], lr=0.05, weight_decay=0.1, backend=backend)
    p.grad = torch.zeros_like(w)
    opt.step()
    decayed = w * (1 - 0.05 * 0.1) if role != "vector" else w
    assert torch.allclose(p.detach(), decayed, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["row", "col"])
@SETTINGS
@given(rows=dims, cols=dims, seed=seeds)
def test_every_row_or_column_of_the_update_has_the_width_aware_norm(backend, norm, rows, cols, seed):
    w, g = _tensors(rows, cols, seed)
    upd = _update(w, g, norm, backend, lr=0.05)
    if norm == "row":     # lr * hidden_mult * d_in^(-1/2) per row
        got, want = upd.norm(dim=1), 0.05 * 20.0 / math.sqrt(cols)
    else:                 # lr * hidden_mult * sqrt(d_out) / d_in per column
        got, want = upd.norm(dim=0), 0.05 * 20.0 * math.sqrt(rows) / cols
    assert torch.allclose(got, torch.full_like(got, want), rtol=1e-5)
