"""Plot scalar curves from TensorBoard event files (needs the plotting extra: `pip install -r requirements-plots.txt`).

One curve per run directory; runs that share a label are averaged (shaded: min to max).

    python scripts/plot_curves.py --runs runs/Pendulum-v1__fmer* --tag eval/episodic_return \
        --title "FMER on Pendulum-v1" --out results/fmer_pendulum.png
"""

import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import tyro

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from aggregate import read_scalar  # noqa: E402


@dataclass
class Args:
    runs: list[str]
    """run directories (each holding one TensorBoard event file)"""
    out: str
    """output image path (.png)"""
    tag: str = "eval/episodic_return"
    """the scalar to plot"""
    labels: list[str] = field(default_factory=list)
    """one label per run (default: the run directory name); equal labels are averaged"""
    title: str = ""
    """figure title"""
    ylabel: str = ""
    """y-axis label (default: the tag)"""
    xlabel: str = "environment steps"
    """x-axis label (offline runs count gradient steps)"""
    hline: float | None = None
    """draw a dashed horizontal reference line at this value (e.g. a success threshold)"""
    hline_label: str = ""
    """legend label of the horizontal line"""
    vline: float | None = None
    """draw a dotted vertical line at this step (e.g. the offline-to-online switch)"""
    vline_label: str = ""
    """legend label of the vertical line"""


if __name__ == "__main__":
    args = tyro.cli(Args)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("error: plotting needs the plotting extra: pip install -r requirements-plots.txt")
    if args.labels and len(args.labels) != len(args.runs):
        sys.exit(f"error: {len(args.labels)} labels for {len(args.runs)} runs")
    groups = defaultdict(list)
    for i, run_dir in enumerate(args.runs):
        groups[args.labels[i] if args.labels else run_dir.rstrip("/").split("/")[-1]].append(read_scalar(run_dir, args.tag))

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for label, curves in groups.items():
        length = min(len(steps) for steps, _ in curves)
        steps = curves[0][0][:length]
        values = np.stack([v[:length] for _, v in curves])
        ax.plot(steps, values.mean(0), label=f"{label} (n={len(curves)})" if len(curves) > 1 else label)
        if len(curves) > 1:
            ax.fill_between(steps, values.min(0), values.max(0), alpha=0.2)
    if args.hline is not None:
        ax.axhline(args.hline, color="gray", linestyle="--", label=args.hline_label or None)
    if args.vline is not None:
        ax.axvline(args.vline, color="black", linestyle=":", label=args.vline_label or None)
    ax.set_xlabel(args.xlabel)
    ax.set_ylabel(args.ylabel or args.tag)
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")
