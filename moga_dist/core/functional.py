"""MOGA's step as a function, torch.optim's way: `moga(pieces, ...)` is to `MOGA.step` what
`torch.optim.adamw.adamw(...)` is to `AdamW.step`, and `MOGA.step` calls it.

A step over rank-local pieces (piece.py): phase A (momentum and partial statistics), the
non-finite verdict and the sum of shared statistics across ranks (`reduce`), then phase B (the
update) or the undo of phase A. Each piece is computed by one backend (backends.py: torch, cpu,
triton), chosen per piece. A `StepProgram` holds what a step over the same pieces reuses: the
backend of each piece, their prepared kernel arguments and the statistics buffers; MOGA keeps one
across steps, so a step allocates nothing and rebuilds nothing. Must not import any engine.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import backends
from . import piece as P
from .piece import Piece


@dataclass
class Verdict:
    """What a step decided. refused: bool, or in sync-free mode a device tensor [1] (1.0 = refused);
    elsewhere: the non-finite statistic was another rank's (default mode only)."""

    refused: bool | torch.Tensor
    elsewhere: bool = False


def moga(pieces: list[Piece], *, reduce: Callable[[torch.Tensor], None] | None = None, backend: str = "auto",
         sync_free: bool = False, program: StepProgram | None = None) -> Verdict:
    """One MOGA step over rank-local pieces, in place; a refused step is undone.

    pieces: a Piece per local tensor (param [N], grad [N], fp32 momentum [N], its reduction plan
    from plan.build_plan or None for sign roles, lr, decay, scales). reduce(flag): sums, in place
    across ranks, the statistic slots the plans share and the verdict flag [1] (> 0: a rank saw a
    non-finite statistic); None on one rank. backend: "auto" | "torch" | "cpu" | "triton".
    sync_free: never ask the host (the verdict is a device tensor and gates phase B and the undo).
    program: StepProgram(pieces, backend) built once and passed on every call over the same pieces
    (MOGA.step passes its cached one); None builds one for this call."""
    if program is None:
        program = StepProgram(pieces, backend)
    elif program.pieces is not pieces or program.backend != backend:
        raise ValueError(f"program was built for other pieces or backend {program.backend!r} (asked: {backend!r}); "
                         "build StepProgram(pieces, backend) for these pieces")
    try:
        program.phase_a()
        if reduce is None and not sync_free:        # one rank, the common CPU case: one host read
            if math.isfinite(float(program.stats_total())):
                program.phase_b()
                return Verdict(False)
            program.undo()
            return Verdict(True)
        # Statistics are sums of |u|^r >= 0, so their total is finite iff every one is; a sum of
        # finite partial sums can still overflow, so the reduced total is checked too.
        bad = ~torch.isfinite(program.stats_total()).view(1)
        flag = bad.float()
        if reduce is not None:
            reduce(flag)
            bad = (flag > 0) | ~torch.isfinite(program.stats_total()).view(1)
        if sync_free:
            refused = bad.float()
            program.undo(refused)
            program.phase_b(refused)
            return Verdict(refused)
        if bool(bad):
            own_bad = not all(bool(torch.isfinite(st).all()) for st in program.stats)
            program.undo()
            return Verdict(True, elsewhere=not own_bad)
        program.phase_b()
        return Verdict(False)
    finally:
        for pc in program.lookahead_pieces:
            pc.lookahead_buffer = None          # phase A -> phase B only


class StepProgram:
    """A step over `pieces` (gradients bound) prepared once: the backend of each piece, the
    backends' prepared work and the statistics they write.

    arenas: {dtype: [Σ stats_size]} on the pieces' device (fp32; float64 for float64 pieces,
    whose math stays float64), each backend's pieces contiguous in it; stats[k]: piece k's
    statistics (a view of its arena); backend_of[k]: the backend computing piece k."""

    def __init__(self, pieces: list[Piece], backend: str = "auto", device: torch.device | None = None):
        self.pieces, self.backend = pieces, backend
        self.device = pieces[0].momentum.device if pieces else (device or torch.device("cpu"))
        chosen: dict[tuple, list[int]] = {}     # (backend, statistics dtype) -> piece indices
        for k, pc in enumerate(pieces):
            name = backends.choose(backend, pc)
            pc.one_pass = backends.one_pass(name, pc)
            chosen.setdefault((name, P.stats_dtype(pc)), []).append(k)
        self.backend_of = {k: name for (name, _), ks in chosen.items() for k in ks}
        used: dict[torch.dtype, int] = {}
        spans = {}
        for (name, dt), ks in chosen.items():
            n = sum(P.stats_size(pieces[k]) for k in ks)
            spans[name, dt] = (used.get(dt, 0), n)
            used[dt] = used.get(dt, 0) + n
        self.arenas = {dt: torch.zeros(n, dtype=dt, device=self.device) for dt, n in used.items()} \
            or {torch.float32: torch.zeros(0, device=self.device)}
        self.stats: list[torch.Tensor] = [torch.empty(0)] * len(pieces)
        self.backends = []
        for (name, dt), ks in chosen.items():
            start, n = spans[name, dt]
            stats = self.arenas[dt][start:start + n]
            self.backends.append(backends.make_backend(name, [pieces[k] for k in ks], stats))
            for k, view in zip(ks, stats.split([P.stats_size(pieces[k]) for k in ks])):
                self.stats[k] = view
        self.lookahead_pieces = [pc for pc in pieces if pc.lookahead is not None]

    def stats_total(self) -> torch.Tensor:
        """Σ of every statistic (finite iff each is: they are sums of |u|^r >= 0), as a 0-dim tensor."""
        totals = [a.sum() for a in self.arenas.values()]
        return totals[0] if len(totals) == 1 else torch.stack([t.double() for t in totals]).sum()

    def phase_a(self) -> None:
        """Momentum and partial statistics for every piece; one-pass pieces are also updated."""
        for b in self.backends:
            b.phase_a()

    def phase_b(self, refused: torch.Tensor | None = None) -> None:
        """The update of every piece not already updated in phase A, from the summed statistics;
        with `refused` (sync-free), a no-op where it is set."""
        for b in self.backends:
            b.phase_b(refused)

    def undo(self, refused: torch.Tensor | None = None) -> None:
        """Restore parameters and momentum of a refused step (to rounding); with `refused`
        (sync-free), a no-op where it is not set."""
        for b in self.backends:
            b.undo(refused)
