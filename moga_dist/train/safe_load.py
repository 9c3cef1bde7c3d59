"""Checkpoint files are read only by torch's weights-only unpickler, never by one that can run code.

DeepSpeed's TorchCheckpointEngine loads with ``weights_only=False``, so a ``__reduce__`` payload
planted in a checkpoint file would run on resume. ``SafeCheckpointEngine`` replaces it on the
training job's engine: loads go through ``torch.load(weights_only=True)`` with an allowlist of the
few plain DeepSpeed classes its checkpoints hold (restored by field assignment, no code runs), and a
failed write is recorded instead of raised mid-save, so every rank still reaches the engine's
closing collective and the job can refuse the checkpoint on all ranks together.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch


def _allowed_globals() -> list:
    """DeepSpeed classes inside its own ZeRO checkpoints (plain data: an int enum, a dataclass,
    loss-scaler attribute holders). Empty without DeepSpeed."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def _enum_member(cls, name: str):
    """What `getattr` may do in a checkpoint: name a member of an allowed enum. Python 3.11.0-3.11.4
    (Debian bookworm's 3.11.2 among them) pickle an enum member as getattr(EnumClass, "name")."""
    import enum

    if not (isinstance(cls, type) and issubclass(cls, enum.Enum) and cls in _allowed_globals()):
        raise pickle.UnpicklingError(f"getattr({cls!r}, {name!r}) refused: only members of allowed enums")
    return cls[name]


def safe_load(path: str | Path, map_location=None, mmap: bool = False):
    """torch.load with weights_only=True (DeepSpeed's plain classes allowed, and `getattr` only as
    an enum-member lookup); raises pickle.UnpicklingError naming the refused global for anything
    else. mmap=True maps tensor storages instead of reading them (a cheap whole-file check)."""
    with torch.serialization.safe_globals([*_allowed_globals(), (_enum_member, "builtins.getattr")]):
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


def unsafe_reason(path: str | Path) -> str | None:
    """None when the weights-only unpickler accepts the file, else why not (one line)."""
    try:
        safe_load(path, map_location="cpu", mmap=True)
    except Exception as exc:  # noqa: BLE001 - any refusal or parse error makes the file unusable
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "WeightsUnpickler error" in ln), lines[-1] if lines else "")
        return f"{type(exc).__name__}: {detail}"[:300]
    return None


def safe_checkpoint_engine(base):
    """A subclass instance of DeepSpeed's TorchCheckpointEngine `base`'s class that loads with
    `safe_load` and records write failures in `.write_errors` (list of "path: error" strings)."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    if type(base) is not TorchCheckpointEngine:
        raise ValueError(f"DeepSpeed checkpoint engine {type(base).__name__}: the training job supports only "
                         "TorchCheckpointEngine (its loads are routed through torch.load(weights_only=True))")

    class SafeCheckpointEngine(TorchCheckpointEngine):
        def save(self, state_dict, path: str):
            try:
                super().save(state_dict, path)
            except Exception as exc:  # noqa: BLE001 - reported collectively by checkpoint.save
                self.write_errors.append(f"{path}: {type(exc).__name__}: {exc}".splitlines()[0])

        def load(self, path: str, map_location=None):
            return safe_load(path, map_location=map_location)

    engine = SafeCheckpointEngine.__new__(SafeCheckpointEngine)
    engine.__dict__.update(base.__dict__)
    engine.write_errors = []
    return engine
