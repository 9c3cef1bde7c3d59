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
from ..core.layout import FlatPartition, RowBlocks, ShardLayout, TensorParallelSplit, clip_ranges
from ..core.optimizer import MOGA

_ADAM_ONLY = ("betas", "eps", "amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused",
              "bias_correction", "decoupled_weight_decay", "adam_w_mode")


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    """What MOGA needs to know about one Megatron model parameter."""
    key: int
    name: str
    role: str
    layout: ShardLayout       # TP split only; the distributed optimizer adds the flat partition


def describe_params(model_chunks, tp_rank: int, tp_size: int) -> dict[int, ParamInfo]:
    """{id(param): ParamInfo} for every parameter of the (DDP-wrapped) model chunks."""
    out = {}
    for chunk in model_chunks:
        module = getattr(chunk, "module", chunk)
        tcfg = getattr(module, "config", None)
        _refuse_experts(tcfg)
        for name, p in module.named_parameters():
            local = list(p.shape)
            tp = None
            if getattr(p, "tensor_model_parallel", False) and tp_size > 1:
                dim, stride = int(p.partition_dim), int(getattr(p, "partition_stride", 1))
                local[dim] *= tp_size
                tp = TensorParallelSplit(dim, tp_rank, tp_size, stride)
            global_shape = tuple(local)
            blocks = _row_blocks(name, global_shape, tcfg)
            if name.endswith("word_embeddings.weight") or name.endswith("position_embeddings.weight"):
                role = "embedding"
            elif name.endswith("output_layer.weight"):
                role = "head"
            else:
                role = "hidden" if p.dim() >= 2 else "vector"
            out[id(p)] = ParamInfo(len(out), name, role,
                                   ShardLayout(global_shape, tp=tp, row_blocks=blocks))
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
    chunk = bucket.grad_data.numel() // dp
    return clip_ranges([bucket.offset + k * chunk for k in range(dp + 1)], start, end - start)


def _swap_inner(wrapper, info: dict[int, ParamInfo], settings: dict, tp_group) -> None:
    adam = wrapper.optimizer
    distributed = hasattr(wrapper, "shard_fp32_from_float16_groups")
    groups = [{k: v for k, v in g.items() if k not in _ADAM_ONLY} for g in adam.param_groups]
    layouts, options, order, ghosts = {}, {}, {}, []
    dp_group = None
    for inner, model in _pairs(wrapper):
        meta = info[id(model)]
        layout = meta.layout
        if distributed:
            buffer = _buffer_of(wrapper, model)
            dp_group = buffer.data_parallel_group
            layout = dataclasses.replace(layout, flat=FlatPartition(_flat_ranges(buffer, model), dp_group.rank()))
        layouts[inner] = layout
        options[inner] = {"role": meta.role}
        order[inner] = meta.key
    if distributed:
        held = set(order.values())
        for buffer in wrapper.buffers:
            for model in buffer.param_index_map:
                meta = info[id(model)]
                if meta.key in held:
                    continue
                dp_group = buffer.data_parallel_group      # a rank may hold a bucket only through ghosts
                flat = FlatPartition(_flat_ranges(buffer, model), dp_group.rank())
                ghosts.append((meta.key, dataclasses.replace(meta.layout, flat=flat), {"role": meta.role, **settings}))
    process_groups = {"tp": tp_group}
    if dp_group is not None:
        process_groups["dp"] = dp_group
    # Megatron's shards may be views (non-leaf): adopt them as its own wrappers do for Adam.
    moga = MOGA([torch.nn.Parameter(torch.zeros(1))], **settings, process_groups=process_groups)
    moga.replace_param_groups(groups)
    for tensor, layout in layouts.items():
        moga.declare(tensor, layout=layout, options=options[tensor], order_key=order[tensor])
    moga.declare_ghosts(ghosts)
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


class _RegistryMOGA(MOGA):
    """MOGA as megatron-core 0.18+'s emerging-optimizer registry builds it: from Megatron's param
    groups plus the metadata config_to_kwargs reads off the model. Megatron then wraps it in
    FP32Optimizer, or for bf16 in Float16OptimizerWithFloat16Params, which swaps each bf16
    parameter in its group slot for an fp32 main copy; the copy inherits the slot's metadata."""

    def __init__(self, param_groups, param_info: dict, tp_group, settings: Mapping):
        groups = [{k: v for k, v in g.items() if k not in _ADAM_ONLY} for g in param_groups]
        super().__init__([torch.nn.Parameter(torch.zeros(1))], **settings, process_groups={"tp": tp_group})
        self.replace_param_groups(groups)
        missing = [tuple(p.shape) for g in self.param_groups for p in g["params"] if id(p) not in param_info]
        if missing:
            raise ValueError(f"MOGA got tensors that are not the model's parameters (shapes {missing[:3]}); "
                             "build it through Megatron's get_megatron_optimizer with optimizer='moga'")
        self._slots = [[param_info[id(p)] for p in g["params"]] for g in self.param_groups]
        self._register([(p, info) for g, infos in zip(self.param_groups, self._slots)
                        for p, info in zip(g["params"], infos)])
        self.save_layouts = False

    def _register(self, pairs: list[tuple[torch.Tensor, ParamInfo]]) -> None:
        for p, info in pairs:
            self.declare(p, layout=info.layout, options={"role": info.role}, order_key=info.key)
        self._declared = {id(p) for g in self.param_groups for p in g["params"]}

    def step(self, closure=None):
        """MOGA's step, after declaring the fp32 main copies Megatron's Float16 wrapper swapped in."""
        moved = [(p, info) for g, infos in zip(self.param_groups, self._slots)
                 for p, info in zip(g["params"], infos) if id(p) not in self._declared]
        if moved:
            self._register(moved)
        return super().step(closure)


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

    _EMERGING_OPTIMIZERS[name] = EmergingOptimizerEntry(optimizer_cls=_RegistryMOGA, init_state_fn=_init_state,
                                                        config_to_kwargs=config_to_kwargs, default_param_overrides={})
