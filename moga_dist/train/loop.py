"""The pretraining loop, shared by every engine: resume, progress bar, TensorBoard, evaluation,
crash-safe checkpoints and the closing summary. The engine-specific parts (building the model and
optimizer, a step, save/load) are a backend (backend.py's Backend: backend_deepspeed.py,
backend_megatron.py).

`run` reads as its steps: `_resume` (which checkpoint, and the state it restores), then per step
`_train_step` (the step and its divergence checks), `_evaluate`, `_checkpoint` and `_Log.step`,
then `_finish` (the summary)."""
from __future__ import annotations

import json
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import NonFiniteGradientError
from . import checkpoint
from .backend import Backend
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


def make_backend(cfg: RunConfig) -> Backend:
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


@dataclass
class _State:
    """What the loop carries from step to step (and into the summary)."""
    cfg: RunConfig
    backend: Backend
    corpus: PretrainData
    ckpt_dir: Path
    group: checkpoint.Group
    meta: dict                    # checkpoint metadata a resume must match
    accum: int                    # micro batches per optimizer step on each DP rank
    start: int                    # the first step to run (the resumed checkpoint's step)
    end: int                      # one past the last step this launch runs
    last_loss: float              # the last logged training loss (all ranks)
    last_tag: str | None          # the newest checkpoint written or resumed
    skipped_at_start: int         # the engine's skipped-step count at `start`
    notes: list[str] = field(default_factory=list)   # checkpoint fallbacks and moves, for the summary
    val_loss: float = float("nan")
    timed_steps: int = 0          # steps after the first one (which pays for builds and caches)
    timed_seconds: float = 0.0

    @property
    def rank(self) -> int:
        return self.backend.rank

    @property
    def world(self) -> int:
        return self.backend.world

    def tokens_per_s(self) -> float:
        """Training throughput so far (nan before a second step)."""
        per_step = self.cfg.training.global_batch_size * self.cfg.model.max_seq_len
        return per_step * self.timed_steps / self.timed_seconds if self.timed_seconds else float("nan")

    def last_checkpoint(self) -> str:
        return self.last_tag or "none"


def run(cfg: RunConfig, backend: Backend | None = None) -> dict:
    """Train per `cfg`; returns (and rank 0 prints and saves) a summary. Raises ValueError for bad
    input (config, corpus, checkpoints, a failed write) and TrainingDiverged, on every rank alike."""
    ckpt_dir = Path(cfg.output_dir) / "checkpoints"
    if checkpoint.has_checkpoints(ckpt_dir) and not cfg.checkpoint.resume:
        raise ValueError(f"{ckpt_dir} already holds checkpoints and checkpoint.resume=false: refusing to "
                         "overwrite them. Resume them, or set output_dir to a new directory")
    # Check the data before the engine: a bad path or tokenizer fails in seconds, not after the build.
    plan = plan_data(cfg)
    backend = backend or make_backend(cfg)
    if not isinstance(backend, Backend):
        raise TypeError(f"{type(backend).__name__} lacks members of moga_dist.train.backend.Backend")
    corpus = PretrainData(plan, cfg, backend.dp_world)
    _say(backend.rank, f"data: {len(plan.prefixes)} dataset(s), {sum(plan.tokens):,} tokens, tokenizer "
                       f"{plan.tokenizer.kind} (vocab {plan.tokenizer.vocab_size:,})")
    s = _resume(cfg, backend, corpus, ckpt_dir)
    with _Log(s) as log:
        if s.start >= s.end:            # already finished (e.g. the same command run twice): just report
            s.val_loss = _mean(backend.eval_losses(corpus), s.world)
        for step in range(s.start, s.end):
            losses = _train_step(s, step)
            done = step + 1
            last = done == s.end
            loss_now = _mean(losses, s.world) if done % cfg.training.log_every == 0 or last else None
            if loss_now is not None:
                s.last_loss = loss_now
            evaluated = done % cfg.training.eval_every == 0 or last
            if evaluated:
                s.val_loss = _mean(backend.eval_losses(corpus), s.world)
            if done % cfg.checkpoint.every == 0 or last:
                _checkpoint(s, done)
            log.step(done, loss_now, evaluated)
    return _finish(s)


def _resume(cfg: RunConfig, backend: Backend, corpus: PretrainData, ckpt_dir: Path) -> _State:
    """Pick the checkpoint to resume (saying why any newer one was refused), check that it fits this
    run, load it; the loop's state at its step (step 0 without one)."""
    group = checkpoint.Group(backend.rank, backend.world)
    accum = accumulation_steps(cfg, backend.dp_world)         # a batch that does not divide: before any load
    meta = {"model": as_dict(cfg.model), "optimizer_name": cfg.optimizer.name, **backend.layout_meta(),
            "config": as_dict(cfg)}
    resume = checkpoint.find_resume(ckpt_dir, group)
    for note in resume.notes:
        _say(backend.rank, note)
    start, last_loss = 0, float("nan")
    if resume.tag:
        saved = checkpoint.check_compatible(ckpt_dir, resume.tag, meta)
        backend.load(ckpt_dir / resume.tag)
        start, last_loss = int(saved["step"]), float(saved.get("train_loss", float("nan")))
    t = cfg.training
    end = t.steps if t.stop_at_step is None else min(t.steps, t.stop_at_step)
    return _State(cfg=cfg, backend=backend, corpus=corpus, ckpt_dir=ckpt_dir, group=group, meta=meta,
                  accum=accum, start=start, end=end, last_loss=last_loss,
                  last_tag=resume.tag, skipped_at_start=backend.skipped_steps(), notes=list(resume.notes))


