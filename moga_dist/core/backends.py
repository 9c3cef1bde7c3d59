"""Backends of the MOGA step, chosen per piece by device, torch.optim's way (`adamw()` ->
`_single_tensor_adamw` / `_multi_tensor_adamw` / `_fused_adamw`).

Every backend is a class with one signature: `Backend(pieces, stats)` prepares its work once
(stats: the pieces' statistics, one contiguous fp32 or float64 vector of Σ stats_size), then each
step calls `phase_a()`, then `phase_b(refused)` or `undo(refused)` (refused: None, or the sync-free
device flag [1] the backend must honour). Each call re-reads the gradients, lr and decay from the
pieces. The names:
- "torch": the plain per-piece loop of piece.py, the readable reference the tests compare to;
  any device, any dtype, any exponent, lookahead.
- "cpu": the fused C++/OpenMP kernels (fp32, contiguous, CPU, exponent 2, no lookahead).
- "triton": the multi-tensor Triton kernels (CUDA; CPU tensors under TRITON_INTERPRET=1) for fp32
  or bf16 parameters and gradients, exponent 2, no lookahead.
"auto" picks triton for CUDA pieces, cpu for CPU pieces, and torch where the faster one does not
accept a piece (the same update, computed by the loop).
"""
from __future__ import annotations

import functools
import os

import torch

from . import piece as P
from .piece import Piece

BACKENDS = ("auto", "torch", "cpu", "triton")


@functools.cache
def triton_available() -> bool:
    """Whether the Triton backend can be imported (on CPU tensors it also needs TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _fused_math(piece: Piece) -> bool:
    return (piece.plan is None or piece.exponent == 2.0) and piece.lookahead is None


def accepts(backend: str, piece: Piece) -> bool:
    """Whether `backend` computes `piece` (else the torch loop does)."""
    if backend == "torch":
        return True
    if not _fused_math(piece) or piece.param.numel() == 0:
        return False
    if backend == "cpu":
        from ..kernels import cpu

        return (piece.param.dtype == torch.float32 and piece.grad.dtype == torch.float32
                and piece.param.is_contiguous() and piece.grad.is_contiguous() and piece.param.is_cpu
                and cpu.ops() is not None)
    if backend == "triton":
        on_device = piece.param.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
        return (on_device and triton_available() and piece.param.is_contiguous() and piece.grad.is_contiguous()
                and piece.param.dtype in (torch.float32, torch.bfloat16)
                and piece.grad.dtype in (torch.float32, torch.bfloat16))
    raise ValueError(f"backend={backend!r}: allowed {BACKENDS}")


def choose(requested: str, piece: Piece) -> str:
    """The backend that computes `piece`: `requested` where it accepts the piece, else torch."""
    if requested == "auto":
        requested = "triton" if piece.param.is_cuda else "cpu"
    return requested if accepts(requested, piece) else "torch"


def one_pass(backend: str, piece: Piece) -> bool:
    """Whether the backend updates the piece in phase A (every statistic of it is on this rank)."""
    return backend != "torch" and (piece.plan is None or (piece.plan.axis == "row" and not piece.plan.group_slots))


class TorchBackend:
    """The plain loop: piece.phase_a / phase_b per piece (`_single_tensor_adamw`'s place)."""

    def __init__(self, pieces: list[Piece], stats: torch.Tensor):
        self.pieces, self.stats = pieces, stats
        sizes = [P.stats_size(pc) for pc in pieces]
        self.views = list(stats.split(sizes)) if pieces else []

    def phase_a(self) -> None:
        self.stats.zero_()          # piece.phase_a adds into its statistics
        for pc, st in zip(self.pieces, self.views):
            P.phase_a(pc, st)

    def phase_b(self, refused: torch.Tensor | None = None) -> None:
        P.gated(self.pieces, refused, self._phase_b, skip_when_refused=True)

    def undo(self, refused: torch.Tensor | None = None) -> None:
        P.gated(self.pieces, refused, self._undo, skip_when_refused=False)

    def _phase_b(self) -> None:
        for pc, st in zip(self.pieces, self.views):
            P.phase_b(pc, st if pc.plan is None else P.inverse_denominators(st, pc.exponent, pc.eps))

    def _undo(self) -> None:
        for pc in self.pieces:
            P.undo_momentum(pc)


def make_backend(name: str, pieces: list[Piece], stats: torch.Tensor):
    """Backend `name` ("torch" | "cpu" | "triton") prepared for `pieces` and their statistics."""
    if name == "torch":
        return TorchBackend(pieces, stats)
    if name == "cpu":
        from ..kernels.cpu import CpuBackend

        return CpuBackend(pieces, stats)
    from ..kernels.triton_backend import TritonBackend

    return TritonBackend(pieces, stats)
