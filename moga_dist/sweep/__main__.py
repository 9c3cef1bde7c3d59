"""`python -m moga_dist.sweep MODE`: width-transfer evidence on the CPU.

  lr           widths x learning rates x optimizers; CSV + plots (loss vs lr per width, curves at the best lr)
  mults        MOGA's per-role multipliers x learning rates at the base width (tune these first)
  coord-check  per-layer activation and update RMS against width over the first steps

Finished runs (same settings) are read back from the CSV, not redone; --jobs runs them in parallel.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from .grid import DEFAULT_LRS, best_by, execute, plot, report
from .runs import OPTIMIZERS, RunSpec

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moga_dist.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["lr", "mults", "coord-check"])
    ap.add_argument("--out", default="outputs/sweep", help="directory for results.csv, plots and summary")
    ap.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512])
    ap.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    ap.add_argument("--lrs", type=float, nargs="+", default=None, help="one grid for all optimizers")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--hidden-mult", type=float, default=5.0)
    ap.add_argument("--mults", type=float, nargs="+", default=[2.0, 5.0, 10.0, 20.0],
                    help="mults mode: hidden_mult values to try at the base width")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.mode == "coord-check":
        from .coord import coord_check

        print(coord_check(args.widths, out, args.hidden_mult))
        return 0
    base = RunSpec(optimizer="moga-row", width=args.widths[0], lr=0.0, steps=args.steps, base_width=args.widths[0],
                   hidden_mult=args.hidden_mult)
    if args.mode == "mults":
        specs = [replace(base, optimizer="moga-row", lr=lr, hidden_mult=m)
                 for m in args.mults for lr in (args.lrs or DEFAULT_LRS["moga-row"])]
        rows = execute(specs, out / "mults.csv", args.jobs)
        for (m,), r in sorted(best_by(rows, "hidden_mult").items(), key=lambda kv: float(kv[0][0])):
            print(f"hidden_mult {float(m):>5}: best lr {float(r['lr']):.2e}, val loss {float(r['val_loss']):.4f}")
        return 0
    specs = [replace(base, optimizer=o, width=w, lr=lr) for o in args.optimizers for w in args.widths
             for lr in (args.lrs or DEFAULT_LRS[o])]
    rows = execute(specs, out / "results.csv", args.jobs)
    print(report(rows, out))
    for p in plot(rows, out):
        print(f"plot: {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
