"""Workers for the Megatron-LM entry test (megatron.training of megatron-core >= 0.18)."""
import torch

from megatron_cases import GLOBAL_BATCH, SEQ, STEPS, VOCAB, train


def megatron_lm_flags(tp, distributed_optimizer):
    """Megatron-LM flags of the tiny model and the settings `train` uses, selecting MOGA."""
    flags = ("--num-layers 2 --hidden-size 64 --ffn-hidden-size 96 --num-attention-heads 4 --group-query-attention "
             f"--num-query-groups 2 --seq-length {SEQ} --max-position-embeddings {SEQ} --normalization RMSNorm "
             "--swiglu --position-embedding-type rope --disable-bias-linear --untie-embeddings-and-output-weights "
             f"--micro-batch-size 2 --global-batch-size {GLOBAL_BATCH} --train-iters {STEPS} --lr 0.02 "
             f"--weight-decay 0.1 --clip-grad 1.0 --tensor-model-parallel-size {tp} --tokenizer-type NullTokenizer "
             f"--vocab-size {VOCAB} --mock-data --optimizer moga --moga-norm col --moga-momentum 0.9 "
             "--moga-hidden-mult 5.0").split()
    return flags + (["--use-distributed-optimizer"] if distributed_optimizer else [])


def megatron_lm(rank, world, ref_path, layouts):
    """Megatron-LM's own argument parsing and validation and its training's optimizer factory, after
    moga_dist.engines.megatron_lm.install(): `--optimizer moga --moga-*` builds MOGA inside
    Megatron's regular wrappers (its DistributedOptimizer for --use-distributed-optimizer), and 3
    steps equal the TP=1 reference."""
    import os
    import sys
    import types

    import megatron_support
    megatron_support.allow_python_3_12_typing()
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator
    from megatron.training import arguments, global_vars, training

    from moga_dist.engines import megatron_lm as lm

    megatron_support.enable_cuda_to_cpu()
    # Megatron-LM's validation asks the GPU's architecture (Hopper here) and its TP setting.
    torch.cuda.get_device_properties = lambda *a, **k: types.SimpleNamespace(major=9, minor=0)
    os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    lm.install()
    want = torch.load(ref_path, weights_only=True)["col"]
    for tp, distributed_optimizer in layouts:
        sys.argv = ["pretrain_gpt.py", *megatron_lm_flags(tp, distributed_optimizer)]
        global_vars.destroy_global_vars()          # Megatron-LM's globals, set once per run
        destroy_num_microbatches_calculator()
        args = arguments.parse_and_validate_args()
        assert (args.optimizer, args.use_distributed_optimizer) == ("moga", distributed_optimizer)
        assert not getattr(args, "use_layer_wise_distributed_optimizer", False)
        global_vars.set_args(args)

        def build(ddp):
            config, overrides = training.get_megatron_optimizer_config(args)
            return training.get_megatron_optimizer(config, [ddp], config_overrides=overrides)
        full, opt = train(tp, distributed_optimizer, "col", make_optimizer=build)
        wrappers = getattr(opt, "chained_optimizers", [opt])
        assert {type(w.optimizer).__name__ for w in wrappers} == {"MOGA"}
        assert all(w.optimizer.defaults["hidden_mult"] == 5.0 and w.optimizer.defaults["norm"] == "col"
                   for w in wrappers)
        if distributed_optimizer:
            assert {type(w).__name__ for w in wrappers} == {"MOGADistributedOptimizer"}
        for name, w in want.items():
            err = (full[name] - w).abs().max().item() / w.abs().max().item()
            assert err <= 1e-6, (tp, distributed_optimizer, name, err)
