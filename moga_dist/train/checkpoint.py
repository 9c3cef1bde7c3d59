"""Crash-safe, checksummed checkpoints, and the choice of which one to resume.

A checkpoint `step<8 digits>` is written under `.tmp-step…`, gets `meta.json` (model and layout,
checked before anything loads) and, last, `manifest.json` (sha256 and size of every file), is
renamed into place, and only then named in `latest`. A crash mid-write therefore leaves the
previous checkpoint and `latest` intact, and a failed write (a full disk) removes its partial
directory and raises on every rank.

On resume every file is verified against the manifest and opened by the weights-only unpickler
(safe_load.py), the work spread over the ranks. A damaged checkpoint is refused naming the file,
and the job falls back to the newest intact one, saying so; a missing or invalid `latest` (it must
name a checkpoint directory in the folder) does the same. While any checkpoint exists the job never
silently starts at step 0, and a checkpoint it would write over is moved aside, never deleted.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .safe_load import unsafe_reason

LATEST = "latest"
META = "meta.json"
MANIFEST = "manifest.json"
TAG = re.compile(r"step\d{8}")
_NO_SPACE_BYTES = 1 << 20          # a failed write with less than this free is reported as a full disk


class CheckpointError(ValueError):
    """A checkpoint cannot be used or written; the message names the file and what to do."""


@dataclass(frozen=True)
class Group:
    """The ranks sharing the checkpoint folder: barrier and all-gather of small Python objects."""
    rank: int
    world: int

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint to resume (None: start at step 0) and what was refused on the way to it."""
    tag: str | None
    notes: list[str] = field(default_factory=list)


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def tag_of(step: int) -> str:
    return f"step{step:08d}"


def checkpoint_tags(ckpt_dir: Path) -> list[str]:
    """Checkpoint directories in the folder, oldest first (temporary and moved-aside ones excluded)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG.fullmatch(p.name))


def has_checkpoints(ckpt_dir: Path) -> bool:
    return bool(checkpoint_tags(ckpt_dir)) or (Path(ckpt_dir) / LATEST).exists()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _spread(items: list, fn, group: Group) -> dict:
    """{item: fn(item)} over all items, each computed by one rank (item i on rank i % world)."""
    mine = {item: fn(item) for i, item in enumerate(items) if i % group.world == group.rank}
    merged: dict = {}
    for part in group.gather(mine):
        merged.update(part)
    return merged


def _file_problem(directory: Path, rel: str, entry: dict) -> str | None:
    path = directory / rel
    if not path.is_file():
        return f"{rel}: missing"
    if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
        return f"{rel}: checksum mismatch (damaged)"
    if rel == META:
        try:
            json.loads(path.read_text())
        except ValueError as exc:
            return f"{rel}: malformed JSON ({exc})"
    if path.suffix == ".pt":
        reason = unsafe_reason(path)
        if reason:
            return f"{rel}: refused by the weights-only loader ({reason})"
    return None


def verify(directory: Path, group: Group) -> list[str]:
    """Problems of one checkpoint directory (empty: intact). Collective."""
    directory = Path(directory)
    try:
        files = json.loads((directory / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return [f"{MANIFEST}: missing (an incomplete checkpoint, or one written without checksums)"]
    except (ValueError, KeyError, TypeError) as exc:
        return [f"{MANIFEST}: malformed ({exc})"]
    found = _spread(sorted(files), lambda rel: _file_problem(directory, rel, files[rel]), group)
    return [found[rel] for rel in sorted(found) if found[rel]]


def find_resume(ckpt_dir: Path, group: Group) -> ResumePoint:
    """The checkpoint to resume: the one `latest` names if intact, else the newest intact one.
    Raises CheckpointError when checkpoints exist but none is intact. Collective."""
    ckpt_dir = Path(ckpt_dir)
    tags, notes = checkpoint_tags(ckpt_dir)[::-1], []
    latest = ckpt_dir / LATEST
    order = tags
    if latest.is_file():
        named = latest.read_text().strip()
        if TAG.fullmatch(named) and named in tags:
            order = [named] + [t for t in tags if t != named]
        else:
            notes.append(f"{latest} names {named!r}, which is not a checkpoint directory in {ckpt_dir}")
    elif tags:
        notes.append(f"{latest} is missing")
    for tag in order:
        problems = verify(ckpt_dir / tag, group)
        if not problems:
            if notes:
                notes.append(f"resuming from {ckpt_dir / tag}, the newest intact checkpoint")
            return ResumePoint(tag, notes)
        notes.append(f"checkpoint {ckpt_dir / tag} refused: " + "; ".join(problems))
    if tags or latest.exists():
        raise CheckpointError(f"no intact checkpoint in {ckpt_dir}: " + " | ".join(notes or ["none found"])
                              + ". Restore the files, or set output_dir to a new directory to start over")
    return ResumePoint(None, notes)


def check_compatible(ckpt_dir: Path, tag: str, meta: dict) -> dict:
    """Raise CheckpointError naming each field of `meta` that the checkpoint's meta.json contradicts."""
    path = Path(ckpt_dir) / tag / META
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path.parent} has no {META}: not written by moga_dist.train") from None
    except ValueError as exc:
        raise CheckpointError(f"{path}: malformed JSON ({exc})") from None
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs this run {v!r}" for k, v in meta.items()
             if k in ("model", "optimizer_name", "engine", "world_size", "zero_stage") and saved.get(k) != v]
    if diffs:
        raise CheckpointError(f"checkpoint {path.parent} does not match this run ({'; '.join(diffs)}). Point "
                              "output_dir elsewhere to start a new run, or restore the original settings.")
    return saved


