"""Aggregate a sweep's runs: mean curves with bootstrap confidence bands over seeds, a per-task final-score table,
and across tasks the IQM and mean with stratified bootstrap confidence intervals and a performance profile
(rliable, Agarwal et al. 2021). Needs the plotting extra: `pip install -r requirements-plots.txt`.

Runs are read from their TensorBoard event files; a run directory is named `{task}__{exp_name}__{seed}__{time}` (as
every script names it), so `exp_name` is the algorithm and `task` the env or dataset:

    python scripts/aggregate.py --runs runs/* --tag eval/normalized_score --out-dir results/sweep

Scores of different tasks are only comparable when the tag is normalized (`eval/normalized_score`, `eval/success`)
or when `--reference TASK=LOW:HIGH` maps each task's raw score to 100 (x - LOW) / (HIGH - LOW).
"""

import json
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import tyro
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


@dataclass
class Args:
    runs: list[str]
    """run directories, each named `{task}__{exp_name}__{seed}__{time}` and holding one TensorBoard event file"""
    out_dir: str
    """where the figures, `final_scores.md` and `aggregates.json` go"""
    tag: str = "eval/episodic_return"
    """the scalar to aggregate"""
    last: int = 1
    """a run's final score is the mean of its last this many logged values"""
    reference: list[str] = field(default_factory=list)
    """`TASK=LOW:HIGH` per task: normalize that task's scores to 100 (x - LOW) / (HIGH - LOW) before aggregating"""
    confidence: float = 0.95
    """confidence level of every interval"""
    reps: int = 2000
    """bootstrap resamples"""
    seed: int = 0
    """seed of the bootstrap"""


def parse_run_name(run_dir: str) -> tuple[str, str, int]:
    """(task, exp_name, seed) from `{task}__{exp_name}__{seed}__{time}`; one-line error otherwise."""
    parts = os.path.basename(run_dir.rstrip("/")).split("__")
    if len(parts) != 4 or not parts[2].lstrip("-").isdigit():
        raise SystemExit(f"error: '{run_dir}' is not a run directory named {{task}}__{{exp_name}}__{{seed}}__{{time}}")
    return parts[0], parts[1], int(parts[2])


def read_scalar(run_dir: str, tag: str) -> tuple[np.ndarray, np.ndarray]:
    events = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    events.Reload()
    if tag not in events.Tags()["scalars"]:
        raise SystemExit(f"error: {run_dir} has no scalar '{tag}' (it has: {', '.join(events.Tags()['scalars'])})")
    points = events.Scalars(tag)
    return np.array([p.step for p in points]), np.array([p.value for p in points])


def bootstrap_ci(values: np.ndarray, confidence: float, reps: int, rng: np.random.Generator) -> np.ndarray:
    """Percentile bootstrap interval of the mean over axis 0 (seeds); values (seeds, ...) -> (2, ...)."""
    idx = rng.integers(0, len(values), (reps, len(values)))
    means = values[idx].mean(1)
    alpha = (1.0 - confidence) / 2.0
    return np.quantile(means, [alpha, 1.0 - alpha], axis=0)


def parse_references(entries: list[str]) -> dict[str, tuple[float, float]]:
    references = {}
    for entry in entries:
        try:
            task, bounds = entry.rsplit("=", 1)
            low, high = (float(x) for x in bounds.split(":"))
        except ValueError:
            raise SystemExit(f"error: --reference '{entry}' is not TASK=LOW:HIGH") from None
        if high == low:
            raise SystemExit(f"error: --reference '{entry}' has HIGH = LOW")
        references[task] = (low, high)
    return references


