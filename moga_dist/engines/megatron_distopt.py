"""Megatron's DistributedOptimizer with MOGA inside: its checkpoint code, made MOGA's.

Stepping through Megatron's DistributedOptimizer is already exact with MOGA as the inner
optimizer (megatron.py). Its checkpoint code is Adam's: `state_dict` reads a tensor `step` off
every parameter, `load_state_dict` allocates `exp_avg`/`exp_avg_sq`, the gathered formats
hard-code those keys, and megatron-core 0.16 no longer accepts the flattened ShardedTensors of
"fully_sharded_model_space". This subclass replaces the state methods only and keeps Megatron's
shard bookkeeping. Its format is model-space like Megatron's
"fully_reshardable": per parameter, the fp32 main weight and `momentum_buffer` under the model's
own ShardedTensor key and global shape, so a checkpoint reshards across TP, PP and DP (the format
both engines share, model_space.py; checkpoints of the older name "moga_model_space" load as they are). Each DP rank
writes only its own flat range [lo, hi) of each TP-local parameter, cut into the few row-major
blocks that tile it (at most 2·ndim - 1 per parameter, see `flat_blocks`), each a *view* of the
rank's main weight or momentum: a save allocates nothing per parameter and needs no communication
(megatron-core saves such uneven shards through torch DCP's LocalShardsContainer), and a load reads
from the saved blocks only those that overlap the rank's own range, straight into its state.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch

from .model_space import FORMAT, MEGATRON, check_format, flat_blocks, readable
from .views import exact_storage

# Formats a Megatron-LM run may ask for; all are served as FORMAT, which reshards in every dimension.
_ACCEPTED = (*readable(MEGATRON), "fully_reshardable", "dp_reshardable", "fully_sharded_model_space",
             "dp_zero_gather_scatter")
_KEYS = ("fp32_param", "momentum_buffer")


def adopt(wrapper) -> None:
    """Make Megatron's DistributedOptimizer `wrapper` (whose inner optimizer is MOGA) checkpoint
    MOGA's state: swaps its class for a subclass that overrides only the state methods."""
    config = wrapper.config
    if getattr(config, "use_precision_aware_optimizer", False):
        raise ValueError("OptimizerConfig.use_precision_aware_optimizer=True is for Adam's scaled state; "
                         "MOGA keeps fp32 main weights and momentum: set it to False")
    if getattr(wrapper.ddp_config, "use_megatron_fsdp", False):
        raise ValueError("Megatron FSDP (use_megatron_fsdp=True) is not supported with MOGA; use "
                         "use_distributed_optimizer=True with the regular DistributedDataParallel")
    wrapper.__class__ = _subclass(type(wrapper))


def _group_key(group: dict) -> tuple:
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    return tuple(group.get(k, group.get(f"pre_{k}")) for k in param_group_identifier_keys)


