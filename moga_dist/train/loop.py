"""The pretraining loop, shared by both engines: resume, progress bar, TensorBoard, evaluation,
crash-safe checkpoints and the closing summary. The engine-specific parts (building the model and
optimizer, a step, save/load) are a backend: backend_deepspeed.py or backend_megatron.py."""
from __future__ import annotations

import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch

from .. import NonFiniteGradientError
from . import checkpoint
from .config import RunConfig, accumulation_steps, as_dict
from .data import PretrainData, plan_data
from .dist_env import discover


def _mean(values: list[float], world: int) -> float:
    """Mean over every rank's values (TP ranks repeat their DP group's loss, which keeps it exact)."""
    import torch.distributed as dist

    t = torch.tensor([sum(values), len(values)], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(t)
    return float(t[0] / t[1])


def make_backend(cfg: RunConfig):
    """The engine backend the preset names, with torch.distributed initialized."""
    discover()
    # torch 2.13 deprecates collective names the engines still call; say it once, not per step.
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*(all_gather_into_tensor|reduce_scatter_tensor)")
    if cfg.parallel.engine == "megatron":
        from .backend_megatron import MegatronBackend

        return MegatronBackend(cfg)
    from .backend_deepspeed import DeepSpeedBackend

    return DeepSpeedBackend(cfg)


class TrainingDiverged(RuntimeError):
    """The run stopped: a non-finite loss, weights or momentum, or more skipped steps than allowed."""


def _agree(values: list[float], world: int) -> list[float]:
    """Element-wise max over ranks (every rank gets the same verdict)."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _say(rank: int, text: str) -> None:
    if rank == 0:
        print(f"moga_dist.train: {text}", file=sys.stderr, flush=True)


def run(cfg: RunConfig, backend=None) -> dict:
    """Train per `cfg`; returns (and rank 0 prints and saves) a summary. Raises ValueError for bad
    input (config, corpus, checkpoints, a failed write) and TrainingDiverged, on every rank alike."""
    t = cfg.training
    out = Path(cfg.output_dir)
    ckpt_dir, log_dir = out / "checkpoints", out / "tensorboard"
    if checkpoint.has_checkpoints(ckpt_dir) and not cfg.checkpoint.resume:
        raise ValueError(f"{ckpt_dir} already holds checkpoints and checkpoint.resume=false: refusing to "
                         "overwrite them. Resume them, or set output_dir to a new directory")
    # Check the data before the engine: a bad path or tokenizer fails in seconds, not after the build.
    plan = plan_data(cfg)
    backend = backend or make_backend(cfg)
    rank, world = backend.rank, backend.world
    corpus = PretrainData(plan, cfg, backend.dp_world)
    _say(rank, f"data: {len(plan.prefixes)} dataset(s), {sum(plan.tokens):,} tokens, tokenizer "
               f"{plan.tokenizer.kind} (vocab {plan.tokenizer.vocab_size:,})")
    group = checkpoint.Group(rank, world)
    accum = accumulation_steps(cfg, backend.dp_world)
    meta = {"model": as_dict(cfg.model), "optimizer_name": cfg.optimizer.name, **backend.layout_meta(),
            "config": as_dict(cfg)}
    resume = checkpoint.find_resume(ckpt_dir, group)
    for note in resume.notes:
        _say(rank, note)
    tag = resume.tag
    start, last_loss = 0, float("nan")
    if tag:
        saved = checkpoint.check_compatible(ckpt_dir, tag, meta)
        backend.load(ckpt_dir / tag)
        start, last_loss = int(saved["step"]), float(saved.get("train_loss", float("nan")))
    skipped_at_start = backend.skipped_steps()
    notes = list(resume.notes)

    writer = bar = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        from tqdm.auto import tqdm

        writer = SummaryWriter(str(log_dir))
        bar = tqdm(total=t.steps, initial=start, desc=cfg.name, unit="step", dynamic_ncols=True)
    tokens_per_step = t.global_batch_size * cfg.model.max_seq_len
    timed_steps, timed_seconds, val_loss, last_tag = 0, 0.0, float("nan"), tag
    end = t.steps if t.stop_at_step is None else min(t.steps, t.stop_at_step)
    if start >= end:            # already finished (e.g. the same command run twice): just report
        val_loss = _mean(backend.eval_losses(corpus), world)
    try:
        for step in range(start, end):
            t0 = time.perf_counter()
            try:
                losses = backend.train_step(step, accum, corpus)
            except NonFiniteGradientError as exc:
                raise TrainingDiverged(f"step {step + 1}: MOGA refused the step ({exc}); stopped. The last "
                                       f"checkpoint, {last_tag or 'none'}, is kept") from None
            elapsed = time.perf_counter() - t0
            if step > start:                       # the first step pays for kernel builds and caches
                timed_steps, timed_seconds = timed_steps + 1, timed_seconds + elapsed
            done = step + 1
            bad_loss, skipped = _agree([float(not all(math.isfinite(v) for v in losses)),
                                        float(backend.skipped_steps() - skipped_at_start)], world)
            if bad_loss:
                raise TrainingDiverged(f"step {done}: non-finite training loss; stopped. The last checkpoint, "
                                       f"{last_tag or 'none'}, is kept (lower optimizer.*.lr?)")
            if skipped > t.max_skipped_steps:
                raise TrainingDiverged(f"step {done}: the engine skipped {int(skipped)} steps (non-finite gradients) "
                                       f"since step {start}, more than training.max_skipped_steps="
                                       f"{t.max_skipped_steps}; stopped. The last checkpoint, {last_tag or 'none'}, "
                                       "is kept (lower optimizer.*.lr?)")
            loss_now = _mean(losses, world) if done % t.log_every == 0 or done == end else None
            if loss_now is not None:
                last_loss = loss_now
            if done % t.eval_every == 0 or done == end:
                val_loss = _mean(backend.eval_losses(corpus), world)
            if done % cfg.checkpoint.every == 0 or done == end:
                if _agree([float(not backend.state_finite())], world)[0]:
                    raise TrainingDiverged(f"step {done}: weights or optimizer state hold NaN/Inf; not writing this "
                                           f"checkpoint. The last checkpoint, {last_tag or 'none'}, is kept")
                last_tag, moved = checkpoint.save(backend.save, ckpt_dir, done, {**meta, "train_loss": last_loss},
                                                  cfg.checkpoint.keep, group)
                for note in moved:
                    _say(rank, note)
                notes += moved
            if rank == 0:
                tps = tokens_per_step * timed_steps / timed_seconds if timed_seconds else 0.0
                if loss_now is not None:
                    writer.add_scalar("train/loss", loss_now, done)
                    writer.add_scalar("train/lr", backend.lr(), done)
                    writer.add_scalar("train/tokens_per_s", tps, done)
                    bar.set_postfix(loss=f"{loss_now:.3f}", tok_s=f"{tps:,.0f}")
                if done % t.eval_every == 0 or done == end:
                    writer.add_scalar("val/loss", val_loss, done)
                bar.update(1)
    finally:
        if rank == 0:       # also on a failure: the message then starts on a line of its own
            bar.close()
            writer.close()

    summary = {"name": cfg.name, "steps": end, "resumed_from": start, "world_size": world,
               "engine": cfg.parallel.engine, "optimizer": cfg.optimizer.name, "layout": backend.describe(),
               "final_train_loss": last_loss, "val_loss": val_loss,
               "tokens_per_s": tokens_per_step * timed_steps / timed_seconds if timed_seconds else float("nan"),
               "checkpoint": str(ckpt_dir / last_tag) if last_tag else None, "tensorboard": str(log_dir),
               "checkpoint_notes": notes}
    if rank == 0:
        checkpoint.atomic_write(out / "summary.json", json.dumps(summary, indent=2))
        print(format_summary(summary, backend.on_cpu), flush=True)
    return summary


def format_summary(s: dict, on_cpu: bool) -> str:
    device = "CPU" if on_cpu else "GPU"
    return "\n".join([
        f"== moga_dist.train '{s['name']}': {s['steps']} steps done"
        + (f" (resumed at step {s['resumed_from']})" if s["resumed_from"] else "") + " ==",
        f"  optimizer {s['optimizer']} | {s['world_size']} {device} ranks | {s['layout']}",
        f"  final train loss {s['final_train_loss']:.4f} (last step, all ranks) | "
        f"validation loss {s['val_loss']:.4f}",
        f"  throughput {s['tokens_per_s']:,.0f} tokens/s" if s["tokens_per_s"] == s["tokens_per_s"]
        else "  nothing left to train: the checkpoint is already at the last step (evaluated it)",
        f"  checkpoint  {s['checkpoint']}",
        f"  tensorboard {s['tensorboard']}   (view: tensorboard --logdir {s['tensorboard']})",
    ])

