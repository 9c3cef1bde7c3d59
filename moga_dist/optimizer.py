"""`MOGA`, a torch.optim.Optimizer: momentum, then row- (or column-) normalized updates with
width-aware scales; sign updates for embeddings and vectors.

Owns validation, state and the step's orchestration (phase A -> one reduction -> phase B). The
math is in functional.py, the reductions in collectives.py; no engine is imported here.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping

import torch

from . import functional as F
from .collectives import StatReducer
from .flat import FlatSegment
from .layout import ShardLayout
from .plan import build_plan
from .hparams import check_hparams
from .scaling import stat_exponent, update_scales

_DECAYED_ROLES = ("hidden", "embedding", "head")
_STATIC_KEYS = ("role", "norm", "p", "q", "hidden_mult", "embedding_mult", "head_mult", "vector_mult",
                "head_width_scale", "base_width")


class NonFiniteGradientError(ValueError):
    """A gradient held NaN or Inf; the step was refused and no parameter was written."""


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
        check_hparams(defaults, "MOGA")
        super().__init__(params, defaults)
        for i, group in enumerate(self.param_groups):
            check_hparams(group, f"MOGA param group {i}")
        self._layouts: dict[int, ShardLayout] = {}
        self._flat: dict[int, tuple[list[FlatSegment], float]] = {}
        self._param_options: dict[int, dict] = {}
        self._order: dict[int, object] = {}
        self._ghosts: list[tuple] = []
        self.reducer = StatReducer(process_groups)
        self.fused = fused
        self._suspended = False
        # Record layouts in state_dict() so a per-rank checkpoint is not loaded into another layout.
        # Engines whose checkpoints reshard state per parameter (Megatron dist_checkpointing) turn it off.
        self.save_layouts = True
        self._static_cache: dict[tuple, tuple] = {}
        self.set_layouts(layouts or {})

    # ----- layouts ---------------------------------------------------------------------------
    def add_param_group(self, param_group):
        """torch.optim's add_param_group, remembering which tensors MOGA was given."""
        super().add_param_group(param_group)
        self._names = None
        if not hasattr(self, "_known"):
            self._known: set[int] = set()
        self._known.update(id(p) for p in self.param_groups[-1]["params"])

    def adopt_param_groups(self, groups: list[dict]) -> None:
        """Replace the param groups with engine-owned tensors, which may be views of a buffer
        (non-leaf, so torch's add_param_group would refuse them); missing settings take defaults."""
        for i, group in enumerate(groups):
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            check_hparams(group, f"MOGA param group {i}")
            group["params"] = list(group["params"])
        self.param_groups = groups
        self._names = None
        self._known.update(id(p) for g in groups for p in g["params"])
        self._static_cache.clear()

    def set_layouts(self, layouts: Mapping) -> None:
        """Attach (or replace) shard layouts: {param tensor: ShardLayout}."""
        for param, layout in layouts.items():
            self._check_member(param)
            if not isinstance(layout, ShardLayout):
                raise ValueError(f"layouts values must be ShardLayout, got {type(layout).__name__}")
            if param.numel() != layout.local_numel:
                raise ValueError(f"{self._name(param)}: local numel {param.numel()} does not match its "
                                 f"layout ({layout.local_numel} elements of global {layout.global_shape})")
            self._layouts[id(param)] = layout
            self._check_groups(layout)
        self._static_cache.clear()

    def set_param_options(self, options: Mapping) -> None:
        """Per-tensor settings over its group's, e.g. {tensor: {"role": "embedding"}} for engines whose
        param groups mix roles (Megatron groups by weight-decay and lr multipliers)."""
        for tensor, opts in options.items():
            self._check_member(tensor)
            check_hparams({**self.defaults, **opts}, f"options of {self._name(tensor)}")
            self._param_options[id(tensor)] = dict(opts)
        self._static_cache.clear()

    def set_global_order(self, order: Mapping, ghosts: list[tuple] = ()) -> None:
        """Make the reduction order independent of which tensors this rank holds.

        order: {tensor: key}, keys comparable and equal across ranks for the same parameter.
        ghosts: (key, ShardLayout, options) for parameters of which this rank holds nothing but whose
        statistics other ranks share (Megatron's distributed optimizer drops such parameters from
        a rank's param groups); they contribute zeros so every rank packs the same buffer."""
        for tensor, key in order.items():
            self._check_member(tensor)
            self._order[id(tensor)] = key
        self._ghosts = []
        for key, layout, options in ghosts:
            if layout.local_numel != 0:
                raise ValueError(f"ghost {key!r} must hold nothing locally, its layout holds {layout.local_numel}")
            role = self.role_of(options, layout)
            if role in ("hidden", "head"):
                axis = {**self.defaults, **options}["norm"] if role == "hidden" else "row"
                plan = build_plan(layout, axis)
                if plan.group_slots:
                    self._ghosts.append((key, plan))

    def register_flat_buffer(self, buffer: torch.Tensor, segments: list[FlatSegment], base_lr: float) -> None:
        """Declare `buffer` (a 1-D tensor in a param group) as segments of parameters.

        Each segment is updated as its own parameter with its own layout and options; its lr is
        options["lr"] * group["lr"] / base_lr, so a schedule on the buffer's group applies."""
        self._check_member(buffer)
        if buffer.dim() != 1:
            raise ValueError(f"a flat buffer must be 1-D, got shape {tuple(buffer.shape)}")
        for seg in segments:
            if seg.start < 0 or seg.start + seg.numel > buffer.numel():
                raise ValueError(f"segment {seg.name!r} [{seg.start}, {seg.start + seg.numel}) lies outside "
                                 f"the buffer of {buffer.numel()} elements")
            check_hparams({**self.defaults, **seg.options}, f"segment {seg.name!r}")
            self._check_groups(seg.layout)
        self._flat[id(buffer)] = (list(segments), float(base_lr))
        self._known.add(id(buffer))
        self._static_cache.clear()

    def _check_member(self, tensor: torch.Tensor) -> None:
        if not any(p is tensor for g in self.param_groups for p in g["params"]):
            raise ValueError(f"a tensor of shape {tuple(tensor.shape)} is not in this optimizer's param groups")

    def _check_groups(self, layout: ShardLayout) -> None:
        if layout.tp is not None and layout.tp.world_size > 1:
            self.reducer.check_group(layout.tp.group, layout.tp.world_size)
        if layout.flat is not None and len(layout.flat.ranges) > 1:
            self.reducer.check_group(layout.flat.group, len(layout.flat.ranges))

    def layout_of(self, param: torch.Tensor) -> ShardLayout:
        """The parameter's layout (a whole tensor unless one was given)."""
        return self._layouts.get(id(param)) or ShardLayout(tuple(param.shape))

    def _name(self, param: torch.Tensor) -> str:
        """How errors name a parameter (its param_names entry when given). Cached per group layout:
        the step asks for every parameter, and a scan per call would be quadratic."""
        key = (id(self.param_groups), len(self.param_groups))   # engines may swap the groups wholesale
        if self._names is None or self._names[0] != key:
            self._names = (key, {id(p): f"parameter {g['param_names'][i]!r}" for g in self.param_groups
                                 if "param_names" in g for i, p in enumerate(g["params"])})
        return self._names[1].get(id(param)) or f"parameter of shape {tuple(param.shape)}"

    def role_of(self, options: Mapping, layout: ShardLayout) -> str:
        """The role in `options`, or by default hidden for a 2-D global shape, vector otherwise."""
        if options.get("role"):
            return options["role"]
        return "hidden" if layout.global_matrix_shape is not None else "vector"

    # ----- step ------------------------------------------------------------------------------
    def _units(self):
        """(owner tensor, slice of it or None, options, layout, cache key, name) for every unit."""
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise ValueError(f"{self._name(param)}: sparse gradients are not supported")
                flat = self._flat.get(id(param))
                if flat is None:
                    options = {**group, **self._param_options[id(param)]} if id(param) in self._param_options else group
                    self._refuse_foreign(options, param)
                    yield param, None, options, self.layout_of(param), (id(param), -1), self._name(param)
                    continue
                segments, base_lr = flat
                for k, seg in enumerate(segments):
                    options = {**group, **seg.options}
                    options["lr"] = seg.options.get("lr", base_lr) * group["lr"] / base_lr
                    yield (param, (seg.start, seg.numel), options, seg.layout, (id(param), k),
                           f"parameter {seg.name!r}")

    def _refuse_foreign(self, group: Mapping, param: torch.Tensor) -> None:
        # An engine that swapped MOGA's parameters for flat 1-D partitions (DeepSpeed ZeRO >= 1)
        # would otherwise get every matrix updated as a vector: a silent wrong update.
        if id(param) in self._known or param.dim() >= 2 or group.get("role") in ("vector", "embedding") \
                or id(param) in self._layouts:
            return
        raise ValueError(
            f"MOGA was handed a 1-D tensor of {param.numel()} elements it was not constructed with "
            f"(role {group.get('role')!r}): an engine replaced the parameters with flat partitions. "
            "Use moga_dist.deepspeed.initialize(...) for DeepSpeed ZeRO >= 1, or "
            "moga_dist.megatron.get_megatron_optimizer(...) for Megatron's distributed optimizer.")

    def _static(self, options: Mapping, layout: ShardLayout, key: tuple, name: str) -> tuple:
        """Per-unit data that only changes with the settings (cached)."""
        sig = tuple(options.get(k) for k in _STATIC_KEYS)
        cached = self._static_cache.get(key)
        if cached is not None and cached[0] == sig:
            return cached[1]
        role = self.role_of(options, layout)
        matrix = layout.global_matrix_shape
        if role in ("hidden", "head") and matrix is None:
            raise ValueError(f"{name} has role {role!r} but global_shape {layout.global_shape}; "
                             "roles hidden/head need a 2-D weight")
        plan = None
        if role in ("hidden", "head"):
            plan = build_plan(layout, options["norm"] if role == "hidden" else "row")
        scales = update_scales(role, options["norm"], matrix, p=options["p"], q=options["q"],
                               mult=options[f"{role}_mult"], head_width_scale=options["head_width_scale"],
                               base_width=options["base_width"],
                               block_rows=plan.block_rows if plan is not None else None)
        static = (role, plan, scales, stat_exponent(role, options["norm"], options["p"], options["q"]))
        self._static_cache[key] = (sig, static)
        return static

    def _pieces(self) -> list[tuple[torch.Tensor, F.Piece]]:
        pieces, stepped = [], set()
        for owner, span, options, layout, key, name in self._units():
            role, plan, scales, exponent = self._static(options, layout, key, name)
            state = self.init_state(owner)
            if id(owner) not in stepped:
                stepped.add(id(owner))
                state["step"] += 1
            data, grad, mom = owner.data, owner.grad, state["momentum_buffer"]
            if span is not None:
                s, n = span
                data, grad, mom = data[s:s + n], grad[s:s + n], mom[s:s + n]
            decay = 1.0 - options["lr"] * options["weight_decay"] if role in _DECAYED_ROLES else 1.0
            pieces.append((owner, F.Piece(param=data, grad=grad, momentum=mom, plan=plan, exponent=exponent,
                                          beta=options["momentum"], lookahead=options["lookahead"],
                                          lr=options["lr"], scales=scales, decay=decay, eps=options["eps"],
                                          name=name)))
        return pieces

    def init_state(self, tensor: torch.Tensor) -> dict:
        """The tensor's state, created if missing: fp32 `momentum_buffer` of its shape and `step` 0."""
        state = self.state[tensor]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros(tensor.shape, dtype=torch.float32, device=tensor.device)
            state["step"] = 0
        return state

    @torch.no_grad()
    def step(self, closure=None):
        """One MOGA step over all groups: momentum + partial sums, one reduction, update."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._suspended:
            return loss
        owned = self._pieces()
        if not owned:
            return loss
        pieces = [pc for _, pc in owned]
        # One arena for every piece's statistics: one finiteness check for the whole step
        # instead of a handful of tiny tensor ops per parameter.
        sizes = [F.stats_size(pc) for pc in pieces]
        offsets = [0]
        for n in sizes[:-1]:
            offsets.append(offsets[-1] + n)
        arena = torch.zeros(sum(sizes), dtype=torch.float32, device=pieces[0].momentum.device)
        F.phase_a_all(pieces, arena, offsets, self.fused)
        stats = arena.split(sizes)
        self.reducer.reduce(self._reduction_items(owned, stats))
        # Statistics are sums of |u|^r >= 0: their total is finite iff every one of them is.
        if not math.isfinite(float(arena.sum())):
            self._refuse_non_finite(owned, stats)
        F.phase_b_all(pieces, arena, offsets, self.fused)
        return loss

    def _reduction_items(self, owned, stats) -> list:
        # (global key, local position): a flat buffer's segments share their owner's key and keep
        # their order within it.
        items = [((self._order.get(id(owner), i), i), pc.plan, st)
                 for i, ((owner, pc), st) in enumerate(zip(owned, stats)) if pc.plan is not None]
        if self._order:
            items += [((key, -1), plan, torch.zeros(plan.num_stats)) for key, plan in self._ghosts]
            items.sort(key=lambda item: item[0])
        return [(plan, st) for _, plan, st in items]

    @contextlib.contextmanager
    def suspended(self):
        """Within this context step() does nothing (an engine's set-up call with zero gradients
        would otherwise apply weight decay once)."""
        self._suspended = True
        try:
            yield self
        finally:
            self._suspended = False

    def _refuse_non_finite(self, owned: list[tuple[torch.Tensor, F.Piece]],
                           stats: list[torch.Tensor]) -> None:
        bad = [pc.name for (_, pc), st in zip(owned, stats) if not bool(torch.isfinite(st).all())]
        for (_, piece), st in zip(owned, stats):
            if self.fused and piece.one_pass:
                F.undo_one_pass(piece, st)
            F.undo_momentum(piece)
        for owner in {id(o): o for o, _ in owned}.values():
            self.state[owner]["step"] -= 1
        raise NonFiniteGradientError(
            f"non-finite gradient (NaN or Inf) in {', '.join(bad)}; step refused: parameters and momentum "
            "were restored to their pre-step values (to float rounding; momentum entries whose gradient "
            "was non-finite reset to 0). Lower the learning rate, enable gradient clipping, or skip this batch.")

    # ----- checkpoints -----------------------------------------------------------------------
    def state_dict(self):
        """torch.optim state dict plus each parameter's layout, to refuse a foreign layout."""
        sd = super().state_dict()
        if self.save_layouts:
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