@functools.cache
def _subclass(base: type) -> type:
    class MOGADistributedOptimizer(base):
        """Megatron's DistributedOptimizer over MOGA: same shards, same step; checkpoints hold the
        fp32 main weight and `momentum_buffer` of every parameter slice, and the step count."""

        def state_dict(self):
            """Non-parameter state: MOGA's param groups (with the step count) and the grad scaler."""
            inner = self.optimizer.state_dict()
            steps = {int(s["step"]) for s in inner["state"].values()}
            if len(steps) > 1:
                raise ValueError(f"MOGA parameters were stepped different numbers of times {sorted(steps)}; "
                                 "a distributed-optimizer checkpoint stores one step count")
            step = steps.pop() if steps else 0
            groups = [{**{k: v for k, v in g.items() if k != "params"}, "step": step}
                      for g in inner["param_groups"]]
            out = {"optimizer": {"param_groups": groups}}
            if self.grad_scaler:
                out["grad_scaler"] = self.grad_scaler.state_dict()
            return out

        def load_state_dict(self, state_dict):
            """Inverse of state_dict, plus the parameter state when `state_dict` carries it; a
            checkpoint of another format is refused before anything is changed."""
            kind = state_dict.get("param_state_sharding_type", FORMAT)
            check_format(kind, MEGATRON, "distributed-optimizer param_state_sharding_type",
                         " (an Adam checkpoint cannot seed MOGA's momentum)")
            saved = {_group_key(g): g for g in state_dict["optimizer"]["param_groups"]}
            steps = {int(g.get("step", 0)) for g in saved.values()}
            if len(steps) > 1:
                raise ValueError(f"checkpoint param groups hold different step counts {sorted(steps)}")
            step = steps.pop() if steps else 0
            missing = [_group_key(g) for g in self.optimizer.param_groups if _group_key(g) not in saved]
            if missing:
                raise ValueError(f"checkpoint has no param group {missing[0]} (it has {sorted(saved, key=str)}): "
                                 "saved with other lr/wd multipliers?")
            for group in self.optimizer.param_groups:
                src = saved[_group_key(group)]
                group.update({k: v for k, v in src.items() if k not in ("params", "step")})
                for p in group["params"]:
                    self.optimizer.init_state(p)["step"] = step
            self.optimizer.invalidate()
            if "grad_scaler" in state_dict and self.grad_scaler:
                self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
            if "param_state" in state_dict:
                self._load_model_space(state_dict["param_state"])

        def sharded_state_dict(self, model_sharded_state_dict=None, is_loading=False, sharding_type=None,
                               metadata=None):
            """dist_checkpointing state: param groups and step (common), and per parameter its fp32
            main weight and momentum in model space (any accepted format request is served so)."""
            requested = sharding_type or (metadata or {}).get("distrib_optim_sharding_type", FORMAT)
            if requested not in _ACCEPTED:
                raise ValueError(f"distrib_optim_sharding_type={requested!r} is not supported with MOGA; "
                                 f"allowed: {', '.join(_ACCEPTED)} (all saved as {FORMAT!r})")
            if model_sharded_state_dict is None:
                raise ValueError("sharded_state_dict needs the model's sharded state dict "
                                 "(model.sharded_state_dict()) to place the optimizer state")
            self.init_state_fn(self.optimizer)      # state exists before the first step too
            out = self.state_dict()
            out["param_state"] = self._model_space(model_sharded_state_dict, is_loading)
            out["param_state_sharding_type"] = FORMAT
            return out

        def _model_space(self, model_sharded_state_dict, is_loading: bool) -> dict:
            """{"<gbuf>.<i>": {key: {"<flat start>": ShardedTensor}}}: for every parameter this rank
            owns a range of, the blocks of that range as views of its fp32 main weight and momentum
            (saving reads them, loading writes into them: no per-parameter buffer either way)."""
            from megatron.core.dist_checkpointing.dict_utils import nested_values
            from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories

            sharded, _ = extract_sharded_tensors_and_factories(model_sharded_state_dict)
            meta = {id(sh.data): sh for sh in nested_values(sharded)}
            instance = getattr(self, "distributed_optimizer_instance_id", 0)
            out = {}
            for gbuf_idx, buffer in enumerate(self.buffers):
                for i, model_param in enumerate(buffer.param_index_map):
                    local = self._local(model_param)
                    if local is None:                # no element of it on this DP rank
                        continue
                    sh = meta.get(id(model_param))
                    if sh is None:
                        raise ValueError(f"a parameter of shape {tuple(model_param.shape)} is not in the model's "
                                         "sharded state dict (build it with keep_vars=True)")
                    main, momentum, lo, hi = local
                    flats = {"fp32_param": main.detach().view(-1), "momentum_buffer": momentum.view(-1)}
                    place = (lambda t: t) if is_loading else exact_storage
                    entry = {key: {} for key in _KEYS}
                    for sub, sub_start in _model_blocks(sh, model_param):
                        replica = _dp_unique(sub.replica_id, instance)
                        p_off = sub.prepend_axis_num
                        a, b = max(lo, sub_start), min(hi, sub_start + math.prod(sub.local_shape))
                        for offset, shape, start in flat_blocks(sub.local_shape, a - sub_start, b - sub_start):
                            at = sub_start + start - lo           # the block's first element in the rank's range
                            n = math.prod(shape)
                            goff = tuple(sub.global_offset[:p_off]) + tuple(
                                g + o for g, o in zip(sub.global_offset[p_off:], offset))
                            # Prepended axes (the layer index) become real axes of size 1: megatron-core
                            # writes uneven shards through DCP, which takes the local shape as is.
                            full = (1,) * p_off + tuple(shape)
                            for key in _KEYS:
                                entry[key][str(sub_start + start)] = dataclasses.replace(
                                    sub, key=f"optimizer.state.{key}.{sub.key}", data=place(flats[key][at:at + n].view(full)),
                                    dtype=torch.float32, local_shape=full, global_offset=goff, prepend_axis_num=0,
                                    axis_fragmentations=None, replica_id=replica)
                    out[f"{gbuf_idx}.{i}"] = entry
            return out

        def _local(self, model_param):
            """(main param, momentum, [start, end) of the flattened model param) on this rank, or None."""
            if model_param not in self.model_param_gbuf_map:
                return None
            group_index, group_order = self.model_param_group_index_map[model_param]
            main = self.optimizer.param_groups[group_index]["params"][group_order]
            rng = self._get_model_param_range_map(model_param)["param"]
            if rng.end <= rng.start:
                return None
            return main, self.optimizer.init_state(main)["momentum_buffer"], rng.start, rng.end

        @torch.no_grad()
        def _load_model_space(self, param_state: dict) -> None:
            for gbuf_idx, buffer in enumerate(self.buffers):
                for i, model_param in enumerate(buffer.param_index_map):
                    local = self._local(model_param)
                    if local is None:
                        continue
                    main, momentum, lo, hi = local
                    entry = param_state.get(f"{gbuf_idx}.{i}")
                    if entry is None:
                        raise ValueError(f"checkpoint has no optimizer state for parameter {gbuf_idx}.{i} "
                                         f"of shape {tuple(model_param.shape)}")
                    for key, flat in (("fp32_param", main.view(-1)), ("momentum_buffer", momentum.view(-1))):
                        covered = 0
                        for start, block in entry[key].items():
                            at, n = int(start) - lo, block.numel()
                            dst = flat[at:at + n]
                            if block.data_ptr() != dst.data_ptr():   # dist_checkpointing loaded into a copy
                                dst.copy_(block.reshape(-1))
                            covered += n
                        if covered != hi - lo:
                            raise ValueError(f"checkpoint {key} blocks of parameter {gbuf_idx}.{i} cover {covered} "
                                             f"of this rank's {hi - lo} elements")

        def save_parameter_state(self, filename: str):
            raise NotImplementedError("MOGA's distributed-optimizer state is saved with dist_checkpointing "
                                      "(sharded_state_dict); the legacy torch.save format is Adam's")

        def load_parameter_state(self, filename: str, *, update_legacy_format=False):
            raise NotImplementedError("MOGA's distributed-optimizer state is loaded with dist_checkpointing "
                                      "(sharded_state_dict); the legacy torch.save format is Adam's")

    MOGADistributedOptimizer.__qualname__ = f"MOGA{base.__name__}"
    return MOGADistributedOptimizer


