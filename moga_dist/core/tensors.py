"""What MOGA is told about its tensors beyond torch.optim's param groups: shard layouts,
per-tensor options, flat buffers of many parameters, a global reduction order and ghosts.

`TensorRegistry` is held by the optimizer (composition): the optimizer's public `declare*`
methods validate and store here, and the step reads it. Every change bumps `epoch`, which the
cached step program's signature includes, so a declaration always reaches the next step.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .flat import FlatSegment
from .layout import ShardLayout
from .plan import Plan


@dataclass
class FlatBuffer:
    """A 1-D tensor of the param groups that holds pieces of many parameters (ZeRO, Megatron's
    distributed optimizer). A segment's lr is options["lr"] * group lr / base_lr."""

    segments: list[FlatSegment]
    base_lr: float


@dataclass
class Ghost:
    """A parameter of which this rank holds nothing but whose statistics other ranks share: it
    contributes zeros to the step's all-reduce so every rank packs the same buffer."""

    order_key: object
    plan: Plan
    dtype: torch.dtype = torch.float32      # float64 when the parameter is float64 (its statistics are)


@dataclass
class TensorRegistry:
    """Declarations keyed by tensor identity (`id`), plus the ids MOGA was constructed with."""

    layouts: dict[int, ShardLayout] = field(default_factory=dict)
    options: dict[int, dict] = field(default_factory=dict)
    order: dict[int, object] = field(default_factory=dict)
    flat: dict[int, FlatBuffer] = field(default_factory=dict)
    ghosts: list[Ghost] = field(default_factory=list)
    known: set[int] = field(default_factory=set)
    names: dict[int, str] = field(default_factory=dict)
    epoch: int = 0
    # An engine's description of its groups, slot by slot (core/param_spec.py), and which tensor
    # each slot was last declared for.
    slots: list[list] = field(default_factory=list)
    slot_ids: dict[tuple[int, int], int] = field(default_factory=dict)

    def changed(self) -> None:
        """A declaration or a setting changed: the step program must be rebuilt."""
        self.epoch += 1

    def layout_of(self, tensor: torch.Tensor) -> ShardLayout:
        """The tensor's layout (a whole tensor unless one was declared)."""
        return self.layouts.get(id(tensor)) or ShardLayout(tuple(tensor.shape))

    def name_of(self, tensor: torch.Tensor) -> str:
        """How errors name a tensor: its declared name, else its shape."""
        return self.names.get(id(tensor)) or f"parameter of shape {tuple(tensor.shape)}"

    def index_names(self, param_groups: list[dict]) -> None:
        """Remember each group's ``param_names`` (errors name parameters by them)."""
        self.names = {id(p): f"parameter {g['param_names'][i]!r}" for g in param_groups
                      if "param_names" in g for i, p in enumerate(g["params"])}


def role_of(options: Mapping, layout: ShardLayout) -> str:
    """The role in `options`, or by default hidden for a 2-D (or flattened N-D) global shape,
    vector otherwise."""
    if options.get("role"):
        return options["role"]
    return "hidden" if layout.global_matrix_shape is not None else "vector"
