"""A step's work, planned once: the pieces, their slots in one statistics arena, and the batched
kernel calls. MOGA rebuilds it only when a tensor or a shape-affecting setting changes; each step
then only binds the gradients and refreshes lr and decay.

Why: at small widths a step's Python (building pieces, views and argument lists, allocating and
splitting the arena) cost as much as 20% of the kernel time. Gradients are bound per step and
released afterwards, so the program never keeps a gradient alive that the caller freed
(``zero_grad(set_to_none=True)``). Must not import torch.distributed or any engine.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import functional as F
from ..kernels import cpu as kernels


@dataclass
class _Batch:
    """One batched kernel call: kind in {sign, rows_local, rows, cols}; per run its piece index,
    run (None: the whole flat piece) and scale; the tensor and offset lists are fixed."""

    kind: str
    eps: float
    p: list = field(default_factory=list)
    m: list = field(default_factory=list)
    w: list = field(default_factory=list)
    off: list = field(default_factory=list)
    src: list = field(default_factory=list)
    g: list = field(default_factory=list)
    decay: list = field(default_factory=list)
    alpha: list = field(default_factory=list)


def _kind(piece: F.Piece) -> str:
    if piece.plan is None:
        return "sign"
    return "rows_local" if piece.one_pass else f"{piece.plan.axis}s"


def _writes_every_slot(piece: F.Piece, fast: bool) -> bool:
    """Whether phase A overwrites (not accumulates into) every statistic slot of the piece (fast:
    it goes to the fused kernels), so the arena needs no zeroing between steps."""
    if piece.plan is None:
        return True
    if not fast or piece.plan.axis != "row":
        return False
    return sum(run.nrows for run in piece.plan.runs) == piece.plan.num_stats


class StepProgram:
    """The planned step for `owned` = [(owner tensor, span or None, Piece)] (grads unbound).

    arena: fp32 [Σ stats_size]; stats[k]: piece k's view of it."""

    def __init__(self, owned: list[tuple[torch.Tensor, tuple | None, F.Piece]], fused: bool):
        self.owned = owned
        self.pieces = [pc for _, _, pc in owned]
        self.owners = list({id(o): o for o, _, _ in owned}.values())
        # Filled in by the optimizer: validity signature, per-piece lr sources, owners' state
        # dicts, the (plan, stats) pairs to reduce (None until first needed) and ghost statistics.
        self.signature: tuple | None = None
        self.rates: list = []
        self.states: list[dict] = []
        self.reduce_items: list | None = None
        self.ghost_stats: torch.Tensor | None = None
        sizes = [F.stats_size(pc) for pc in self.pieces]
        offsets = [0]
        for n in sizes[:-1]:
            offsets.append(offsets[-1] + n)
        device = self.pieces[0].momentum.device if self.pieces else None
        self.arena = torch.zeros(sum(sizes), dtype=torch.float32, device=device)
        self.stats = list(self.arena.split(sizes))
        fast = [fused and pc.kernel for pc in self.pieces]
        self.needs_zero = not all(_writes_every_slot(pc, f) for pc, f in zip(self.pieces, fast))
        self.slow = [k for k, f in enumerate(fast) if not f]
        self.batches_a: dict[tuple, _Batch] = {}
        self.batches_b: dict[tuple, _Batch] = {}
        for k, (pc, off, f) in enumerate(zip(self.pieces, offsets, fast)):
            if not f:
                continue
            kind = _kind(pc)
            self._add(self.batches_a.setdefault((kind, pc.eps), _Batch(kind, pc.eps)), k, pc, off)
            if kind in ("rows", "cols"):
                self._add(self.batches_b.setdefault((kind, pc.eps), _Batch(kind, pc.eps)), k, pc, off)

    @staticmethod
    def _add(batch: _Batch, k: int, piece: F.Piece, off: int) -> None:
        for run in piece.plan.runs if piece.plan is not None else [None]:
            batch.p.append(F.run_view(piece.param, run))
            batch.m.append(F.run_view(piece.momentum, run))
            batch.w.append(1.0 - piece.beta)
            batch.off.append(off + (run.stat_start if run is not None else 0))
            batch.src.append((k, run, piece.scale_of(run)))

    def bind(self) -> None:
        """Point every piece and batch at this step's gradients and lr/decay (set on the pieces)."""
        for owner, span, pc in self.owned:
            grad = owner.grad
            pc.grad = grad if span is None else grad[span[0]:span[0] + span[1]]
        pieces = self.pieces
        for batch in (*self.batches_a.values(), *self.batches_b.values()):
            batch.alpha = [pieces[k].lr * scale for k, _, scale in batch.src]
            batch.decay = [pieces[k].decay for k, _, _ in batch.src]
        for batch in self.batches_a.values():
            batch.g = [F.run_view(pieces[k].grad, run) for k, run, _ in batch.src]

    def release(self) -> None:
        """Drop this step's gradient references."""
        for pc in self.pieces:
            pc.grad = None
        for batch in self.batches_a.values():
            batch.g = []

    def phase_a(self) -> None:
        """Momentum and partial statistics for every piece; one-pass pieces are also updated."""
        if self.needs_zero:
            self.arena.zero_()
        for k in self.slow:
            F.phase_a(self.pieces[k], self.stats[k])
        op = kernels.ops()
        for b in self.batches_a.values():
            if b.kind == "sign":
                op.sign_ab(b.p, b.m, b.g, b.w, self.arena, b.off, b.decay, b.alpha)
            elif b.kind == "rows_local":
                op.rows_ab(b.p, b.m, b.g, b.w, self.arena, b.off, b.decay, b.alpha, b.eps)
            else:
                getattr(op, f"{b.kind}_a")(b.m, b.g, b.w, self.arena, b.off)

    def phase_b(self) -> None:
        """The update of every piece not already updated in phase A, from the summed statistics."""
        for k in self.slow:
            pc, st = self.pieces[k], self.stats[k]
            F.phase_b(pc, st if pc.plan is None else F.inverse_denominators(st, pc.exponent, pc.eps))
        op = kernels.ops()
        for b in self.batches_b.values():
            getattr(op, f"{b.kind}_b")(b.p, b.m, self.arena, b.off, b.decay, b.alpha, b.eps)
