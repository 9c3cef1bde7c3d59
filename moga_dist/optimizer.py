"""`MOGA`, a torch.optim.Optimizer: momentum, then row- (or column-) normalized updates with
width-aware scales; sign updates for embeddings and vectors.

Owns validation, state and the step's orchestration (phase A -> one reduction -> phase B). The
math is in functional.py, the reductions in collectives.py; no engine is imported here.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from . import functional as F
from .collectives import StatReducer
from .layout import ShardLayout
from .plan import Plan, build_plan
from .scaling import NORMS, ROLES, stat_exponent, update_scales

_DECAYED_ROLES = ("hidden", "embedding", "head")


class NonFiniteGradientError(ValueError):
    """A gradient held NaN or Inf; the step was refused and no parameter was written."""


def _check_hparams(h: Mapping, where: str) -> None:
    def bad(key, allowed):
        raise ValueError(f"{where}: {key}={h[key]!r} is invalid; allowed: {allowed}")

    if not (isinstance(h["lr"], float | int) and h["lr"] >= 0):
        bad("lr", "a number >= 0")
    if not 0.0 <= h["momentum"] < 1.0:
        bad("momentum", "0 <= momentum < 1")
    if h["weight_decay"] < 0:
        bad("weight_decay", ">= 0")
    if h["norm"] not in NORMS:
        bad("norm", list(NORMS))
    if not (h["p"] >= 1.0 and math.isfinite(h["p"])):
        bad("p", "1 <= p < inf")
    if not (h["q"] > 1.0 and math.isfinite(h["q"])):
        bad("q", "1 < q < inf")
    if not h["eps"] > 0:
        bad("eps", "> 0")
    if h["lookahead"] is not None and not 0.0 <= h["lookahead"] < 1.0:
        bad("lookahead", "None or 0 <= lookahead < 1")
    for key in ("hidden_mult", "embedding_mult", "head_mult", "vector_mult"):
        if not h[key] >= 0:
            bad(key, ">= 0")
    if h.get("role") is not None and h["role"] not in ROLES:
        bad("role", list(ROLES))


class MOGA(torch.optim.Optimizer):
    r"""MOGA (Xu, Li, Lu 2026), distributed-exact.

    For every parameter with gradient g and fp32 momentum m (state ``momentum_buffer``)::

        m <- β m + (1 - β) g                     (β = momentum)
        u  = m, or β2 m_old + (1 - β2) g         (β2 = lookahead, off by default)
        hidden, norm="row": W <- W(1 - lr wd) - lr hidden_mult d_in^(-1/p)        rownorm_p(u)
        hidden, norm="col": W <- W(1 - lr wd) - lr hidden_mult d_out^(1/q) / d_in colnorm_q(u)
        head:               W <- W(1 - lr wd) - lr head_mult rownorm_p(u)
        embedding:          W <- W(1 - lr wd) - lr embedding_mult sign(u)
        vector:             w <- w            - lr vector_mult sign(u)           (no decay)

    rownorm_p(u)[r] = sign(u_r)|u_r|^(p-1) / max(‖u_r‖_p^(p-1), eps), colnorm_q likewise with q*.
    d_out, d_in are the *global* matrix dims; on shards they come from ``layouts``.

    Args:
        params: parameters or param groups; a group's ``role`` is one of hidden, embedding, head,
            vector (default: 2-D global shape -> hidden, else vector). Any hyper-parameter below
            may be overridden per group. ``param_names`` (list of str) improves error messages.
        lr (float): learning rate η. momentum (float, 0.95): β. weight_decay (float, 0.1):
            decoupled, applied with the unscaled lr to hidden, embedding and head weights.
        norm ("row" | "col"): normalize rows (over d_in) or columns (over d_out) of hidden weights.
        p (float, 2.0), q (float, 2.0): row ℓp geometry / column ℓq geometry.
        hidden_mult (20.0), embedding_mult, head_mult, vector_mult (1.0): per-role multipliers.
        head_width_scale (bool, False), base_width: the paper's head scale (base_width/d_in)^(1/p).
        eps (1e-8): floor on the norm, so a zero row gives a zero update.
        lookahead (float | None): Algorithm 1's β2.
        layouts (Mapping[Tensor, ShardLayout]): how sharded parameters sit in their global
            matrix; unlisted parameters are whole tensors.
        process_groups (Mapping[str, ProcessGroup]): the groups the layouts' keys name.
        fused (bool, True): use the fused CPU kernels where they apply.

    Every rank must step the same parameters (gradients present on all or none), as DDP, ZeRO
    and Megatron guarantee.
    """

    def __init__(self, params: Iterable, lr: float = 1e-2, momentum: float = 0.95,
                 weight_decay: float = 0.1, norm: str = "row", p: float = 2.0, q: float = 2.0,
                 hidden_mult: float = 20.0, embedding_mult: float = 1.0, head_mult: float = 1.0,
                 vector_mult: float = 1.0, head_width_scale: bool = False,
                 base_width: float | None = None, eps: float = 1e-8, lookahead: float | None = None,
                 *, layouts: Mapping | None = None, process_groups: Mapping | None = None,
                 fused: bool = True):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, norm=norm, p=p, q=q,
                        hidden_mult=hidden_mult, embedding_mult=embedding_mult, head_mult=head_mult,
                        vector_mult=vector_mult, head_width_scale=head_width_scale,
                        base_width=base_width, eps=eps, lookahead=lookahead, role=None)
        _check_hparams(defaults, "MOGA")
        super().__init__(params, defaults)
        for i, group in enumerate(self.param_groups):
            _check_hparams(group, f"MOGA param group {i}")
        self._layouts: dict[int, ShardLayout] = {}
        self.reducer = StatReducer(process_groups)
        self.fused = fused
        self._plans: dict[tuple[int, str], Plan] = {}
        self._static_cache: dict[int, tuple] = {}
        self.set_layouts(layouts or {})

    # ----- layouts ---------------------------------------------------------------------------
    def set_layouts(self, layouts: Mapping) -> None:
        """Attach (or replace) shard layouts: {param tensor: ShardLayout}."""
        known = {id(p) for g in self.param_groups for p in g["params"]}
        for param, layout in layouts.items():
            if id(param) not in known:
                raise ValueError(f"layout given for a tensor of shape {tuple(param.shape)} that is not "
                                 "in this optimizer's param groups")
            if not isinstance(layout, ShardLayout):
                raise ValueError(f"layouts values must be ShardLayout, got {type(layout).__name__}")
            if param.numel() != layout.local_numel:
                raise ValueError(f"{self._name(param)}: local numel {param.numel()} does not match its "
                                 f"layout ({layout.local_numel} elements of global {layout.global_shape})")
            self._layouts[id(param)] = layout
            for key, size in _groups_of(layout):
                self.reducer.check_group(key, size)
        self._plans.clear()
        self._static_cache.clear()

    def layout_of(self, param: torch.Tensor) -> ShardLayout:
        """The parameter's layout (a whole tensor unless one was given)."""
        return self._layouts.get(id(param)) or ShardLayout(tuple(param.shape))

    def _name(self, param: torch.Tensor) -> str:
        for g in self.param_groups:
            for i, p in enumerate(g["params"]):
                if p is param and "param_names" in g:
                    return f"parameter {g['param_names'][i]!r}"
        return f"parameter of shape {tuple(param.shape)}"

    def role_of(self, group: Mapping, param: torch.Tensor) -> str:
        """The group's role, or by default hidden for a 2-D global shape, vector otherwise."""
        if group.get("role"):
            return group["role"]
        return "hidden" if self.layout_of(param).global_matrix_shape is not None else "vector"

    def _plan(self, param: torch.Tensor, axis: str) -> Plan:
        key = (id(param), axis)
        if key not in self._plans:
            self._plans[key] = build_plan(self.layout_of(param), axis)
        return self._plans[key]

    # ----- step ------------------------------------------------------------------------------
    def _pieces(self) -> list[tuple[torch.Tensor, F.Piece]]:
        pieces = []
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise ValueError(f"{self._name(param)}: sparse gradients are not supported")
                pieces.append((param, self._piece(group, param)))
        return pieces

    def _static(self, group: Mapping, param: torch.Tensor) -> tuple:
        """Per-parameter data that only changes with the group's settings (cached)."""
        key = (group.get("role"), group["norm"], group["p"], group["q"], group["hidden_mult"],
               group["embedding_mult"], group["head_mult"], group["vector_mult"],
               group["head_width_scale"], group["base_width"])
        cached = self._static_cache.get(id(param))
        if cached is not None and cached[0] == key:
            return cached[1]
        role = self.role_of(group, param)
        layout = self.layout_of(param)
        matrix = layout.global_matrix_shape
        if role in ("hidden", "head") and matrix is None:
            raise ValueError(f"{self._name(param)} has role {role!r} but global_shape "
                             f"{layout.global_shape}; roles hidden/head need a 2-D weight")
        plan = None
        if role in ("hidden", "head"):
            plan = self._plan(param, group["norm"] if role == "hidden" else "row")
        scales = update_scales(role, group["norm"], matrix, p=group["p"], q=group["q"],
                               mult=group[f"{role}_mult"], head_width_scale=group["head_width_scale"],
                               base_width=group["base_width"],
                               block_rows=plan.block_rows if plan is not None else None)
        static = (role, plan, scales, stat_exponent(role, group["norm"], group["p"], group["q"]),
                  self._name(param))
        self._static_cache[id(param)] = (key, static)
        return static

    def _piece(self, group: Mapping, param: torch.Tensor) -> F.Piece:
        role, plan, scales, exponent, name = self._static(group, param)
        state = self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
            state["step"] = 0
        decay = 1.0 - group["lr"] * group["weight_decay"] if role in _DECAYED_ROLES else 1.0
        return F.Piece(param=param.data, grad=param.grad, momentum=state["momentum_buffer"], plan=plan,
                       exponent=exponent, beta=group["momentum"], lookahead=group["lookahead"],
                       lr=group["lr"], scales=scales, decay=decay, eps=group["eps"], name=name)

    @torch.no_grad()
    def step(self, closure=None):
        """One MOGA step over all groups: momentum + partial sums, one reduction, update."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        owned = self._pieces()
        if not owned:
            return loss
        pieces = [pc for _, pc in owned]
        for param, _ in owned:
            self.state[param]["step"] += 1
        # One arena for every piece's statistics: one finiteness check and, usually, one inverse
        # for the whole step instead of a handful of tiny tensor ops per parameter.
        sizes = [F.stats_size(pc) for pc in pieces]
        offsets = [0]
        for n in sizes[:-1]:
            offsets.append(offsets[-1] + n)
        arena = torch.zeros(sum(sizes), dtype=torch.float32, device=pieces[0].momentum.device)
        F.phase_a_all(pieces, arena, offsets, self.fused)
        stats = arena.split(sizes)
        self.reducer.reduce([(pc.plan, st) for pc, st in zip(pieces, stats) if pc.plan is not None])
        # Statistics are sums of |u|^r >= 0: their total is finite iff every one of them is.
        if not math.isfinite(float(arena.sum())):
            self._refuse_non_finite(owned, stats)
        F.phase_b_all(pieces, arena, offsets, self.fused)
        return loss

    def _refuse_non_finite(self, owned: list[tuple[torch.Tensor, F.Piece]],
                           stats: list[torch.Tensor]) -> None:
        bad = [pc.name for (_, pc), st in zip(owned, stats) if not bool(torch.isfinite(st).all())]
        for (param, piece), st in zip(owned, stats):
            if self.fused and piece.one_pass:
                F.undo_one_pass(piece, st)
            F.undo_momentum(piece)
            self.state[param]["step"] -= 1
        raise NonFiniteGradientError(
            f"non-finite gradient (NaN or Inf) in {', '.join(bad)}; step refused: parameters and momentum "
            "were restored to their pre-step values (to float rounding; momentum entries whose gradient "
            "was non-finite reset to 0). "
            "Lower the learning rate, enable gradient clipping, or skip this batch.")

    # ----- checkpoints -----------------------------------------------------------------------
    def state_dict(self):
        """torch.optim state dict plus each parameter's layout, to refuse a foreign layout."""
        sd = super().state_dict()
        sd["layouts"] = [self.layout_of(p).to_dict() for g in self.param_groups for p in g["params"]]
        return sd

    def load_state_dict(self, state_dict):
        """Load, keeping momentum in fp32 and refusing a checkpoint written for another layout."""
        state_dict = dict(state_dict)
        saved_layouts = state_dict.pop("layouts", None)
        params = [p for g in self.param_groups for p in g["params"]]
        if saved_layouts is not None:
            if len(saved_layouts) != len(params):
                raise ValueError(f"checkpoint has {len(saved_layouts)} parameters, this optimizer {len(params)}")
            for i, (saved, p) in enumerate(zip(saved_layouts, params)):
                mine = self.layout_of(p).to_dict()
                if _plain(saved) != _plain(mine):
                    raise ValueError(f"checkpoint parameter {i} ({self._name(p)}) was saved with layout "
                                     f"{saved}, but this run has {mine}; reshard the checkpoint first")
        momenta = {k: v["momentum_buffer"].clone() for k, v in state_dict["state"].items()
                   if "momentum_buffer" in v}
        super().load_state_dict(state_dict)
        # torch casts state to the parameter dtype on load; MOGA keeps momentum in fp32.
        index = [i for g in state_dict["param_groups"] for i in g["params"]]
        for i, p in zip(index, params):
            if i in momenta:
                self.state[p]["momentum_buffer"] = momenta[i].to(device=p.device, dtype=torch.float32)


def _plain(obj):
    """Tuples and lists compare alike (a layout dict after a round trip through a checkpoint)."""
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def _groups_of(layout: ShardLayout):
    if layout.tp is not None and layout.tp.world_size > 1:
        yield layout.tp.group, layout.tp.world_size
    if layout.flat is not None and len(layout.flat.ranges) > 1:
        yield layout.flat.group, len(layout.flat.ranges)
