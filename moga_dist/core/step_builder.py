"""Turns MOGA's param groups and declarations into a StepProgram, and keeps it across steps.

The program is rebuilt only when its signature changes: which tensors have gradients (their
storage, dtype, contiguity), their momentum buffers, the per-group settings that shape the plan,
and the registry's epoch, which every declaration and `MOGA.invalidate()` bumps. Each step then
only refreshes lr and decay (schedules change them) and binds the gradients.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from . import functional as F
from .adopters import is_fsdp1_flattened
from .dtensor import is_dtensor, local_view, param_of, step_owner
from .hparams import check_decay, lr_value
from .layout import ShardLayout
from .plan import Plan, build_plan
from .program import StepProgram
from .scaling import stat_exponent, update_scales
from .tensors import role_of

DECAYED_ROLES = ("hidden", "embedding", "head")
STATIC_KEYS = ("role", "norm", "p", "q", "hidden_mult", "embedding_mult", "head_mult", "vector_mult",
               "head_width_scale", "base_width")
PROGRAM_KEYS = STATIC_KEYS + ("momentum", "lookahead", "eps")


@dataclass
class RateSource:
    """Where a piece's lr and weight decay are re-read from each step: its group, the tensor's or
    segment's own options, and for a flat-buffer segment (its lr, the buffer's base lr)."""

    decayed: bool
    group: dict
    override: Mapping
    flat_lr: tuple[float, float] | None


@dataclass
class Unit:
    """One piece to plan: `owner` (a param-group tensor) or its span [start, start + numel)."""

    owner: torch.Tensor
    span: tuple[int, int] | None
    options: Mapping
    layout: ShardLayout
    key: tuple
    name: str
    rate: RateSource


@dataclass
class StaticPart:
    """What only changes with the settings: role, reduction plan, per-block scales, exponent r."""

    role: str
    plan: Plan | None
    scales: list[float]
    exponent: float


class ProgramCache:
    """The cached StepProgram of one MOGA and the per-unit static parts it was built from."""

    def __init__(self):
        self.static: dict[tuple, tuple[tuple, StaticPart]] = {}
        self.program: StepProgram | None = None

    def clear(self) -> None:
        """Settings changed: recompute the static parts at the next build."""
        self.static.clear()

    def get(self, opt) -> StepProgram:
        """The program for `opt`'s current tensors, rebuilt if its signature changed, with this
        step's lr and decay set on every piece and the gradients bound."""
        sig = signature(opt)
        program = self.program
        if program is None or program.signature != sig:
            # Tensors may have been swapped in since the last build (Accelerate, FSDP1 wrapping).
            opt.refresh_tensors()
            program = self.build(opt)
            program.signature = signature(opt)      # momentum buffers may have just been created
            program.reduce_items = reduction_items(opt, program)
            self.program = program
        for piece, rate in zip(program.pieces, program.rates):
            group_lr = lr_value(rate.group["lr"])
            if rate.flat_lr is None:
                lr = lr_value(rate.override.get("lr", group_lr))
            else:
                seg_lr, base_lr = rate.flat_lr
                lr = seg_lr * group_lr / base_lr if base_lr else group_lr
            piece.lr = lr
            wd = rate.override.get("weight_decay", rate.group["weight_decay"])
            if rate.decayed:
                check_decay(lr, wd, piece.name or "MOGA")       # before any tensor is written
            piece.decay = 1.0 - lr * wd if rate.decayed else 1.0
        program.bind()
        return program

    def build(self, opt) -> StepProgram:
        owned, rates = [], []
        for unit in units(opt):
            part = self.static_part(unit)
            # A DTensor's step works on its local shard (views of the same storage).
            mom = local_view(opt.init_state(unit.owner)["momentum_buffer"])
            data, grad = local_view(unit.owner.data), local_view(unit.owner.grad)
            if unit.span is not None:
                s, n = unit.span
                data, grad, mom = data[s:s + n], grad[s:s + n], mom[s:s + n]
            owned.append((step_owner(unit.owner), unit.span, F.Piece(
                param=data, grad=grad, momentum=mom, plan=part.plan, exponent=part.exponent,
                beta=unit.options["momentum"], lookahead=unit.options["lookahead"], lr=0.0, scales=part.scales,
                decay=1.0, eps=unit.options["eps"], name=unit.name)))
            unit.rate.decayed = part.role in DECAYED_ROLES
            rates.append(unit.rate)
        program = StepProgram(owned, opt.backend, device=_device(opt))
        program.rates = rates
        program.states = [opt.state[param_of(o)] for o in program.owners]
        return program

    def static_part(self, unit: Unit) -> StaticPart:
        """The unit's role, plan, scales and exponent (cached per unit and settings)."""
        sig = tuple(unit.options.get(k) for k in STATIC_KEYS)
        cached = self.static.get(unit.key)
        if cached is not None and cached[0] == sig:
            return cached[1]
        options, layout = unit.options, unit.layout
        role = role_of(options, layout)
        matrix = layout.global_matrix_shape
        if role in ("hidden", "head") and matrix is None:
            raise ValueError(f"{unit.name} has role {role!r} but global_shape {layout.global_shape}; "
                             "roles hidden/head need a 2-D weight")
        plan = build_plan(layout, options["norm"] if role == "hidden" else "row") if role in ("hidden", "head") \
            else None
        scales = update_scales(role, options["norm"], matrix, p=options["p"], q=options["q"],
                               mult=options[f"{role}_mult"], head_width_scale=options["head_width_scale"],
                               base_width=options["base_width"],
                               block_rows=plan.block_rows if plan is not None else None)
        part = StaticPart(role, plan, scales, stat_exponent(role, options["norm"], options["p"], options["q"]))
        self.static[unit.key] = (sig, part)
        return part


