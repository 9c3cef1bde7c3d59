"""One rank-local tensor to update (`Piece`) and MOGA's math on it: the torch backend's loop.

Two phases so that one code path serves 1 and N ranks: phase A updates the momentum and returns
partial sums Σ|u|^r per statistic (row or block-column); the caller sums those across ranks where
the plan says so (collectives.py) and phase B applies the normalized update. The fused backends
(kernels/) import this module for the piece and the undo of a refused step; it imports no backend,
no kernel, no torch.distributed and no engine.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .plan import Plan


@dataclass
class Piece:
    """One rank-local tensor to update.

    param: local data, any float dtype, numel N (flat view is used); grad: same numel (a step
    binds it and releases it to None afterwards); momentum: fp32, numel N; plan: reduction plan
    (None for sign-updated roles); exponent: r of the partial sums; scales: lr multipliers per
    block; lr and decay (1 - lr*wd): refreshed every step.
    """

    param: torch.Tensor
    grad: torch.Tensor | None
    momentum: torch.Tensor
    plan: Plan | None
    exponent: float
    beta: float
    lookahead: float | None
    lr: float
    scales: list[float]
    decay: float
    eps: float
    name: str = ""
    one_pass: bool = False      # set when a backend is chosen: that backend updates it in phase A
    lookahead_buffer: torch.Tensor | None = None   # phase A -> phase B only, released by the step

    @property
    def kind(self) -> str:
        """Which kernel updates it: sign (no plan), rows_local (one pass), rows or cols."""
        if self.plan is None:
            return "sign"
        return "rows_local" if self.one_pass else f"{self.plan.axis}s"

    def scale_of(self, run) -> float:
        """The lr multiplier of `run`'s block (None: the whole piece)."""
        return self.scales[run.block if run is not None and len(self.scales) > 1 else 0]


def overwrites_every_slot(piece: Piece, stored_kinds: tuple[str, ...]) -> bool:
    """Whether phase A of a backend whose kernels *store* (not add) the statistics of the kinds in
    `stored_kinds` rewrites every statistic slot of `piece`, so its statistics need no zeroing
    before phase A. The CPU and Triton backends both decide it here (their stored kinds differ)."""
    kind = piece.kind
    if kind not in stored_kinds:
        return False
    return piece.plan is None or piece.plan.each_slot_once()


def flat_view(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1) if t.is_contiguous() else t.reshape(-1)


def direction_source(piece: Piece) -> torch.Tensor:
    """The tensor whose normalization is the update: the momentum, or the lookahead blend."""
    return piece.momentum if piece.lookahead is None else piece.lookahead_buffer


def stats_size(piece: Piece) -> int:
    """Length of the piece's statistics vector (1 for sign roles: a finiteness probe)."""
    return 1 if piece.plan is None else piece.plan.num_stats


def stats_dtype(piece: Piece) -> torch.dtype:
    """The dtype of the piece's statistics: its momentum's (float64 pieces keep float64 math), else fp32."""
    return torch.float64 if piece.momentum.dtype == torch.float64 else torch.float32


def phase_a(piece: Piece, stats: torch.Tensor) -> None:
    """Update the momentum in place and write partial sums (stats_dtype) into the zeroed `stats`
    [stats_size(piece)] (sign roles: the ℓ1 norm of the direction, to detect non-finite grads)."""
    m, g = flat_view(piece.momentum), flat_view(piece.grad)
    w = 1.0 - piece.beta
    if piece.lookahead is not None:
        # Lookahead (Alg. 1's β2) blends the *old* buffer with g, so it is taken before the update.
        piece.lookahead_buffer = m.lerp(g.to(m.dtype), 1.0 - piece.lookahead)
    plan = piece.plan
    if plan is None:
        m.lerp_(g.to(m.dtype), w)
        stats[0] = torch.linalg.vector_norm(direction_source(piece), 1)
        return
    for run in plan.runs:
        n = run.nrows * run.ncols
        m2 = m[run.offset:run.offset + n].view(run.nrows, run.ncols)
        g2 = g[run.offset:run.offset + n].view(run.nrows, run.ncols)
        m2.lerp_(g2.to(m2.dtype), w)
        u = m2 if piece.lookahead is None else \
            piece.lookahead_buffer[run.offset:run.offset + n].view(run.nrows, run.ncols)
        dim = 1 if plan.axis == "row" else 0
        part = torch.linalg.vector_norm(u, piece.exponent, dim=dim).pow_(piece.exponent)
        k = part.numel()
        stats[run.stat_start:run.stat_start + k] += part


def inverse_denominators(stats: torch.Tensor, exponent: float, eps: float) -> torch.Tensor:
    """1 / max(‖u‖_r^(r-1), eps) from summed |u|^r (eps floors the norm: a zero row -> zero update)."""
    r = exponent
    denom = stats.clamp_min(0.0).pow((r - 1.0) / r) if r != 2.0 else stats.clamp_min(0.0).sqrt()
    return denom.clamp_min_(eps).reciprocal_()


