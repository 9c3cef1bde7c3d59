"""Workers for the Megatron pipeline-parallel tests: megatron-core's own schedule, directly and
through the training job's Megatron backend."""
import torch
import torch.distributed as dist

from megatron_cases import GLOBAL_BATCH, MOGA_SETTINGS, SEQ, STEPS, VOCAB, gather_full


def pipeline(rank, world, ref_path, tp, pp):
    """Megatron's own pipeline schedule (get_forward_backward_func, 1F1B over gloo p2p) at TP x PP:
    each stage holds its layers (weights copied from the full TP=1 model, layer i of stage s = layer
    s * layers_per_stage + i), one MOGA per stage through the drop-in, 3 steps equal the TP=1
    reference for every parameter of every stage."""
    import megatron_support
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.pipeline_parallel import get_forward_backward_func

    import moga_dist.engines.megatron as moga_megatron

    megatron_support.enable_cuda_to_cpu()
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    megatron_support.apply_model_shims()
    want = torch.load(ref_path, weights_only=True)["col"]
    init = torch.load(ref_path.replace(".pt", "_init.pt"), weights_only=True)
    cfg = megatron_support.tiny_config(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                     vocab_size=VOCAB, max_sequence_length=SEQ, position_embedding_type="rope",
                     share_embeddings_and_output_weights=False, pre_process=first, post_process=last)
    offset = ps.get_pipeline_model_parallel_rank() * (cfg.num_layers // pp)

    def global_name(name):
        if name.startswith("decoder.layers."):
            index, rest = name[len("decoder.layers."):].split(".", 1)
            return f"decoder.layers.{int(index) + offset}.{rest}"
        return name
    tp_rank = ps.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for name, p in model.named_parameters():
            full = init[global_name(name)]
            if getattr(p, "tensor_model_parallel", False) and tp > 1:
                d, s = p.partition_dim, p.partition_stride
                full = torch.cat([part.chunk(tp, d)[tp_rank] for part in full.chunk(s, d)], d)
            p.copy_(full)
    ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    opt = moga_megatron.get_megatron_optimizer(
        OptimizerConfig(optimizer="moga", lr=0.02, weight_decay=0.1, clip_grad=1.0), [ddp],
        moga={**MOGA_SETTINGS, "norm": "col"})
    gen = torch.Generator().manual_seed(7)
    mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)
    pos = torch.arange(SEQ).unsqueeze(0).expand(GLOBAL_BATCH, -1)

    def forward_step(data_iterator, stage_model):
        tokens = next(data_iterator)
        out = stage_model(tokens[:, :-1], pos, mask, labels=tokens[:, 1:])
        return out, lambda output: (output.mean(), {})
    forward_backward = get_forward_backward_func()
    for _ in range(STEPS):
        tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=gen)
        ddp.zero_grad_buffer()
        opt.zero_grad()
        forward_backward(forward_step_func=forward_step, data_iterator=iter([tokens]), model=[ddp],
                         num_microbatches=1, seq_length=SEQ, micro_batch_size=GLOBAL_BATCH, forward_only=False)
        finalize_model_grads([ddp])
        ok, _, _ = opt.step()
        assert ok
    names = set()
    for name, p in model.named_parameters():
        full, ref = gather_full(p.data, p, ps), want[global_name(name)]
        err = (full - ref).abs().max().item() / ref.abs().max().item()
        assert err <= 1e-6, (tp, pp, global_name(name), err)
        names.add(global_name(name))
    everywhere = [None] * world
    dist.all_gather_object(everywhere, sorted(names))
    assert set().union(*everywhere) == set(want), sorted(set(want) - set().union(*everywhere))


def megatron_job_pipeline(rank, world, base, zero_stage):
    """The training job's Megatron backend at PP=2: 4 steps at TP=2 (DP=1, so the same batches),
    and the same run stopped at step 2 and resumed at TP=1 x PP=2 (dist_checkpointing reshards
    TP -> PP) through megatron-core's 1F1B schedule: every parameter of every stage equals the
    uninterrupted TP=2 run within 1e-6, and every stage's optimizer is MOGA with momentum."""
    import megatron_support
    from megatron.core import parallel_state as ps
    from train_cases import TINY

    from moga_dist.train.backend_megatron import MegatronBackend
    from moga_dist.train.config import load
    from moga_dist.train.loop import run

    megatron_support.enable_cuda_to_cpu()
    common = TINY + ["parallel.engine='megatron'", "training.steps=4",
                     f"parallel.distributed_optimizer={str(bool(zero_stage)).lower()}"]

    def backend(tp, pp, *extra):
        ps.destroy_model_parallel()
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        megatron_support.apply_model_shims()
        return MegatronBackend(load(None, common + [f"parallel.tensor_parallel={tp}",
                                                    f"parallel.pipeline_parallel={pp}", *extra]), allow_cpu=True)

    straight = backend(2, 1, f"output_dir='{base}/straight'")
    run(straight.cfg, straight)
    want = {n: gather_full(p.data, p, ps) for n, p in straight.model.named_parameters()}
    first = backend(2, 1, f"output_dir='{base}/split'", "training.stop_at_step=2")
    run(first.cfg, first)
    resumed = backend(1, 2, f"output_dir='{base}/split'")
    summary = run(resumed.cfg, resumed)
    kind = "distributed optimizer" if zero_stage else "replicated optimizer"
    assert summary["resumed_from"] == 2 and summary["layout"] == f"Megatron TP1 x PP2 x DP1, {kind}", summary
    for wrapper in getattr(resumed.optimizer, "chained_optimizers", [resumed.optimizer]):
        assert type(wrapper.optimizer).__name__ == "MOGA"
        assert all("momentum_buffer" in s for s in wrapper.optimizer.state.values())
    offset = ps.get_pipeline_model_parallel_rank() * (resumed.cfg.model.num_layers // 2)
    names = []
    for name, p in resumed.model.named_parameters():
        if name.startswith("decoder.layers."):
            index, rest = name[len("decoder.layers."):].split(".", 1)
            name = f"decoder.layers.{int(index) + offset}.{rest}"
        err = (p.data - want[name]).abs().max().item() / want[name].abs().max().item()
        assert err <= 1e-6, (name, err)
        names.append(name)
    everywhere = [None] * world
    dist.all_gather_object(everywhere, names)
    assert sorted(n for part in everywhere for n in part) == sorted(want)
