"""Backends of the MOGA step, chosen per piece by device, torch.optim's way (`adam()` ->
`_single_tensor_adam` / `_multi_tensor_adam` / `_fused_adam`).

Every backend builds `Batches` from (pieces, their offsets in the statistics arena) and offers the
same five calls: bind (after each step's gradients, lr and decay are set on the pieces), phase_a,
phase_b, undo and release. The names:
- "torch": the plain per-piece loop of functional.py, the readable reference the tests compare to;
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

from . import functional as F

BACKENDS = ("auto", "torch", "cpu", "triton")


@functools.cache
def triton_available() -> bool:
    """Whether the Triton backend can be imported (on CPU tensors it also needs TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _fused_math(piece: F.Piece) -> bool:
    return (piece.plan is None or piece.exponent == 2.0) and piece.lookahead is None


def accepts(backend: str, piece: F.Piece) -> bool:
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


def choose(requested: str, piece: F.Piece) -> str:
    """The backend that computes `piece`: `requested` where it accepts the piece, else torch."""
    if requested == "auto":
        requested = "triton" if piece.param.is_cuda else "cpu"
    return requested if accepts(requested, piece) else "torch"


def one_pass(backend: str, piece: F.Piece) -> bool:
    """Whether the backend updates the piece in phase A (every statistic of it is on this rank)."""
    return backend != "torch" and (piece.plan is None or (piece.plan.axis == "row" and not piece.plan.group_slots))


def kind_of(piece: F.Piece) -> str:
    """The fused kernels' kind of a piece: sign (no plan), rows_local (one pass), rows or cols."""
    if piece.plan is None:
        return "sign"
    return "rows_local" if piece.one_pass else f"{piece.plan.axis}s"


def overwrites_every_slot(piece: F.Piece, stored_kinds: tuple[str, ...]) -> bool:
    """Whether phase A of a backend whose kernels *store* (not add) the statistics of the kinds in
    `stored_kinds` rewrites every statistic slot of `piece`, so its arena needs no zeroing. The
    CPU and Triton batches both decide needs_zero with it (only their stored kinds differ)."""
    kind = kind_of(piece)
    if kind not in stored_kinds:
        return False
    return piece.plan is None or piece.plan.each_slot_once()


class TorchBatches:
    """The plain loop: functional.phase_a / phase_b per piece."""

    native_gate = False
    needs_zero = True       # functional.phase_a adds into its statistics

    def __init__(self, pieces: list[F.Piece], offsets: list[int]):
        self.pieces, self.offsets = pieces, offsets

    def bind(self) -> None:
        pass

    def release(self) -> None:
        pass

    def _stats(self, arena: torch.Tensor):
        for pc, off in zip(self.pieces, self.offsets):
            yield pc, arena[off:off + F.stats_size(pc)]

    def phase_a(self, arena: torch.Tensor) -> None:
        for pc, st in self._stats(arena):
            F.phase_a(pc, st)

    def phase_b(self, arena: torch.Tensor, refused: torch.Tensor | None = None) -> None:
        for pc, st in self._stats(arena):
            F.phase_b(pc, st if pc.plan is None else F.inverse_denominators(st, pc.exponent, pc.eps))

    def undo(self, arena: torch.Tensor, refused: torch.Tensor | None = None) -> None:
        for pc, _ in self._stats(arena):
            F.undo_momentum(pc)


def make_batches(backend: str, pieces: list[F.Piece], offsets: list[int]):
    """The backend's Batches over `pieces` (offsets: each piece's first slot in the arena)."""
    if backend == "torch":
        return TorchBatches(pieces, offsets)
    if backend == "cpu":
        from ..kernels.cpu import CpuBatches

        return CpuBatches(pieces, offsets)
    from ..kernels.triton_batches import TritonBatches

    return TritonBatches(pieces, offsets)
