"""scripts/aggregate.py on synthetic TensorBoard runs whose final scores are known."""

import json
import os

import numpy as np
import pytest
from scipy import stats
from torch.utils.tensorboard import SummaryWriter

from tests.conftest import run_script

pytest.importorskip("rliable", reason="the plotting extra: pip install -r requirements-plots.txt")

FINAL = {  # (task, algo) -> final score per seed
    ("taskA", "algo1"): [10.0, 20.0, 30.0],
    ("taskA", "algo2"): [40.0, 50.0, 60.0],
    ("taskB", "algo1"): [1.0, 2.0, 3.0],
    ("taskB", "algo2"): [7.0, 8.0, 9.0],
}


def write_runs(root) -> list[str]:
    runs = []
    for (task, algo), scores in FINAL.items():
        for seed, score in enumerate(scores, 1):
            run_dir = os.path.join(root, "runs", f"{task}__{algo}__{seed}__1700000000")
            with SummaryWriter(run_dir) as writer:
                for step, value in [(100, 0.0), (200, score / 2), (300, score)]:
                    writer.add_scalar("eval/normalized_score", value, step)
            runs.append(run_dir)
    return runs


def test_final_scores_iqm_and_mean_across_tasks(tmp_path):
    runs = write_runs(tmp_path)
    out = tmp_path / "agg"
    result = run_script(tmp_path, "scripts/aggregate.py", "--runs", *runs, "--out-dir", out, "--tag", "eval/normalized_score")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "aggregates.json").read_text())
    for (task, algo), scores in FINAL.items():
        assert summary["final_scores"][f"{task}/{algo}"] == scores
    for algo in ("algo1", "algo2"):
        matrix = np.array([FINAL["taskA", algo], FINAL["taskB", algo]]).T  # (seeds, tasks)
        agg = summary["across_tasks"][algo]
        assert agg["mean"] == pytest.approx(matrix.mean())
        assert agg["iqm"] == pytest.approx(stats.trim_mean(matrix.ravel(), 0.25))
        assert agg["iqm_ci"][0] <= agg["iqm"] <= agg["iqm_ci"][1]
        assert agg["mean_ci"][0] <= agg["mean"] <= agg["mean_ci"][1]
    table = (out / "final_scores.md").read_text()
    assert "| taskA | 20.0 [" in table and "| 50.0 [" in table
    assert (out / "curves.png").exists() and (out / "performance_profile.png").exists()


def test_reference_normalizes_each_task(tmp_path):
    runs = write_runs(tmp_path)
    out = tmp_path / "agg"
    flags = ["--runs", *runs, "--out-dir", out, "--tag", "eval/normalized_score", "--reference", "taskB=0:10", "taskA=0:100"]
    result = run_script(tmp_path, "scripts/aggregate.py", *flags)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "aggregates.json").read_text())
    assert summary["final_scores"]["taskB/algo2"] == pytest.approx([70.0, 80.0, 90.0])


def test_bad_run_name_ends_in_one_line(tmp_path):
    bad = tmp_path / "not-a-run"
    bad.mkdir()
    result = run_script(tmp_path, "scripts/aggregate.py", "--runs", bad, "--out-dir", tmp_path / "agg")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
