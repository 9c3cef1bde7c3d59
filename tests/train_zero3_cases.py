"""Workers for the training job at ZeRO-3 (tests/test_train_zero3.py): the tiny LLaMA of
train_cases with train_reshard_cases' batch (12 sequences per step at any world size)."""
from train_cases import tiny
from train_reshard_cases import RESHARD


def run_stage(rank, world, out, stage, steps, stop_at=None):
    """The job at `engine.zero_stage=stage` into `out` (stop_at: an interrupted run), then checks
    that the optimizer that ran is MOGA: at ZeRO-3, inside DeepSpeed's stage-3 wrapper, each
    sub-group's fp32 flat holding momentum that took one step per optimizer step."""
    from moga_dist import MOGA
    from moga_dist.train.loop import make_backend, run

    cfg = tiny(out, steps, *RESHARD, f"engine.zero_stage={stage}",
               *([f"training.stop_at_step={stop_at}"] if stop_at else []))
    backend = make_backend(cfg)
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


def straight_and_split(rank, world, base, steps, stop_at):
    """One process group, three runs: ZeRO-3 and ZeRO-2 uninterrupted, ZeRO-3 stopped at `stop_at`."""
    run_stage(rank, world, f"{base}/zero3", 3, steps)
    run_stage(rank, world, f"{base}/zero2", 2, steps)
    run_stage(rank, world, f"{base}/split", 3, steps, stop_at)
