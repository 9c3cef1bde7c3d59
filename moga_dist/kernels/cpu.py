"""Optional fused CPU kernels, JIT-built once with torch.utils.cpp_extension.

`ops()` returns torch.ops.moga_dist when the build works and None otherwise (no compiler, no
ninja, MOGA_DIST_NO_KERNELS=1; `unavailable_reason()` says which): callers then use the pure-torch
path, which computes the same update and which the tests compare against.

The build uses -march=native, so its cache entry is named after the CPU (`cpu_key()`): nodes of
another CPU model sharing a home directory build their own instead of loading one that may use
instructions they lack.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

_STATE: dict = {}


def cpu_key(cpuinfo: str | None = None) -> str:
    """12 hex digits naming this CPU for a -march=native build: the machine type plus the model and
    feature lines of the first processor in /proc/cpuinfo (`cpuinfo` overrides the file's text)."""
    import hashlib
    import platform

    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:          # not Linux: the platform's own description is all there is
            cpuinfo = platform.processor()
    first = cpuinfo.split("\n\n")[0]
    keys = ("vendor_id", "cpu family", "model", "model name", "flags", "features", "cpu implementer",
            "cpu architecture", "cpu variant", "cpu part", "isa")
    lines = sorted(ln.split(":", 1)[0].strip().lower() + ":" + " ".join(sorted(ln.split(":", 1)[1].split()))
                   for ln in first.splitlines() if ":" in ln and ln.split(":", 1)[0].strip().lower() in keys)
    return hashlib.sha256("\n".join([platform.machine(), *lines]).encode()).hexdigest()[:12]


def unavailable_reason() -> str | None:
    """Why `ops()` returned None (None while the kernels are loaded or not yet tried)."""
    return _STATE.get("reason")


def ops():
    """The loaded kernel namespace, or None when unavailable (built at most once per process)."""
    if "ops" in _STATE:
        return _STATE["ops"]
    _STATE["ops"] = None
    if os.environ.get("MOGA_DIST_NO_KERNELS", "") not in ("", "0"):
        _STATE["reason"] = "MOGA_DIST_NO_KERNELS is set"
        return None
    try:
        import torch
        from torch.utils import cpp_extension

        src = Path(__file__).with_name("moga_kernels.cpp")
        cpp_extension.load(
            name=f"moga_dist_kernels_{cpu_key()}",
            sources=[str(src)],
            # -fopenmp: at::parallel_for is an inline OpenMP region; without it the kernels run serially.
            extra_cflags=["-O3", "-fopenmp", "-march=native", "-ffp-contract=fast"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
        _STATE["ops"] = torch.ops.moga_dist
    except Exception as exc:  # noqa: BLE001 - any build failure means: use the torch path
        _STATE["reason"] = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"moga_dist: fused CPU kernels unavailable ({type(exc).__name__}: {exc}); "
                      "using the pure-torch path", RuntimeWarning, stacklevel=2)
    return _STATE["ops"]
