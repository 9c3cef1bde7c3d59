"""Workers for the training job at ZeRO-3 (tests/test_train_zero3.py): the tiny LLaMA of
train_cases with train_reshard_cases' batch (12 sequences per step at any world size)."""
from train_cases import tiny
from train_reshard_cases import RESHARD


def run_stage(rank, world, out, stage, steps, stop_at=None):
    """The job at `engine.zero_stage=stage` into `out` (stop_at: an interrupted run), then checks
    that the optimizer that ran is MOGA: at ZeRO-3, inside DeepSpeed's stage-3 wrapper, each
    sub-group's fp32 flat holding momentum that took one step per optimizer step."""
    from moga_dist import MOGA
    from moga_dist.train import backend_deepspeed
    from moga_dist.train.loop import make_backend, run

    cfg = tiny(out, steps, *RESHARD, f"engine.zero_stage={stage}",
               *([f"training.stop_at_step={stop_at}"] if stop_at else []))
    built, whole, ds_config = [], backend_deepspeed.build_partitioned, backend_deepspeed.deepspeed_config

    def no_persistent(*a):           # the tiny model's parameters are all under ZeRO-3's persistence
        out = ds_config(*a)          # threshold (1e5 elements: kept gathered); 0 partitions them all
        out["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        return out
    backend_deepspeed.build_partitioned = lambda *a: built.append(a) or whole(*a)
    backend_deepspeed.deepspeed_config = no_persistent
    try:
        backend = make_backend(cfg)
    finally:
        backend_deepspeed.build_partitioned, backend_deepspeed.deepspeed_config = whole, ds_config
    assert len(built) == (stage == 3), "ZeRO-3 must build the model under zero.Init, ZeRO 0-2 whole"
    summary = run(cfg, backend)
    assert summary["world_size"] == world and summary["layout"] == f"ZeRO-{stage}", summary
    engine = backend.engine
    moga = engine.basic_optimizer
    assert isinstance(moga, MOGA), type(moga)
    if stage == 3:
        wrapper = engine.optimizer
        assert type(wrapper).__name__ == "DeepSpeedZeroOptimizer_Stage3", type(wrapper)
        assert wrapper.optimizer is moga
        flats = list(wrapper.fp32_partitioned_groups_flat)
        assert flats, "ZeRO-3 holds no fp32 partitions"
        done = min(steps, stop_at or steps)
        for flat in flats:
            state = moga.state[flat]
            assert state["step"] == done and state["momentum_buffer"].shape == flat.shape, state.get("step")
        # Every parameter (none is persistent here) is released after the run, which ends with an
        # evaluation and MOGA's save, as after a training step: none is left gathered whole on a rank.
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        partitioned = [(n, p) for n, p in engine.module.named_parameters() if not p.ds_persist]
        assert partitioned, "every ZeRO-3 parameter is persistent: the check below is vacuous"
        kept = [n for n, p in partitioned if p.ds_status != ZeroParamStatus.NOT_AVAILABLE or p.data.numel()]
        assert not kept, f"ZeRO-3 parameters left gathered after the run: {kept}"


def partitioned_build(rank, world):
    """build_partitioned (zero.Init) leaves every parameter a 0-element placeholder, gathers to
    build_model's weights bit for bit under the same seed, and moga_groups gives each parameter the
    role param_groups gives it on the whole model."""
    import deepspeed
    import torch

    from moga_dist import param_groups
    from moga_dist.engines.deepspeed import skip_shm_comm_build
    from moga_dist.train.backend_deepspeed import (
        build_model,
        build_partitioned,
        moga_groups,
    )
    from moga_dist.train.engine_config import deepspeed_config

    skip_shm_comm_build()
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    cfg = tiny("unused", 1, *RESHARD, "engine.zero_stage=3")
    torch.manual_seed(cfg.training.seed)
    whole = build_model(cfg.model)
    torch.manual_seed(cfg.training.seed)
    part = build_partitioned(cfg.model, deepspeed_config(cfg, world))
    params = dict(part.named_parameters())
    assert params.keys() == dict(whole.named_parameters()).keys()
    assert all(p.numel() == 0 and hasattr(p, "ds_shape") for p in params.values()), "a parameter was left whole"
    with deepspeed.zero.GatheredParameters(list(params.values())):
        for name, w in whole.named_parameters():
            assert torch.equal(params[name], w), name

    def roles(groups):
        return {n: g["role"] for g in groups for n in g["param_names"]}
    assert roles(moga_groups(part, cfg.model)) == roles(param_groups(whole))


def straight_and_split(rank, world, base, steps, stop_at):
    """One process group: the partitioned build, then three runs: ZeRO-3 and ZeRO-2 uninterrupted,
    ZeRO-3 stopped at `stop_at`."""
    partitioned_build(rank, world)
    run_stage(rank, world, f"{base}/zero3", 3, steps)
    run_stage(rank, world, f"{base}/zero2", 2, steps)
    run_stage(rank, world, f"{base}/split", 3, steps, stop_at)
