"""Engine adapters that recognise their engine's tensors in MOGA's param groups (torch FSDP1's
flat shards) register here; MOGA runs them before it builds a step program, so a MOGA built
before or after the engine wrapped the model (Accelerate, Lightning, litgpt) gets mapped at its
first step. The core imports no engine: engines append themselves (moga_dist/__init__.py).

An adopter is a callable adopter(optimizer) -> None that declares, through the optimizer's public
interface, the tensors it recognises and leaves the others alone; it must be cheap when there is
nothing of its engine in the groups (it runs at every rebuild of the step program).
"""
from __future__ import annotations

from collections.abc import Callable

ADOPTERS: list[Callable] = []
# Called with no argument whenever a MOGA is constructed: an engine that must be patched before
# it meets MOGA (DeepSpeed's initialize) installs itself on this first use, not at import.
ON_CONSTRUCT: list[Callable] = []

# torch.distributed.fsdp (FSDP1) sets this attribute on every tensor it flattened: its
# FlatParameters and, with use_orig_params=True, the original parameters it turned into 1-D views
# of a rank's shard. Such a tensor is never a vector by its shape.
FSDP1_FLATTENED = "_fsdp_flattened"


def register(adopter: Callable) -> None:
    """Run `adopter(optimizer)` before every step-program build of every MOGA (idempotent)."""
    if adopter not in ADOPTERS:
        ADOPTERS.append(adopter)


def on_construct(hook: Callable) -> None:
    """Run `hook()` at every MOGA construction (idempotent registration; the hook must be cheap)."""
    if hook not in ON_CONSTRUCT:
        ON_CONSTRUCT.append(hook)


def is_fsdp1_flattened(tensor) -> bool:
    """Whether torch FSDP1 flattened `tensor` (its 1-D shape says nothing about its role)."""
    return bool(getattr(tensor, FSDP1_FLATTENED, False))
