"""Workers for the checkpoint-memory tests: how much a rank's resident memory rises while it saves
and loads a checkpoint, at two model sizes (moga_dist.bench.rss measures; the test compares)."""
import json
import os

import torch
import torch.distributed as dist

SEQ, VOCAB = 32, 1024
# (hidden, layers, ffn): ~3.4M and ~40M parameters of a LLaMA-like GPTModel (GQA 4/2, SwiGLU).
SIZES = {"small": (256, 4, 704), "large": (768, 6, 2048)}


def _megatron(hidden, layers, ffn):
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig

    import megatron_support
    import moga_dist.engines.megatron as moga_megatron

    cfg = megatron_support.tiny_config(num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn)
    model, ddp = megatron_support.tiny_gpt_ddp(cfg, vocab_size=VOCAB, seq_len=SEQ, distributed_optimizer=True, seed=0)
    opt = moga_megatron.get_megatron_optimizer(
        OptimizerConfig(optimizer="moga", lr=0.01, weight_decay=0.0, use_distributed_optimizer=True), [ddp],
        moga={"momentum": 0.9, "norm": "col"})
    tokens = torch.randint(0, VOCAB, (1, SEQ + 1), generator=torch.Generator().manual_seed(ps.get_data_parallel_rank()))
    mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)
    ddp.zero_grad_buffer()
    ddp(tokens[:, :-1], torch.arange(SEQ).unsqueeze(0), mask, labels=tokens[:, 1:]).mean().backward()
    finalize_model_grads([ddp])
    assert opt.step()[0]
    return model, opt


def megatron_distopt(rank, world, base, out_json):
    """DP=world, TP=1, distributed optimizer: per size, the RSS rise of the job's save
    (sharded_state_dict + dist_checkpointing.save of without_copies, as MegatronBackend.save) and load (+ load_state_dict), max over ranks; a
    first save/load of the small model warms up the lazy imports so they count against neither."""
    import megatron_support
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from moga_dist.bench.rss import measure
    from moga_dist.engines.megatron_distopt import without_copies

    megatron_support.enable_cuda_to_cpu()
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=1)
    megatron_support.apply_model_shims()
    results = {}
    for name in ("warmup", "small", "large"):
        model, opt = _megatron(*SIZES["small" if name == "warmup" else name])
        params = sum(p.numel() for p in model.parameters())
        path = f"{base}/{name}"
        if rank == 0:
            os.makedirs(path)
        dist.barrier()
        with measure() as save:
            msd = model.sharded_state_dict()
            dist_checkpointing.save(without_copies({"model": msd, "optimizer": opt.sharded_state_dict(msd)}), path)
            del msd
        dist.barrier()
        with measure() as load:
            msd = model.sharded_state_dict()
            state = dist_checkpointing.load({"model": msd, "optimizer": opt.sharded_state_dict(msd, is_loading=True)},
                                            path)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            del msd, state
        rises = [None] * world
        dist.all_gather_object(rises, (save.rise, load.rise))
        results[name] = {"params": params, "save": max(r[0] for r in rises), "load": max(r[1] for r in rises),
                         "per_rank": rises}
        del model, opt
        dist.barrier()
    if rank == 0:
        with open(out_json, "w") as f:
            json.dump(results, f)
