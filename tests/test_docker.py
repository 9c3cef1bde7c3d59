"""The CPU image, built here without a registry (docker/build.sh), prepares a dataset onto a shared
volume (`python -m moga_dist.data prepare`), runs the main job from it as two containers acting as two
nodes (launch/torchrun.sh, host network, 127.0.0.1), and its losses equal a single-node 2-rank run of
the same config on the host, reading the same prepared files. Expensive (the image build): marked `docker`, run by
.ci/docker_check.sh (`pytest -m docker`), not by the default run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from docker_daemon import Unavailable, ensure_daemon
from moga_dist.testing import free_port
from moga_dist.train.safe_load import safe_load

ROOT = Path(__file__).parent.parent
IMAGE = os.environ.get("MOGA_TEST_IMAGE", "moga-dist:cpu-test")
# The main job (configs/tiny_cpu.toml), shortened: 6 steps, an evaluation and a checkpoint at the end,
# on the dataset the image prepared onto the shared volume (outputs/data/kjv.bin/.idx). DeepSpeed's own
# files are asked for (not written for MOGA by default): the test reads the ZeRO files the image's
# Python pickled (_assert_moga_state).
SHORT = ["--set", "training.steps=6", "--set", "training.log_every=1", "--set", "training.eval_batches=2",
         "--set", "data.paths=['outputs/data/kjv']", "--set", "checkpoint.deepspeed_files=true"]



def test_build_scripts_pass_shellcheck():
    shellcheck = Path(sys.executable).parent / "shellcheck"
    if not shellcheck.exists():
        pytest.skip("shellcheck not installed (pip install '.[test]')")
    proc = subprocess.run([str(shellcheck), "docker/build.sh", "docker/sshd.sh", ".ci/docker_check.sh"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.fixture(scope="module")
def daemon():
    try:
        running = ensure_daemon()
    except Unavailable as exc:
        pytest.skip(f"this machine cannot run containers: {exc}")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def image(daemon):
    proc = subprocess.run(["bash", "docker/build.sh"], cwd=ROOT, env={**daemon.env, "IMAGE": IMAGE},
                          capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    print(proc.stdout.splitlines()[-1])      # "== built IMAGE in N s, M MB" (pytest -s shows it)
    return IMAGE


def _prepare_in_container(daemon, image: str, outputs: Path) -> str:
    """The image's `prepare` writes the shipped corpus (copied onto the volume) as outputs/data/kjv."""
    from moga_dist.data.shipped import kjv_jsonl

    (outputs / "data").mkdir(mode=0o777)
    (outputs / "data").chmod(0o777)
    (outputs / "kjv.jsonl").write_bytes(kjv_jsonl().read_bytes())
    proc = subprocess.run([daemon.env["DOCKER"], "run", "--rm", "-v", f"{outputs}:/opt/moga_dist/outputs", image,
                           "python", "-m", "moga_dist.data", "prepare", "--input", "outputs/kjv.jsonl", "--tokenizer",
                           "bytes", "--output-prefix", "outputs/data/kjv", "--append-eod", "--quiet"],
                          env=daemon.env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    verses = sum(1 for line in (outputs / "kjv.jsonl").read_text().splitlines() if json.loads(line)["text"].strip())
    assert f"{verses:,} documents" in proc.stdout, proc.stdout        # every verse became one document
    return proc.stdout


def _host_run(out: Path, outputs: Path) -> dict:
    """The same job on the host, reading the files the container prepared (data.paths points there)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "moga_dist.train", "--config", "configs/tiny_cpu.toml", *SHORT,
                           "--set", f"data.paths=['{outputs}/data/kjv']",
                           "--set", f"output_dir='{out}'"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


def _node(daemon, image: str, rank: int, port: int, outputs: Path) -> subprocess.Popen:
    """`docker run` of launch/torchrun.sh as node `rank` of 2, as a cluster user starts it on each node.
    Each node has its own host name and loopback address, as on a cluster: torchrun's rendezvous tells
    nodes apart by their fully qualified name and PID, and both agents are PID 1."""
    cmd = [daemon.env["DOCKER"], "run", "--rm", "--name", f"moga-test-node{rank}", "--network", "host",
           "--hostname", f"node{rank}", "--add-host", "node0:127.0.0.2", "--add-host", "node1:127.0.0.3",
           "--ipc", "host",
           "-v", f"{outputs}:/opt/moga_dist/outputs",
           "-e", "NNODES=2", "-e", f"NODE_RANK={rank}", "-e", "NPROC_PER_NODE=1", "-e", "MASTER_ADDR=127.0.0.1",
           "-e", f"MASTER_PORT={port}", "-e", f"RDZV_IS_HOST={int(rank == 0)}", "-e", "GLOO_SOCKET_IFNAME=lo",
           image, "launch/torchrun.sh", *SHORT, "--set", "output_dir='outputs/two_nodes'"]
    return subprocess.Popen(cmd, env=daemon.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.docker
def test_two_container_nodes_match_a_single_node_run(daemon, image, tmp_path):
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    outputs.chmod(0o777)            # the image's user (uid 1000) writes here
    _prepare_in_container(daemon, image, outputs)
    port = free_port()
    nodes = [_node(daemon, image, rank, port, outputs) for rank in (0, 1)]
    try:
        logs = [node.communicate(timeout=600)[0] for node in nodes]
    finally:        # a hung job must not outlive the test
        subprocess.run([daemon.env["DOCKER"], "rm", "-f", "moga-test-node0", "moga-test-node1"], env=daemon.env,
                       capture_output=True)
    assert all(node.returncode == 0 for node in nodes), logs[0][-4000:] + logs[1][-4000:]
    assert "fused CPU kernels unavailable" not in logs[0] + logs[1]      # g++ in the image builds them
    containers = json.loads((outputs / "two_nodes/summary.json").read_text())
    assert containers["world_size"] == 2 and containers["steps"] == 6 and containers["optimizer"] == "moga"

    host = _host_run(tmp_path / "host", outputs)
    for key in ("final_train_loss", "val_loss"):
        assert containers[key] == pytest.approx(host[key], rel=1e-6, abs=0), (key, containers[key], host[key])
    assert containers["layout"] == host["layout"]
    _assert_moga_state(outputs / Path(containers["checkpoint"]).relative_to("outputs"))


def _assert_moga_state(ckpt: Path):
    """The optimizer that ran in the containers is MOGA: each rank's ZeRO partition has a momentum buffer
    of its size (AdamW would hold exp_avg/exp_avg_sq) and MOGA's saved layouts."""
    shards = sorted(ckpt.glob("zero_pp_rank_*_optim_states.pt"))
    assert len(shards) == 2, sorted(p.name for p in ckpt.iterdir())
    space = sorted(p.name for p in (ckpt / "moga_model_space").iterdir())      # and MOGA's own state beside them
    assert space == ["common.pt", "rank00000.pt", "rank00001.pt"], space
    for shard in shards:
        # The image's Python (Debian's 3.11.2) pickles ZeroStageEnum as getattr(ZeroStageEnum, name):
        # safe_load takes that as an enum-member lookup, so a resume inside the image works too.
        state = safe_load(shard, map_location="cpu")["optimizer_state_dict"]
        inner, partitions = state["base_optimizer_state"], state["single_partition_of_fp32_groups"]
        assert "layouts" in inner and len(inner["state"]) == len(partitions), shard
        for i, part in enumerate(partitions):
            assert set(inner["state"][i]) == {"momentum_buffer", "step"}, (shard, i, set(inner["state"][i]))
            assert inner["state"][i]["momentum_buffer"].numel() == part.numel(), (shard, i)