def _move_aside(ckpt_dir: Path, tag: str) -> Path:
    n = 1
    while (ckpt_dir / f"superseded-{tag}-{n}").exists():
        n += 1
    target = ckpt_dir / f"superseded-{tag}-{n}"
    os.replace(ckpt_dir / tag, target)
    return target


def _write_failure(errors: list[str], ckpt_dir: Path, tmp: Path) -> CheckpointError:
    free = shutil.disk_usage(ckpt_dir).free
    kept = (ckpt_dir / LATEST).read_text().strip() if (ckpt_dir / LATEST).is_file() else "none"
    what = ("no space left on device" if free < _NO_SPACE_BYTES or any("No space left" in e for e in errors)
            else "could not write the checkpoint")
    return CheckpointError(f"{what} in {ckpt_dir} ({free:,} bytes free; {errors[0]}); removed the partial "
                           f"{tmp.name}, the previous checkpoint ({kept}) is intact")


def save(save_fn, ckpt_dir: Path, step: int, meta: dict, keep: int, group: Group) -> tuple[str, list[str]]:
    """Checkpoint as tag step<N> (collective). `save_fn(directory)` writes the engine's files and
    returns this rank's write errors (strings). Returns (tag, notes on checkpoints moved aside)."""
    ckpt_dir = Path(ckpt_dir)
    tag, rank0 = tag_of(step), group.rank == 0
    tmp = ckpt_dir / f".tmp-{tag}"
    if rank0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)     # debris of an earlier crash
        tmp.mkdir()
    group.barrier()
    try:
        errors = list(save_fn(tmp))
    except OSError as exc:
        errors = [f"{type(exc).__name__}: {exc}"]
    errors = [e for part in group.gather(errors) for e in part]
    notes: list[str] = []
    if not errors:
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        sums = _spread(files, lambda rel: {"sha256": sha256_file(tmp / rel), "bytes": (tmp / rel).stat().st_size},
                       group)
        finishing = []
        if rank0:
            try:
                atomic_write(tmp / META, json.dumps({**meta, "step": step}, indent=2, sort_keys=True))
                sums[META] = {"sha256": sha256_file(tmp / META), "bytes": (tmp / META).stat().st_size}
                # Written last: a directory without it is incomplete.
                atomic_write(tmp / MANIFEST, json.dumps({"format": 1, "files": sums}, indent=1, sort_keys=True))
            except OSError as exc:
                finishing = [f"{tmp}: {type(exc).__name__}: {exc}"]
        errors = [e for part in group.gather(finishing) for e in part]
    if errors:
        err = _write_failure(errors, ckpt_dir, tmp)
        if rank0:
            shutil.rmtree(tmp, ignore_errors=True)
        group.barrier()
        raise err
    if rank0:
        # Checkpoints at or after this step belong to a run this one resumed before (the job fell
        # back past them): keep them under another name rather than overwrite or rotate them.
        for old in checkpoint_tags(ckpt_dir):
            if old >= tag:
                notes.append(f"moved {ckpt_dir / old} aside to {_move_aside(ckpt_dir, old)}")
        os.replace(tmp, ckpt_dir / tag)
        atomic_write(ckpt_dir / LATEST, tag)
        # Only finite checkpoints are ever written (the loop checks first), so rotation keeps the
        # newest `keep` of them.
        for old in checkpoint_tags(ckpt_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    group.barrier()
    return tag, group.gather(notes)[0]

