"""The main job runs under torchrun, the deepspeed launcher and mpirun, with identical results."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from train_cases import TINY

BIN = Path(sys.executable).parent
LAUNCHERS = {
    "torchrun": [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "moga_dist.train"],
    "deepspeed": [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", "29731", "--module", "moga_dist.train"],
    "mpirun": [str(BIN / "mpirun"), "-np", "2", sys.executable, "-m", "moga_dist.train"],
}


def _run(launcher: str, out: Path) -> dict:
    if not Path(LAUNCHERS[launcher][0]).exists() and shutil.which(LAUNCHERS[launcher][0]) is None:
        pytest.skip(f"{launcher} is not installed")
    args = [a for kv in TINY for a in ("--set", kv)] + ["--set", "training.steps=4", "--set", f"output_dir='{out}'"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_PORT": "29733"}
    proc = subprocess.run(LAUNCHERS[launcher] + args, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "moga_dist.train 'run': 4 steps done" in proc.stdout
    return json.loads((out / "summary.json").read_text())


def test_three_launchers_give_the_same_run(tmp_path):
    results = {name: _run(name, tmp_path / name) for name in LAUNCHERS}
    losses = {name: r["final_train_loss"] for name, r in results.items()}
    assert len(set(losses.values())) == 1, losses
    assert all(r["world_size"] == 2 for r in results.values())
