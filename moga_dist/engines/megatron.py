"""Megatron-core adapter: `get_megatron_optimizer` with `OptimizerConfig(optimizer="moga")`.

Megatron builds its usual wrappers (FP32Optimizer, Float16OptimizerWithFloat16Params, or the
DistributedOptimizer, chained per dense/expert group) around an Adam, which its distributed
optimizer insists on at construction; each wrapper's inner Adam is then replaced by a MOGA over
the same tensors. All knowledge of Megatron's parameter metadata lives here: tensor-parallel
attributes, the interleaved linear_qkv rows, SwiGLU's stride-2 linear_fc1, embedding and output
layers, and the distributed optimizer's buffer partition (param_index_map, buckets), which become
ShardLayouts. Parameters of which this rank owns nothing are declared as ghosts so that every rank
packs the same all-reduce.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from . import megatron_distopt
from ..core.flat import partition_ranges
from ..core.layout import FlatPartition, RowBlocks, ShardLayout, TensorParallelSplit
from ..core.optimizer import MOGA
from ..core.param_groups import assign_roles, structural_role
from ..core.param_spec import ParamSpec

_ADAM_ONLY = ("betas", "eps", "amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused",
              "bias_correction", "decoupled_weight_decay", "adam_w_mode")


def describe_params(model_chunks, tp_rank: int, tp_size: int) -> dict[int, ParamSpec]:
    """{id(param): ParamSpec} for every parameter of the (DDP-wrapped) model chunks: its TP split
    as the layout (the distributed optimizer adds the flat partition), order_key its position."""
    out = {}
    for chunk in model_chunks:
        module = getattr(chunk, "module", chunk)
        tcfg = getattr(module, "config", None)
        _refuse_experts(tcfg)
        # param_groups' one rule: VocabParallelEmbedding by its name (EMBEDDING_NAMES), output_layer by
        # HEAD_NAMES, a pipeline stage's tied copy of the embedding (shared_embedding) an embedding.
        roles = assign_roles(module)
        for name, p in module.named_parameters():
            local = list(p.shape)
            tp = None
            if getattr(p, "tensor_model_parallel", False) and tp_size > 1:
                dim, stride = int(p.partition_dim), int(getattr(p, "partition_stride", 1))
                local[dim] *= tp_size
                tp = TensorParallelSplit(dim, tp_rank, tp_size, stride)
            global_shape = tuple(local)
            blocks = _row_blocks(name, global_shape, tcfg)
            role = roles.get(name) or structural_role(p.dim(), param=p)        # frozen parameters: by shape
            out[id(p)] = ParamSpec(name, role, ShardLayout(global_shape, tp=tp, row_blocks=blocks), order_key=len(out))
    return out


def _refuse_experts(tcfg) -> None:
    """Mixture-of-experts models are refused by name: expert weights live in their own expert-parallel
    and expert-TP groups (and grouped GEMMs stack experts in one tensor), which this adapter does
    not describe yet; a dense TP layout for them would normalize the wrong rows."""
    experts = getattr(tcfg, "num_moe_experts", None)
    if experts:
        raise ValueError(f"TransformerConfig.num_moe_experts={experts} (expert_model_parallel_size="
                         f"{getattr(tcfg, 'expert_model_parallel_size', 1)}): mixture-of-experts models are not "
                         "supported with MOGA yet; allowed: num_moe_experts=None (dense models)")


def _row_blocks(name: str, global_shape, tcfg) -> RowBlocks | None:
    if tcfg is None or len(global_shape) != 2:
        return None
    if name.endswith("linear_qkv.weight"):
        heads = tcfg.num_attention_heads
        groups = tcfg.num_query_groups or heads
        head_dim = tcfg.kv_channels or tcfg.hidden_size // heads
        return RowBlocks.qkv(groups, heads // groups, head_dim)
    if name.endswith("linear_fc1.weight") and getattr(tcfg, "gated_linear_unit", False):
        return RowBlocks.fused(global_shape[0] // 2, global_shape[0] // 2)
    return None


def get_megatron_optimizer(config, model_chunks, config_overrides=None, use_gloo_process_groups: bool = True,
                           pg_collection=None, moga: Mapping | None = None, **kwargs):
    """Drop-in for megatron.core.optimizer.get_megatron_optimizer; `config.optimizer == "moga"`
    selects MOGA (its settings in `moga`, e.g. {"norm": "col", "hidden_mult": 5.0}); the lr,
    weight decay and schedule stay Megatron's. Any other optimizer name goes to Megatron unchanged."""
    from megatron.core import optimizer as mopt
    from megatron.core import parallel_state as ps

    if config.optimizer != "moga":
        return mopt.get_megatron_optimizer(config, model_chunks, config_overrides, use_gloo_process_groups,
                                           pg_collection, **kwargs)
    settings = dict(moga or {})
    for key in ("lr", "weight_decay", "params", "layouts", "process_groups"):
        if key in settings:
            raise ValueError(f"moga[{key!r}] is not allowed: lr and weight decay come from OptimizerConfig")
    built = mopt.get_megatron_optimizer(dataclasses.replace(config, optimizer="adam"), model_chunks,
                                        config_overrides, use_gloo_process_groups, pg_collection, **kwargs)
    tp_group = pg_collection.tp if pg_collection is not None and hasattr(pg_collection, "tp") \
        else ps.get_tensor_model_parallel_group()
    tp_size = torch.distributed.get_world_size(tp_group)
    info = describe_params(model_chunks, torch.distributed.get_rank(tp_group), tp_size)
    wrappers = built.chained_optimizers if isinstance(built, mopt.ChainedOptimizer) else [built]
    for wrapper in wrappers:
        if getattr(wrapper, "optimizer", None) is not None:
            _swap_inner(wrapper, info, settings, tp_group)
    return built


