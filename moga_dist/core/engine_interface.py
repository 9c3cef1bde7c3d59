"""The interface engines use: how an engine (or a front door: `take_roles`, FSDP1, DTensors) tells
`MOGA` about the tensors in its param groups, names process groups, reads back what MOGA knows,
creates state and holds a step back.

A mixin (`EngineInterface`) that `MOGA` inherits, not a separate object MOGA owns: every engine
holds the optimizer itself (DeepSpeed's and Megatron's wrappers, torch.optim schedulers) and calls
these as MOGA's methods (`moga.declare_engine(...)`, `MOGA.from_engine(...)`), so the public API
stays one class while core/optimizer.py keeps torch.optim's part (constructor, `step`,
`_init_group`, state dicts, pickling). The mixin has no `__init__` and no state of its own: it
reads and writes what `MOGA.__init__` sets up (torch.optim's `param_groups`, `defaults`, `state`;
MOGA's `tensors` registry, `reducer`, `_programs` cache, `_suspended` flag), so pickling and
copies are MOGA's `__getstate__`/`__setstate__` alone. No engine is imported here.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Self

import torch

from .adopters import ADOPTERS
from .collectives import StatReducer
from .dtensor import declare_swapped_dtensors, local_view
from .flat import FlatSegment
from .hparams import check_hparams
from .layout import ShardLayout
from .param_spec import ParamSpec, Slot, check_slots, declare_slots
from .plan import build_plan
from .roles import resolve_missing_roles
from .step_builder import ProgramCache
from .tensors import FlatBuffer, Ghost, TensorRegistry, role_of


class EngineInterface:
    """MOGA's methods for engines and front doors: describe tensors (`from_engine`,
    `declare_engine`, `declare*`, `replace_param_groups`), name process groups
    (`set_process_group`, `process_group`), read declarations (`layout_of`, `options_of`), make
    state (`init_state`), rebuild (`invalidate`, `refresh_tensors`) and hold a step back
    (`suspended`). Mixed into `MOGA` (core/optimizer.py); not usable alone."""

    # What the methods use, set by torch.optim.Optimizer.__init__ and MOGA.__init__ (and restored by
    # MOGA.__setstate__): the mixin itself adds no attribute.
    param_groups: list[dict]
    defaults: dict
    state: dict
    tensors: TensorRegistry
    reducer: StatReducer
    _programs: ProgramCache
    _suspended: bool

    # ----- describing tensors ------------------------------------------------------------------
    @classmethod
    def from_engine(cls, groups: list[dict], specs: Sequence[Sequence[Slot]], *,
                    process_groups: Mapping | None = None, ghosts: Iterable[ParamSpec] = (), **settings) -> Self:
        """MOGA over an engine's own tensors (Megatron's fp32 shards, which may be non-leaf views of
        its buffers), described slot by slot: the one constructor for engine adapters.

        groups: param groups whose "params" are the engine's tensors, plus per-group settings
            (missing ones take `settings`, then MOGA's defaults).
        specs: specs[i][j] describes groups[i]["params"][j]: a ParamSpec (that tensor is the
            parameter, or its shard per spec.layout) or a FlatBuffer (it holds segments of many);
            see `declare_engine`.
        process_groups: {key: ProcessGroup} the layouts name (e.g. "tp", "dp").
        ghosts: ParamSpecs of parameters this rank holds nothing of but shares statistics of
            (layout.local_numel == 0), see `declare_ghosts`.
        settings: MOGA's keyword arguments (lr, momentum, norm, backend, ...)."""
        # torch.optim refuses an empty parameter list and leaf-checks tensors: start from one empty
        # group, then adopt the engine's groups as they are.
        moga = cls([{"params": []}], **settings, process_groups=process_groups)
        moga.replace_param_groups(groups)
        moga.declare_engine(specs, ghosts=ghosts)
        return moga

    def declare_engine(self, specs: Sequence[Sequence[Slot]], *, process_groups: Mapping | None = None,
                       ghosts: Iterable[ParamSpec] | None = None) -> None:
        """Describe the param groups slot by slot for an engine that owns the tensors in them:
        specs[i][j] (a ParamSpec, or a FlatBuffer of segments) is what param_groups[i]["params"][j]
        holds. The tensors there now are declared at once; a tensor the engine puts into a slot later
        (Megatron's Float16 wrapper swaps in fp32 main copies; ZeRO-3 fills its groups only while it
        steps) is declared with the slot's description before the next step-program build. A group
        holding more tensors than described is refused at that build. process_groups: named as by
        `set_process_group`; ghosts: ParamSpecs for `declare_ghosts` (None: keep the current ones)."""
        slots = check_slots(specs, self.param_groups)
        for key, group in (process_groups or {}).items():
            self.set_process_group(key, group)
        self.tensors.slots, self.tensors.slot_ids = slots, {}
        if ghosts is not None:
            self.declare_ghosts([g.ghost() if isinstance(g, ParamSpec) else g for g in ghosts])
        declare_slots(self)
        self.invalidate()

    def declare(self, tensor: torch.Tensor, *, layout: ShardLayout | None = None,
                options: Mapping | None = None, order_key=None) -> None:
        """Tell MOGA about one tensor of its param groups.

        layout: where the local tensor sits in its global matrix (numel must match);
        options: settings over its group's, e.g. {"role": "embedding"} where an engine's groups mix
        roles; order_key: a key equal on every rank for the same parameter, so the reduction order
        does not depend on which tensors a rank holds."""
        self._check_member(tensor)
        name = self.tensors.name_of(tensor)
        if layout is not None:
            if not isinstance(layout, ShardLayout):
                raise ValueError(f"layout must be a ShardLayout, got {type(layout).__name__}")
            if local_view(tensor).numel() != layout.local_numel:
                raise ValueError(f"{name}: local numel {tensor.numel()} does not match its layout "
                                 f"({layout.local_numel} elements of global {layout.global_shape})")
            self._check_groups(layout)
            self.tensors.layouts[id(tensor)] = layout
        if options is not None:
            check_hparams({**self.defaults, **options}, f"options of {name}")
            self.tensors.options[id(tensor)] = dict(options)
        if order_key is not None:
            self.tensors.order[id(tensor)] = order_key
        self.tensors.known.add(id(tensor))
        self.invalidate()

    def declare_flat_buffer(self, buffer: torch.Tensor, segments: list[FlatSegment], base_lr: float) -> None:
        """Declare `buffer` (a 1-D tensor of the param groups) as segments of parameters, each
        updated as its own parameter with its own layout and options; a segment's lr is
        options["lr"] * group["lr"] / base_lr, so a schedule on the buffer's group applies (with
        base_lr 0, the group's lr itself: there is no ratio to keep)."""
        self._check_member(buffer)
        if buffer.dim() != 1:
            raise ValueError(f"a flat buffer must be 1-D, got shape {tuple(buffer.shape)}")
        if not base_lr >= 0:
            raise ValueError(f"base_lr={base_lr!r}: must be >= 0 (segment lrs are relative to it)")
        for seg in segments:
            if seg.start < 0 or seg.start + seg.numel > buffer.numel():
                raise ValueError(f"segment {seg.name!r} [{seg.start}, {seg.start + seg.numel}) lies outside "
                                 f"the buffer of {buffer.numel()} elements")
            check_hparams({**self.defaults, **seg.options}, f"segment {seg.name!r}")
            self._check_groups(seg.layout)
        self.tensors.flat[id(buffer)] = FlatBuffer(list(segments), float(base_lr))
        self.tensors.known.add(id(buffer))
        self.invalidate()

    def declare_ghosts(self, ghosts: list[tuple]) -> None:
        """ParamSpecs (or (order_key, ShardLayout, options) tuples) of parameters this rank holds nothing of but whose
        statistics other ranks share (Megatron's distributed optimizer drops them from a rank's
        groups); they contribute zeros so every rank packs the same all-reduce buffer, and their
        process groups join every step's all-reduce. options["dtype"] = torch.float64 for a
        float64 parameter (its statistics are float64 on the ranks that hold it)."""
        self.tensors.ghosts = []
        for key, layout, options in (g.ghost() if isinstance(g, ParamSpec) else g for g in ghosts):
            if layout.local_numel != 0:
                raise ValueError(f"ghost {key!r} must hold nothing locally, its layout holds {layout.local_numel}")
            # A rank may share a group only through ghosts: it must join every step's all-reduce.
            self._check_groups(layout)
            role = role_of(options, layout)
            if role in ("hidden", "head"):
                axis = {**self.defaults, **options}["norm"] if role == "hidden" else "row"
                plan = build_plan(layout, axis)
                if plan.group_slots:
                    self.tensors.ghosts.append(Ghost(key, plan, options.get("dtype", torch.float32)))
        self.invalidate()

    def replace_param_groups(self, groups: list[dict]) -> None:
        """Replace the param groups with engine-owned tensors, which may be views of a buffer
        (non-leaf, so torch's add_param_group would refuse them); missing settings take defaults."""
        for i, group in enumerate(groups):
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            check_hparams(group, f"MOGA param group {i}")
            group["params"] = list(group["params"])
            _refuse_complex(group)
        self.param_groups = groups
        self.tensors.slots, self.tensors.slot_ids = [], {}      # an engine describes the new groups again
        self.tensors.known.update(id(p) for g in groups for p in g["params"])
        self.tensors.index_names(groups)
        self.invalidate()

    # ----- process groups, rebuilds, what was declared -----------------------------------------
    def set_process_group(self, key: str, group) -> None:
        """Name a process group that layouts refer to by `key` (e.g. "tp", "dp")."""
        self.reducer.process_groups[key] = group
        self.invalidate()

    def process_group(self, key: str):
        """The process group named `key` (by `set_process_group` or process_groups=), or None."""
        return self.reducer.process_groups.get(key)

    def invalidate(self) -> None:
        """Settings, layouts, tensors or state changed outside step(): rebuild the step program."""
        self._programs.clear()
        self.tensors.changed()

    def refresh_tensors(self) -> None:
        """Re-derive what MOGA knows about the tensors now in its groups; run before each step
        program build. A tensor an engine put into a slot it described (`declare_engine`) takes
        that slot's ParamSpec; a DTensor put into the groups after construction (Accelerate's FSDP2 swaps
        every parameter for one) gets its layout from its placements, and registered engine
        adopters (core/adopters.py: torch FSDP1) map their engine's tensors; matrices still without a
        role take their model's roles (core/roles.py)."""
        declare_slots(self)             # tensors an engine put into its described slots (from_engine)
        if declare_swapped_dtensors(self):
            self.invalidate()
        for adopt in ADOPTERS:
            adopt(self)
        resolve_missing_roles(self)     # role-less matrices left: the model's roles, or one warning

    def layout_of(self, tensor: torch.Tensor) -> ShardLayout:
        """The tensor's declared layout (a whole tensor unless one was declared)."""
        return self.tensors.layout_of(tensor)

    def options_of(self, tensor: torch.Tensor) -> dict:
        """The settings declared for the tensor over its group's (`declare(options=...)`, e.g. a
        role `take_roles` declared); {} if none."""
        return dict(self.tensors.options.get(id(tensor), {}))

    def _check_member(self, tensor: torch.Tensor) -> None:
        if not any(p is tensor for g in self.param_groups for p in g["params"]):
            raise ValueError(f"a tensor of shape {tuple(tensor.shape)} is not in this optimizer's param groups")

    def _check_groups(self, layout: ShardLayout) -> None:
        if layout.tp is not None and layout.tp.world_size > 1:
            self.reducer.check_group(layout.tp.group, layout.tp.world_size, order=1)
        if layout.flat is not None and len(layout.flat.ranges) > 1:
            self.reducer.check_group(layout.flat.group, len(layout.flat.ranges), order=0)

    # ----- state and held-back steps ---------------------------------------------------------
    def init_state(self, tensor: torch.Tensor) -> dict:
        """The tensor's state, created if missing: `momentum_buffer` of its shape (fp32; float64
        for a float64 tensor, whose math then stays float64) and `step` 0."""
        state = self.state[tensor]
        if "momentum_buffer" not in state:
            # zeros_like: a DTensor parameter gets a DTensor momentum of its placements.
            state["momentum_buffer"] = torch.zeros_like(tensor, dtype=momentum_dtype(tensor),
                                                       memory_format=torch.contiguous_format)
            state["step"] = 0
        return state

    @contextlib.contextmanager
    def suspended(self):
        """Within this context step() does nothing (an engine's set-up call with zero gradients
        would otherwise apply weight decay once)."""
        self._suspended = True
        try:
            yield self
        finally:
            self._suspended = False


def momentum_dtype(tensor: torch.Tensor) -> torch.dtype:
    """fp32 momentum for fp32 and lower precision; float64 tensors keep float64 throughout."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _refuse_complex(group: Mapping) -> None:
    """Raise for a complex tensor in `group` (a row norm of complex numbers is another algorithm)."""
    for i, t in enumerate(group["params"]):
        if isinstance(t, torch.Tensor) and t.is_complex():
            name = group["param_names"][i] if "param_names" in group else i
            raise ValueError(f"parameter {name!r} of a group is complex ({t.dtype}): MOGA supports real floating "
                             "tensors only; view it as real (torch.view_as_real) or use another optimizer")
