"""Crash-safe DeepSpeed checkpoints with a compatibility check before anything is loaded.

A checkpoint is written under a temporary tag, renamed into place, and only then named in
`latest` (atomically replaced), so a crash mid-write leaves the previous checkpoint and `latest`
intact. `meta.json` beside the engine files records the model and layout; a resume whose model
or data-parallel layout differs is refused with the differing fields named, before DeepSpeed
touches any state.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

LATEST = "latest"
META = "meta.json"


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag named in `latest`, if it and its directory exist."""
    f = Path(ckpt_dir) / LATEST
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    return tag if (Path(ckpt_dir) / tag).is_dir() else None


def save(save_fn, ckpt_dir: Path, step: int, meta: dict, keep: int, is_rank0: bool, barrier) -> str:
    """Checkpoint as tag step<N>: `save_fn(directory)` writes the engine's files (collective; every
    rank calls this); meta.json records `meta` and the step. Returns the tag."""
    ckpt_dir = Path(ckpt_dir)
    tag = f"step{step:08d}"
    tmp_tag = f".tmp-{tag}"
    if is_rank0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(ckpt_dir / tmp_tag, ignore_errors=True)     # debris of an earlier crash
        (ckpt_dir / tmp_tag).mkdir()
    barrier()
    save_fn(ckpt_dir / tmp_tag)
    barrier()
    if is_rank0:
        atomic_write(ckpt_dir / tmp_tag / META, json.dumps({**meta, "step": step}, indent=2, sort_keys=True))
        final = ckpt_dir / tag
        if final.exists():                                        # re-saving the same step
            shutil.rmtree(final)
        os.replace(ckpt_dir / tmp_tag, final)
        atomic_write(ckpt_dir / LATEST, tag)
        tags = sorted(p.name for p in ckpt_dir.glob("step*") if p.is_dir())
        for old in tags[:-keep] if keep > 0 else []:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    barrier()
    return tag


def check_compatible(ckpt_dir: Path, tag: str, meta: dict) -> dict:
    """Raise ValueError naming each field of `meta` that the checkpoint's meta.json contradicts."""
    path = Path(ckpt_dir) / tag / META
    if not path.is_file():
        raise ValueError(f"checkpoint {path.parent} has no {META}: not written by moga_dist.train")
    saved = json.loads(path.read_text())
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs this run {v!r}" for k, v in meta.items()
             if k in ("model", "optimizer_name", "engine", "world_size", "zero_stage") and saved.get(k) != v]
    if diffs:
        raise ValueError(f"checkpoint {path.parent} does not match this run ({'; '.join(diffs)}). Point "
                         "output_dir elsewhere to start a new run, or restore the original settings.")
    return saved
