"""scripts/benchmark.py: the rates read back from TensorBoard wall times, and its rows for runs that work, fail or
run past their cap (tiny CPU runs of the real flowq.py)."""

import json
import os
import sys

import pytest
from torch.utils.tensorboard import SummaryWriter

from tests.conftest import ROOT, run_script

sys.path.insert(0, os.path.join(ROOT, "scripts"))
from benchmark import one_line, read_phase  # noqa: E402


def test_read_phase_times_each_phase_between_its_own_log_events(tmp_path):
    """Offline steps 1..500 then online 501..800, logged every 100 steps at known wall times: the steady rate is the
    median interval rate, the mean pools the intervals, the start-up leaves out the first interval's steps at the
    steady rate, the online phase starts its clock at the last offline log, and memory is the phase's own peak."""
    launch = 1000.0
    times = {100: 30, 200: 31, 300: 32, 400: 34, 500: 35, 600: 45, 700: 47, 800: 49}  # seconds after launch
    memory = {100: 5, 300: 10, 500: 8, 600: 20, 800: 15}
    writer = SummaryWriter(str(tmp_path))
    for step, t in times.items():
        writer.add_scalar("losses/qf_loss", 1.0, step, walltime=launch + t)
        writer.add_scalar("charts/SPS", step / 10, step, walltime=launch + t)
        if step in memory:
            writer.add_scalar("charts/gpu_memory_mb", memory[step], step, walltime=launch + t)
    writer.close()

    offline = read_phase(str(tmp_path), launch, 1, 500, None)
    assert offline["steady_sps"] == pytest.approx(100.0)  # intervals: 100, 100, 50, 100 steps/s
    assert offline["mean_sps"] == pytest.approx(400 / 5)
    assert offline["startup_s"] == pytest.approx(30 - 100 / 100)
    assert offline["script_sps"] == pytest.approx(50.0) and offline["peak_gpu_mb"] == 10
    online = read_phase(str(tmp_path), launch, 501, 800, offline["end_time"])
    assert online["steady_sps"] == pytest.approx(50.0) and online["mean_sps"] == pytest.approx(50.0)
    assert online["startup_s"] == pytest.approx((45 - 35) - 100 / 50)
    assert online["script_sps"] == pytest.approx(80.0) and online["peak_gpu_mb"] == 20


def test_one_line_picks_the_line_that_says_why():
    tyro_box = "╭─ Unrecognized options ─╮\n│ Unrecognized options: --compile │\n│ For full helptext, run x │\n╰──╯"
    assert one_line(tyro_box) == "Unrecognized options: --compile"
    assert one_line("Traceback (most recent call last):\n  File x\nRuntimeError: boom\nclosing\n") == "RuntimeError: boom"
    assert one_line("loading\nerror: --cudagraphs needs a CUDA device\n") == "error: --cudagraphs needs a CUDA device"


def bench(tmp_path, *flags):
    """Run the CPU suite on flowq.py alone, eager, with the smallest budget; returns the process and its JSON rows."""
    out = tmp_path / "bench.json"
    flags = ("--suite", "cpu", "--scripts", "flowq", "--modes", "eager", "--steps-scale", "0.01", "--json", out, *flags)
    result = run_script(tmp_path, "scripts/benchmark.py", *flags, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result, json.loads(out.read_text())["rows"]


def test_cpu_suite_times_a_real_run(tmp_path):
    """One row for flowq's offline phase, with a steady rate that agrees with the script's own SPS, in the table too."""
    result, rows = bench(tmp_path)
    assert [(r["script"], r["phase"], r["mode"], r["status"]) for r in rows] == [("flowq", "offline", "eager", "ok")]
    row = rows[0]
    assert row["steady_sps"] > 0 and row["mean_sps"] > 0 and row["startup_s"] > 0
    assert 1 / 3 < row["steady_sps"] / row["script_sps"] < 3
    assert row["peak_gpu_mb"] is None and row["compile_s"] is None  # CPU; compile times only for compiled modes
    assert f"| flowq | HalfCheetah-v5 random | offline | eager | {row['steady_sps']:.1f} |" in result.stdout


def test_failed_and_timed_out_runs_are_rows_not_crashes(tmp_path):
    """A flag the script does not know is a `failed: <one line>` row; a run past its cap is a timeout row."""
    _, rows = bench(tmp_path, "--extra-flags=--no-such-flag")
    assert [r["status"] for r in rows] == ["failed: Unrecognized options: --no-such-flag"]
    assert rows[0]["steady_sps"] is None
    _, rows = bench(tmp_path, "--config-timeout", "1")
    assert [r["status"] for r in rows] == ["timeout after 1 s"]
