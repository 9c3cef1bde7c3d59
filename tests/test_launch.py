"""launch/ and docker/: shellcheck, DRY_RUN of every script, real two-node torchrun on loopback and
mpirun; the Dockerfile passes hadolint and compose.yaml the Compose specification."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from train_cases import TINY

ROOT = Path(__file__).parent.parent
BIN = Path(sys.executable).parent
SCRIPTS = ["launch/torchrun.sh", "launch/deepspeed.sh", "launch/mpirun.sh", "launch/slurm.sbatch", "docker/sshd.sh"]


def _tool(name):
    path = BIN / name
    if not path.exists():
        pytest.skip(f"{name} not installed (pip install '.[test]')")
    return str(path)


def _env(**extra):
    return {**os.environ, "PYTHON": sys.executable, "DS_ACCELERATOR": "cpu", **extra}


def test_scripts_pass_shellcheck():
    proc = subprocess.run([_tool("shellcheck"), "-x", "-P", "launch", *SCRIPTS, "launch/env.sh"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("script,env,expect", [
    ("launch/torchrun.sh", {"NNODES": "4", "NODE_RANK": "3", "MASTER_ADDR": "10.0.0.1"},
     ["--nnodes 4", "--node_rank 3", "--rdzv_endpoint 10.0.0.1:29500", "-m moga_dist.train"]),
    ("launch/deepspeed.sh", {"LAUNCHER": "pdsh", "HOSTFILE": "launch/hostfile.example"},
     ["--hostfile launch/hostfile.example", "--launcher pdsh", "--module moga_dist.train"]),
    ("launch/deepspeed.sh", {"LAUNCHER": "openmpi", "LAUNCHER_ARGS": "--allow-run-as-root"},
     ["--launcher openmpi", "--launcher_args --allow-run-as-root"]),
    ("launch/mpirun.sh", {"NP": "16", "HOSTS": "a:8,b:8"}, ["-np 16", "-hosts a:8\\,b:8", "MASTER_ADDR=127.0.0.1"]),
    ("launch/slurm.sbatch", {"SLURM_NNODES": "8", "SLURM_JOB_ID": "42", "MASTER_ADDR": "n0"},
     ["srun --kill-on-bad-exit=1", "--nnodes 8", "--rdzv_id 42", "--rdzv_endpoint n0:29500"]),
])
def test_dry_run_prints_the_resolved_command(script, env, expect):
    proc = subprocess.run(["bash", script, "--set", "training.steps=5"], cwd=ROOT, env=_env(DRY_RUN="1", **env),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "# environment" in proc.stdout and "--set training.steps=5" in proc.stdout
    for piece in expect:
        assert piece in proc.stdout, (piece, proc.stdout)


def test_unknown_launcher_is_refused():
    proc = subprocess.run(["bash", "launch/deepspeed.sh"], cwd=ROOT, env=_env(LAUNCHER="ssh"), capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "allowed: local, pdsh, openmpi, mpich" in proc.stderr


def _tiny_args(out):
    return [a for kv in TINY for a in ("--set", kv)] + ["--set", "training.steps=4", "--set", f"output_dir='{out}'"]


def test_two_nodes_as_two_torchrun_agents_on_loopback(tmp_path):
    common = _env(NNODES="2", NPROC_PER_NODE="1", MASTER_PORT="29787")
    agents = [subprocess.Popen(["bash", "launch/torchrun.sh", *_tiny_args(tmp_path)], cwd=ROOT,
                               env={**common, "NODE_RANK": str(r), "RDZV_IS_HOST": "1" if r == 0 else "0"},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outputs = [a.communicate(timeout=300)[0] for a in agents]
    assert all(a.returncode == 0 for a in agents), outputs[0][-3000:] + outputs[1][-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4


def test_mpirun_script_runs_two_ranks(tmp_path):
    _tool("mpirun")
    proc = subprocess.run(["bash", "launch/mpirun.sh", *_tiny_args(tmp_path)], cwd=ROOT,
                          env=_env(NP="2", MPIRUN=str(BIN / "mpirun"), MASTER_PORT="29789"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert json.loads((tmp_path / "summary.json").read_text())["world_size"] == 2


def test_dockerfile_passes_hadolint():
    proc = subprocess.run([_tool("hadolint"), "docker/Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
    text = (ROOT / "docker/Dockerfile").read_text()
    assert "ARG BASE_IMAGE=" in text and "\nUSER ${USER_NAME}" in text and "pdsh" in text


def test_compose_file_is_valid_compose_spec():
    proc = subprocess.run([_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", "docker/compose.yaml"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
