"""Megatron's DistributedOptimizer with MOGA inside: its checkpoint code, made MOGA's.

Stepping through Megatron's DistributedOptimizer is already exact with MOGA as the inner
optimizer (megatron.py). Its checkpoint code is Adam's: `state_dict` reads a tensor `step` off
every parameter, `load_state_dict` allocates `exp_avg`/`exp_avg_sq`, the gathered formats
hard-code those keys, and megatron-core 0.16 no longer accepts the flattened ShardedTensors of
"fully_sharded_model_space". This subclass replaces the state methods only and keeps Megatron's
shard bookkeeping. Its format, "moga_model_space", is model-space like Megatron's
"fully_reshardable": per parameter, the fp32 main weight and `momentum_buffer` as a tensor of the
TP-local parameter's shape under the model's own ShardedTensor metadata (assembled from the DP
shards with one all-reduce per grad buffer and key), so a checkpoint reshards across TP, PP and DP.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from ..core.collectives import sum_across

FORMAT = "moga_model_space"
# Formats a Megatron-LM run may ask for; all are served as FORMAT, which reshards in every dimension.
_ACCEPTED = (FORMAT, "fully_reshardable", "dp_reshardable", "fully_sharded_model_space", "dp_zero_gather_scatter")
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
            if kind != FORMAT:
                raise ValueError(f"distributed-optimizer parameter state of type {kind!r}: MOGA checkpoints "
                                 f"are {FORMAT!r} (an Adam checkpoint cannot seed MOGA's momentum)")
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
            from megatron.core.dist_checkpointing.dict_utils import nested_values
            from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories

            sharded, _ = extract_sharded_tensors_and_factories(model_sharded_state_dict)
            meta = {id(sh.data): sh for sh in nested_values(sharded)}
            out = {}
            for gbuf_idx, buffer in enumerate(self.buffers):
                world = {} if is_loading else self._assemble(buffer)
                for i, (model_param, (start, end, _)) in enumerate(buffer.param_index_map.items()):
                    sh = meta.get(id(model_param))
                    if sh is None:
                        raise ValueError(f"a parameter of shape {tuple(model_param.shape)} is not in the model's "
                                         "sharded state dict (build it with keep_vars=True)")
                    entry = {}
                    for key in _KEYS:
                        data = torch.empty(model_param.shape, dtype=torch.float32, device=model_param.device) \
                            if is_loading else world[key][start:end].view(model_param.shape)
                        fields = dict(key=f"optimizer.state.{key}.{sh.key}", data=data)
                        if hasattr(sh, "dtype"):             # a ShardedTensor, not a factory
                            fields["dtype"] = torch.float32
                        entry[key] = dataclasses.replace(sh, **fields)
                    out[f"{gbuf_idx}.{i}"] = entry
            return out

        def _local(self, model_param):
            """(main param, momentum, [start, end) of the flattened model param) on this rank, or None."""
            if model_param not in self.model_param_gbuf_map:
                return None
            group_index, group_order = self.model_param_group_index_map[model_param]
            main = self.optimizer.param_groups[group_index]["params"][group_order]
            rng = self._get_model_param_range_map(model_param)["param"]
            return main, self.optimizer.init_state(main)["momentum_buffer"], rng.start, rng.end

        def _assemble(self, buffer) -> dict[str, torch.Tensor]:
            """The buffer's whole fp32 main weights and momenta, from every DP rank's shard: each rank
            writes its own ranges into zeros, one all-reduce sums the disjoint pieces."""
            world = {key: torch.zeros(buffer.numel, dtype=torch.float32, device=buffer.grad_data.device)
                     for key in _KEYS}
            for model_param, (start, _, _) in buffer.param_index_map.items():
                local = self._local(model_param)
                if local is None:
                    continue
                main, momentum, lo, hi = local
                world["fp32_param"][start + lo:start + hi] = main.detach().reshape(-1)
                world["momentum_buffer"][start + lo:start + hi] = momentum.reshape(-1)
            packed = torch.cat([world[k] for k in _KEYS])
            sum_across(packed, buffer.data_parallel_group)
            return dict(zip(_KEYS, packed.split(buffer.numel)))

        @torch.no_grad()
        def _load_model_space(self, param_state: dict) -> None:
            for gbuf_idx, buffer in enumerate(self.buffers):
                for i, model_param in enumerate(buffer.param_index_map):
                    local = self._local(model_param)
                    if local is None:
                        continue
                    main, momentum, lo, hi = local
                    entry = param_state[f"{gbuf_idx}.{i}"]
                    main.copy_(entry["fp32_param"].reshape(-1)[lo:hi].view_as(main))
                    momentum.copy_(entry["momentum_buffer"].reshape(-1)[lo:hi].view_as(momentum))

        def save_parameter_state(self, filename: str):
            raise NotImplementedError("MOGA's distributed-optimizer state is saved with dist_checkpointing "
                                      "(sharded_state_dict); the legacy torch.save format is Adam's")

        def load_parameter_state(self, filename: str, *, update_legacy_format=False):
            raise NotImplementedError("MOGA's distributed-optimizer state is loaded with dist_checkpointing "
                                      "(sharded_state_dict); the legacy torch.save format is Adam's")

    MOGADistributedOptimizer.__qualname__ = f"MOGA{base.__name__}"
    return MOGADistributedOptimizer
