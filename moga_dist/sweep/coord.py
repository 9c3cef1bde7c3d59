"""Coordinate check: per-layer activation RMS and weight-update RMS against width, first steps.

Under a width-transferable parametrization these curves stay flat as width grows (µP's test)."""
from __future__ import annotations

from pathlib import Path

from ..train.data import ByteCorpus
from .runs import RunSpec, build_model, build_optimizer


def coord_check(widths: list[int], out_dir: Path, hidden_mult: float, steps: int = 5,
                optimizers=("moga-row", "adamw")) -> str:
    """Plot coord_check.png; returns a text table (activation / update RMS at the last step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corpus = ByteCorpus("kjv", 128, 0.02, 1234)
    lines, results = [], {}
    for opt_name in optimizers:
        for w in widths:
            spec = RunSpec(optimizer=opt_name, width=w, lr=1.6e-2 if opt_name.startswith("moga") else 3e-3,
                           steps=steps, hidden_mult=hidden_mult, base_width=widths[0])
            model = build_model(spec)
            opts = build_optimizer(spec, model)
            acts: dict[str, float] = {}
            hooks = [m.register_forward_hook(lambda mod, i, o, n=n: acts.__setitem__(
                n, (o[0] if isinstance(o, tuple) else o).detach().pow(2).mean().sqrt().item()))
                for n, m in model.named_modules() if n.endswith(("mlp", "self_attn")) or n == "model.embed_tokens"]
            for step in range(steps):
                before = {n: p.detach().clone() for n, p in model.named_parameters() if p.ndim == 2}
                x = corpus.batch(step, 0, 0, 8)
                loss = model(input_ids=x, labels=x).loss
                for o in opts:
                    o.zero_grad()
                loss.backward()
                for o in opts:
                    o.step()
            upd = {n: (p.detach() - before[n]).pow(2).mean().sqrt().item()
                   for n, p in model.named_parameters() if p.ndim == 2}
            for h in hooks:
                h.remove()
            results[(opt_name, w)] = (acts, upd)
    fig, axes = plt.subplots(2, len(optimizers), figsize=(5 * len(optimizers), 7), squeeze=False)
    for col, opt_name in enumerate(optimizers):
        names = list(results[(opt_name, widths[0])][0])
        for n in names:
            axes[0][col].plot(widths, [results[(opt_name, w)][0][n] for w in widths], marker="o", label=n)
        pnames = [n for n in results[(opt_name, widths[0])][1] if "layers.0" in n or "lm_head" in n or "embed" in n]
        for n in pnames:
            axes[1][col].plot(widths, [results[(opt_name, w)][1][n] for w in widths], marker="o", label=n)
        for row, what in enumerate(("activation RMS", "update RMS (last step)")):
            axes[row][col].set_xscale("log", base=2)
            axes[row][col].set_yscale("log")
            axes[row][col].set_title(f"{opt_name}: {what}")
            axes[row][col].set_xlabel("width")
        axes[0][col].legend(fontsize=6)
        axes[1][col].legend(fontsize=6)
        for w in widths:
            acts, upd = results[(opt_name, w)]
            lines.append(f"{opt_name:<9} width {w:>4}: mean activation RMS {sum(acts.values()) / len(acts):.3g}, "
                         f"mean update RMS {sum(upd.values()) / len(upd):.3g}")
    fig.tight_layout()
    fig.savefig(out_dir / "coord_check.png", dpi=110)
    plt.close(fig)
    return "\n".join(lines + [f"plot: {out_dir / 'coord_check.png'}"])
