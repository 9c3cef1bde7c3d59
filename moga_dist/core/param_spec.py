"""What an engine tells MOGA about one parameter (`ParamSpec`), and the slots of its param groups.

Every engine adapter (DeepSpeed ZeRO 0-3, Megatron-core's wrappers and registry, FSDP1's flat
parameters) ends up saying the same thing about each tensor it hands MOGA: which model parameter
it is (a name), how MOGA updates it (a role), where this rank's piece sits in the global matrix (a
ShardLayout) and a key that sorts it alike on every rank. `ParamSpec` is that one description.

An engine describes its param groups slot by slot (`MOGA.from_engine` / `MOGA.declare_engine`):
`specs[i][j]` is what sits at `param_groups[i]["params"][j]`, either one parameter (a ParamSpec)
or a flat buffer of many (a `FlatBuffer` of FlatSegments). A slot keeps its description when the
engine puts another tensor into it later (Megatron's Float16 wrapper swaps each bf16 parameter
for its fp32 main copy after MOGA is built; ZeRO-3 fills its groups only while it steps): such a
tensor is declared at the next step-program build (`declare_slots`, run by `refresh_tensors`).
"""
from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

from .flat import FlatSegment
from .layout import ShardLayout
from .scaling import ROLES
from .tensors import FlatBuffer


@dataclass(frozen=True)
class ParamSpec:
    """One model parameter as an engine describes it to MOGA.

    name: the model's name for it, e.g. "decoder.layers.0.mlp.linear_fc1.weight" (errors and
        checkpoints name parameters by it).
    role: "hidden" | "embedding" | "head" | "vector", or None for the default by global shape
        (hidden for >= 2-D, vector otherwise); engines take it from `param_groups.assign_roles`.
    layout: the global shape [d_out, d_in, ...] and where this rank's local tensor sits in it
        (tensor-parallel split, flat data-parallel range, fused row blocks); a whole tensor is
        ShardLayout(tuple(shape)).
    order_key: equal on every rank for the same parameter, so the statistics all-reduce packs
        pieces in one order whichever pieces a rank holds (None: the slot order).
    options: MOGA settings over its group's that travel with the parameter (e.g. the unscheduled
        "lr" of its group when the engine merges groups into one flat buffer); not the role.
    """

    name: str
    role: str | None
    layout: ShardLayout
    order_key: Hashable | None = None
    options: Mapping = field(default_factory=dict)

    def __post_init__(self):
        if self.role is not None and self.role not in ROLES:
            raise ValueError(f"ParamSpec {self.name!r}: role={self.role!r}; allowed: {list(ROLES)} or None")
        if not isinstance(self.layout, ShardLayout):
            raise ValueError(f"ParamSpec {self.name!r}: layout must be a ShardLayout, got {type(self.layout).__name__}")  # noqa: TRY004
        if "role" in self.options:
            raise ValueError(f"ParamSpec {self.name!r}: the role goes in ParamSpec.role, not in options")

    def declared_options(self) -> dict | None:
        """What `MOGA.declare(tensor, options=...)` gets for a tensor that is this parameter."""
        if self.role is None:
            return dict(self.options) or None
        return {**self.options, "role": self.role}

    def segment(self, start: int, layout: ShardLayout | None = None) -> FlatSegment:
        """This parameter's piece at buffer[start : start + layout.local_numel] of a flat buffer
        (`layout`: its flat partition there, default this spec's layout)."""
        return FlatSegment(start, layout if layout is not None else self.layout, self.name,
                           {**self.options, "role": self.role})

    def ghost(self) -> tuple:
        """(order_key, layout, options) of `MOGA.declare_ghosts`: this rank holds nothing of it."""
        return self.order_key, self.layout, {**self.options, "role": self.role}


Slot = ParamSpec | FlatBuffer


def check_slots(specs: Sequence[Sequence[Slot]], groups: list[dict]) -> list[list[Slot]]:
    """`specs` as lists, one per param group; raises naming the group or slot that does not fit."""
    out = [list(s) for s in specs]
    if len(out) != len(groups):
        raise ValueError(f"the engine described {len(out)} param groups, MOGA has {len(groups)}")
    for i, slots in enumerate(out):
        for j, spec in enumerate(slots):
            if not isinstance(spec, ParamSpec | FlatBuffer):
                raise ValueError(f"param group {i} slot {j}: a ParamSpec or FlatBuffer, got {type(spec).__name__}")  # noqa: TRY004
    return out


def declare_slots(optimizer) -> bool:
    """Declare each tensor now in a described slot of `optimizer`'s groups that was not declared
    for that slot yet; returns whether any was. A group holding more tensors than the engine
    described is refused (an undescribed tensor would be updated by its shape alone)."""
    tensors = optimizer.tensors
    if not tensors.slots:
        return False
    changed = False
    for i, group in enumerate(optimizer.param_groups):
        slots = tensors.slots[i] if i < len(tensors.slots) else []
        params = group["params"]
        if len(params) > len(slots):
            raise ValueError(f"param group {i} of MOGA holds {len(params)} tensors, but its engine described "
                             f"{len(slots)}: something put tensors into it that no adapter mapped")
        for j, tensor in enumerate(params):
            if tensors.slot_ids.get((i, j)) == id(tensor):
                continue
            spec = slots[j]
            if isinstance(spec, FlatBuffer):
                optimizer.declare_flat_buffer(tensor, spec.segments, spec.base_lr)
            else:
                optimizer.declare(tensor, layout=spec.layout, options=spec.declared_options(),
                                  order_key=spec.order_key)
            tensors.slot_ids[(i, j)] = id(tensor)
            changed = True
    return changed
