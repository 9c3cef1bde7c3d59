"""A step's work, planned once: the pieces, their slots in one statistics arena, the backend
batches that compute them, and the step itself (phase A -> verdict and reduction -> phase B).

MOGA caches a StepProgram and rebuilds it only when a tensor or a shape-affecting setting
changes; each step then only binds the gradients and refreshes lr and decay. Why: at small widths
a step's Python (pieces, views, argument lists, the arena) cost as much as 20% of the kernel time.
Gradients are bound per step and released afterwards, so the program never keeps alive a gradient
the caller freed. `moga()` is the same step as a plain function. Must not import any engine.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import backends
from . import functional as F


@dataclass
class Verdict:
    """What a step decided. refused: bool, or in sync-free mode a device tensor [1] (1.0 = refused);
    elsewhere: the non-finite statistic was another rank's (default mode only)."""

    refused: bool | torch.Tensor
    elsewhere: bool = False


class StepProgram:
    """The planned step for `owned` = [(owner tensor, span or None, Piece)] (gradients unbound).

    arenas: {dtype: [Σ stats_size]} on the pieces' device (fp32; float64 for float64 pieces);
    stats[k]: piece k's view of its arena; backend:
    "auto" | "torch" | "cpu" | "triton" (see backends)."""

    def __init__(self, owned: list[tuple[torch.Tensor, tuple | None, F.Piece]], backend: str = "auto",
                 device: torch.device | None = None):
        self.owned = owned
        self.pieces = [pc for _, _, pc in owned]
        self.owners = list({id(o): o for o, _, _ in owned}.values())
        # Filled in by the optimizer: validity signature, per-piece lr sources, owners' state dicts,
        # the (plan, stats) pairs to reduce (None until first needed) and ghost statistics.
        self.signature: tuple | None = None
        self.rates: list = []
        self.states: list[dict] = []
        self.reduce_items: list | None = None
        self.ghost_stats: tuple[torch.Tensor, ...] = ()
        self.device = self.pieces[0].momentum.device if self.pieces else (device or torch.device("cpu"))
        # One arena per statistics dtype: fp32, and float64 for float64 pieces (their math stays
        # float64; only the torch loop accepts them). stats[k]: piece k's view of its arena.
        sizes = [F.stats_size(pc) for pc in self.pieces]
        dtypes = [F.stats_dtype(pc) for pc in self.pieces]
        offsets, used = [], {}
        for n, dt in zip(sizes, dtypes):
            offsets.append(used.get(dt, 0))
            used[dt] = offsets[-1] + n
        self.arenas = {dt: torch.zeros(n, dtype=dt, device=self.device) for dt, n in used.items()} \
            or {torch.float32: torch.zeros(0, device=self.device)}
        self.stats = [self.arenas[dt][off:off + n] for dt, off, n in zip(dtypes, offsets, sizes)]
        chosen: dict[tuple, list[int]] = {}
        for k, pc in enumerate(self.pieces):
            name = backends.choose(backend, pc)
            pc.one_pass = backends.one_pass(name, pc)
            chosen.setdefault((name, dtypes[k]), []).append(k)
        self.backend_of = {k: name for (name, _), ks in chosen.items() for k in ks}
        # (batches, their arena) pairs; a batches object sees only its own dtype's arena.
        self.batches_on = [(backends.make_batches(name, [self.pieces[k] for k in ks], [offsets[k] for k in ks]),
                            self.arenas[dt]) for (name, dt), ks in chosen.items()]
        self.batches = [b for b, _ in self.batches_on]
        self.zero_arenas = list({id(a): a for b, a in self.batches_on if b.needs_zero}.values())

    def stats_total(self) -> torch.Tensor:
        """Σ of every statistic (finite iff each is: they are sums of |u|^r >= 0), as a 0-dim tensor."""
        totals = [a.sum() for a in self.arenas.values()]
        return totals[0] if len(totals) == 1 else torch.stack([t.double() for t in totals]).sum()

    def bind(self) -> None:
        """Point every piece and batch at this step's gradients and lr/decay (set on the pieces)."""
        for owner, span, pc in self.owned:
            grad = owner.grad
            pc.grad = grad if span is None else grad[span[0]:span[0] + span[1]]
        for b in self.batches:
            b.bind()

    def release(self) -> None:
        """Drop this step's gradient references."""
        for pc in self.pieces:
            pc.grad = None
            pc.lookahead_buffer = None
        for b in self.batches:
            b.release()

    def phase_a(self) -> None:
        """Momentum and partial statistics for every piece; one-pass pieces are also updated."""
        for arena in self.zero_arenas:
            arena.zero_()
        for b, arena in self.batches_on:
            b.phase_a(arena)

    def phase_b(self, refused: torch.Tensor | None = None) -> None:
        """The update of every piece not already updated in phase A, from the summed statistics;
        with `refused` (sync-free), a no-op where it is set."""
        for b, arena in self.batches_on:
            _gated(b, refused, lambda: b.phase_b(arena, refused), skip_when_refused=True)

    def undo(self, refused: torch.Tensor | None = None) -> None:
        """Restore parameters and momentum of a refused step (to rounding); with `refused`
        (sync-free), a no-op where it is not set."""
        for b, arena in self.batches_on:
            _gated(b, refused, lambda: b.undo(arena, refused), skip_when_refused=False)

    def run(self, reduce: Callable[[torch.Tensor], None] | None, sync_free: bool = False) -> Verdict:
        """One step: phase A, the non-finite verdict (reduced with the statistics by `reduce`,
        which sums the shared slots and the flag [1] in place across ranks), then phase B, or the
        undo of phase A when any rank saw a non-finite statistic.

        Statistics are sums of |u|^r >= 0, so their total is finite iff every one is; a sum of
        finite partial sums can still overflow, so the reduced total is checked too."""
        self.phase_a()
        if reduce is None and not sync_free:        # one rank, the common CPU case: one host read
            if math.isfinite(float(self.stats_total())):
                self.phase_b()
                return Verdict(False)
            self.undo()
            return Verdict(True)
        bad = ~torch.isfinite(self.stats_total()).view(1)
        flag = bad.float()
        if reduce is not None:
            reduce(flag)
            bad = (flag > 0) | ~torch.isfinite(self.stats_total()).view(1)
        if sync_free:
            refused = bad.float()
            self.undo(refused)
            self.phase_b(refused)
            return Verdict(refused)
        if bool(bad):
            own_bad = not all(bool(torch.isfinite(st).all()) for st in self.stats)
            self.undo()
            return Verdict(True, elsewhere=not own_bad)
        self.phase_b()
        return Verdict(False)


