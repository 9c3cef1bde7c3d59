"""The Triton backend: run and work-item tables built once per step program, then one launch per
(kind, dtype pair) per phase, whatever the number of parameters.

Tables live on the pieces' device. Gradient addresses, lr and decay are re-read every step and
copied to the device only when they changed, so a step that a CUDA graph captured replays with
the same tables (a graph needs the gradients' storage to stay put, as torch's capturable
optimizers do).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton.language as tl

from ..core import piece as P
from ..core.piece import Piece
from . import triton as K

_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16}
ROW_BLOCK = 1024            # columns a rows program handles per loop iteration
TILE_R, TILE_C = 16, 128    # column kernels' tile
SIGN_BLOCK = 4096


@dataclass
class _Group:
    """Runs of one kind and dtype pair: per run (piece index, run or None, scale, view of p, view of
    m); the static tables and the per-step ones (addresses incl. the gradient's, coefficients)."""

    kind: str                   # rows_local | rows | cols | sign
    p_type: object
    g_type: object
    runs: list = field(default_factory=list)
    items: torch.Tensor | None = None
    sizes: torch.Tensor | None = None
    addr: torch.Tensor | None = None
    coef: torch.Tensor | None = None
    block: int = ROW_BLOCK
    host_key: tuple | None = None


def _pow2(n: int, cap: int) -> int:
    b = 16
    while b < n and b < cap:
        b *= 2
    return b


class TritonBackend:
    """Multi-tensor Triton launches over every piece this backend accepts; the kernels read the
    sync-free flag themselves."""

    def __init__(self, pieces: list[Piece], stats: torch.Tensor):
        self.pieces, self.stats = pieces, stats
        self.device = pieces[0].param.device if pieces else torch.device("cpu")
        self.groups: dict[tuple, _Group] = {}
        off = 0
        for k, pc in enumerate(pieces):
            kind = pc.kind
            key = (kind, pc.param.dtype, pc.grad.dtype)
            group = self.groups.setdefault(key, _Group(kind, _TL[pc.param.dtype], _TL[pc.grad.dtype]))
            for run in pc.plan.runs if pc.plan is not None else [None]:
                slot = off + (run.stat_start if run is not None else 0)
                group.runs.append((k, run, pc.scale_of(run), P.run_view(pc.param, run),
                                   P.run_view(pc.momentum, run), slot))
            off += P.stats_size(pc)
        # The row kernels store each row's sum; the column and sign kernels add atomically.
        self._needs_zero = not all(P.overwrites_every_slot(pc, ("rows_local", "rows")) for pc in pieces)
        self.no_flag = torch.zeros(1, dtype=torch.float32, device=self.device)
        for g in self.groups.values():
            self._static_tables(g)

    def _static_tables(self, g: _Group) -> None:
        items, sizes = [], []
        for r, (_, run, _, p, _, slot) in enumerate(g.runs):
            if g.kind == "sign":
                n = p.numel()
                sizes.append((n, slot))
                items += [(r, s) for s in range(0, n, SIGN_BLOCK)]
            elif g.kind == "cols":
                nrows, ncols = p.shape
                sizes.append((nrows, ncols, slot))
                items += [(r, i, j) for i in range(0, nrows, TILE_R) for j in range(0, ncols, TILE_C)]
            else:
                nrows, ncols = p.shape
                sizes.append((ncols, slot))
                items += [(r, i) for i in range(nrows)]
        width = 3 if g.kind == "cols" else 2
        g.items = torch.tensor(items, dtype=torch.int64).view(-1, width).to(self.device)
        g.sizes = torch.tensor(sizes, dtype=torch.int64).view(-1, width).to(self.device)
        if g.kind in ("rows_local", "rows"):
            g.block = _pow2(max((p.shape[1] for _, _, _, p, _, _ in g.runs), default=16), ROW_BLOCK)
        g.addr = torch.zeros(len(g.runs), 3, dtype=torch.int64, device=self.device)
        g.coef = torch.zeros(len(g.runs), 4, dtype=torch.float32, device=self.device)

    def _bind(self) -> None:
        """Refresh the gradient addresses and lr/decay of every run (copied only when changed)."""
        pieces = self.pieces
        for g in self.groups.values():
            rows_addr, rows_coef = [], []
            for k, run, scale, p, m, _ in g.runs:
                pc = pieces[k]
                rows_addr.append((p.data_ptr(), m.data_ptr(), P.run_view(pc.grad, run).data_ptr()))
                rows_coef.append((1.0 - pc.beta, pc.decay, pc.lr * scale, pc.eps))
            key = (tuple(rows_addr), tuple(rows_coef))
            if key != g.host_key:
                g.addr.copy_(torch.tensor(rows_addr, dtype=torch.int64), non_blocking=True)
                g.coef.copy_(torch.tensor(rows_coef, dtype=torch.float32), non_blocking=True)
                g.host_key = key

    def _launch(self, g: _Group, stats: torch.Tensor, flag: torch.Tensor, mode: int) -> None:
        n = g.items.shape[0]
        if n == 0:
            return
        if g.kind == "sign":
            K.sign_kernel[(n,)](g.items, g.addr, g.sizes, g.coef, stats, flag, MODE=mode, P_TYPE=g.p_type,
                                G_TYPE=g.g_type, BLOCK=SIGN_BLOCK)
        elif g.kind == "cols":
            K.cols_kernel[(n,)](g.items, g.addr, g.sizes, g.coef, stats, flag, MODE=mode, P_TYPE=g.p_type,
                                G_TYPE=g.g_type, TILE_R=TILE_R, TILE_C=TILE_C)
        else:
            K.rows_kernel[(n,)](g.items, g.addr, g.sizes, g.coef, stats, flag, MODE=mode, P_TYPE=g.p_type,
                                G_TYPE=g.g_type, BLOCK=g.block)

    def phase_a(self) -> None:
        self._bind()
        if self._needs_zero:
            self.stats.zero_()
        for g in self.groups.values():
            mode = K.MODE_A if g.kind in ("rows", "cols") else K.MODE_ONE_PASS
            self._launch(g, self.stats, self.no_flag, mode)

    def phase_b(self, refused: torch.Tensor | None = None) -> None:
        for g in self.groups.values():
            if g.kind in ("rows", "cols"):
                self._launch(g, self.stats, self.no_flag if refused is None else refused, K.MODE_B)

    def undo(self, refused: torch.Tensor | None = None) -> None:
        """Restore a refused step: one-pass kinds by kernel (gated by `refused` when given); the
        momentum of two-phase kinds by the torch loop (their parameters were not written yet)."""
        flag = torch.ones(1, device=self.device) if refused is None else refused
        for g in self.groups.values():
            if g.kind in ("rows_local", "sign"):
                self._launch(g, self.stats, flag, K.MODE_UNDO)
            else:
                for k in sorted({k for k, *_ in g.runs}):
                    P.undo_momentum(self.pieces[k], refused)
