"""Optional fused CPU kernels, JIT-built once with torch.utils.cpp_extension.

`ops()` returns torch.ops.moga_dist when the build works and None otherwise (no compiler, no
ninja, MOGA_DIST_NO_KERNELS=1): callers then use the pure-torch path, which computes the same
update and which the tests compare against.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

_STATE: dict = {}


def ops():
    """The loaded kernel namespace, or None when unavailable (built at most once per process)."""
    if "ops" in _STATE:
        return _STATE["ops"]
    _STATE["ops"] = None
    if os.environ.get("MOGA_DIST_NO_KERNELS", "") not in ("", "0"):
        return None
    try:
        import torch
        from torch.utils import cpp_extension

        src = Path(__file__).with_name("moga_kernels.cpp")
        cpp_extension.load(
            name="moga_dist_kernels",
            sources=[str(src)],
            # -fopenmp: at::parallel_for is an inline OpenMP region; without it the kernels run serially.
            extra_cflags=["-O3", "-fopenmp", "-march=native", "-ffp-contract=fast"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
        _STATE["ops"] = torch.ops.moga_dist
    except Exception as exc:  # noqa: BLE001 - any build failure means: use the torch path
        warnings.warn(f"moga_dist: fused CPU kernels unavailable ({type(exc).__name__}: {exc}); "
                      "using the pure-torch path", RuntimeWarning, stacklevel=2)
    return _STATE["ops"]