def without_copies(sharded_state_dict: dict) -> dict:
    """A sharded state dict to save, changed in place so that megatron-core's writer copies none of
    its CPU tensors (see `exact_storage`): factories applied, every ShardedTensor's data an exact-
    storage alias. Model weights are views of the DDP param buffer; without this, the DP rank that
    writes them (the main replica) holds a second copy of the whole TP/PP-local model while saving."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    apply_factories(sharded_state_dict)

    def alias(x):
        if isinstance(x, ShardedTensor) and x.data is not None:
            x.data = exact_storage(x.data.detach())
        return x

    dict_list_map_inplace(alias, sharded_state_dict)
    return sharded_state_dict


def _model_blocks(sh, model_param) -> list:
    """[(ShardedTensor, flat start in the TP-local parameter)] of a model parameter: itself at 0, or,
    for a ShardedTensorFactory (SwiGLU's fc1 is saved as two halves), the tensors its build_fn
    makes, found by running it on a meta tensor and reading where each view starts."""
    if hasattr(sh, "dtype"):                                   # a ShardedTensor
        return [(sh, 0)]
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    probe = torch.empty(model_param.shape, dtype=torch.float32, device="meta")
    subs = list(nested_values(sh.build_fn(sh.key, probe, sh.replica_id, None)))
    out = []
    for sub in subs:
        if not hasattr(sub, "dtype") or not sub.data.is_contiguous():
            raise ValueError(f"ShardedTensorFactory {sh.key!r} builds a non-contiguous or nested piece; "
                             "MOGA's distributed-optimizer checkpoint cannot place its state")
        out.append((sub, sub.data.storage_offset()))
    return out


def _dp_unique(replica_id, instance: int):
    """The model's (PP, TP, DP) replica id with DP set to the optimizer instance: DP ranks hold
    disjoint ranges, so each block has exactly one writer per TP/PP replica."""
    if not (isinstance(replica_id, tuple) and len(replica_id) == 3):
        raise ValueError(f"model ShardedTensor replica_id {replica_id!r}: expected (PP, TP, DP)")
    return (*replica_id[:2], instance)