def _gated(batches, refused: torch.Tensor | None, work: Callable[[], None], skip_when_refused: bool) -> None:
    """Run `work` on `batches`; in sync-free mode on a backend that cannot read the device flag
    itself, keep its parameters and momentum where the flag says the work must not happen (a
    where() over the tensors: correct, not fast; the Triton kernels read the flag themselves)."""
    if refused is None or batches.native_gate:
        work()
        return
    tensors = [t for pc in batches.pieces for t in (pc.param, pc.momentum)]
    before = [t.clone() for t in tensors]
    work()
    keep = (refused > 0 if skip_when_refused else refused == 0).reshape(())
    for t, old in zip(tensors, before):
        t.copy_(torch.where(keep, old, t))


def moga(pieces: list[F.Piece], *, reduce: Callable[[torch.Tensor], None] | None = None,
         backend: str = "auto", sync_free: bool = False) -> Verdict:
    """One MOGA step over local pieces, as a function (what MOGA.step runs, without its caches).

    pieces: functional.Piece per local tensor (param [N], grad [N], fp32 momentum [N], its plan
    from plan.build_plan or None for sign roles, lr/decay/scales); reduce: sums the shared
    statistic slots and the verdict flag across ranks in place (collectives.StatReducer.reduce
    bound to the plans), None on one rank. Returns the Verdict; a refused step is undone."""
    program = StepProgram([(pc.param, None, pc) for pc in pieces], backend)
    for b in program.batches:
        b.bind()
    return program.run(reduce, sync_free)
