"""Roles for a MOGA built from parameters without them, whichever front door built it.

The Hugging Face Trainer without DeepSpeed (its weight-decay / no-decay groups), litgpt
(`instantiate_torch_optimizer(..., model.parameters())`), Lightning's `configure_optimizers`
with `self.parameters()` and torchtitan's regex groups all hand MOGA matrices without a role;
by default MOGA would update an embedding or output head as a hidden matrix (row-normalized,
d_in-scaled), a silent wrong update. So before the first step (and again when its tensors
change) MOGA resolves every role-less matrix:

1. `take_roles(optimizer, model)`, called by a front door or the user, declares each
   parameter's role exactly as `param_groups(model)` assigns it;
2. otherwise MOGA looks for the model that owns the matrices (the `nn.Module` tree holding them,
   found through the garbage collector's object graph, as a debugger would) and takes the roles
   from it;
3. where no single model owns them, it warns once (`MissingRolesWarning`), naming the matrices
   it updates as hidden and the one-line fix.

A group's "role" and a role declared per tensor (engines do this) are never overridden.
"""
from __future__ import annotations

import gc
import logging
import os
import sys
import warnings
import weakref
from collections.abc import Mapping

import torch
from torch import nn

from .param_groups import assign_roles

log = logging.getLogger("moga_dist")

_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # optimizer -> registry epoch
_WARNED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()    # optimizer -> ids warned about
_INTERNAL = (f"{os.sep}moga_dist{os.sep}", f"{os.sep}torch{os.sep}")
_SHOWN = 8                                                          # matrices named in a warning


class MissingRolesWarning(UserWarning):
    """MOGA updates matrices without a role as hidden and could not find the model that owns
    them; if one is an embedding or an output head, its update is wrong."""


def take_roles(optimizer, model: nn.Module, overrides: Mapping[str, str] | None = None,
               head: nn.Module | str | None = None) -> dict[str, str]:
    """Give every parameter of `model` that sits in a role-less group of `optimizer` (a MOGA)
    its role, as `param_groups(model, overrides, head)` would; returns {name: role} declared.

    For front doors that build MOGA from bare parameters or their own groups: call it once after
    the optimizer is built and before its first step. Groups with a "role" keep it; the groups
    themselves (and so LR schedulers and checkpoints) are unchanged: the role is declared per
    tensor (`MOGA.declare(tensor, options={"role": ...})`)."""
    roles = assign_roles(model, overrides, head)
    by_id = {}
    for name, param in model.named_parameters():
        if name in roles:
            by_id.setdefault(id(param), (name, roles[name]))
    taken = {}
    for group in optimizer.param_groups:
        if group.get("role"):
            continue
        for param in group["params"]:
            if id(param) in by_id:
                name, role = by_id[id(param)]
                _declare_role(optimizer, param, role)
                taken[name] = role
    _CHECKED.pop(optimizer, None)
    return taken


def resolve_missing_roles(optimizer) -> None:
    """Before a step: give role-less matrices the role their model assigns, or warn once.

    Cheap when nothing changed (one comparison of the registry's epoch)."""
    epoch = optimizer.tensors.epoch
    if _CHECKED.get(optimizer) == epoch:
        return
    missing = roleless_matrices(optimizer)
    if missing:
        found, reasons = owner_roles(missing)
        for param in missing:
            if id(param) in found:
                _declare_role(optimizer, param, found[id(param)][1])
        if found:
            log.info("MOGA took the roles of %d matrices from their model: %s", len(found),
                     ", ".join(f"{n}={r}" for n, r in list(found.values())[:_SHOWN]))
        warned = _WARNED.setdefault(optimizer, set())
        left = [p for p in missing if id(p) not in found and id(p) not in warned]
        if left:
            warned.update(id(p) for p in left)
            warnings.warn(_message(optimizer, left, reasons), MissingRolesWarning, stacklevel=_callers_level())
    _CHECKED[optimizer] = optimizer.tensors.epoch


