"""Tables, the bracketing check, CSV export and plots from a sweep's results (JSONL rows).

`python -m moga_dist.sweep report --out DIR --to docs/evidence/X` turns whatever cells have finished
into results.csv, summary.md, loss_vs_lr.png and best_lr.png."""
from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path

from .grid import bracket, group_key
from .runs import OPTIMIZERS

CSV_FIELDS = ["optimizer", "width", "steps", "tokens_per_param", "lr", "val_loss", "train_loss", "diverged",
              "params", "seconds", "cpu_seconds", "hidden_mult", "batch", "seq_len", "layers", "finished_utc"]


def groups(rows: list[dict]) -> list[dict]:
    """One entry per (optimizer, width, horizon, ...): the bracket() verdict plus the group's identity."""
    by: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by[group_key(r)].append(r)
    out = []
    for members in by.values():
        r0 = members[0]
        out.append({"optimizer": r0["optimizer"], "width": r0["width"], "steps": r0["steps"],
                    "tokens_per_param": r0["tokens_per_param"], "lrs": sorted(r["lr"] for r in members),
                    **bracket(members)})
    order = {o: i for i, o in enumerate(OPTIMIZERS)}
    return sorted(out, key=lambda g: (g["steps"], g["width"], order.get(g["optimizer"], 99)))


def machine_time(rows: list[dict]) -> tuple[float, float]:
    """(wall hours, CPU hours) summed over finished cells."""
    return (sum(r.get("seconds", 0.0) for r in rows) / 3600, sum(r.get("cpu_seconds", 0.0) for r in rows) / 3600)


def _status(g: dict) -> str:
    if g["best"] is None:
        return "all diverged"
    if g["bracketed"]:
        return "bracketed"
    return "NOT bracketed (" + " and ".join(s for s, ok in (("needs a lower lr", g["lower"]),
                                                         ("needs a higher lr", g["upper"])) if not ok) + ")"


def unbracketed(rows: list[dict]) -> list[str]:
    """One line per group whose best lr lacks a worse neighbour on some side."""
    return [f"{g['optimizer']} width {g['width']} steps {g['steps']}: best lr "
            f"{g['best']['lr'] if g['best'] else '-'} {_status(g)}" for g in groups(rows) if not g["bracketed"]]


def markdown(rows: list[dict], label: str = "") -> str:
    """summary.md: per-cell best lr / loss / bracketing, gaps to AdamW and Muon, machine time."""
    gs = groups(rows)
    wall, cpu = machine_time(rows)
    lines = [f"# Sweep summary{(' — ' + label) if label else ''}", "",
             (f"{len(rows)} finished runs in {len(gs)} groups; machine time {wall:.2f} h wall, {cpu:.2f} h CPU "
              "(one core each, niced, on a shared 2-core machine)."), "",
             "| optimizer | width | steps | tokens/param | best lr | held-out loss | LRs tried | bracketing |",
             "|---|---|---|---|---|---|---|---|"]
    for g in gs:
        b = g["best"]
        lines.append(f"| {g['optimizer']} | {g['width']} | {g['steps']} | {g['tokens_per_param']:.1f} | "
                     f"{b['lr']:.3g} | {b['val_loss']:.4f} | " if b else
                     f"| {g['optimizer']} | {g['width']} | {g['steps']} | {g['tokens_per_param']:.1f} | - | - | ")
        lines[-1] += f"{', '.join(f'{x:.3g}' for x in g['lrs'])} | {_status(g)} |"
    lines += ["", "Gap of MOGA-row's best held-out loss to the others' (positive: MOGA-row is worse):", "",
              "| width | steps | MOGA-row | AdamW | Muon | vs AdamW | vs Muon |", "|---|---|---|---|---|---|---|"]
    best = {(g["optimizer"], g["width"], g["steps"]): g for g in gs if g["best"]}
    for width, steps in sorted({(g["width"], g["steps"]) for g in gs}, key=lambda t: (t[1], t[0])):
        loss = {o: best[(o, width, steps)]["best"]["val_loss"] if (o, width, steps) in best else None
                for o in ("moga-row", "adamw", "muon")}
        note = {o: "" if (o, width, steps) not in best or best[(o, width, steps)]["bracketed"] else "*"
                for o in loss}

        m = loss["moga-row"]
        gaps = [f"{100 * (m - x) / x:+.2f}%" if m is not None and x is not None else "-"
                for x in (loss["adamw"], loss["muon"])]
        cells = [f"{loss[o]:.4f}{note[o]}" if loss[o] is not None else "-" for o in loss]
        lines.append(f"| {width} | {steps} | {' | '.join(cells)} | {' | '.join(gaps)} |")
    lines += ["", "`*`: that optimizer's best lr is not bracketed yet (its optimum may lie outside the LRs tried).", ""]
    lines += fit_section(rows)
    return "\n".join(lines) + "\n"


