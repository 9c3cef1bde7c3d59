"""Workers for the resharding tests: a DeepSpeed run with MOGA saved at one world size continues
at another, equal to uninterrupted single-process MOGA on the same global batches."""
import contextlib
import dataclasses
import gc
import weakref

import torch

from deepspeed_cases import HP, STEPS, Tiny, batches, ds_config, engine_run, loss_of
from deepspeed_zero3_cases import assert_moga_ran_stage3, compare_gathered
from moga_dist import MOGA, param_groups

GLOBAL_BATCH, ACCUM, SAVED_AT = 12, 2, 2
CLIP = 1.0
WARMUP = dict(warmup_min_lr=0.005, warmup_max_lr=HP["lr"], warmup_num_steps=3, warmup_type="linear")


def _engine(world, stage):
    import deepspeed
    import moga_dist.engines.deepspeed as mds

    mds.skip_shm_comm_build()
    torch.manual_seed(0)
    model = Tiny()
    config = ds_config(stage, GLOBAL_BATCH // (ACCUM * world), ACCUM, CLIP)
    # A schedule, so the resumed lr (MOGA's group and the scheduler) is part of what is checked.
    config["scheduler"] = {"type": "WarmupLR", "params": WARMUP}
    engine, *_ = deepspeed.initialize(model=model, optimizer=MOGA(param_groups(model), **HP), config=config)
    return engine


def _run(engine, rank, world, stage, data):
    return engine_run(rank, world, stage, CLIP, data, GLOBAL_BATCH // (ACCUM * world), ACCUM, engine=engine)


def save_case(rank, world, stage, directory):
    """SAVED_AT steps at `world` ranks, then a model-space checkpoint in `directory`."""
    from moga_dist.engines.deepspeed_checkpoint import save_model_space

    engine = _engine(world, stage)
    _run(engine, rank, world, stage, batches(GLOBAL_BATCH, STEPS)[:SAVED_AT])
    save_model_space(engine, directory)


def resume_case(rank, world, stage, directory):
    """Load at `world` ranks, run the remaining steps: equals uninterrupted MOGA (1e-5)."""
    from moga_dist.engines.deepspeed_checkpoint import load_model_space
    from moga_dist.engines.deepspeed_wrappers import held_tensors

    data = batches(GLOBAL_BATCH, STEPS)
    engine = _engine(world, stage)
    with files_held() as held:
        assert load_model_space(engine, directory) == SAVED_AT
    # The load streams the 2 saved rank files: never more than one held at a time.
    assert held.opened >= 2 and held.most == 1, (held.opened, held.most)
    assert engine.global_steps == SAVED_AT
    _run(engine, rank, world, stage, data[SAVED_AT:])
    ref = reference_scheduled(data)
    if stage == 3:
        assert_moga_ran_stage3(engine, STEPS)
        compare_gathered(engine, ref, f"resumed ZeRO-3 at world {world}")
        return
    moga = engine.basic_optimizer
    for held in held_tensors(moga):
        assert moga.state[held.tensor]["step"] == STEPS and "momentum_buffer" in moga.state[held.tensor]
    for (name, p), q in zip(engine.module.named_parameters(), ref.parameters()):
        err = (p.detach().float() - q.detach()).abs().max().item() / q.detach().abs().max().item()
        assert err <= 1e-5, (f"resumed ZeRO-{stage} at world {world}", name, err)


@dataclasses.dataclass
class FilesHeld:
    opened: int = 0         # rank files whose tensors were read
    most: int = 0           # most rank files alive at once (some tensor of theirs still referenced)


@contextlib.contextmanager
def files_held():
    """Count the model-space rank files a load holds at once: each file read is tracked by a weak
    reference to one of its tensors, dead once the loader dropped the file."""
    import moga_dist.engines.deepspeed_checkpoint as dc

    held, live, read = FilesHeld(), [], dc._read

    def tracking(path):
        out = read(path)
        tensors = [t for p in out.get("pieces", {}).values() for t in p.values() if torch.is_tensor(t)]
        if tensors:
            gc.collect()
            live[:] = [r for r in live if r() is not None] + [weakref.ref(tensors[0])]
            held.opened += 1
            held.most = max(held.most, len(live))
        return out

    dc._read = tracking
    try:
        yield held
    finally:
        dc._read = read


def reference_scheduled(data):
    """Single-process MOGA under the same warm-up schedule, stepped after each optimizer step."""
    import deepspeed.runtime.lr_schedules as schedules

    torch.manual_seed(0)
    model = Tiny()
    opt = MOGA(param_groups(model), **HP)
    sched = schedules.WarmupLR(opt, **WARMUP)
    for tokens in data:
        opt.zero_grad()
        loss_of(model, tokens).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        sched.step()
    return model
