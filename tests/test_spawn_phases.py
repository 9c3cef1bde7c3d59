"""The one-spawn-per-world runner of the Megatron tests (spawn_phases.py): a case that fails is
reported under its own id with the rank's traceback, the cases after it still run (in a fresh
spawn), and a case whose prerequisite failed is reported as not run."""
from pathlib import Path

from spawn_phases import WorkerCall, run_phases


def writes(rank, world, path):
    Path(path).write_text("x")


def fails(rank, world):
    raise AssertionError("deliberate")


def reads(rank, world, path):
    assert Path(path).read_text() == "x"


def test_a_failing_case_is_named_and_the_others_still_run(tmp_path):
    made, spawns = str(tmp_path / "made"), tmp_path / "spawns"
    out = run_phases([[WorkerCall("writes", 1, writes, (made,)), WorkerCall("fails", 1, fails),
                       WorkerCall("reads", 1, reads, (made,), ("writes",)),
                       WorkerCall("after_fails", 1, reads, (made,), ("fails",))]], spawns)
    assert out["writes"] == "ok" and out["reads"] == "ok", out
    assert out["fails"].startswith("rank 0: Traceback") and "AssertionError: deliberate" in out["fails"], out
    assert out["after_fails"].startswith("not run: it needs 'fails', which failed: rank 0:"), out
    assert sorted(p.name for p in spawns.iterdir()) == ["spawn1", "spawn2"]   # the rest ran in a fresh spawn