def fit_section(rows: list[dict]) -> list[str]:
    """Interpolated optima per bracketed group and the fitted lr rule per optimizer (sweep/fit.py)."""
    from .fit import fit, optima

    ops = optima(rows)
    if not ops:
        return []
    lines = ["## How the best lr moves", "",
             "Interpolated optimum of each bracketed group (vertex of a parabola in log2 lr through the best "
             "lattice lr and its neighbours):", "",
             "| optimizer | width | steps | tokens/param | best lattice lr | interpolated optimum |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {o.optimizer} | {o.width} | {o.steps} | {o.tokens_per_param:.1f} | {o.lattice_lr:.3g} | "
              f"{o.lr:.3g} |" for o in ops]
    lines += ["", "Least-squares rule per optimizer, `log2 lr* = a + b log2(tokens/param) + c log2(width)` "
              "(a single seed per cell: the rms error says how far one cell's optimum sits from the rule):", ""]
    for opt in OPTIMIZERS:
        rule = fit(rows, opt)
        if rule is not None:
            lines.append(f"- {rule.describe()}")
    lines += ["", "At one width (the horizon exponent alone; what `lr_rule = \"horizon-tpp-1\"` uses at width 64):", ""]
    for opt in OPTIMIZERS:
        for width in sorted({o.width for o in ops if o.optimizer == opt}):
            if len({o.steps for o in ops if o.optimizer == opt and o.width == width}) > 1:
                rule = fit([r for r in rows if r["width"] == width], opt)
                lines.append(f"- width {width}: {rule.describe()}")
    return lines


def export_csv(rows: list[dict], path: Path) -> None:
    """The finished runs without their curves, one line each, sorted by group and lr."""
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in sorted(rows, key=lambda r: (r["steps"], r["width"], r["optimizer"], r["lr"])):
            w.writerow(r)


def plot(rows: list[dict], out_dir: Path) -> list[Path]:
    """loss_vs_lr.png (a row per horizon, a panel per optimizer, a line per width) and best_lr.png
    (best lr against width, a line per horizon; a panel per optimizer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    decimal = FuncFormatter(lambda v, _: f"{v:.3g}")      # 0.004, not 2^-8
    opts = [o for o in OPTIMIZERS if any(r["optimizer"] == o for r in rows)]
    horizons = sorted({r["steps"] for r in rows})
    widths = sorted({r["width"] for r in rows})
    all_lrs = sorted({r["lr"] for r in rows})
    fig, axes = plt.subplots(len(horizons), len(opts), figsize=(4 * len(opts), 3.2 * len(horizons)),
                             squeeze=False, sharex=True)
    for i, steps in enumerate(horizons):
        for j, opt in enumerate(opts):
            ax = axes[i][j]
            for w in widths:
                pts = sorted((r["lr"], r["val_loss"]) for r in rows if r["optimizer"] == opt and r["width"] == w
                             and r["steps"] == steps and not r["diverged"] and math.isfinite(r["val_loss"]))
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"width {w}")
            ax.set_xscale("log", base=2)
            ax.set_xticks(all_lrs)                            # the lattice LRs, labelled as decimals
            ax.xaxis.set_major_formatter(decimal)
            ax.tick_params(axis="x", labelrotation=60, labelsize=7)
            ax.set_title(f"{opt}, {steps} steps", fontsize=9)
            if j == 0:
                ax.set_ylabel("held-out loss (nats/byte)")
            if i == len(horizons) - 1:
                ax.set_xlabel("peak learning rate")
            ax.legend(fontsize=7)
    fig.tight_layout()
    paths = [out_dir / "loss_vs_lr.png"]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)

    gs = [g for g in groups(rows) if g["best"]]
    fig, axes = plt.subplots(1, len(opts), figsize=(4 * len(opts), 3.4), squeeze=False, sharey=True)
    for ax, opt in zip(axes[0], opts):
        for steps in horizons:
            pts = [(g["width"], g["best"]["lr"], g["bracketed"]) for g in gs if g["optimizer"] == opt
                   and g["steps"] == steps]
            if pts:
                line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{steps} steps")
                ax.scatter([p[0] for p in pts if not p[2]], [p[1] for p in pts if not p[2]], s=120,
                           facecolors="none", edgecolors=line.get_color())     # ring: not bracketed
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.xaxis.set_major_formatter(decimal)
        ax.yaxis.set_major_formatter(decimal)
        ax.set_title(f"{opt}: best lr (ring = not bracketed)", fontsize=9)
        ax.set_xlabel("width")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("best peak learning rate")
    fig.tight_layout()
    paths.append(out_dir / "best_lr.png")
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)
    return paths


def write_report(rows: list[dict], to: Path, label: str = "") -> list[Path]:
    """results.csv, summary.md and the plots into `to`; returns the paths written."""
    to.mkdir(parents=True, exist_ok=True)
    export_csv(rows, to / "results.csv")
    (to / "summary.md").write_text(markdown(rows, label))
    paths = [to / "results.csv", to / "summary.md"]
    if rows:
        paths += plot(rows, to)
    (to / "curves.json").write_text(json.dumps(
        {r["key"]: {"every": r.get("curve_every", 1), "loss": [round(v, 4) for v in r["curve"]]} for r in rows}))
    return paths + [to / "curves.json"]
