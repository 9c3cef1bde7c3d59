"""Workers for the ZeRO-3 tests: plain `deepspeed.initialize(optimizer=MOGA(...))` at stage 3 vs
single-process MOGA on the same global batches."""
import torch

from deepspeed_cases import HP, STEPS, Tiny, batches, ds_config, engine_run, loss_of, reference
from moga_dist import MOGA, param_groups


def gathered(engine) -> dict[str, torch.Tensor]:
    """{name: full fp32 copy} of the engine's (ZeRO-3 partitioned) parameters."""
    import deepspeed

    params = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params]):
        return {name: p.detach().float().clone() for name, p in params}


def compare_gathered(engine, ref, what, rtol=1e-5) -> None:
    """Every gathered parameter equals the reference's within rtol of its largest entry."""
    full = gathered(engine)
    for name, q in ref.named_parameters():
        err = (full[name] - q.detach()).abs().max().item() / q.detach().abs().max().item()
        assert err <= rtol, (what, name, err)


def assert_moga_ran_stage3(engine, steps) -> None:
    """The optimizer ZeRO-3 stepped is MOGA, and each sub-group's fp32 flat holds a momentum
    buffer that took exactly `steps` steps (one per optimizer step, not per micro-batch)."""
    moga = engine.optimizer.optimizer
    assert isinstance(moga, MOGA), type(moga)
    flats = list(engine.optimizer.fp32_partitioned_groups_flat)
    assert flats, "ZeRO-3 holds no fp32 partitions"
    for flat in flats:
        state = moga.state[flat]
        assert "momentum_buffer" in state and state["step"] == steps, (tuple(flat.shape), state.get("step"))
        assert state["momentum_buffer"].shape == flat.shape


