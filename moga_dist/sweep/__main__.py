"""`python -m moga_dist.sweep MODE`: width-transfer evidence on the CPU.

  lr           optimizers x widths x horizons x learning rates; results.jsonl + summary + plots
  mults        MOGA's per-role multipliers x learning rates at the base width (tune these first)
  report       tables (bracketing, gaps to AdamW/Muon), CSV and plots from a results.jsonl
  coord-check  per-layer activation and update RMS against width over the first steps

Resumable: each finished run is appended to OUT/results.jsonl; a restart (same command) skips the
finished ones and reruns a run that was killed. Groups finish in order: horizon, then width.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from .grid import Group, default_lrs, execute, plan, read_results
from .runs import OPTIMIZERS, RunSpec


def _positive(kind):
    def parse(text):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text}: allowed a number > 0")
        return value
    return parse


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moga_dist.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["lr", "mults", "report", "coord-check"])
    ap.add_argument("--out", default="outputs/sweep", help="directory for results.jsonl, plots and summary")
    ap.add_argument("--to", default=None, help="report mode: where to write the tables and plots (default: --out)")
    ap.add_argument("--label", default="", help="report mode: a label for summary.md (e.g. 'partial, 3 h in')")
    ap.add_argument("--widths", type=_positive(int), nargs="+", default=[64, 128, 256, 512])
    ap.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    ap.add_argument("--lrs", type=_positive(float), nargs="+", default=None,
                    help="one grid for all optimizers and horizons (default: --points lattice LRs per horizon)")
    ap.add_argument("--points", type=_positive(int), default=5, help="LRs per group in the default grid")
    ap.add_argument("--extend", type=int, default=3,
                    help="extra LRs a group may add, a factor 2 beyond its edge, until its best lr is bracketed")
    ap.add_argument("--steps", type=_positive(int), nargs="+", default=None, help="horizons in steps")
    ap.add_argument("--tokens-per-param", type=_positive(float), nargs="+", default=None,
                    help="horizons in training tokens per parameter (steps then differ per width)")
    ap.add_argument("--batch", type=_positive(int), default=8)
    ap.add_argument("--seq-len", type=_positive(int), default=128)
    ap.add_argument("--eval-windows", type=int, default=0, help="held-out windows scored; 0: the whole split")
    ap.add_argument("--hidden-mult", type=float, default=10.0)
    ap.add_argument("--mults", type=float, nargs="+", default=[2.0, 5.0, 10.0, 20.0],
                    help="mults mode: hidden_mult values to try at the base width")
    ap.add_argument("--jobs", type=_positive(int), default=1)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.mode == "coord-check":
        from .coord import coord_check

        print(coord_check(args.widths, out, args.hidden_mult))
        return 0
    if args.mode == "report":
        from .report import markdown, unbracketed, write_report

        rows = list(read_results(out / "results.jsonl").values())
        for p in write_report(rows, Path(args.to or out), args.label):
            print(f"wrote {p}")
        print(markdown(rows, args.label))
        print("\n".join(unbracketed(rows)) or "every group's best lr is bracketed")
        return 0
    horizons = [("steps", s) for s in (args.steps or [])] + [("tokens_per_param", t) for t in
                                                               (args.tokens_per_param or [])]
    base = RunSpec(optimizer="moga-row", width=args.widths[0], lr=0.0, steps=300, base_width=args.widths[0],
                   batch=args.batch, seq_len=args.seq_len, hidden_mult=args.hidden_mult,
                   eval_windows=args.eval_windows)
    if args.mode == "mults":
        steps = horizons[0][1] if horizons and horizons[0][0] == "steps" else 300
        groups = [Group(replace(base, steps=steps, hidden_mult=m),
                        tuple(args.lrs or default_lrs("moga-row", steps, args.points))) for m in args.mults]
        rows = execute(groups, out / "mults.jsonl", args.jobs, args.extend)
        from .report import groups as summarize

        for g in summarize(rows):
            b = g["best"]
            print(f"hidden_mult {b['hidden_mult']:>5}: best lr {b['lr']:.2e}, held-out loss {b['val_loss']:.4f}")
        return 0
    groups = plan(args.optimizers, args.widths, horizons or [("steps", 300)], base, args.points, args.lrs)
    rows = execute(groups, out / "results.jsonl", args.jobs, args.extend)
    from .report import markdown, unbracketed, write_report

    write_report(rows, out)
    print(markdown(rows))
    print("\n".join(unbracketed(rows)) or "every group's best lr is bracketed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
