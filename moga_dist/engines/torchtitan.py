"""torchtitan adapter: an `OptimizersContainer` that knows "MOGA" and gives it the model's roles.

torchtitan resolves optimizer names from a closed list (`NotImplementedError: Optimizer MOGA not
added`) and builds its groups from FQN regexes, without roles. `MOGAOptimizersContainer` adds
"MOGA" to the list and, once torchtitan has built its groups, declares every parameter's role as
`param_groups(model_part)` assigns it (`moga_dist.take_roles`); everything else (several
optimizers, FQN-keyed checkpoints through DCP, LR schedulers) is torchtitan's own. DTensor
parameters (FSDP2, TP) describe their own sharding, so MOGA is exact at any layout torchtitan's
parallelize functions produce.

In a torchtitan config module, one import::

    from moga_dist.engines.torchtitan import moga_optimizer
    config.optimizer = moga_optimizer(lr=1.6e-2, weight_decay=0.1, norm="row")
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn
from torchtitan.components.optimizer import OptimizersContainer, ParamGroupConfig

from ..core.optimizer import MOGA
from ..core.roles import take_roles

NAME = "MOGA"
# torchtitan puts its implementation switches into every group; MOGA picks its backend itself.
_IMPL_KEYS = ("fused", "foreach")


def build_moga(param_groups: list[dict], **kwargs) -> MOGA:
    """torchtitan's optimizer factory for "MOGA": its regex groups (each with "param_names")
    minus torchtitan's fused/foreach switches; roles come afterwards from the container."""
    groups = [{k: v for k, v in g.items() if k not in _IMPL_KEYS} for g in param_groups]
    return MOGA(groups, **kwargs)


class MOGAOptimizersContainer(OptimizersContainer):
    """torchtitan's OptimizersContainer with "MOGA" among its optimizer names; each MOGA gets
    the roles of the model part it optimizes (embedding, head, hidden, vector). Other names
    (AdamW for some groups, say) are built as torchtitan builds them."""

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        role_overrides: dict[str, str] | None = None
        """{regex: role} over parameter FQNs, as `param_groups(model, overrides=...)` takes them."""

        head: str | None = None
        """FQN of the output projection when it is not called output, lm_head or output_layer."""

    @staticmethod
    def _resolve_optimizer_factory(name: str):
        if name == NAME:
            return build_moga
        return OptimizersContainer._resolve_optimizer_factory(name)

    def __init__(self, config: Config, *, model_parts: list[nn.Module]) -> None:
        super().__init__(config, model_parts=model_parts)
        for optimizer in self.optimizers:
            if isinstance(optimizer, MOGA):
                mine = {id(p) for g in optimizer.param_groups for p in g["params"]}
                for part in model_parts:
                    if any(id(p) in mine for p in part.parameters()):
                        take_roles(optimizer, part, config.role_overrides, config.head)


def moga_optimizer(lr: float = 1.6e-2, *, role_overrides: dict[str, str] | None = None, head: str | None = None,
                   **moga_kwargs: Any) -> MOGAOptimizersContainer.Config:
    """A torchtitan optimizer config: one catch-all "MOGA" group (like torchtitan's
    `default_adamw`), roles from the model. moga_kwargs: MOGA's settings (weight_decay, norm,
    hidden_mult, ...), applied to every parameter."""
    return MOGAOptimizersContainer.Config(
        param_groups=[ParamGroupConfig(pattern=r".*", optimizer_name=NAME, optimizer_kwargs={"lr": lr, **moga_kwargs})],
        implementation="for-loop", role_overrides=role_overrides, head=head)