def roleless_matrices(optimizer) -> list[torch.Tensor]:
    """Trainable tensors of the param groups whose global shape is a matrix and that have no
    role (neither their group's nor one declared for them): MOGA would update them as hidden."""
    tensors = optimizer.tensors
    out = []
    for group in optimizer.param_groups:
        if group.get("role"):
            continue
        for param in group["params"]:
            if id(param) in tensors.flat or not param.requires_grad \
                    or tensors.options.get(id(param), {}).get("role"):
                continue
            if tensors.layout_of(param).global_matrix_shape is not None:
                out.append(param)
    return out


def owner_roles(params: list[torch.Tensor]) -> tuple[dict[int, tuple[str, str]], list[str]]:
    """({id(param): (name, role)} for params a model owns, reasons some could not be resolved).

    The owner is the smallest module of a module tree that holds all of that tree's candidates
    (a DDP, compile or Lightning wrapper is looked through), so its `get_output_embeddings` and
    names decide the head as `param_groups` would. A parameter two models disagree about is left
    unresolved."""
    ids = {id(p) for p in params}
    # Cheap test first (one pass over the heap, no list of it): does a module's parameter dict
    # (a dict whose values are the tensors themselves) hold any of them?
    if not any(isinstance(r, dict) and any(id(v) in ids for v in r.values()) for r in gc.get_referrers(*params)):
        return {}, []
    modules = [o for o in gc.get_objects() if issubclass(type(o), nn.Module)]
    children = {id(c) for m in modules for c in m.children()}
    found: dict[int, tuple[str, str]] = {}
    clash, reasons, seen = set(), [], set()
    for root in (m for m in modules if id(m) not in children):
        mine = ids & {id(p) for p in root.parameters()}
        if not mine:
            continue
        model = _smallest_owner(root, mine)
        if id(model) in seen:
            continue
        seen.add(id(model))
        try:
            roles = assign_roles(model)
        except ValueError as exc:
            reasons.append(f"{type(model).__name__}: {exc}")
            continue
        for name, param in model.named_parameters():
            if id(param) in mine and name in roles:
                if id(param) in found and found[id(param)][1] != roles[name]:
                    clash.add(id(param))
                found.setdefault(id(param), (name, roles[name]))
    if clash:
        reasons.append(f"{len(clash)} matrices belong to models that disagree on their role")
    return {k: v for k, v in found.items() if k not in clash}, reasons


def _smallest_owner(module: nn.Module, mine: set[int]) -> nn.Module:
    """Descend while a child alone holds every id in `mine` and the module holds none itself."""
    while not any(id(p) in mine for p in module.parameters(recurse=False)):
        holders = [c for c in module.children() if mine <= {id(p) for p in c.parameters()}]
        if not holders:
            break
        # Fabric keeps DDP(model) and model side by side: the smaller tree is the model itself.
        module = min(holders, key=lambda c: sum(1 for _ in c.modules()))
    return module


def _callers_level() -> int:
    """warnings' stacklevel of the first frame outside moga_dist and torch (the user's step())."""
    frame, level = sys._getframe(1), 1
    while frame is not None and any(part in frame.f_code.co_filename for part in _INTERNAL):
        frame, level = frame.f_back, level + 1
    return level


def _declare_role(optimizer, param: torch.Tensor, role: str) -> None:
    options = {**optimizer.tensors.options.get(id(param), {}), "role": role}
    optimizer.declare(param, options=options)


def _message(optimizer, params: list[torch.Tensor], reasons: list[str]) -> str:
    names = [f"{optimizer.tensors.names.get(id(p), 'a tensor')} of shape {tuple(optimizer.layout_of(p).global_shape)}"
             for p in params]
    shown = "; ".join(names[:_SHOWN]) + (f"; and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")
    why = f" ({'; '.join(reasons)})" if reasons else ""
    return (f"MOGA: {len(params)} matrices have no role and MOGA found no model that owns them{why}; it updates "
            f"them as hidden matrices (row-normalized, d_in-scaled): {shown}. If one is an embedding or an output "
            "head, that is the wrong update: build MOGA(param_groups(model), ...), or call "
            "moga_dist.take_roles(optimizer, model) before the first step (or give each group its 'role').")
