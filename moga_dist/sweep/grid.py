"""The sweep grid: run what the CSV lacks (in parallel, resumably), summarize, plot.

Workers live here, not in __main__, so spawned processes can import them."""
from __future__ import annotations

import csv
import json
import multiprocessing as mp
from pathlib import Path

from .runs import OPTIMIZERS, RunSpec

DEFAULT_LRS = {  # factor-2 grids around each optimizer's usual optimum, wide enough to see both sides
    "moga-row": [2 ** k * 1e-3 for k in range(1, 8)], "moga-col": [2 ** k * 1e-3 for k in range(1, 8)],
    "adamw": [2 ** k * 2.5e-4 for k in range(0, 7)], "adamw-mup": [2 ** k * 2.5e-4 for k in range(0, 7)],
    "muon": [2 ** k * 2.5e-4 for k in range(0, 9)],     # its optimum sits higher at small widths
}
FIELDS = ["key", "optimizer", "width", "lr", "hidden_mult", "embedding_mult", "head_mult", "vector_mult",
          "steps", "val_loss", "train_loss", "diverged", "curve"]


def _work(args):
    spec, corpus_args = args
    from ..train.data import ByteCorpus
    from .runs import run

    corpus = ByteCorpus(*corpus_args)
    return spec, run(spec, corpus)


def execute(specs: list[RunSpec], csv_path: Path, jobs: int) -> list[dict]:
    """Run what the CSV does not hold yet (appending each result as it finishes); return all rows."""
    from tqdm.auto import tqdm

    done = {}
    if csv_path.exists():
        with open(csv_path, newline="") as fh:
            done = {row["key"]: row for row in csv.DictReader(fh)}
    todo = [s for s in specs if s.key() not in done]
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    new_file = not csv_path.exists()
    corpus_args = ("kjv", specs[0].seq_len if specs else 128, 0.02, 1234)
    with open(csv_path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        if new_file:
            writer.writeheader()
        with mp.get_context("spawn").Pool(jobs) as pool:
            for spec, res in tqdm(pool.imap_unordered(_work, [(s, corpus_args) for s in todo]), total=len(todo),
                                  desc=f"runs ({len(specs) - len(todo)} already done)", unit="run"):
                row = {"key": spec.key(), "optimizer": spec.optimizer, "width": spec.width, "lr": spec.lr,
                       "hidden_mult": spec.hidden_mult, "embedding_mult": spec.embedding_mult,
                       "head_mult": spec.head_mult, "vector_mult": spec.vector_mult, "steps": spec.steps,
                       "val_loss": res["val_loss"], "train_loss": res["train_loss"], "diverged": res["diverged"],
                       "curve": json.dumps([round(v, 4) for v in res["curve"]])}
                writer.writerow(row)
                fh.flush()
                done[row["key"]] = {k: str(v) for k, v in row.items()}    # as read back from the CSV
    return [done[s.key()] for s in specs]


def best_by(rows: list[dict], *group: str) -> dict:
    """{group values: row with the lowest validation loss}."""
    out: dict = {}
    for r in rows:
        k = tuple(r[g] for g in group)
        if k not in out or float(r["val_loss"]) < float(out[k]["val_loss"]):
            out[k] = r
    return out


def report(rows: list[dict], out_dir: Path) -> str:
    """Text summary: best lr (and its grid index) and loss per optimizer and width."""
    lines = [f"{'optimizer':<11}{'width':>6}{'best lr':>10}{'grid idx':>9}{'val loss':>10}{'edge?':>7}"]
    for (opt, width), r in sorted(best_by(rows, "optimizer", "width").items(), key=lambda kv: (kv[0][0], int(kv[0][1]))):
        lrs = sorted({float(x["lr"]) for x in rows if x["optimizer"] == opt and x["width"] == width})
        i = lrs.index(float(r["lr"]))
        lines.append(f"{opt:<11}{int(width):>6}{float(r['lr']):>10.2e}{i:>9}{float(r['val_loss']):>10.4f}"
                     f"{'yes' if i in (0, len(lrs) - 1) else '':>7}")
    text = "\n".join(lines)
    (out_dir / "summary.txt").write_text(text + "\n")
    return text


def plot(rows: list[dict], out_dir: Path) -> list[Path]:
    """loss_vs_lr.png (a panel per optimizer, a line per width) and curves.png (best-lr curves)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    opts = [o for o in OPTIMIZERS if any(r["optimizer"] == o for r in rows)]
    widths = sorted({int(r["width"]) for r in rows})
    fig, axes = plt.subplots(1, len(opts), figsize=(4 * len(opts), 3.6), sharey=True, squeeze=False)
    for ax, opt in zip(axes[0], opts):
        for w in widths:
            pts = sorted((float(r["lr"]), float(r["val_loss"])) for r in rows
                         if r["optimizer"] == opt and int(r["width"]) == w and r["diverged"] in ("False", False))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"width {w}")
        ax.set_xscale("log", base=2)
        ax.set_title(opt)
        ax.set_xlabel("peak learning rate")
    axes[0][0].set_ylabel("validation loss (bytes)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    paths = [out_dir / "loss_vs_lr.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    best = best_by(rows, "optimizer", "width")
    fig, axes = plt.subplots(1, len(widths), figsize=(4 * len(widths), 3.4), sharey=True, squeeze=False)
    for ax, w in zip(axes[0], widths):
        for opt in opts:
            r = best.get((opt, str(w))) or best.get((opt, w))
            if r:
                ax.plot(json.loads(r["curve"]), label=f"{opt} lr={float(r['lr']):.1e}", linewidth=1)
        ax.set_title(f"width {w}: best-lr training curves")
        ax.set_xlabel("step")
        ax.set_ylim(top=3.5)
    axes[0][0].set_ylabel("training loss")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / "curves.png")
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


