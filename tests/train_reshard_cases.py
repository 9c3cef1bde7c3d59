"""Workers for the training job's resharding test: a run stopped at 2 ranks resumes at another
world size (same global batch of 12 samples per step) through MOGA's model-space checkpoint."""
from train_cases import tiny

RESHARD = ["training.global_batch_size=12", "training.micro_batch_size=2"]


def run_job(rank, world, out, steps, stop_at=None, *extra_overrides):
    """The job at `world` ranks into `out`; with stop_at, an interrupted run. Returns nothing:
    the test reads the checkpoints it wrote."""
    from moga_dist.train.loop import run

    extra = ([f"training.stop_at_step={stop_at}"] if stop_at else []) + list(extra_overrides)
    summary = run(tiny(out, steps, *RESHARD, *extra))
    assert summary["world_size"] == world and summary["optimizer"] == "moga", summary
