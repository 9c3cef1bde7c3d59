"""MOGA._init_group's work: the param groups and declarations -> the step's pieces, their
StepProgram and the reduction across ranks, built once and kept across steps.

Rebuilt only when the signature changes: which tensors have gradients (their storage, dtype,
contiguity), their momentum buffers, the per-group settings that shape the plan, and the
registry's epoch, which every declaration and `MOGA.invalidate()` bumps. Each step then only
re-reads lr and weight decay (schedules change them) and binds the gradients, which `release()`
drops after the step, so MOGA never keeps alive a gradient the caller freed. Why cache: at small
widths a step's Python (pieces, views, argument lists, statistics buffers) cost as much as 20% of
the kernel time.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from .adopters import is_fsdp1_flattened
from .dtensor import is_dtensor, local_view, step_owner
from .functional import StepProgram
from .hparams import check_decay, lr_value
from .layout import ShardLayout
from .piece import Piece
from .plan import build_plan
from .scaling import stat_exponent, update_scales
from .tensors import role_of

DECAYED_ROLES = ("hidden", "embedding", "head")
STATIC_KEYS = ("role", "norm", "p", "q", "hidden_mult", "embedding_mult", "head_mult", "vector_mult",
               "head_width_scale", "base_width")
PROGRAM_KEYS = STATIC_KEYS + ("momentum", "lookahead", "eps")


@dataclass
class _Source:
    """Where a piece comes from each step: `param` (a param-group tensor; `owner` reads its
    gradient: the param, or for a DTensor its local gradient) or its span [start, start + numel);
    its group and the options over the group's (the tensor's or its segment's), from which lr and
    weight decay are re-read; for a flat-buffer segment (its lr, the buffer's base lr)."""

    param: torch.Tensor
    owner: object
    span: tuple[int, int] | None
    group: dict
    override: Mapping
    flat_lr: tuple[float, float] | None
    decayed: bool = False


class ProgramCache:
    """What MOGA.step reuses: the pieces, their StepProgram, the reduction, and (across rebuilds)
    each piece's role, plan, scales and exponent, recomputed only when its settings change."""

    def __init__(self):
        self.static: dict[tuple, tuple] = {}      # piece key -> (settings, (role, plan, scales, exponent))
        self.program: StepProgram | None = None
        self.signature: tuple | None = None
        self.pieces: list[Piece] = []
        self.sources: list[_Source] = []
        self.states: list[dict] = []             # the owners' state dicts (each counts its steps)
        self.reduce: Callable[[torch.Tensor], None] | None = None

    def clear(self) -> None:
        """Settings changed: recompute the static parts at the next build."""
        self.static.clear()

    def get(self, opt) -> tuple[list[Piece], StepProgram, Callable[[torch.Tensor], None] | None]:
        """(pieces, program, reduce) for `opt`'s current tensors, rebuilt if the signature changed,
        with this step's lr, decay and gradient set on every piece; reduce is None when no process
        group is declared."""
        sig = signature(opt)
        if self.program is None or self.signature != sig:
            # Tensors may have been swapped in since the last build (Accelerate, FSDP1 wrapping).
            opt.refresh_tensors()
            self.build(opt)
            self.signature = signature(opt)         # momentum buffers may have just been created
        for piece, src in zip(self.pieces, self.sources):
            group_lr = lr_value(src.group["lr"])
            if src.flat_lr is None:
                lr = lr_value(src.override.get("lr", group_lr))
            else:
                seg_lr, base_lr = src.flat_lr
                lr = seg_lr * group_lr / base_lr if base_lr else group_lr
            piece.lr = lr
            wd = src.override.get("weight_decay", src.group["weight_decay"])
            if src.decayed:
                check_decay(lr, wd, piece.name or "MOGA")       # before any tensor is written
            piece.decay = 1.0 - lr * wd if src.decayed else 1.0
            grad = src.owner.grad
            piece.grad = grad if src.span is None else grad[src.span[0]:src.span[0] + src.span[1]]
        return self.pieces, self.program, (self.reduce if opt.reducer.reduce_order else None)

    def forget_tensors(self) -> None:
        """Drop the built program and every tensor it references (momentum, parameters, statistics),
        so a load's replaced state is freed now, not at the next step's rebuild (which would hold two
        momenta, 4 B x parameters / DP, through the resumed step's peak)."""
        self.program, self.signature, self.reduce = None, None, None
        self.pieces, self.sources, self.states = [], [], []

    def release(self) -> None:
        """Drop this step's gradient references."""
        for piece in self.pieces:
            piece.grad = None

    def count_step(self) -> None:
        """Every owner's `step` + 1 (a refused step is not counted)."""
        for state in self.states:
            state["step"] += 1

    def build(self, opt) -> None:
        self.pieces, self.sources = [], []
        for src, options, layout, name, key in _sources(opt):
            role, plan, scales, exponent = self.static_part(key, options, layout, name)
            # A DTensor's step works on its local shard (views of the same storage).
            mom = local_view(opt.init_state(src.param)["momentum_buffer"])
            data, grad = local_view(src.param.data), local_view(src.param.grad)
            if src.span is not None:
                s, n = src.span
                data, grad, mom = data[s:s + n], grad[s:s + n], mom[s:s + n]
            self.pieces.append(Piece(
                param=data, grad=grad, momentum=mom, plan=plan, exponent=exponent, beta=options["momentum"],
                lookahead=options["lookahead"], lr=0.0, scales=scales, decay=1.0, eps=options["eps"], name=name))
            src.decayed = role in DECAYED_ROLES
            self.sources.append(src)
        self.program = StepProgram(self.pieces, opt.backend, device=_device(opt))
        self.states = list({id(src.param): opt.state[src.param] for src in self.sources}.values())
        items, ghost_stats = reduction_items(opt, self.sources, self.program)

        def reduce(flag: torch.Tensor, reducer=opt.reducer) -> None:
            # Every shared statistic slot plus the verdict flag [1], one all-reduce per group. It
            # runs on every step where groups are declared, so every rank agrees on a refusal even
            # when no statistic is shared (no rank is left waiting).
            for stats in ghost_stats:
                stats.zero_()                       # ghosts contribute zeros, every step
            reducer.reduce(items, flag)
        self.reduce = reduce

    def static_part(self, key: tuple, options: Mapping, layout: ShardLayout, name: str) -> tuple:
        """The piece's (role, plan, scales, exponent), cached per piece key and settings."""
        sig = tuple(options.get(k) for k in STATIC_KEYS)
        cached = self.static.get(key)
        if cached is not None and cached[0] == sig:
            return cached[1]
        role = role_of(options, layout)
        matrix = layout.global_matrix_shape
        if role in ("hidden", "head") and matrix is None:
            raise ValueError(f"{name} has role {role!r} but global_shape {layout.global_shape}; "
                             "roles hidden/head need a 2-D weight")
        plan = build_plan(layout, options["norm"] if role == "hidden" else "row") if role in ("hidden", "head") \
            else None
        scales = update_scales(role, options["norm"], matrix, p=options["p"], q=options["q"],
                               mult=options[f"{role}_mult"], head_width_scale=options["head_width_scale"],
                               base_width=options["base_width"],
                               block_rows=plan.block_rows if plan is not None else None)
        part = (role, plan, scales, stat_exponent(role, options["norm"], options["p"], options["q"]))
        self.static[key] = (sig, part)
        return part


def _sources(opt):
    """(source, options, layout, name, key) of every piece to update this step: each parameter
    with a gradient, or each segment of a declared flat buffer."""
    tensors = opt.tensors
    for group in opt.param_groups:
        for param in group["params"]:
            if param.grad is None:
                continue
            if param.grad.is_sparse:
                raise ValueError(f"{tensors.name_of(param)}: sparse gradients are not supported")
            owner = step_owner(param)
            flat = tensors.flat.get(id(param))
            if flat is None:
                override = tensors.options.get(id(param), {})
                options = {**group, **override} if override else group
                refuse_foreign(tensors, options, param)
                yield (_Source(param, owner, None, group, override, None), options, tensors.layout_of(param),
                       tensors.name_of(param), (id(param), -1))
                continue
            for k, seg in enumerate(flat.segments):
                flat_lr = (seg.options.get("lr", flat.base_lr), flat.base_lr)
                yield (_Source(param, owner, (seg.start, seg.numel), group, seg.options, flat_lr),
                       {**group, **seg.options}, seg.layout, f"parameter {seg.name!r}", (id(param), k))


def refuse_foreign(tensors, options: Mapping, param: torch.Tensor) -> None:
    """Refuse a 1-D tensor MOGA was not given, and any tensor torch FSDP1 flattened that no
    adopter mapped: either would otherwise get its matrix updated as a vector, a silent wrong update."""
    if is_fsdp1_flattened(param) and id(param) not in tensors.layouts:
        raise ValueError(
            f"{tensors.name_of(param)} (local shape {tuple(param.shape)}) is a flattened shard made by torch FSDP1 "
            "(FullyShardedDataParallel) that moga_dist.engines.fsdp1 could not map back to its parameter; "
            "updating it as a vector would be wrong. Call moga_dist.engines.fsdp1.attach(fsdp_model, optimizer), "
            "or use FSDP2 (fully_shard), which MOGA maps exactly")
    if is_dtensor(param) and id(param) not in tensors.layouts and param.dim() >= 2:
        raise ValueError(f"{tensors.name_of(param)} is a DTensor that MOGA has no layout for "
                         "(swapped in after the last step program was built); call optimizer.refresh_tensors()")
    if id(param) in tensors.known or param.dim() >= 2 or options.get("role") in ("vector", "embedding") \
            or id(param) in tensors.layouts:
        return
    raise ValueError(
        f"MOGA was handed a 1-D tensor of {param.numel()} elements it was not constructed with "
        f"(role {options.get('role')!r}), a plain tensor that is neither a DTensor nor an FSDP1 shard: "
        "something replaced the parameters in MOGA's groups after it was built, and a 1-D tensor may be a "
        "flat partition of a matrix. If it is a genuine vector, give its group role='vector'. DeepSpeed ZeRO: "
        "hand MOGA to deepspeed.initialize (moga_dist maps its partitions); Megatron's distributed optimizer: "
        "moga_dist.engines.megatron.get_megatron_optimizer(...).")


def signature(opt) -> tuple:
    """Everything a StepProgram depends on besides lr and weight decay. Cheap: one tuple per
    parameter."""
    sig: list = [opt.tensors.epoch]
    state = opt.state
    for group in opt.param_groups:
        sig.append(tuple(group.get(k) for k in PROGRAM_KEYS))
        for p in group["params"]:
            g = p.grad
            if g is None:
                sig.append(None)
                continue
            st = state.get(p)
            mom = st.get("momentum_buffer") if st else None
            sig.append((id(p), local_view(p).data_ptr(), id(mom), g.dtype, g.is_contiguous()))
    return tuple(sig)


def reduction_items(opt, sources: list[_Source], program: StepProgram) -> tuple[list, tuple]:
    """(plan, stats view) pairs in an order every rank agrees on (empty when nothing is shared),
    and the ghost statistics: parameters this rank holds nothing of contribute zeros from them. A
    flat buffer's segments share their parameter's key and keep their order within it."""
    tensors = opt.tensors
    items = [((tensors.order.get(id(src.param), i), i), pc.plan, st)
             for i, (src, pc, st) in enumerate(zip(sources, program.pieces, program.stats))
             if pc.plan is not None]
    ghost_stats: tuple = ()
    ghosts = tensors.ghosts
    if ghosts:
        # Zeros of the ghost parameter's statistics dtype, so every rank packs the same buffer.
        stores = {dt: torch.zeros(sum(g.plan.num_stats for g in ghosts if g.dtype == dt), dtype=dt,
                                  device=program.device) for dt in {g.dtype for g in ghosts}}
        used = dict.fromkeys(stores, 0)
        for g in ghosts:
            n = g.plan.num_stats
            items.append(((g.order_key, -1), g.plan, stores[g.dtype][used[g.dtype]:used[g.dtype] + n]))
            used[g.dtype] += n
        ghost_stats = tuple(stores.values())
    if tensors.order:
        items.sort(key=lambda item: item[0])
    if not any(plan.group_slots for _, plan, _ in items):
        return [], ghost_stats
    return [(plan, st) for _, plan, st in items], ghost_stats


def _device(opt) -> torch.device:
    for group in opt.param_groups:
        for p in group["params"]:
            return p.device
    return torch.device("cpu")
