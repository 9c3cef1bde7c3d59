"""DeepSpeed checkpoints of MOGA that resume at any data-parallel world size (ZeRO 0-3).

DeepSpeed's own ZeRO files hold each rank's flat partition and its optimizer state, so they load
only into the same partitioning, and its universal-checkpoint converter knows Adam's state, not
MOGA's. This module writes MOGA's state in model space instead: every rank saves, for each
parameter piece it holds, the parameter's name and shape, the piece's [start, end) in the
flattened parameter, the fp32 master weight and the fp32 momentum (`rank<k>.pt`); rank 0 adds
what is not per piece (`common.pt`: step counts, MOGA's param-group settings including the
scheduled lr, the lr scheduler, the engine's step counters, the model's buffers). Loading copies,
on every rank, the overlap of each saved piece with each piece the rank holds now, checking that
every element is covered exactly once, and rebuilds the model's (bit16) weights from the fp32
masters as a DeepSpeed step does. Files are plain tensors and Python scalars, read only with
`torch.load(weights_only=True)`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.flat import FlatSegment
from ..core.optimizer import MOGA
from .deepspeed_wrappers import held_tensors

FORMAT = "moga-model-space-1"
COMMON = "common.pt"


@dataclass(frozen=True)
class SavedPiece:
    """Elements [start, end) of a flattened parameter: fp32 master weight and momentum."""

    start: int
    end: int
    weight: torch.Tensor
    momentum: torch.Tensor


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
            # clone(): a view would save the whole flat buffer with it.
            pieces[seg.name] = {"shape": list(seg.layout.global_shape), "start": start, "end": end,
                                "weight": weight[seg.start:seg.start + seg.numel].clone(),
                                "momentum_buffer": mom[seg.start:seg.start + seg.numel].clone()}
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


def _saved_pieces(directory: Path) -> tuple[dict, dict[str, list[SavedPiece]], dict[str, list[int]]]:
    """(common, {name: pieces from every saved rank}, {name: shape})."""
    common = _read(directory / COMMON)
    if common.get("format") != FORMAT:
        raise ValueError(f"{directory / COMMON}: format {common.get('format')!r}, this moga_dist reads {FORMAT!r}")
    pieces: dict[str, dict[tuple[int, int], SavedPiece]] = {}
    shapes: dict[str, list[int]] = {}
    for rank in range(int(common["world_size"])):
        for name, p in _read(directory / rank_file(rank))["pieces"].items():
            shapes[name] = list(p["shape"])
            if p["end"] > p["start"]:     # ZeRO-0 ranks hold the same whole tensors: keep one copy
                pieces.setdefault(name, {})[(p["start"], p["end"])] = SavedPiece(
                    p["start"], p["end"], p["weight"], p["momentum_buffer"])
    return common, {n: list(v.values()) for n, v in pieces.items()}, shapes


def model_space_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """{parameter name: full fp32 master weight} assembled from a model-space checkpoint
    (written at any world size); like DeepSpeed's zero_to_fp32 for MOGA's format."""
    _, saved, shapes = _saved_pieces(Path(directory))
    out = {}
    for name, shape in shapes.items():
        numel = 1
        for s in shape:
            numel *= s
        full = torch.empty(numel, dtype=saved[name][0].weight.dtype if saved.get(name) else torch.float32)
        _fill(full, 0, numel, saved.get(name, []), "weight", name)
        out[name] = full.view(shape)
    return out


def _fill(dest: torch.Tensor, start: int, end: int, saved: list[SavedPiece], field: str, name: str) -> None:
    """dest (1-D, end - start elements) <- elements [start, end) of the saved parameter."""
    covered = 0
    for piece in saved:
        lo, hi = max(start, piece.start), min(end, piece.end)
        if lo < hi:
            dest[lo - start:hi - start].copy_(getattr(piece, field)[lo - piece.start:hi - piece.start])
            covered += hi - lo
    if covered != end - start:
        raise ValueError(f"parameter {name!r}: the checkpoint covers {covered} of elements [{start}, {end}) "
                         "(a rank file is missing or overlaps another)")


def load_model_space(engine, directory: str | Path) -> int:
    """Load a model-space checkpoint written at any data-parallel world size into `engine`
    (built at the same ZeRO stage, with the same model and MOGA settings). Returns the
    optimizer step count loaded. Raises ValueError naming what does not match."""
    directory = Path(directory)
    moga = engine_moga(engine)
    common, saved, shapes = _saved_pieces(directory)
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
    ds = engine.optimizer
    if stage == 3:
        ds.checkpoint_event_prologue()
    with torch.no_grad():
        for h in held:
            state = moga.init_state(h.tensor)
            state["step"] = int(common["step"])
            weight, mom = h.tensor.data.view(-1), state["momentum_buffer"].view(-1)
            for seg, param in zip(h.segments, h.params):
                if list(seg.layout.global_shape) != shapes[seg.name]:
                    raise ValueError(f"parameter {seg.name!r}: shape {shapes[seg.name]} in the checkpoint, "
                                     f"{list(seg.layout.global_shape)} in this model")
                start, end = piece_range(seg)
                _fill(weight[seg.start:seg.start + seg.numel], start, end, saved.get(seg.name, []), "weight", seg.name)
                _fill(mom[seg.start:seg.start + seg.numel], start, end, saved.get(seg.name, []), "momentum", seg.name)
                if stage < 3 and param is not h.tensor:
                    # The model's copy (bit16, or fp32 views of ZeRO's flat buffer) rounded from the master, as a step does.
                    full = torch.empty(param.numel(), dtype=weight.dtype)
                    _fill(full, 0, param.numel(), saved[seg.name], "weight", seg.name)
                    param.data.copy_(full.view(param.shape))
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
