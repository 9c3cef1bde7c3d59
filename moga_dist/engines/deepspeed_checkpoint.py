"""DeepSpeed checkpoints of MOGA that resume at any data-parallel world size (ZeRO 0-3).

DeepSpeed's own ZeRO files hold each rank's flat partition and its optimizer state, so they load
only into the same partitioning, and its universal-checkpoint converter knows Adam's state, not
MOGA's. This module writes MOGA's state in model space instead (the format both engines share,
model_space.py; checkpoints of the older name "moga-model-space-1" load as they are): every rank saves, for each
parameter piece it holds, the parameter's name and shape, the piece's [start, end) in the
flattened parameter, the fp32 master weight and the fp32 momentum (`rank<k>.pt`); rank 0 adds
what is not per piece (`common.pt`: step counts, MOGA's param-group settings including the
scheduled lr, the lr scheduler, the engine's step counters, the model's buffers). Loading copies,
on every rank, the overlap of each saved piece with each piece the rank holds now, checking that
every element is covered exactly once, and rebuilds the model's (bit16) weights from the fp32
masters as a DeepSpeed step does. Files are plain tensors and Python scalars, read only with
`torch.load(weights_only=True)`.

Memory: a save writes exact-storage aliases of the rank's tensors (views.exact_storage), no copy;
a load first reads only the files' piece ranges (memory-mapped, no tensor touched), checks the
coverage, then streams the rank files one at a time, so it holds at most one saved rank file
beyond its own state.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.flat import FlatSegment
from ..core.optimizer import MOGA
from .deepspeed_wrappers import held_tensors
from .model_space import DEEPSPEED, FORMAT, check_format
from .views import exact_storage

COMMON = "common.pt"


def engine_moga(engine) -> MOGA:
    """The MOGA inside a DeepSpeed engine; raises if the engine runs another optimizer."""
    moga = engine.basic_optimizer
    if not isinstance(moga, MOGA):
        raise ValueError(f"the engine's optimizer is {type(moga).__name__}, not MOGA: its checkpoints are DeepSpeed's "
                         "own (engine.save_checkpoint)")
    return moga


def piece_range(seg: FlatSegment) -> tuple[int, int]:
    """[start, end) of the flattened parameter that a segment holds."""
    if seg.layout.tp is not None:
        raise ValueError(f"parameter {seg.name!r} has a tensor-parallel layout; model-space checkpoints cover "
                         "data-parallel partitions only")
    if seg.layout.flat is None:
        return 0, seg.numel
    return seg.layout.flat.local_range


def rank_file(rank: int) -> str:
    return f"rank{rank:05d}.pt"


def save_model_space(engine, directory: str | Path, save: Callable = torch.save) -> None:
    """Write this rank's pieces of MOGA's state to `directory` (rank 0 also `common.pt`).

    No collective: each rank writes only its own file. `save(obj, path)`: the writer (the
    training job passes DeepSpeed's checkpoint engine, which records write errors)."""
    import torch.distributed as dist

    moga = engine_moga(engine)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    pieces, steps = {}, set()
    for held in held_tensors(moga):
        state = moga.state.get(held.tensor, {})
        steps.add(int(state.get("step", 0)))
        weight = held.tensor.detach().reshape(-1)
        mom = state.get("momentum_buffer")
        mom = torch.zeros_like(weight) if mom is None else mom.reshape(-1)
        for seg in held.segments:
            start, end = piece_range(seg)
            if seg.name in pieces:
                raise ValueError(f"parameter {seg.name!r} is held twice by MOGA on rank {rank}")
            # exact_storage: a plain view would save the whole flat buffer with it, a clone copy it.
            pieces[seg.name] = {"shape": list(seg.layout.global_shape), "start": start, "end": end,
                                "weight": exact_storage(weight[seg.start:seg.start + seg.numel]),
                                "momentum_buffer": exact_storage(mom[seg.start:seg.start + seg.numel])}
    if len(steps) > 1:
        raise ValueError(f"MOGA's tensors took different numbers of steps ({sorted(steps)}); not saving")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save({"format": FORMAT, "rank": rank, "pieces": pieces}, str(directory / rank_file(rank)))
    if rank == 0:
        module = engine.module
        save({"format": FORMAT, "world_size": world, "zero_stage": int(engine.zero_optimization_stage()),
              "step": steps.pop() if steps else 0,
              "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in moga.param_groups],
              "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
              "global_steps": int(engine.global_steps), "global_samples": int(engine.global_samples),
              "skipped_steps": int(engine.skipped_steps),
              "buffers": {name: b.detach().clone() for name, b in module.named_buffers()}},
             str(directory / COMMON))


def _read(path: Path):
    if not path.is_file():
        raise ValueError(f"{path}: missing (a model-space checkpoint needs common.pt and one rank file per saved rank)")
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


@dataclass(frozen=True)
class _Index:
    """A checkpoint's layout without its tensors: `common`, {name: shape}, and per saved rank the
    pieces it supplies ({rank: [(name, start, end)]}; a range saved by several ranks, as ZeRO-0's
    whole tensors are, is taken from the first)."""
    common: dict
    shapes: dict[str, list[int]]
    supplies: dict[int, list[tuple[str, int, int]]]

    def covered(self, name: str, start: int, end: int) -> int:
        return sum(max(0, min(end, hi) - max(start, lo)) for pieces in self.supplies.values()
                   for n, lo, hi in pieces if n == name)


def _index(directory: Path) -> _Index:
    common = _read(directory / COMMON)
    check_format(common.get("format"), DEEPSPEED, str(directory / COMMON))
    shapes, supplies, seen = {}, {}, set()
    for rank in range(int(common["world_size"])):
        for name, shape, start, end in _ranges(directory / rank_file(rank)):
            shapes[name] = shape
            if end > start and (name, start, end) not in seen:
                seen.add((name, start, end))
                supplies.setdefault(rank, []).append((name, start, end))
    return _Index(common, shapes, supplies)


def _ranges(path: Path) -> list[tuple[str, list[int], int, int]]:
    """(name, shape, start, end) of each piece in a rank file; its tensors are memory-mapped and
    never touched, and none outlives this call."""
    saved = _read(path)
    check_format(saved.get("format"), DEEPSPEED, str(path))
    return [(name, list(p["shape"]), int(p["start"]), int(p["end"])) for name, p in saved["pieces"].items()]


def _check_covered(index: _Index, targets: list[tuple]) -> None:
    for _, name, start, end, _ in targets:
        covered = index.covered(name, start, end)
        if covered != end - start:
            raise ValueError(f"parameter {name!r}: the checkpoint covers {covered} of elements [{start}, {end}) "
                             "(a rank file is missing or overlaps another)")


def _stream(directory: Path, index: _Index, targets: list[tuple]) -> None:
    """Copy into each target (dest 1-D tensor, name, start, end, field) the saved elements
    [start, end) of `field` ("weight" or "momentum_buffer"), reading one rank file at a time.
    Coverage is checked beforehand (`_check_covered`)."""
    by_name: dict[str, list[tuple]] = {}
    for t in targets:
        by_name.setdefault(t[1], []).append(t)
    for rank, supplied in sorted(index.supplies.items()):
        pieces = _read(directory / rank_file(rank))["pieces"]
        for name, lo_saved, hi_saved in supplied:
            for dest, _, start, end, field in by_name.get(name, ()):
                lo, hi = max(start, lo_saved), min(end, hi_saved)
                if lo < hi:
                    dest[lo - start:hi - start].copy_(pieces[name][field][lo - lo_saved:hi - lo_saved])
        del pieces                       # this file's mapping goes before the next one is opened


def model_space_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """{parameter name: full fp32 master weight} assembled from a model-space checkpoint
    (written at any world size); like DeepSpeed's zero_to_fp32 for MOGA's format."""
    directory = Path(directory)
    index = _index(directory)
    out, targets = {}, []
    for name, shape in index.shapes.items():
        numel = 1
        for s in shape:
            numel *= s
        out[name] = torch.empty(numel, dtype=torch.float32)
        targets.append((out[name], name, 0, numel, "weight"))
    _check_covered(index, targets)
    _stream(directory, index, targets)
    return {name: full.view(index.shapes[name]) for name, full in out.items()}


def load_model_space(engine, directory: str | Path) -> int:
    """Load a model-space checkpoint written at any data-parallel world size into `engine`
    (built at the same ZeRO stage, with the same model and MOGA settings). Returns the
    optimizer step count loaded. Raises ValueError naming what does not match."""
    directory = Path(directory)
    moga = engine_moga(engine)
    index = _index(directory)
    common, shapes = index.common, index.shapes
    stage = int(engine.zero_optimization_stage())
    if int(common["zero_stage"]) != stage:
        raise ValueError(f"{directory}: written at ZeRO stage {common['zero_stage']}, this engine runs stage {stage}")
    if len(common["param_groups"]) != len(moga.param_groups):
        raise ValueError(f"{directory}: {len(common['param_groups'])} MOGA param groups saved, this engine has "
                         f"{len(moga.param_groups)}")
    held = held_tensors(moga)
    names = {seg.name for h in held for seg in h.segments}
    if names != set(shapes):
        raise ValueError(f"{directory}: parameters differ from this model's: missing {sorted(names - set(shapes))}, "
                         f"unknown {sorted(set(shapes) - names)}")
    targets = []
    for h in held:
        weight, mom = h.tensor.data.view(-1), moga.init_state(h.tensor)["momentum_buffer"].view(-1)
        for seg, param in zip(h.segments, h.params):
            if list(seg.layout.global_shape) != shapes[seg.name]:
                raise ValueError(f"parameter {seg.name!r}: shape {shapes[seg.name]} in the checkpoint, "
                                 f"{list(seg.layout.global_shape)} in this model")
            start, end = piece_range(seg)
            targets += [(weight[seg.start:seg.start + seg.numel], seg.name, start, end, "weight"),
                        (mom[seg.start:seg.start + seg.numel], seg.name, start, end, "momentum_buffer")]
            if stage < 3 and param is not h.tensor:
                # The model's copy (bit16, or fp32 views of ZeRO's flat buffer), rounded element-wise
                # from the master by copy_, as a step does.
                targets.append((param.data.view(-1), seg.name, 0, param.numel(), "weight"))
    _check_covered(index, targets)
    ds = engine.optimizer
    if stage == 3:
        ds.checkpoint_event_prologue()
    with torch.no_grad():
        for h in held:
            moga.init_state(h.tensor)["step"] = int(common["step"])
        _stream(directory, index, targets)
        if stage == 3:
            for i in range(len(ds.fp16_groups)):
                ds._reassign_or_swap_out_partitioned_parameters(i)
            ds.checkpoint_event_epilogue()
        buffers = dict(engine.module.named_buffers())
        for name, value in common["buffers"].items():
            if name not in buffers:
                raise ValueError(f"{directory}: buffer {name!r} is not in this model")
            buffers[name].copy_(value)
    for group, saved_group in zip(moga.param_groups, common["param_groups"]):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    if common["lr_scheduler"] is not None and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(common["lr_scheduler"])
    engine.global_steps, engine.global_samples = common["global_steps"], common["global_samples"]
    engine.skipped_steps = common["skipped_steps"]
    moga.invalidate()
    return int(common["step"])
