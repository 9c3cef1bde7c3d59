"""Optional fused CPU kernels, JIT-built once with torch.utils.cpp_extension.

`ops()` returns torch.ops.moga_dist when the build works and None otherwise (no compiler, no
ninja, MOGA_DIST_NO_KERNELS=1; `unavailable_reason()` says which): callers then use the pure-torch
path, which computes the same update and which the tests compare against.

The build uses -march=native, so its cache entry is named after the CPU (`cpu_key()`): nodes of
another CPU model sharing a home directory build their own instead of loading one that may use
instructions they lack.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..core import piece as P

_STATE: dict = {}


def cpu_key(cpuinfo: str | None = None) -> str:
    """12 hex digits naming this CPU for a -march=native build: the machine type plus the model and
    feature lines of the first processor in /proc/cpuinfo (`cpuinfo` overrides the file's text)."""
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
        # Also keyed by the source's path: torch rebuilds an entry in place when its build file
        # changes, and two installs sharing a home (worktrees, venvs) would rebuild each other's
        # library under processes that have it mapped (seen: a gloo rank crashing mid-test).
        where = hashlib.sha256(str(src.resolve()).encode()).hexdigest()[:8]
        cpp_extension.load(
            name=f"moga_dist_kernels_{cpu_key()}_{where}",
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


@dataclass
class _Call:
    """One batched kernel call: kind in {sign, rows_local, rows, cols}; per run its piece index,
    run (None: the whole flat piece) and scale; the tensor and offset lists are fixed, decay and
    alpha are refreshed every step."""

    kind: str
    eps: float
    p: list = field(default_factory=list)
    m: list = field(default_factory=list)
    w: list = field(default_factory=list)
    off: list = field(default_factory=list)
    src: list = field(default_factory=list)
    decay: list = field(default_factory=list)
    alpha: list = field(default_factory=list)


class CpuBackend:
    """The fused C++ kernels over every piece they accept: one call per kind and eps per phase.

    Why argument lists prepared once: at small widths a step's Python (views and lists) cost as
    much as 20% of the kernel time."""

    def __init__(self, pieces: list, stats):
        self.pieces, self.stats = pieces, stats
        # sign_ab and the row kernels store their sums; the column kernels add into them.
        self._needs_zero = not all(P.overwrites_every_slot(pc, ("sign", "rows_local", "rows")) for pc in pieces)
        self.calls_a: dict[tuple, _Call] = {}
        self.calls_b: dict[tuple, _Call] = {}
        self.offsets, off = [], 0
        for k, pc in enumerate(pieces):
            self.offsets.append(off)
            kind = pc.kind
            targets = [self.calls_a] + ([self.calls_b] if kind in ("rows", "cols") else [])
            for calls in targets:
                call = calls.setdefault((kind, pc.eps), _Call(kind, pc.eps))
                for run in pc.plan.runs if pc.plan is not None else [None]:
                    call.p.append(P.run_view(pc.param, run))
                    call.m.append(P.run_view(pc.momentum, run))
                    call.w.append(1.0 - pc.beta)
                    call.off.append(off + (run.stat_start if run is not None else 0))
                    call.src.append((k, run, pc.scale_of(run)))
            off += P.stats_size(pc)

    def _bind(self) -> None:
        """This step's lr and decay (set on the pieces) into every call's coefficient lists."""
        pieces = self.pieces
        for call in (*self.calls_a.values(), *self.calls_b.values()):
            call.alpha = [pieces[k].lr * scale for k, _, scale in call.src]
            call.decay = [pieces[k].decay for k, _, _ in call.src]

    def phase_a(self) -> None:
        self._bind()
        if self._needs_zero:
            self.stats.zero_()
        op, pieces, stats = ops(), self.pieces, self.stats
        for c in self.calls_a.values():
            # The gradients are read every step and not kept: the caller may free them.
            g = [P.run_view(pieces[k].grad, run) for k, run, _ in c.src]
            if c.kind == "sign":
                op.sign_ab(c.p, c.m, g, c.w, stats, c.off, c.decay, c.alpha)
            elif c.kind == "rows_local":
                op.rows_ab(c.p, c.m, g, c.w, stats, c.off, c.decay, c.alpha, c.eps)
            else:
                getattr(op, f"{c.kind}_a")(c.m, g, c.w, stats, c.off)

    def phase_b(self, refused=None) -> None:
        P.gated(self.pieces, refused, self._phase_b, skip_when_refused=True)

    def undo(self, refused=None) -> None:
        P.gated(self.pieces, refused, self._undo, skip_when_refused=False)

    def _phase_b(self) -> None:
        op = ops()
        for c in self.calls_b.values():
            getattr(op, f"{c.kind}_b")(c.p, c.m, self.stats, c.off, c.decay, c.alpha, c.eps)

    def _undo(self) -> None:
        for pc, off in zip(self.pieces, self.offsets):
            if pc.one_pass:
                P.undo_one_pass(pc, self.stats[off:off + P.stats_size(pc)])
            P.undo_momentum(pc)
