"""What MOGA is told about its tensors beyond torch.optim's param groups: shard layouts,
per-tensor options, flat buffers of many parameters, and a global reduction order.

A mixin of MOGA (it uses the optimizer's param_groups, defaults and reducer); split out so the
optimizer module holds the step. Every setter invalidates the cached step program.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from .flat import FlatSegment
from .hparams import check_hparams
from .layout import ShardLayout
from .plan import build_plan


class TensorRegistry:
    """Layouts, options, flat buffers and order, keyed by tensor identity."""

    def add_param_group(self, param_group):
        """torch.optim's add_param_group, remembering which tensors MOGA was given."""
        super().add_param_group(param_group)
        self._names = None
        self._epoch = getattr(self, "_epoch", 0) + 1
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
        self._invalidate()

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
        self._invalidate()

    def set_param_options(self, options: Mapping) -> None:
        """Per-tensor settings over its group's, e.g. {tensor: {"role": "embedding"}} for engines whose
        param groups mix roles (Megatron groups by weight-decay and lr multipliers)."""
        for tensor, opts in options.items():
            self._check_member(tensor)
            check_hparams({**self.defaults, **opts}, f"options of {self._name(tensor)}")
            self._param_options[id(tensor)] = dict(opts)
        self._invalidate()

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
        self._invalidate()

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
        self._invalidate()

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