if __name__ == "__main__":
    args = tyro.cli(Args)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from rliable import library as rly
        from rliable import metrics
    except ImportError as e:
        sys.exit(f"error: aggregation needs the plotting extra ({e.name} is missing): pip install -r requirements-plots.txt")
    references = parse_references(args.reference)
    rng = np.random.default_rng(args.seed)
    os.makedirs(args.out_dir, exist_ok=True)

    curves = defaultdict(list)  # (task, algo) -> [(steps, values)] over seeds
    for run_dir in args.runs:
        task, algo, _ = parse_run_name(run_dir)
        steps, values = read_scalar(run_dir, args.tag)
        low, high = references.get(task, (0.0, 100.0))
        curves[task, algo].append((steps, 100.0 * (values - low) / (high - low) if task in references else values))
    tasks = sorted({task for task, _ in curves})
    algos = sorted({algo for _, algo in curves})
    ylabel = f"{args.tag} (normalized)" if references else args.tag

    # mean curve per (task, algorithm), with a bootstrap confidence band over seeds
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.0 * len(tasks), 3.6), dpi=120, squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for algo in algos:
            if (task, algo) not in curves:
                continue
            runs = curves[task, algo]
            length = min(len(steps) for steps, _ in runs)
            values = np.stack([v[:length] for _, v in runs])
            steps = runs[0][0][:length]
            ax.plot(steps, values.mean(0), label=f"{algo} (n={len(runs)})")
            if len(runs) > 1:
                low, high = bootstrap_ci(values, args.confidence, args.reps, rng)
                ax.fill_between(steps, low, high, alpha=0.2)
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out_dir, "curves.png"))

    # per-task final scores: mean over seeds with a bootstrap confidence interval
    final = {key: np.array([v[-args.last :].mean() for _, v in runs]) for key, runs in curves.items()}
    level = f"{100 * args.confidence:g}%"
    rows = [f"| task | {' | '.join(algos)} |", "|---|" + "---|" * len(algos)]
    for task in tasks:
        cells = []
        for algo in algos:
            if (task, algo) not in final:
                cells.append("")
                continue
            scores = final[task, algo]
            low, high = bootstrap_ci(scores, args.confidence, args.reps, rng)
            cells.append(f"{scores.mean():.1f} [{low:.1f}, {high:.1f}] (n={len(scores)})")
        rows.append(f"| {task} | {' | '.join(cells)} |")
    table = f"Final {args.tag} (mean of the last {args.last} values per run; mean over seeds [{level} bootstrap CI])\n\n"
    table += "\n".join(rows) + "\n"

    # across tasks: IQM and mean with stratified bootstrap CIs (rliable), and a performance profile
    summary = {}
    complete = [algo for algo in algos if all((task, algo) in final for task in tasks)]
    if len(tasks) > 1 and complete:
        seeds = min(len(final[task, algo]) for task in tasks for algo in complete)  # rliable needs (runs, tasks)
        score_dict = {algo: np.stack([final[task, algo][:seeds] for task in tasks], 1) for algo in complete}
        aggregate = lambda x: np.array([metrics.aggregate_iqm(x), metrics.aggregate_mean(x)])
        points, intervals = rly.get_interval_estimates(
            score_dict, aggregate, reps=args.reps, confidence_interval_size=args.confidence
        )
        table += f"\nAcross {len(tasks)} tasks ({seeds} seeds each; stratified bootstrap, {level} CI)\n\n"
        table += "| algorithm | IQM | mean |\n|---|---|---|\n"
        for algo in complete:
            (iqm, mean), ci = points[algo], intervals[algo]
            table += f"| {algo} | {iqm:.1f} [{ci[0, 0]:.1f}, {ci[1, 0]:.1f}] | {mean:.1f} [{ci[0, 1]:.1f}, {ci[1, 1]:.1f}] |\n"
            summary[algo] = dict(iqm=iqm, iqm_ci=ci[:, 0].tolist(), mean=mean, mean_ci=ci[:, 1].tolist())
        all_scores = np.concatenate([s.ravel() for s in score_dict.values()])
        thresholds = np.linspace(all_scores.min(), all_scores.max(), 101)
        profiles, profile_cis = rly.create_performance_profile(score_dict, thresholds, reps=args.reps)
        fig, ax = plt.subplots(figsize=(5.0, 3.6), dpi=120)
        for algo in complete:
            ax.plot(thresholds, profiles[algo], label=algo)
            ax.fill_between(thresholds, profile_cis[algo][0], profile_cis[algo][1], alpha=0.2)
        ax.set_xlabel(f"score threshold ({ylabel})")
        ax.set_ylabel("fraction of runs above")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(args.out_dir, "performance_profile.png"))
    elif len(tasks) > 1:
        table += "\nNo algorithm ran every task: no cross-task aggregate.\n"
    if len(tasks) > 1 and not references and args.tag == "eval/episodic_return":
        table += "\nNote: raw returns of different tasks are not comparable; pass --reference TASK=LOW:HIGH per task.\n"

    with open(os.path.join(args.out_dir, "final_scores.md"), "w") as f:
        f.write(table)
    final_scores = {f"{task}/{algo}": scores.tolist() for (task, algo), scores in final.items()}
    with open(os.path.join(args.out_dir, "aggregates.json"), "w") as f:
        json.dump(dict(tag=args.tag, final_scores=final_scores, across_tasks=summary), f, indent=1)
    print(table)
    print(
        f"wrote {args.out_dir}/curves.png, final_scores.md, aggregates.json" + (", performance_profile.png" if summary else "")
    )