def _direction(u: torch.Tensor, exponent: float) -> torch.Tensor:
    if exponent == 2.0:
        return u
    return u.sign() * u.abs().pow(exponent - 1.0)


def phase_b(piece: Piece, inv: torch.Tensor) -> None:
    """Apply p <- p*decay - lr*scale*D with D = u * inv (inv from inverse_denominators of the
    summed statistics, [stats_size(piece)]), or D = sign(u) for sign roles."""
    p = flat_view(piece.param)
    u = flat_view(direction_source(piece))
    plan = piece.plan
    if plan is None:
        alpha = piece.lr * piece.scales[0]
        if p.dtype == u.dtype:
            p.mul_(piece.decay).add_(u.sign(), alpha=-alpha)
        else:
            p.copy_(p.to(u.dtype).mul_(piece.decay).add_(u.sign(), alpha=-alpha))
        return
    for run in plan.runs:
        n = run.nrows * run.ncols
        p2 = p[run.offset:run.offset + n].view(run.nrows, run.ncols)
        u2 = u[run.offset:run.offset + n].view(run.nrows, run.ncols)
        alpha = piece.lr * piece.scale_of(run)
        k = run.nrows if plan.axis == "row" else run.ncols
        scale = inv[run.stat_start:run.stat_start + k]
        scale = scale.view(-1, 1) if plan.axis == "row" else scale.view(1, -1)
        d = _direction(u2, piece.exponent)
        if p2.dtype == u2.dtype:
            p2.mul_(piece.decay).addcmul_(d, scale.to(u2.dtype), value=-alpha)
        else:
            p2.copy_(p2.to(u2.dtype).mul_(piece.decay).addcmul_(d, scale, value=-alpha))


def undo_momentum(piece: Piece, refused: torch.Tensor | None = None) -> None:
    """Revert phase A's momentum update (used when a step is refused for non-finite gradients);
    with `refused` (a device flag [1], sync-free mode) only where it is set.

    Exact up to rounding where the gradient was finite; entries whose gradient was not finite
    cannot be recovered and are reset to zero.
    """
    m = flat_view(piece.momentum)
    g = flat_view(piece.grad).to(m.dtype)
    if piece.beta == 0.0:
        old = torch.zeros_like(m)
    else:
        finite = torch.isfinite(g)
        old = (m - torch.where(finite, g, torch.zeros_like(g)) * (1.0 - piece.beta)) / piece.beta
        old.masked_fill_(~finite, 0.0)
    m.copy_(old if refused is None else torch.where((refused > 0).reshape(()), old, m))


def run_view(t: torch.Tensor, run) -> torch.Tensor:
    """The [nrows, ncols] block of `t` that `run` names (t itself when it already is that block);
    run None: all of `t`, flat [numel] (sign roles have no runs)."""
    if run is None:
        return flat_view(t)
    if run.offset == 0 and t.dim() == 2 and t.shape[0] == run.nrows and t.shape[1] == run.ncols:
        return t
    n = run.nrows * run.ncols
    return flat_view(t)[run.offset:run.offset + n].view(run.nrows, run.ncols)


def undo_one_pass(piece: Piece, stats: torch.Tensor) -> None:
    """Revert the parameter update a fused backend made in phase A for a one-pass piece (before
    undo_momentum).

    Inverts p_new = p*decay - alpha*D row by row (exact up to rounding); rows the kernel skipped
    because their norm was not finite were never written."""
    if piece.plan is None:
        sign = torch.nan_to_num(flat_view(piece.momentum).sign(), nan=0.0)
        flat_view(piece.param).add_(sign, alpha=piece.lr * piece.scales[0]).div_(piece.decay)
        return
    for run in piece.plan.runs:
        p2, m2 = run_view(piece.param, run), run_view(piece.momentum, run)
        acc = stats[run.stat_start:run.stat_start + run.nrows]
        finite = torch.isfinite(acc)
        scale = torch.where(finite, inverse_denominators(acc, 2.0, piece.eps), torch.zeros_like(acc))
        restored = (p2 + torch.nan_to_num(m2, nan=0.0, posinf=0.0, neginf=0.0) * (scale * piece.lr *
                    piece.scales[0]).view(-1, 1)) / piece.decay
        p2.copy_(torch.where(finite.view(-1, 1), restored, p2))


def gated(pieces: list[Piece], refused: torch.Tensor | None, work, skip_when_refused: bool) -> None:
    """Run `work()` on `pieces`; with a sync-free device flag `refused` [1], keep each piece's
    parameter and momentum where the flag says the work must not happen (skip_when_refused: phase B;
    else: the undo). For backends that cannot read the flag themselves: a where() over the
    tensors, correct, not fast (the Triton kernels read the flag)."""
    if refused is None:
        work()
        return
    tensors = [t for pc in pieces for t in (pc.param, pc.momentum)]
    before = [t.clone() for t in tensors]
    work()
    keep = (refused > 0 if skip_when_refused else refused == 0).reshape(())
    for t, old in zip(tensors, before):
        t.copy_(torch.where(keep, old, t))
