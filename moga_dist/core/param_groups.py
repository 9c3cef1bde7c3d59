"""Assigns MOGA roles to a model's parameters: embedding, head, hidden or vector. The one rule
every front door and engine adapter uses (DeepSpeed, Megatron-core, FSDP1, `take_roles`):

1. an override pattern the caller gives ({regex: role}, first match) wins;
2. embedding: a parameter of an nn.Embedding / nn.EmbeddingBag, of a module named in
   EMBEDDING_NAMES (embedding layers that are not torch's: Megatron's VocabParallelEmbedding), or
   one marked as a pipeline stage's copy of the tied embedding (TIED_EMBEDDING_ATTR); a head tied
   to the embedding stays an embedding;
3. head: the weight of the output projection: `get_output_embeddings()`, else the first module
   named in HEAD_NAMES;
4. otherwise hidden for a >= 2-D (global) shape, vector below.
Model structure decides; names are data of this one rule (EMBEDDING_NAMES, HEAD_NAMES), matched
against a module's own name, never a parameter-name suffix. No engine imports.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from .adopters import is_fsdp1_flattened
from .scaling import ROLES

HEAD_NAMES = ("lm_head", "output_layer", "output")
EMBEDDING_NAMES = ("word_embeddings",)
# Megatron sets it on the last pipeline stage's copy of a tied embedding (whose gradient is summed
# with the first stage's): both copies must take the same (embedding) update to stay equal.
TIED_EMBEDDING_ATTR = "shared_embedding"


def is_embedding_module(module: nn.Module, name: str) -> bool:
    """Whether `module` (named `name` in its model, dotted) is an embedding layer by rule 2."""
    return isinstance(module, nn.Embedding | nn.EmbeddingBag) or name.split(".")[-1] in EMBEDDING_NAMES


def structural_role(ndim: int, *, embedding: bool = False, head: bool = False, param=None) -> str:
    """The role of a parameter of `ndim` global dims by rules 2-4 (overrides are the caller's):
    embedding (of an embedding module, or `param` marked as a tied embedding), head (the output
    projection's weight), else hidden for ndim >= 2, vector below."""
    if embedding or getattr(param, TIED_EMBEDDING_ATTR, False):
        return "embedding"
    if head:
        return "head"
    return "hidden" if ndim >= 2 else "vector"


def assign_roles(model: nn.Module, overrides: Mapping[str, str] | None = None,
                 head: nn.Module | str | None = None) -> dict[str, str]:
    """{parameter name: role} for every trainable parameter.

    overrides: {regex: role}, matched against the full parameter name with re.search, first
    match wins; each pattern must match at least one parameter. head: the output projection
    (module or name); by default `model.get_output_embeddings()` or a module named lm_head,
    output_layer or output. A parameter tied to the embedding stays an embedding.
    """
    overrides = dict(overrides or {})
    for pattern, role in overrides.items():
        if role not in ROLES:
            raise ValueError(f"override {pattern!r} -> {role!r}: unknown role; allowed: {list(ROLES)}")
    embedding_ids, head_ids = set(), set()
    head_module = _find_head(model, head)
    for name, module in model.named_modules():
        if is_embedding_module(module, name):
            embedding_ids.update(id(p) for p in module.parameters(recurse=False))
    if head_module is not None:
        head_ids.add(id(head_module.weight))

    roles: dict[str, str] = {}
    used = set()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        role = None
        for pattern, forced in overrides.items():
            if re.search(pattern, name):
                role, _ = forced, used.add(pattern)
                break
        if role is None:
            role = structural_role(param.ndim, embedding=id(param) in embedding_ids, head=id(param) in head_ids,
                                   param=param)
        # A tensor FSDP1 flattened is a 1-D view of a shard: its true shape is the FSDP1 adapter's to
        # know (moga_dist.engines.fsdp1 maps it and gives a flattened matrix its matrix role).
        if role in ("hidden", "head") and param.ndim < 2 and not is_fsdp1_flattened(param):
            raise ValueError(f"parameter {name!r} of shape {tuple(param.shape)} cannot take role {role!r}: "
                             "hidden and head need a weight with >= 2 dims; use 'vector' or 'embedding'")
        roles[name] = role
    unused = [p for p in overrides if p not in used]
    if unused:
        raise ValueError(f"override patterns matched no trainable parameter: {unused}")
    return roles


def _find_head(model: nn.Module, head) -> nn.Module | None:
    if isinstance(head, nn.Module):
        return head
    if isinstance(head, str):
        try:
            return model.get_submodule(head)
        except AttributeError as exc:
            raise ValueError(f"head={head!r} is not a submodule of the model") from exc
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter) and isinstance(getter(), nn.Module):
        return getter()
    for name, module in model.named_modules():
        if name.split(".")[-1] in HEAD_NAMES and isinstance(getattr(module, "weight", None), torch.Tensor):
            return module
    return None


def param_groups(model: nn.Module, overrides: Mapping[str, str] | None = None, head=None,
                 role_options: Mapping[str, Mapping] | None = None) -> list[dict]:
    """Param groups for MOGA, one per role present: {"params", "param_names", "role", **options}.

    role_options: per-role hyper-parameter overrides, e.g. {"vector": {"lr": 3e-3}}.
    """
    role_options = dict(role_options or {})
    for role in role_options:
        if role not in ROLES:
            raise ValueError(f"role_options key {role!r}: unknown role; allowed: {list(ROLES)}")
    roles = assign_roles(model, overrides, head)
    groups: dict[str, dict] = {}
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if name not in roles or id(param) in seen:
            continue
        seen.add(id(param))
        role = roles[name]
        group = groups.setdefault(role, {"params": [], "param_names": [], "role": role,
                                         **role_options.get(role, {})})
        group["params"].append(param)
        group["param_names"].append(name)
    return [groups[r] for r in ROLES if r in groups]
