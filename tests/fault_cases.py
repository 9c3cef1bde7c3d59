"""Workers for the fault-injection tests of the training job (2 gloo ranks, the tiny LLaMA of
train_cases). One uninterrupted run writes step 3 and step 6; each scenario damages a copy of its
checkpoints and resumes it; the outcome of every scenario is recorded, and tests/test_faults.py
judges each one separately. The checkpoints are the default's: MOGA's model-space state alone
(common.pt and one rank file per rank, no DeepSpeed files)."""
import json
import os
import shutil
import signal
from pathlib import Path

import torch

from train_cases import tiny

STRAIGHT = "straight"
MARKER = "payload-ran"
COMMON = "moga_model_space/common.pt"        # step counts, param groups, lr scheduler, buffers
RANK0 = "moga_model_space/rank00000.pt"      # rank 0's pieces: fp32 weights + momentum
RANK1 = "moga_model_space/rank00001.pt"


class Payload:
    """Unpickling this creates a marker file: proof that a loader ran code from the checkpoint."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def flip_bytes(path: Path, count: int = 4) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    for i in range(mid, mid + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def rewrite_manifest_entry(ckpt: Path, rel: str) -> None:
    """What an attacker who can write the folder also does: make the checksum match the new file."""
    from moga_dist.train.checkpoint import MANIFEST, sha256_file

    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["files"][rel] = {"sha256": sha256_file(ckpt / rel), "bytes": (ckpt / rel).stat().st_size}
    (ckpt / MANIFEST).write_text(json.dumps(manifest))


def plant_payload(ckpt: Path, marker: str) -> None:
    rel = COMMON
    state = torch.load(ckpt / rel, weights_only=False)     # our own file, written a moment ago
    state["client_note"] = Payload(marker)
    torch.save(state, ckpt / rel)
    rewrite_manifest_entry(ckpt, rel)


def _damage(name: str, ckpt: Path, base: Path) -> None:
    s6 = ckpt / "step00000006"
    if name == "flip_model":
        flip_bytes(s6 / RANK0)
    elif name == "flip_optim":
        flip_bytes(s6 / RANK1)
    elif name == "deleted_latest":
        shutil.rmtree(s6)
    elif name == "bad_latest":
        (ckpt / "latest").write_text("../../etc")
    elif name == "missing_latest":
        (ckpt / "latest").unlink()
    elif name == "deleted_model_file":
        (s6 / COMMON).unlink()
    elif name == "malformed_meta":
        (s6 / "meta.json").write_text('{"step": 6,\n')
        rewrite_manifest_entry(s6, "meta.json")
    elif name == "pickle_payload":
        plant_payload(s6, str(base / MARKER))
    elif name == "all_damaged":
        flip_bytes(ckpt / "step00000003" / RANK0)
        flip_bytes(s6 / RANK0)


# scenario -> overrides of its resumed run (to step 6 unless it names training.steps)
SCENARIOS = {
    "flip_model": [], "flip_optim": [], "deleted_latest": [], "bad_latest": [], "missing_latest": [],
    "deleted_model_file": [], "malformed_meta": [], "pickle_payload": [], "all_damaged": [],
    "lr_inf": ["optimizer.moga.lr=inf", "training.steps=9", "checkpoint.keep=2"],
    "lr_1e6": ["optimizer.moga.lr=1e6", "optimizer.moga.weight_decay=0.0", "training.steps=9", "checkpoint.keep=2"],
}


def scenarios(rank, world, base):
    """Rank 0 writes <base>/results.json: per scenario the resume step and notes, or the error."""
    import torch.distributed as dist

    from moga_dist.train.loop import TrainingDiverged, run

    base = Path(base)
    run(tiny(str(base / STRAIGHT), 6))
    if rank == 0:
        for name in SCENARIOS:
            shutil.copytree(base / STRAIGHT, base / name)
            _damage(name, base / name / "checkpoints", base)
    dist.barrier()
    results = {}
    for name, extra in SCENARIOS.items():
        steps = [] if any(e.startswith("training.steps") for e in extra) else ["training.steps=6"]
        try:
            summary = run(tiny(str(base / name), 6, *steps, *extra))
            results[name] = {"resumed_from": summary["resumed_from"], "notes": summary["checkpoint_notes"],
                             "error": None}
        except (ValueError, TrainingDiverged) as exc:
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        results[name]["marker_seen_by_rank"] = (base / MARKER).exists()
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        for name in results:        # the payload must not have run on any rank
            results[name]["marker_seen_by_rank"] = [g[name]["marker_seen_by_rank"] for g in gathered]
        (base / "results.json").write_text(json.dumps(results, indent=1))


def killed_mid_save(rank, world, out):
    """Rank 1 is SIGKILLed while writing the step-6 checkpoint (after step 3 was saved)."""
    from moga_dist.train import backend_deepspeed
    from moga_dist.train.loop import run

    save = backend_deepspeed.DeepSpeedBackend.save

    def dying_save(self, directory):
        if rank == 1 and directory.name.endswith("step00000006"):
            os.kill(os.getpid(), signal.SIGKILL)
        return save(self, directory)

    backend_deepspeed.DeepSpeedBackend.save = dying_save
    run(tiny(out, 6))


def resume(rank, world, out):
    from moga_dist.train.loop import run

    run(tiny(out, 6))
