"""The contract between the training loop (loop.py) and an engine backend (backend_deepspeed.py,
backend_megatron.py, or a new one): every member the loop uses, and nothing else.

A backend is built with torch.distributed initialized and the model, optimizer and LR schedule
ready; the loop then drives it step by step. `Backend` is a runtime-checkable Protocol, so
`isinstance(obj, Backend)` checks that every member is present (not their signatures).
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable


@runtime_checkable
class Backend(Protocol):
    """What moga_dist.train.loop.run needs from an engine."""

    rank: int
    """This process's global rank (rank 0 logs, writes TensorBoard and the summary)."""
    world: int
    """All processes of the job (verdicts and means are all-reduced over them)."""
    dp_world: int
    """Data-parallel ranks: the global batch is split over them (TP/PP ranks of one DP group read the same samples)."""
    on_cpu: bool
    """Whether the job runs on CPU processes (the summary says "CPU ranks" rather than "GPU ranks")."""

    def layout_meta(self) -> dict:
        """Fields recorded in each checkpoint's metadata that a resume must match (or records, for
        layouts the backend's checkpoints reshard across); see checkpoint.check_compatible."""
        ...

    def describe(self) -> str:
        """The layout in words for the summary, e.g. "ZeRO-2" or "Megatron TP2 x DP1, replicated optimizer"."""
        ...

    def train_step(self, step: int, accum: int, data) -> list[float]:
        """One optimizer step (0-based `step`) over `accum` micro batches of global samples
        [step * B, (step + 1) * B) read from `data` (a data.PretrainData); returns this rank's
        per-micro-batch training losses. May raise NonFiniteGradientError (MOGA refused the step)."""
        ...

    def eval_losses(self, data) -> list[float]:
        """This rank's validation losses (empty when the split has no validation documents); the
        model is back in training mode afterwards."""
        ...

    def lr(self) -> float:
        """The learning rate of the step just taken (first param group)."""
        ...

    def skipped_steps(self) -> int:
        """Steps the engine skipped (non-finite gradients) so far, restored on resume where the engine does."""
        ...

    def state_finite(self) -> bool:
        """Whether this rank's weights and optimizer state hold no NaN/Inf (checked before each checkpoint)."""
        ...

    def save(self, directory: Path) -> list[str]:
        """Write this rank's part of a checkpoint into `directory`; returns write errors collected
        on this rank (or raises OSError), so every rank reaches the engine's closing barrier."""
        ...

    def load(self, directory: Path) -> None:
        """Restore model, optimizer and schedule from a checkpoint directory; raises
        checkpoint.CheckpointError (a ValueError) when it cannot be loaded at this layout."""
        ...