def _train_step(s: _State, step: int) -> list[float]:
    """One optimizer step (timed) and the divergence checks every rank agrees on: a step MOGA
    refused, a non-finite loss, more skipped steps than training.max_skipped_steps."""
    t0 = time.perf_counter()
    try:
        losses = s.backend.train_step(step, s.accum, s.corpus)
    except NonFiniteGradientError as exc:
        raise TrainingDiverged(f"step {step + 1}: MOGA refused the step ({exc}); stopped. The last "
                               f"checkpoint, {s.last_checkpoint()}, is kept") from None
    if step > s.start:                       # the first step pays for kernel builds and caches
        s.timed_steps, s.timed_seconds = s.timed_steps + 1, s.timed_seconds + time.perf_counter() - t0
    done, allowed = step + 1, s.cfg.training.max_skipped_steps
    bad_loss, skipped = _agree([float(not all(math.isfinite(v) for v in losses)),
                                float(s.backend.skipped_steps() - s.skipped_at_start)], s.world)
    if bad_loss:
        raise TrainingDiverged(f"step {done}: non-finite training loss; stopped. The last checkpoint, "
                               f"{s.last_checkpoint()}, is kept (lower optimizer.*.lr?)")
    if skipped > allowed:
        raise TrainingDiverged(f"step {done}: the engine skipped {int(skipped)} steps (non-finite gradients) "
                               f"since step {s.start}, more than training.max_skipped_steps={allowed}; stopped. "
                               f"The last checkpoint, {s.last_checkpoint()}, is kept (lower optimizer.*.lr?)")
    return losses


def _checkpoint(s: _State, done: int) -> None:
    """Write checkpoint `done` (crash-safe, checkpoint.py) unless any rank's weights or optimizer
    state went non-finite: then stop, keeping the last good one."""
    if _agree([float(not s.backend.state_finite())], s.world)[0]:
        raise TrainingDiverged(f"step {done}: weights or optimizer state hold NaN/Inf; not writing this "
                               f"checkpoint. The last checkpoint, {s.last_checkpoint()}, is kept")
    s.last_tag, moved = checkpoint.save(s.backend.save, s.ckpt_dir, done, {**s.meta, "train_loss": s.last_loss},
                                        s.cfg.checkpoint.keep, s.group)
    for note in moved:
        _say(s.rank, note)
    s.notes += moved


class _Log:
    """Rank 0's progress bar and TensorBoard writer (other ranks log nothing); closed also on a
    failure, so that the error message starts on a line of its own."""

    def __init__(self, s: _State):
        self.s = s
        self.writer = self.bar = None

    def __enter__(self) -> _Log:
        if self.s.rank == 0:
            from torch.utils.tensorboard import SummaryWriter
            from tqdm.auto import tqdm

            self.writer = SummaryWriter(str(Path(self.s.cfg.output_dir) / "tensorboard"))
            self.bar = tqdm(total=self.s.cfg.training.steps, initial=self.s.start, desc=self.s.cfg.name,
                            unit="step", dynamic_ncols=True)
        return self

    def step(self, done: int, loss_now: float | None, evaluated: bool) -> None:
        """Step `done`'s scalars: train/* where a loss was logged, val/loss where it was evaluated."""
        if self.s.rank != 0:
            return
        tps = self.s.tokens_per_s() if self.s.timed_seconds else 0.0
        if loss_now is not None:
            self.writer.add_scalar("train/loss", loss_now, done)
            self.writer.add_scalar("train/lr", self.s.backend.lr(), done)
            self.writer.add_scalar("train/tokens_per_s", tps, done)
            self.bar.set_postfix(loss=f"{loss_now:.3f}", tok_s=f"{tps:,.0f}")
        if evaluated:
            self.writer.add_scalar("val/loss", self.s.val_loss, done)
        self.bar.update(1)

    def __exit__(self, *exc) -> None:
        if self.s.rank == 0:
            self.bar.close()
            self.writer.close()


def _finish(s: _State) -> dict:
    """The summary: returned on every rank; rank 0 writes summary.json and prints it."""
    out = Path(s.cfg.output_dir)
    summary = {"name": s.cfg.name, "steps": s.end, "resumed_from": s.start, "world_size": s.world,
               "engine": s.cfg.parallel.engine, "optimizer": s.cfg.optimizer.name, "layout": s.backend.describe(),
               "final_train_loss": s.last_loss, "val_loss": s.val_loss, "tokens_per_s": s.tokens_per_s(),
               "checkpoint": str(s.ckpt_dir / s.last_tag) if s.last_tag else None,
               "tensorboard": str(out / "tensorboard"), "checkpoint_notes": s.notes}
    if s.rank == 0:
        checkpoint.atomic_write(out / "summary.json", json.dumps(summary, indent=2))
        print(format_summary(summary, s.backend.on_cpu), flush=True)
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

