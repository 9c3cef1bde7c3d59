"""The sweep grid: groups of cells, a resumable results file, the bracketing check.

A *cell* is one run (RunSpec). A *group* is every cell that differs only in the learning rate:
(optimizer, width, horizon, multipliers...). Results go to a JSONL file, one line appended and
flushed per finished cell; a restart reads it back and runs only the cells it lacks. A cell killed
mid-run leaves nothing (it reruns from scratch); a line cut off mid-write is ignored.

Workers live here, not in __main__, so spawned processes can import them."""
from __future__ import annotations

import json
import math
import multiprocessing as mp
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from . import runs
from .runs import RunSpec

LR_UNIT = 1e-3                  # every grid lies on the lattice LR_UNIT * 2**k, so horizons share LRs
CENTER_K_AT_300 = {"moga-row": 4, "moga-col": 3, "adamw": 2, "adamw-mup": 3, "muon": 3}
HORIZON_SLOPE = 0.35            # prior: the best lr falls ~ steps**-0.35 (issue 24's 300 -> 16k numbers)
CORPUS = ("kjv", 0.02, 1234)    # corpus, held-out fraction (the tail), batch seed


def lattice(k: int) -> float:
    return LR_UNIT * 2.0 ** k


def lattice_k(lr: float) -> int:
    return round(math.log2(lr / LR_UNIT))


def default_lrs(optimizer: str, steps: int, points: int = 5) -> list[float]:
    """`points` lattice LRs a factor 2 apart, centred on a prior guess of the optimum at this horizon."""
    centre = round(CENTER_K_AT_300[optimizer] - HORIZON_SLOPE * math.log2(steps / 300))
    lo = centre - (points - 1) // 2
    return [lattice(k) for k in range(lo, lo + points)]


@dataclass(frozen=True)
class Group:
    """Cells that differ only in lr: `base` (its lr is ignored) and the LRs to run first."""
    base: RunSpec
    lrs: tuple[float, ...]

    def cells(self) -> list[RunSpec]:
        # centre-out: a group cut short still has its most likely optimum and both neighbours
        mid = (len(self.lrs) - 1) / 2
        return [replace(self.base, lr=lr) for _, lr in sorted(enumerate(self.lrs), key=lambda t: (abs(t[0] - mid), t[0]))]


def group_key(spec_or_row) -> str:
    spec = spec_or_row if isinstance(spec_or_row, RunSpec) else spec_from_row(spec_or_row)
    return replace(spec, lr=0.0).key()


def spec_from_row(row: dict) -> RunSpec:
    names = RunSpec.__dataclass_fields__
    return RunSpec(**{k: row[k] for k in names if k in row})


def plan(optimizers, widths, horizons, base: RunSpec, points: int = 5, lrs=None) -> list[Group]:
    """Groups in the order they should finish: horizon ascending, then width, then optimizer.

    horizons: [("steps", n) | ("tokens_per_param", x)], resolved to steps per width."""
    groups = []
    resolved = []
    for kind, value in horizons:
        for w in widths:
            spec = replace(base, width=w)
            steps = int(value) if kind == "steps" else runs.steps_for_tokens_per_param(spec, value)
            resolved.append((steps, w))
    for steps, w in sorted(set(resolved), key=lambda t: (t[0], t[1])):
        for o in optimizers:
            grid = tuple(lrs) if lrs else tuple(default_lrs(o, steps, points))
            groups.append(Group(replace(base, optimizer=o, width=w, steps=steps), grid))
    return groups


def read_results(path: Path) -> dict[str, dict]:
    """{key: row} from a results JSONL; lines that do not parse (a write cut off by a kill) are skipped."""
    done: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "key" in row and "val_loss" in row:
                done[row["key"]] = row
    return done


def bracket(rows: list[dict]) -> dict:
    """The best lr of one group's rows and whether a worse (or diverged) lr lies on both sides.

    Returns {"best": row | None, "lower": bool, "upper": bool, "bracketed": bool}."""
    pts = sorted(rows, key=lambda r: r["lr"])
    finite = [r for r in pts if not r["diverged"] and math.isfinite(r["val_loss"])]
    if not finite:
        return {"best": None, "lower": False, "upper": False, "bracketed": False}
    best = min(finite, key=lambda r: r["val_loss"])
    i = pts.index(best)
    lower = i > 0 and (pts[i - 1]["diverged"] or pts[i - 1]["val_loss"] > best["val_loss"])
    upper = i < len(pts) - 1 and (pts[i + 1]["diverged"] or pts[i + 1]["val_loss"] > best["val_loss"])
    return {"best": best, "lower": lower, "upper": upper, "bracketed": lower and upper}


def _row(spec: RunSpec, res: dict) -> dict:
    params = runs.parameter_count(spec)
    return {"key": spec.key(), **asdict(spec), "params": params, "tokens_per_step": spec.tokens_per_step,
            "tokens_per_param": round(spec.steps * spec.tokens_per_step / params, 2), **res,
            "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _work(args):
    spec, corpus_args = args
    from ..train.data import ByteCorpus

    return spec, runs.run(spec, ByteCorpus(*corpus_args))


def execute(groups: list[Group], path: Path, jobs: int = 1, extend: int = 0, log=print) -> list[dict]:
    """Run every cell the results file lacks, group by group in order; with `extend` > 0, add up to
    that many lattice LRs beyond a group's edge until its best lr is bracketed. Returns the rows of
    all groups' cells (finished before or now)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    done = read_results(path)
    if path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
        with open(path, "a") as fh:             # a line cut off by a kill: end it, the reader skips it
            fh.write("\n")
    corpus_args = (CORPUS[0], groups[0].base.seq_len if groups else 128, *CORPUS[1:])
    corpus = None
    pool = mp.get_context("spawn").Pool(jobs) if jobs > 1 else None
    try:
        for gi, group in enumerate(groups):
            todo = [c for c in group.cells() if c.key() not in done]
            extra = 0
            while True:
                if todo:
                    log(f"group {gi + 1}/{len(groups)} {group.base.optimizer} width {group.base.width} "
                        f"steps {group.base.steps}: {len(todo)} cell(s) to run")
                if pool is None and todo and corpus is None:
                    from ..train.data import ByteCorpus

                    corpus = ByteCorpus(*corpus_args)
                results = pool.imap_unordered(_work, [(c, corpus_args) for c in todo]) if pool else \
                    ((c, runs.run(c, corpus)) for c in todo)
                for spec, res in results:
                    row = _row(spec, res)
                    with open(path, "a") as fh:
                        fh.write(json.dumps(row) + "\n")
                        fh.flush()
                    done[row["key"]] = row
                    log(f"  lr {spec.lr:.3g}: held-out loss {res['val_loss']:.4f} ({res['seconds']:.0f} s)")
                gk = group_key(group.base)
                mine = [r for r in done.values() if group_key(r) == gk]
                b = bracket(mine)
                if b["bracketed"] or b["best"] is None or extra >= extend:
                    break
                lrs = sorted(r["lr"] for r in mine)
                nxt = lattice(lattice_k(lrs[0]) - 1) if not b["lower"] else lattice(lattice_k(lrs[-1]) + 1)
                todo, extra = [replace(group.base, lr=nxt)], extra + 1
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    keys = {group_key(g.base) for g in groups}
    return [r for r in done.values() if group_key(r) in keys]
