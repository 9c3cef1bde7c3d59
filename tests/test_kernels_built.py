"""The fused CPU kernels: built (where CI requires them) and actually called by a default MOGA step,
and their JIT cache named after the CPU so a -march=native build never reaches another CPU model.

Without MOGA_DIST_REQUIRE_KERNELS=1 or CI=true a machine without a compiler skips the first two;
with either set, a failed build fails here instead of silently comparing the fallback with itself.
"""
import os

import pytest
import torch

from moga_dist import MOGA
from moga_dist.kernels import cpu

REQUIRED = os.environ.get("MOGA_DIST_REQUIRE_KERNELS", "") == "1" or os.environ.get("CI", "").lower() == "true"


def _ops_or_skip():
    ops = cpu.ops()
    if ops is None:
        if REQUIRED:
            pytest.fail(f"fused CPU kernels required (MOGA_DIST_REQUIRE_KERNELS=1 or CI=true) but not built: "
                        f"{cpu.unavailable_reason()}")
        pytest.skip(f"fused CPU kernels unavailable: {cpu.unavailable_reason()}")
    return ops


def test_kernels_are_built():
    ops = _ops_or_skip()
    assert hasattr(ops, "rows_ab") and hasattr(ops, "sign_ab")


def test_default_step_calls_the_fused_kernels():
    _ops_or_skip()
    torch.manual_seed(0)
    hidden, bias = torch.nn.Parameter(torch.randn(16, 8)), torch.nn.Parameter(torch.randn(16))
    opt = MOGA([{"params": [hidden], "role": "hidden"}, {"params": [bias], "role": "vector"}], lr=0.01)
    hidden.grad, bias.grad = torch.randn(16, 8), torch.randn(16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    called = {e.key for e in prof.key_averages() if e.key.startswith("moga_dist::")}
    assert called, "a default MOGA step on fp32 CPU tensors ran no moga_dist:: kernel"


@pytest.mark.parametrize("other", ["flags: fpu sse avx2 avx512f", "model name: Other CPU\nflags: fpu sse avx2"],
                         ids=["more-flags", "other-model"])
def test_cache_name_differs_per_cpu(other):
    base = "model name: Some CPU\nflags: fpu sse avx2"
    assert cpu.cpu_key(base) == cpu.cpu_key("model name: Some CPU\nflags: avx2 sse fpu\n\nprocessor: 1")
    assert cpu.cpu_key(base) != cpu.cpu_key(other if "model" in other else f"model name: Some CPU\n{other}")