def shared_statistics(model, world: int, norm: str) -> int:
    """Floats a rank must all-reduce per step under ZeRO-3 at `world` ranks: rows (or columns) of
    each normalized matrix that ZeRO-3's per-parameter partition (ceil(numel / world) elements per
    rank) puts on more than one rank. Arithmetic on the partition, not MOGA's planner."""
    total = 0
    for name, p in model.named_parameters():
        if p.dim() != 2 or name.startswith("embed"):
            continue                               # sign-updated: no statistics
        axis = "row" if name.startswith("lm_head") else norm
        d_out, d_in = p.shape
        part = -(-p.numel() // world)
        owner = (torch.arange(p.numel()) // part).reshape(d_out, d_in)
        lines = owner if axis == "row" else owner.t()
        total += sum(1 for line in lines if len(set(line.tolist())) > 1)
    return total


def stage3(rank, world, norm="row", sub_group_size=None, clip=1.0):
    """ZeRO-3, accumulation 2, clipping: gathered weights equal single-process MOGA (1e-5), and
    the statistics all-reduce carries exactly the shared rows/columns."""
    import deepspeed
    import moga_dist.engines.deepspeed as mds

    mds.skip_shm_comm_build()
    micro, accum = 2, 2
    data = batches(micro * accum * world, STEPS)
    torch.manual_seed(0)
    model = Tiny()
    config = ds_config(3, micro, accum, clip)
    if sub_group_size is not None:
        config["zero_optimization"]["sub_group_size"] = sub_group_size
    hp = {**HP, "norm": norm}
    minimum = shared_statistics(model, world, norm)
    moga = MOGA(param_groups(model), **hp)
    engine, *_ = deepspeed.initialize(model=model, optimizer=moga, config=config)
    assert type(engine.optimizer).__name__ == "DeepSpeedZeroOptimizer_Stage3", type(engine.optimizer)
    if sub_group_size is not None:
        assert len(engine.optimizer.fp16_groups) > 1, "sub_group_size did not split the parameters"
    engine_run(rank, world, 3, clip, data, micro, accum, engine=engine)
    assert_moga_ran_stage3(engine, STEPS)
    compare_gathered(engine, reference(data, clip, hp), f"ZeRO-3 world {world} {norm}")
    assert minimum > 0
    assert moga.reducer.counter.payload_bytes["dp"] == STEPS * 4 * minimum, \
        (dict(moga.reducer.counter.payload_bytes), STEPS * 4 * minimum)


def stage3_refusals(rank, world):
    """ZeRO-3 settings MOGA is not mapped for are refused inside deepspeed.initialize, by key."""
    import deepspeed
    import moga_dist.engines.deepspeed as mds

    mds.skip_shm_comm_build()
    for key, extra in (("zero_optimization.offload_param", {"offload_param": {"device": "cpu"}}),
                       ("zero_optimization.zero_hpz_partition_size", {"zero_hpz_partition_size": 2})):
        torch.manual_seed(0)
        model = Tiny()
        config = ds_config(3, 2, 1)
        config["zero_optimization"].update(extra)
        try:
            deepspeed.initialize(model=model, optimizer=MOGA(param_groups(model), **HP), config=config)
        except ValueError as exc:
            assert key in str(exc), (key, str(exc))
        else:
            raise AssertionError(f"{key} was not refused")


def stage3_sub_groups_one_step(rank, world):
    """ZeRO-3 with several sub-groups steps MOGA once per optimizer step: the step program is built
    once and reused (the same object after every later step), and a non-finite gradient in the LAST
    sub-group (injected on rank 0 only, after DeepSpeed's own gradient-norm check) is refused on
    every rank with every sub-group's fp32 flat, momentum and partitioned parameters unchanged."""
    import deepspeed
    import moga_dist.engines.deepspeed as mds
    from moga_dist import NonFiniteGradientError

    mds.skip_shm_comm_build()
    micro = 2
    data = batches(micro * world, 4)
    torch.manual_seed(0)
    model = Tiny()
    config = ds_config(3, micro, 1)
    config["zero_optimization"]["sub_group_size"] = 100
    moga = MOGA(param_groups(model), **HP)
    engine, *_ = deepspeed.initialize(model=model, optimizer=moga, config=config)
    ds = engine.optimizer
    assert len(ds.fp16_groups) > 2, "sub_group_size did not split the parameters"
    engine_run(rank, world, 3, 0.0, data[:1], micro, 1, engine=engine)
    program = moga.last_program
    assert program is not None and len(program.pieces) >= len(ds.fp16_groups), "one program for all sub-groups"
    engine_run(rank, world, 3, 0.0, data[1:3], micro, 1, engine=engine)
    assert moga.last_program is program, "the step program was rebuilt"

    last = len(ds.fp16_groups) - 1
    flats = [f.detach().clone() for f in ds.fp32_partitioned_groups_flat]
    moms = [moga.state[f]["momentum_buffer"].clone() for f in ds.fp32_partitioned_groups_flat]
    parts = [f.detach().clone() for f in ds.fp16_partitioned_groups_flat]
    clip = ds.unscale_and_clip_grads

    def poison(sub_group_id, norm):
        clip(sub_group_id, norm)
        if sub_group_id == last and rank == 0:
            ds.fp32_partitioned_groups_flat[last].grad[0] = float("nan")

    ds.unscale_and_clip_grads = poison
    first = rank * micro
    engine.backward(loss_of(engine, data[3][first:first + micro]))
    try:
        engine.step()
    except NonFiniteGradientError:
        pass
    else:
        raise AssertionError("a NaN in the last sub-group was not refused")
    for i, f in enumerate(ds.fp32_partitioned_groups_flat):
        assert torch.allclose(f.detach(), flats[i], rtol=0, atol=1e-6), ("fp32 flat stepped", i)
        assert torch.equal(ds.fp16_partitioned_groups_flat[i], parts[i]), ("partitioned params changed", i)
        mom = moga.state[f]["momentum_buffer"]
        keep = torch.ones_like(mom, dtype=torch.bool)
        if i == last and rank == 0:
            keep[0] = False                      # the poisoned entry's momentum is reset to 0
        assert torch.allclose(mom[keep], moms[i][keep], rtol=0, atol=1e-6), ("momentum stepped", i)
