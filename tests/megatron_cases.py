"""Workers for the Megatron tests: a tiny LLaMA-style GPTModel, k steps, gathered full weights."""
import dataclasses

import torch
import torch.distributed as dist

STEPS = 3
GLOBAL_BATCH, SEQ, VOCAB = 4, 32, 256
MOGA_SETTINGS = {"momentum": 0.9, "hidden_mult": 5.0}


def gather_full(t, p, ps):
    """Full tensor of a TP-sharded parameter (Megatron's strided layout)."""
    if not getattr(p, "tensor_model_parallel", False) or ps.get_tensor_model_parallel_world_size() == 1:
        return t.detach().clone()
    group, n = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()
    shards = [torch.empty_like(t) for _ in range(n)]
    dist.all_gather(shards, t.contiguous(), group=group)
    d, s = p.partition_dim, p.partition_stride
    return torch.cat([sh.chunk(s, d)[j] for j in range(s) for sh in shards], d)


LAST = {}


def train(tp, distributed_optimizer, norm, steps=STEPS, start=0, load_dir=None, save_dir=None, bias=False,
          make_optimizer=None):
    """Steps [start, steps) at this TP size (DP = world / TP), optionally loading a dist_checkpointing
    checkpoint first and saving one at the end; returns {name: full weight} and the optimizer.
    bias: Megatron's default add_bias_linear=True (column-parallel biases are TP-sharded 1-D tensors).
    make_optimizer(ddp): another way to build the optimizer (default: the adapter's drop-in)."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig

    import megatron_support
    import moga_dist.engines.megatron as moga_megatron

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    megatron_support.apply_model_shims()
    cfg = megatron_support.tiny_config(tensor_model_parallel_size=tp, add_bias_linear=bias)
    model, ddp = megatron_support.tiny_gpt_ddp(cfg, vocab_size=VOCAB, seq_len=SEQ, distributed_optimizer=distributed_optimizer, seed=42)
    LAST["initial"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    if make_optimizer is not None:
        opt = make_optimizer(ddp)
    else:
        opt = moga_megatron.get_megatron_optimizer(
            OptimizerConfig(optimizer="moga", lr=0.02, weight_decay=0.1, clip_grad=1.0,
                            use_distributed_optimizer=distributed_optimizer), [ddp], moga={**MOGA_SETTINGS, "norm": norm})
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    gen = torch.Generator().manual_seed(7)
    mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)
    pos = torch.arange(SEQ).unsqueeze(0)
    LAST["ddp"] = ddp
    if load_dir is not None:
        from megatron.core import dist_checkpointing

        msd = model.sharded_state_dict()
        loaded = dist_checkpointing.load({"model": msd, "optimizer": opt.sharded_state_dict(msd, is_loading=True)},
                                         load_dir)
        model.load_state_dict(loaded["model"])
        opt.load_state_dict(loaded["optimizer"])
    for step in range(steps):
        tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=gen)
        if step < start:
            continue
        mine = tokens.chunk(dp)[dp_rank]
        ddp.zero_grad_buffer()
        opt.zero_grad()
        loss = ddp(mine[:, :-1], pos.expand(mine.shape[0], -1), mask, labels=mine[:, 1:]).mean()
        loss.backward()
        finalize_model_grads([ddp])
        ok, _, _ = opt.step()
        assert ok
    if save_dir is not None:
        from megatron.core import dist_checkpointing

        msd = model.sharded_state_dict()
        dist_checkpointing.save({"model": msd, "optimizer": opt.sharded_state_dict(msd)}, save_dir)
    check_metadata(ddp, tp, ps.get_tensor_model_parallel_rank(), bias)
    full = {n: gather_full(p.data, p, ps) for n, p in model.named_parameters()}
    return full, opt


def check_metadata(ddp, tp, tp_rank, bias=False):
    """The adapter's reading of Megatron's metadata, checked against the model config by hand:
    4 heads in 2 query groups of head_dim 16 -> QKV rows [q q k v] x 2; fc1 = [gate(96); up(96)];
    column-parallel biases keep their TP split (fc1's with stride 2), row-parallel ones are whole."""
    from moga_dist import RowBlocks
    from moga_dist.engines.megatron import describe_params

    info = {i.name: i for i in describe_params([ddp], tp_rank, tp).values()}
    qkv = info["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert qkv.role == "hidden" and qkv.layout.global_shape == (128, 64)
    assert qkv.layout.row_blocks == RowBlocks(((32, 0), (16, 1), (16, 2)), 2)
    fc1 = info["decoder.layers.1.mlp.linear_fc1.weight"]
    assert fc1.layout.row_blocks == RowBlocks(((96, 0), (96, 1)), 1) and fc1.layout.global_shape == (192, 64)
    proj = info["decoder.layers.0.self_attention.linear_proj.weight"]
    assert proj.layout.global_shape == (64, 64)
    if tp > 1:
        assert (fc1.layout.tp.dim, fc1.layout.tp.stride, proj.layout.tp.dim) == (0, 2, 1)
    assert info["embedding.word_embeddings.weight"].role == "embedding"
    assert info["output_layer.weight"].role == "head" and info["output_layer.weight"].layout.global_shape == (256, 64)
    assert info["decoder.final_layernorm.weight"].role == "vector"
    if bias:
        qkv_b = info["decoder.layers.0.self_attention.linear_qkv.bias"]
        fc1_b = info["decoder.layers.1.mlp.linear_fc1.bias"]
        assert (qkv_b.role, qkv_b.layout.global_shape, fc1_b.layout.global_shape) == ("vector", (128,), (192,))
        proj_b = info["decoder.layers.0.self_attention.linear_proj.bias"]
        assert proj_b.layout.global_shape == (64,) and proj_b.layout.tp is None
        if tp > 1:
            assert (qkv_b.layout.tp.dim, fc1_b.layout.tp.stride, fc1_b.layout.tp.world_size) == (0, 2, tp)


def reference(rank, world, path, bias=False):
    """TP=1 weights after STEPS steps (row and col variants) in `path`, initial ones in *_init.pt."""
    import megatron_support

    megatron_support.enable_cuda_to_cpu()
    out = {norm: train(1, False, norm, bias=bias)[0] for norm in ("row", "col")}
    torch.save(out, path)
    torch.save({n: p.detach().clone() for n, p in LAST["initial"].items()}, path.replace(".pt", "_init.pt"))


def sharded(rank, world, path, layouts, bias=False):
    import megatron_support

    megatron_support.enable_cuda_to_cpu()
    ref = torch.load(path, weights_only=True)
    torch.manual_seed(42)
    for tp, distopt in layouts:
        for norm in ("row", "col"):
            full, opt = train(tp, distopt, norm, bias=bias)
            if bias:
                assert sum(n.endswith(".bias") for n in full) == 8, sorted(full)
            kinds = {type(o).__name__ for o in getattr(opt, "chained_optimizers", [opt])}
            inner = {type(o.optimizer).__name__ for o in getattr(opt, "chained_optimizers", [opt])}
            assert inner == {"MOGA"}, inner
            for name, want in ref[norm].items():
                err = (full[name] - want).abs().max().item() / want.abs().max().item()
                assert err <= 1e-6, (tp, distopt, norm, name, err, kinds)


def save_at_tp2(rank, world, save_dir):
    import megatron_support

    megatron_support.enable_cuda_to_cpu()
    train(2, False, "col", steps=2, save_dir=save_dir)


def save_distopt_at_dp2(rank, world, save_dir):
    """TP=1 x DP=2 with the distributed optimizer: each rank holds half of every bucket."""
    import megatron_support

    megatron_support.enable_cuda_to_cpu()
    _, opt = train(1, True, "col", steps=2, save_dir=save_dir)
    wrapper = opt.chained_optimizers[0] if hasattr(opt, "chained_optimizers") else opt
    assert type(wrapper).__name__ == "MOGADistributedOptimizer"
    # What it cannot do is refused by name: Megatron FSDP's format, and Adam's parameter state.
    msd = LAST["ddp"].module.sharded_state_dict()
    try:
        wrapper.sharded_state_dict(msd, metadata={"distrib_optim_sharding_type": "fsdp_dtensor"})
    except ValueError as exc:
        assert "'fsdp_dtensor'" in str(exc) and "moga_model_space" in str(exc), exc
    else:
        raise AssertionError("fsdp_dtensor was not refused")
    try:
        wrapper.load_state_dict({**wrapper.state_dict(), "param_state": {}, "param_state_sharding_type": "dp_reshardable"})
    except ValueError as exc:
        assert "'dp_reshardable'" in str(exc) and "Adam" in str(exc), exc
    else:
        raise AssertionError("an Adam parameter state was not refused")


def resume_distopt_at_tp2(rank, world, load_dir, ref_path):
    """Load the DP=2 distributed-optimizer checkpoint at TP=2 x DP=1 (distributed optimizer again),
    take step 3: equals 3 uninterrupted TP=1 steps. Momentum must come back: without it step 3
    would differ at O(update)."""
    import megatron_support

    megatron_support.enable_cuda_to_cpu()
    full, opt = train(2, True, "col", steps=STEPS, start=2, load_dir=load_dir)
    wrappers = getattr(opt, "chained_optimizers", [opt])
    assert all(s["step"] == STEPS for w in wrappers for s in w.optimizer.state.values())
    want = torch.load(ref_path, weights_only=True)["col"]
    for name, w in want.items():
        err = (full[name] - w).abs().max().item() / w.abs().max().item()
        assert err <= 1e-6, (name, err)


def resume_at_tp1(rank, world, load_dir, ref_path):
    """Load the TP=2 checkpoint at TP=1, take step 3: equals 3 uninterrupted TP=1 steps."""
    import megatron_support

    megatron_support.enable_cuda_to_cpu()
    full, opt = train(1, False, "col", steps=STEPS, start=2, load_dir=load_dir)
    inner = opt.chained_optimizers[0].optimizer if hasattr(opt, "chained_optimizers") else opt.optimizer
    assert all(s["step"] == STEPS for s in inner.state.values())
    want = torch.load(ref_path, weights_only=True)["col"]
    for name, w in want.items():
        err = (full[name] - w).abs().max().item() / w.abs().max().item()
        assert err <= 1e-6, (name, err)


def megatron_job(rank, world, base, tp=2, zero_stage=0):
    """The training loop's Megatron backend: straight 4 steps == 2 steps, stop, resume 2."""
    import megatron_support
    from megatron.core import parallel_state as ps
    from train_cases import TINY

    from moga_dist.train.backend_megatron import MegatronBackend
    from moga_dist.train.config import load
    from moga_dist.train.loop import run

    megatron_support.enable_cuda_to_cpu()
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    megatron_support.apply_model_shims()
    common = TINY + ["parallel.engine='megatron'", f"parallel.tensor_parallel={tp}", "training.steps=4",
                     f"parallel.distributed_optimizer={str(bool(zero_stage)).lower()}",
                     f"training.global_batch_size={2 * (world // tp)}"]

    def weights(backend):
        return {n: gather_full(p.data, p, ps) for n, p in backend.model.named_parameters()}

    straight = MegatronBackend(load(None, common + [f"output_dir='{base}/straight'"]), allow_cpu=True)
    summary = run(straight.cfg, straight)
    kind = "distributed optimizer" if zero_stage else "replicated optimizer"
    assert summary["layout"] == f"Megatron TP{tp} x DP{world // tp}, {kind}" and summary["steps"] == 4
    first = MegatronBackend(load(None, common + [f"output_dir='{base}/split'", "training.stop_at_step=2"]),
                            allow_cpu=True)
    run(first.cfg, first)
    resumed = MegatronBackend(load(None, common + [f"output_dir='{base}/split'"]), allow_cpu=True)
    assert run(resumed.cfg, resumed)["resumed_from"] == 2
    want, got = weights(straight), weights(resumed)
    for name in want:
        assert torch.equal(want[name], got[name]), name


def registry(rank, world, path):
    """megatron-core 0.18+: Megatron's own get_megatron_optimizer with optimizer='moga' registered."""
    import megatron_support
    from megatron.core import optimizer as mopt

    from moga_dist.engines.megatron import register

    megatron_support.enable_cuda_to_cpu()
    register(settings=MOGA_SETTINGS | {"norm": "col"})
    config = mopt.OptimizerConfig(optimizer="moga", lr=0.02, weight_decay=0.1, clip_grad=1.0)
    full, opt = train(2, False, "col", make_optimizer=lambda ddp: mopt.get_megatron_optimizer(config, [ddp]))
    # Megatron's registry path has no DP-sharded MOGA: both ways to ask for one are refused by name.
    for field in ("use_distributed_optimizer", "use_layer_wise_distributed_optimizer"):
        try:
            mopt.get_megatron_optimizer(dataclasses.replace(config, **{field: True}), [LAST["ddp"]])
        except ValueError as exc:
            assert f"{field}=True" in str(exc), exc
        else:
            raise AssertionError(f"{field}=True was not refused")
    want = torch.load(path, weights_only=True)["col"]
    for name, w in want.items():
        err = (full[name] - w).abs().max().item() / w.abs().max().item()
        assert err <= 1e-6, (name, err)


def _dp_full(wrapper, p, tensor_of_range):
    """The whole TP-local tensor of parameter p from the distributed optimizer's DP shards:
    tensor_of_range(lo, hi) gives this rank's [lo, hi) of the flattened parameter."""
    full = torch.zeros(p.numel(), dtype=torch.float32)
    if p in wrapper.model_param_gbuf_map:
        rng = wrapper._get_model_param_range_map(p)["param"]
        full[rng.start:rng.end] = tensor_of_range(rng.start, rng.end)
    dist.all_reduce(full, group=wrapper.data_parallel_group)
    return full.view(p.shape)


def bf16_wrapper(rank, world, tp, distopt=False, registry=False):
    """bf16 model, Megatron's Float16OptimizerWithFloat16Params (or its distributed optimizer)
    around MOGA: one step of every fp32 main weight equals the float64 reference step on the whole
    (TP-gathered, DP-assembled) main weight, momentum and fp32 main gradient, with the role and
    row blocks the adapter read off the model."""
    import megatron_support
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig

    import moga_dist.engines.megatron as moga_megatron
    from moga_dist.core.reference import reference_step

    megatron_support.enable_cuda_to_cpu()
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    megatron_support.apply_model_shims()
    cfg = megatron_support.tiny_config(num_layers=1, tensor_model_parallel_size=tp, bf16=True,
                                       params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16)
    torch.manual_seed(42)
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                     vocab_size=VOCAB, max_sequence_length=SEQ, position_embedding_type="rope",
                     share_embeddings_and_output_weights=False)
    ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=distopt), model)
    hp = {**MOGA_SETTINGS, "norm": "col", "lr": 0.02, "weight_decay": 0.1}
    settings = {k: hp[k] for k in ("momentum", "hidden_mult", "norm")}
    config = OptimizerConfig(optimizer="moga", lr=hp["lr"], weight_decay=hp["weight_decay"], clip_grad=0.0,
                             bf16=True, params_dtype=torch.bfloat16, use_distributed_optimizer=distopt)
    if registry:     # megatron-core 0.18+: Megatron's own entry point, MOGA registered under "moga"
        from megatron.core import optimizer as mopt
        moga_megatron.register(settings=settings)
        opt = mopt.get_megatron_optimizer(config, [ddp])
    else:
        opt = moga_megatron.get_megatron_optimizer(config, [ddp], moga=settings)
    wrapper = getattr(opt, "chained_optimizers", [opt])[0]
    want_kind = "MOGADistributedOptimizer" if distopt else "Float16OptimizerWithFloat16Params"
    assert type(wrapper).__name__ == want_kind, type(wrapper).__name__
    info = moga_megatron.describe_params([ddp], ps.get_tensor_model_parallel_rank(), tp)
    main_of = {id(model_p): main for main, model_p in moga_megatron._pairs(wrapper)}

    def whole(p, what):
        """(main weight | gradient | momentum) of p, whole, fp64."""
        if not distopt:
            main = main_of[id(p)]
            t = {"main": main.detach(), "grad": p.main_grad,
                 "mom": wrapper.optimizer.state.get(main, {}).get("momentum_buffer", torch.zeros_like(main))}[what]
            return gather_full(t, p, ps).double()

        def local(lo, hi):
            main = main_of[id(p)]
            if what == "main":
                return main.detach()
            if what == "grad":          # the reduce-scattered shard of the grad buffer
                return p.main_grad.reshape(-1)[lo:hi]
            return wrapper.optimizer.state.get(main, {}).get("momentum_buffer", torch.zeros_like(main))
        return gather_full(_dp_full(wrapper, p, local), p, ps).double()
    gen = torch.Generator().manual_seed(7)
    mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)
    pos = torch.arange(SEQ).unsqueeze(0)
    checked = 0
    for step in range(2):
        tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=gen)
        ddp.zero_grad_buffer()
        opt.zero_grad()
        ddp(tokens[:, :-1], pos.expand(GLOBAL_BATCH, -1), mask, labels=tokens[:, 1:]).mean().backward()
        finalize_model_grads([ddp])
        before = {n: [whole(p, k) for k in ("main", "grad", "mom")] for n, p in model.named_parameters()}
        ok, _, _ = opt.step()
        assert ok
        for n, p in model.named_parameters():
            meta = info[id(p)]
            w, g, m = before[n]
            want, _ = reference_step(w, g, m, meta.role, row_blocks=meta.layout.row_blocks, **hp)
            got = whole(p, "main")
            err = ((got - w) - (want - w)).abs().max().item()
            assert err <= 1e-5 * (want - w).abs().max().item() + 1e-7 * w.abs().max().item(), (step, n, err)
            # the model weight is the main weight rounded to its dtype (bf16)
            assert torch.equal(gather_full(p.detach(), p, ps), got.to(p.dtype)), (n, p.dtype)
            checked += 1
    assert checked == 2 * len(list(model.parameters()))
