"""A Docker daemon for tests/test_docker.py: the one already running, or a private one started here.

The private daemon (vfs storage, no iptables, no bridge: containers use the host's network) has its
own socket, data root and PID file under a temporary directory, and is stopped by its PID.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


class Unavailable(Exception):
    """This machine cannot run containers at all (the message says why)."""


@dataclass
class Daemon:
    """A reachable daemon: `env` points the client `env["DOCKER"]` at it; `proc` is set when we started it."""
    env: dict
    proc: subprocess.Popen | None = None
    root: Path | None = None

    def stop(self) -> None:
        """Stop the daemon we started (SIGTERM to its PID; it stops its containers) and remove its directories."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        _remove(self.root)


def _remove(root: Path) -> None:
    """Delete a daemon's private directory, unmounting what it left mounted there (its netns)."""
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for point in sorted((m for m in mounts if m.startswith(f"{root}/")), reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)
    # rm is much faster than shutil.rmtree on vfs's full copies; never crosses into a mount left behind.
    subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=False)


def _client() -> str:
    """A docker client that can run BuildKit builds: one with buildx, or one older than 23.0 (built in)."""
    for path in dict.fromkeys(str(Path(d) / "docker") for d in os.environ.get("PATH", "").split(os.pathsep)):
        if not os.access(path, os.X_OK):
            continue
        if subprocess.run([path, "buildx", "version"], capture_output=True).returncode == 0:
            return path
        version = subprocess.run([path, "version", "--format", "{{.Client.Version}}"], capture_output=True, text=True)
        if version.stdout.strip().split(".")[0].isdigit() and int(version.stdout.split(".")[0]) < 23:
            return path
    raise Unavailable("no docker client with BuildKit (buildx, or docker.io's 20.10 client) on PATH")


def _reachable(env: dict) -> bool:
    return subprocess.run([env["DOCKER"], "info"], env=env, capture_output=True, timeout=60).returncode == 0


def _install(*packages: str) -> None:
    """apt-get install the packages whose programs are missing (root only)."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise Unavailable(f"{' '.join(packages)} not installed and cannot install them here (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *packages]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise Unavailable(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}")


def ensure_daemon() -> Daemon:
    """The running daemon if the client reaches one, else a private daemon started here."""
    missing = [pkg for prog, pkg in (("dockerd", "docker.io"), ("debootstrap", "debootstrap")) if not shutil.which(prog)]
    if missing:
        _install(*missing)
    env = {**os.environ, "DOCKER": _client()}
    if _reachable(env):
        return Daemon(env)
    if os.geteuid() != 0:
        raise Unavailable("no Docker daemon reachable and starting one needs root")
    root = Path(tempfile.mkdtemp(prefix="moga-dockerd-"))
    sock = root / "docker.sock"
    with open(root / "dockerd.log", "w") as log:     # the daemon keeps its own copy of the descriptor
        proc = subprocess.Popen(["dockerd", "--host", f"unix://{sock}", "--data-root", str(root / "data"),
                                 "--exec-root", str(root / "exec"), "--pidfile", str(root / "dockerd.pid"),
                                 "--storage-driver=vfs", "--iptables=false", "--bridge=none"],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    daemon = Daemon({**env, "DOCKER_HOST": f"unix://{sock}"}, proc, root)
    for _ in range(60):
        if proc.poll() is not None:
            break
        if sock.exists() and _reachable(daemon.env):
            return daemon
        time.sleep(1)
    tail = (root / "dockerd.log").read_text()[-800:]
    daemon.stop()
    raise Unavailable(f"dockerd did not start: {tail}")
