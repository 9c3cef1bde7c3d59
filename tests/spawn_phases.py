"""Many spawned cases, one spawn per world size: the cases of a module run in turn inside one
group of gloo ranks, each case's outcome is recorded, and each pytest test then judges its own.

Starting ranks (and importing an engine in each) costs more than most cases, so a module whose
cases each spawned their own ranks spent most of its time starting processes. Here a phase is one
spawn of its world size; phases run in order, so a later phase reads what an earlier one wrote (a
reference run, a checkpoint). A case that raises ends its spawn (its peers may be waiting in a
collective it left, so the group cannot go on safely); the cases after it then run in a fresh
spawn, so one failure does not hide the others, and a case whose `needs` failed is not run.
"""
from __future__ import annotations

import json
import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moga_dist.testing import spawn


@dataclass(frozen=True)
class WorkerCall:
    """One case inside a group spawn: fn(rank, world, *args) (fn importable: spawn pickles it).
    needs: ids of calls that must have passed before this one runs (a reference, a checkpoint)."""
    id: str
    world: int
    fn: Callable
    args: tuple = ()
    needs: tuple[str, ...] = ()


def run_calls(rank: int, world: int, calls: list[WorkerCall], out_dir: str) -> None:
    """Inside the spawn: run every call in turn, appending {"id", "status", "error"} to
    out_dir/rank<r>.jsonl after each; the first call that raises ends the group."""
    path = os.path.join(out_dir, f"rank{rank}.jsonl")
    for call in calls:
        try:
            call.fn(rank, world, *call.args)
        except BaseException:
            with open(path, "a") as fh:
                fh.write(json.dumps({"id": call.id, "status": "error",
                                     "error": f"rank {rank}: {traceback.format_exc()}"}) + "\n")
            raise
        with open(path, "a") as fh:
            fh.write(json.dumps({"id": call.id, "status": "ok"}) + "\n")


def _records(run_dir: Path) -> dict[str, list[dict]]:
    records: dict[str, list[dict]] = {}
    for f in sorted(run_dir.glob("rank*.jsonl")):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            records.setdefault(rec["id"], []).append(rec)
    return records


def run_phases(phases: list[list[WorkerCall]], out_dir: Path) -> dict[str, str]:
    """Run each phase (calls of one world size) in as few spawns as failures allow, phases in order.
    Returns {call id: "ok" | the failing ranks' tracebacks | why it did not run}."""
    outcome: dict[str, str] = {}
    spawns = 0
    for phase in phases:
        pending = list(phase)
        while pending:
            group = []
            for call in pending:
                failed = [n for n in call.needs if outcome.get(n, "ok") != "ok"]
                if failed:
                    outcome[call.id] = f"not run: it needs {failed[0]!r}, which failed: {outcome[failed[0]]}"
                else:
                    group.append(call)
            if not group:
                break
            worlds = {c.world for c in group}
            assert len(worlds) == 1, f"a phase mixes world sizes {sorted(worlds)}"
            spawns += 1
            run_dir = out_dir / f"spawn{spawns}"
            run_dir.mkdir(parents=True)
            crash = None
            try:
                spawn(group[0].world, run_calls, group, str(run_dir))
            except Exception as exc:    # noqa: BLE001 - a rank raised or died: the records say where
                crash = f"{type(exc).__name__}: {exc}"
            records = _records(run_dir)
            pending = []
            for i, call in enumerate(group):
                recs = records.get(call.id, [])
                if len(recs) == call.world and all(r["status"] == "ok" for r in recs):
                    outcome[call.id] = "ok"
                    continue
                # The first call that did not pass on every rank ended the spawn; the rest run again.
                errors = [r["error"] for r in recs if r["status"] == "error"]
                outcome[call.id] = "\n".join(errors) or f"the spawn failed while it ran: {crash}"
                pending = group[i + 1:]
                break
            else:
                if crash:               # every call passed, then a rank failed on its way out
                    outcome[group[-1].id] = f"every rank passed it, then the spawn failed at exit: {crash}"
    return outcome
