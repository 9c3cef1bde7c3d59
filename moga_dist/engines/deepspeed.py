"""DeepSpeed adapter: `initialize` is `deepspeed.initialize` with MOGA exact at ZeRO stages 0-2.

All knowledge of ZeRO's flat partitions lives here: the per-parameter offsets and the partition
size of the ZeRO optimizer become FlatSegments with FlatPartition layouts (moga_dist.core.flat), so the
core computes the unsharded update and all-reduces only statistics cut by a partition boundary.
"""
from __future__ import annotations

import copy
import inspect
import json
from collections.abc import Mapping
from pathlib import Path

import torch

from ..core.flat import partition_segments
from ..core.optimizer import MOGA
from ..core.param_groups import param_groups

SUPPORTED_STAGES = (0, 1, 2)
_GROUP_ONLY_KEYS = ("params", "param_names")


def moga_kwargs() -> list[str]:
    """Keyword arguments MOGA accepts from a DeepSpeed config's optimizer.params."""
    return [n for n, p in inspect.signature(MOGA.__init__).parameters.items()
            if n not in ("self", "params", "layouts", "process_groups") and p.kind != p.VAR_KEYWORD]


def _load_config(config) -> dict:
    if config is None:
        raise ValueError("moga_dist.engines.deepspeed.initialize needs config= (a dict or a JSON file path)")
    if isinstance(config, str | Path):
        with open(config) as fh:
            return json.load(fh)
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    raise ValueError(f"config must be a dict or a path, got {type(config).__name__}")


def build_optimizer(model: torch.nn.Module, block: Mapping) -> MOGA:
    """MOGA from a DeepSpeed config's {"type": "MOGA", "params": {...}} block, roles by param_groups."""
    if str(block.get("type", "")).lower() != "moga":
        raise ValueError(f"optimizer.type={block.get('type')!r}: moga_dist.engines.deepspeed.initialize builds only "
                         "'MOGA'; pass another optimizer to deepspeed.initialize directly")
    params = dict(block.get("params", {}))
    unknown = sorted(set(params) - set(moga_kwargs()))
    if unknown:
        raise ValueError(f"unknown MOGA setting(s) in optimizer.params: {unknown}; allowed: {moga_kwargs()}")
    return MOGA(param_groups(model), **params)


def initialize(*, model: torch.nn.Module, optimizer: MOGA | None = None, config=None, **kwargs):
    """Same arguments and return value as `deepspeed.initialize` (engine, optimizer, dataloader,
    lr_scheduler); MOGA comes from `optimizer=` or from config["optimizer"] = {"type": "MOGA", ...}.

    ZeRO 1/2: MOGA's param groups are merged into one DeepSpeed group (so ZeRO calls step() once
    per step and all shared statistics travel in one all-reduce); each parameter keeps its role and
    settings, and lrs keep their ratio to the scheduled lr. ZeRO-3 is refused.
    """
    import deepspeed

    cfg = _load_config(config)
    block = cfg.pop("optimizer", None)
    stage = int(cfg.get("zero_optimization", {}).get("stage", 0))
    if stage not in SUPPORTED_STAGES:
        raise ValueError(f"zero_optimization.stage={stage}: MOGA supports ZeRO stages {SUPPORTED_STAGES}. "
                         "Under ZeRO-3 parameters are partitioned before the optimizer sees them and exact "
                         "row statistics are not implemented yet; use stage 2")
    if optimizer is None:
        if block is None:
            raise ValueError("no MOGA given: pass optimizer=MOGA(...) or config['optimizer'] = "
                             "{'type': 'MOGA', 'params': {...}}")
        optimizer = build_optimizer(model, block)
    elif block is not None:
        raise ValueError("both optimizer= and config['optimizer'] were given; DeepSpeed would silently "
                         "ignore the config block. Keep one")
    if not isinstance(optimizer, MOGA):
        raise ValueError(f"optimizer must be a moga_dist.MOGA, got {type(optimizer).__name__}")
    cfg.setdefault("zero_allow_untested_optimizer", True)

    merged = _merge_groups(optimizer) if stage >= 1 else None
    # DeepSpeed's wrappers call step() once with zero gradients while setting up; with decoupled
    # weight decay that would move the weights.
    with optimizer.suspended():
        engine, ds_optimizer, loader, scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                       config=cfg, **kwargs)
    if merged is not None:
        _register_zero_partition(engine.optimizer, optimizer, *merged)
    return engine, ds_optimizer, loader, scheduler


def _merge_groups(moga: MOGA):
    """Fold all groups into one, remembering each parameter's options, name and layout."""
    base_lr = float(moga.param_groups[0]["lr"])
    per_param = {}
    for group in moga.param_groups:
        options = {k: v for k, v in group.items() if k not in _GROUP_ONLY_KEYS}
        names = group.get("param_names") or [None] * len(group["params"])
        for p, name in zip(group["params"], names):
            per_param[id(p)] = (options, name or f"param{len(per_param)}", moga.layout_of(p))
    params = [p for g in moga.param_groups for p in g["params"]]
    moga.param_groups = [{**moga.defaults, "params": params, "lr": base_lr}]
    return per_param, base_lr


def _register_zero_partition(zero_opt, moga: MOGA, per_param: dict, base_lr: float) -> None:
    import torch.distributed as dist

    if not hasattr(zero_opt, "single_partition_of_fp32_groups"):
        raise ValueError(f"unexpected DeepSpeed optimizer {type(zero_opt).__name__}: expected ZeRO stage 1/2")
    if len(zero_opt.single_partition_of_fp32_groups) != 1:
        raise ValueError("expected one ZeRO param group after merging MOGA's groups, got "
                         f"{len(zero_opt.single_partition_of_fp32_groups)}")
    group = zero_opt.real_dp_process_group[0]
    params = zero_opt.round_robin_bit16_groups[0]
    shapes = [tuple(m.shape) for m in zero_opt.round_robin_bit16_meta[0]]
    unknown = [tuple(p.shape) for p in params if id(p) not in per_param]
    if unknown:
        raise ValueError(f"ZeRO holds parameters MOGA was not given (shapes {unknown[:3]}); build MOGA over "
                         "all trainable parameters, e.g. MOGA(moga_dist.core.param_groups(model))")
    options = [per_param[id(p)][0] for p in params]
    segments = partition_segments(shapes, list(zero_opt.round_robin_bit16_offsets[0]),
                                  int(zero_opt.partition_size[0]), dist.get_rank(group),
                                  dist.get_world_size(group), [per_param[id(p)][1] for p in params], options,
                                  [per_param[id(p)][2] for p in params])
    moga.set_process_group("dp", group)
    moga.declare_flat_buffer(zero_opt.single_partition_of_fp32_groups[0], segments, base_lr)


def skip_shm_comm_build() -> None:
    """Stop DeepSpeed's CPU accelerator from JIT-building its shared-memory comm op at start-up
    (45-60 s on first use); gloo collectives do not need it. Call before deepspeed.initialize."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