def units(opt):
    """Every piece to update this step: each parameter with a gradient, or each segment of a
    declared flat buffer."""
    tensors = opt.tensors
    for group in opt.param_groups:
        for param in group["params"]:
            if param.grad is None:
                continue
            if param.grad.is_sparse:
                raise ValueError(f"{tensors.name_of(param)}: sparse gradients are not supported")
            flat = tensors.flat.get(id(param))
            if flat is None:
                override = tensors.options.get(id(param), {})
                options = {**group, **override} if override else group
                refuse_foreign(tensors, options, param)
                yield Unit(param, None, options, tensors.layout_of(param), (id(param), -1), tensors.name_of(param),
                           RateSource(False, group, override, None))
                continue
            for k, seg in enumerate(flat.segments):
                yield Unit(param, (seg.start, seg.numel), {**group, **seg.options}, seg.layout, (id(param), k),
                           f"parameter {seg.name!r}",
                           RateSource(False, group, seg.options, (seg.options.get("lr", flat.base_lr), flat.base_lr)))


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


def reduction_items(opt, program: StepProgram) -> list:
    """(plan, stats view) pairs in an order every rank agrees on; empty when nothing is shared.
    A flat buffer's segments share their owner's key and keep their order within it; ghosts
    (parameters this rank holds nothing of) contribute zeros from program.ghost_stats."""
    tensors = opt.tensors
    items = [((tensors.order.get(id(owner), i), i), pc.plan, st)
             for i, ((owner, _, pc), st) in enumerate(zip(program.owned, program.stats))
             if pc.plan is not None]
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
        program.ghost_stats = tuple(stores.values())
    if tensors.order:
        items.sort(key=lambda item: item[0])
    if not any(plan.group_slots for _, plan, _ in items):
        return []
    return [(plan, st) for _, plan, st in items]


def _device(opt) -> torch.device:
    for group in opt.param_groups:
        for p in group["params"]:
            return p.device
    return torch.device("cpu")