def _pairs(wrapper):
    """(inner tensor, model param) for each tensor the wrapper's inner optimizer updates."""
    if hasattr(wrapper, "shard_fp32_from_float16_groups"):            # DistributedOptimizer
        for models, shards in zip(wrapper.model_fp32_groups, wrapper.shard_fp32_groups):
            yield from zip(shards, models)
        for models, shards in zip(wrapper.model_float16_groups, wrapper.shard_fp32_from_float16_groups):
            yield from zip(shards, models)
    elif hasattr(wrapper, "fp32_from_float16_groups"):                 # Float16OptimizerWithFloat16Params
        for models, mains in zip(wrapper.float16_groups, wrapper.fp32_from_float16_groups):
            yield from zip(mains, models)
        for group in wrapper.fp32_from_fp32_groups:
            yield from ((p, p) for p in group)
    else:                                                               # FP32Optimizer
        for group in wrapper.optimizer.param_groups:
            yield from ((p, p) for p in group["params"])


def _buffer_of(wrapper, model_param):
    for buffer in wrapper.buffers:
        if model_param in buffer.param_index_map:
            return buffer
    raise ValueError(f"parameter of shape {tuple(model_param.shape)} is in none of the optimizer's buffers")


def _flat_ranges(buffer, model_param) -> tuple[tuple[int, int], ...]:
    """Each DP rank's [start, end) of the TP-local flattened param: the buffer's bucket is cut
    into dp equal chunks (Megatron's _build_model_gbuf_range), intersected with the param."""
    start, end, bucket_index = buffer.param_index_map[model_param]
    bucket = buffer.buckets[bucket_index]
    dp = buffer.data_parallel_group.size()
    return partition_ranges(start, end - start, bucket.grad_data.numel() // dp, dp, base=bucket.offset)


def _sharded(spec: ParamSpec, buffer, model_param) -> ParamSpec:
    """`spec` with this DP rank's flat range of the TP-local parameter (distributed optimizer)."""
    flat = FlatPartition(_flat_ranges(buffer, model_param), buffer.data_parallel_group.rank())
    return dataclasses.replace(spec, layout=dataclasses.replace(spec.layout, flat=flat))


def _engine_slots(groups: list[dict], by_tensor: dict[int, ParamSpec]) -> list[list[ParamSpec]]:
    """specs[i][j] for groups[i]["params"][j]; raises for a tensor no model parameter accounts for."""
    missing = [tuple(p.shape) for g in groups for p in g["params"] if id(p) not in by_tensor]
    if missing:
        raise ValueError(f"MOGA got tensors that are not the model's parameters (shapes {missing[:3]}); "
                         "build it through Megatron's get_megatron_optimizer with optimizer='moga'")
    return [[by_tensor[id(p)] for p in g["params"]] for g in groups]


def _swap_inner(wrapper, info: dict[int, ParamSpec], settings: dict, tp_group) -> None:
    adam = wrapper.optimizer
    distributed = hasattr(wrapper, "shard_fp32_from_float16_groups")
    groups = [{k: v for k, v in g.items() if k not in _ADAM_ONLY} for g in adam.param_groups]
    by_tensor, ghosts = {}, []
    process_groups = {"tp": tp_group}
    for inner, model in _pairs(wrapper):
        spec = info[id(model)]
        if distributed:
            buffer = _buffer_of(wrapper, model)
            process_groups["dp"] = buffer.data_parallel_group
            spec = _sharded(spec, buffer, model)
        by_tensor[id(inner)] = spec
    if distributed:
        held = {spec.order_key for spec in by_tensor.values()}
        for buffer in wrapper.buffers:
            for model in buffer.param_index_map:
                if info[id(model)].order_key not in held:
                    process_groups["dp"] = buffer.data_parallel_group   # a rank may hold a bucket only through ghosts
                    ghosts.append(_sharded(info[id(model)], buffer, model))
    # Megatron's shards may be views (non-leaf): MOGA adopts its groups as they are.
    moga = MOGA.from_engine(groups, _engine_slots(groups, by_tensor), process_groups=process_groups,
                            ghosts=ghosts, **settings)
    # Megatron's sharded checkpoints map state to each parameter's global sharding and reshard it
    # (TP=2 -> TP=1 works); a per-rank layout record would be wrong there.
    moga.save_layouts = False
    wrapper.optimizer = moga
    wrapper.init_state_fn = _init_state
    if distributed:
        megatron_distopt.adopt(wrapper)


def _init_state(opt: MOGA, config=None) -> None:
    """Create MOGA's state for every tensor (Megatron calls this before loading checkpoints)."""
    for group in opt.param_groups:
        for p in group["params"]:
            opt.init_state(p)


def registry_moga(param_groups, param_info: dict[int, ParamSpec], tp_group, settings: Mapping) -> MOGA:
    """MOGA as megatron-core 0.18+'s emerging-optimizer registry builds it (its `optimizer_cls`,
    called as optimizer_cls(param_groups, **config_to_kwargs(...))): from Megatron's param groups
    plus the ParamSpecs config_to_kwargs reads off the model. Megatron then wraps it in
    FP32Optimizer, or for bf16 in Float16OptimizerWithFloat16Params, which swaps each bf16
    parameter in its group slot for an fp32 main copy: MOGA describes its groups slot by slot
    (from_engine), so the copy takes the slot's ParamSpec at the first step."""
    groups = [{k: v for k, v in g.items() if k not in _ADAM_ONLY} for g in param_groups]
    moga = MOGA.from_engine(groups, _engine_slots(groups, param_info), process_groups={"tp": tp_group}, **settings)
    moga.save_layouts = False
    return moga


def _refuse_sharded_registry_state(config, model_chunks) -> None:
    """The registry wraps MOGA in FP32Optimizer/Float16 wrappers (whole gradients) or, layer-wise,
    in LayerWiseDistributedOptimizer; neither is MOGA over Megatron's DP-sharded DistributedOptimizer,
    and with a DDP that reduce-scatters, the wrappers would step on partly reduced gradients."""
    if getattr(config, "use_layer_wise_distributed_optimizer", False):
        raise ValueError("OptimizerConfig.use_layer_wise_distributed_optimizer=True is not supported with the "
                         "registered MOGA; allowed: False. For DP-sharded state use "
                         "moga_dist.engines.megatron.get_megatron_optimizer with use_distributed_optimizer=True")
    sharded = [c for c in model_chunks if getattr(getattr(c, "ddp_config", None), "use_distributed_optimizer", False)]
    if config.use_distributed_optimizer or sharded:
        raise ValueError("use_distributed_optimizer=True (OptimizerConfig or the DDP config) with the registered "
                         "MOGA: Megatron's registry path has no DistributedOptimizer for it; allowed: False, or build "
                         "it with moga_dist.engines.megatron.get_megatron_optimizer (which supports it)")


REGISTRY_VERSION = "0.18.0"       # first megatron-core with megatron/core/optimizer/emerging_optimizers.py


def register(name: str = "moga", settings: Mapping | None = None) -> None:
    """Register MOGA under `name` in megatron-core 0.18+'s emerging-optimizer registry, so that
    Megatron's own get_megatron_optimizer accepts OptimizerConfig(optimizer="moga") (for every
    parameter: MOGA has its own rules for embeddings, head and vectors). Raises RuntimeError on an
    older megatron-core (0.16/0.17 have no registry: use moga_dist.engines.megatron.get_megatron_optimizer)."""
    import importlib.util

    import megatron.core
    import megatron.core.optimizer as mopt
    if importlib.util.find_spec("megatron.core.optimizer.emerging_optimizers") is None:
        raise RuntimeError(
            f"moga_dist.engines.megatron.register() needs megatron-core >= {REGISTRY_VERSION} (its emerging-optimizer "
            f"registry); installed: {megatron.core.__version__}. On this version build MOGA with "
            "moga_dist.engines.megatron.get_megatron_optimizer(config, model_chunks, moga={...})")
    from megatron.core.optimizer.emerging_optimizers import EmergingOptimizerEntry, _EMERGING_OPTIMIZERS
    # The gate only checks for the emerging-optimizers package, which MOGA does not use.
    mopt.HAVE_EMERGING_OPTIMIZERS = True
    fixed = dict(settings or {})

    def config_to_kwargs(config, model_chunks, pg_collection):
        _refuse_sharded_registry_state(config, model_chunks)
        tp_group = pg_collection.tp
        info = describe_params(model_chunks, torch.distributed.get_rank(tp_group),
                               torch.distributed.get_world_size(tp_group))
        # Megatron's groups carry no lr/weight decay of their own here: Adam would get them as arguments.
        return {"param_info": info, "tp_group": tp_group,
                "settings": {**fixed, "lr": config.lr, "weight_decay": config.weight_decay}}

    _EMERGING_OPTIMIZERS[name] = EmergingOptimizerEntry(optimizer_cls=registry_moga, init_state_fn=_init_state,
                                                        config_to_kwargs=config_to_kwargs, default_param_overrides={})
