"""Helpers shared by the end-to-end tests: run a script in a subprocess, read a run's TensorBoard scalars."""

import glob
import os
import subprocess
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(cwd, script: str, *flags: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python {script} {flags}` in `cwd` on one CPU thread; returns the completed process (text output)."""
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *map(str, flags)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )


def run_dirs(cwd) -> list[str]:
    """The run directories a script wrote under `cwd/runs`, oldest first."""
    return sorted(glob.glob(os.path.join(str(cwd), "runs", "*")), key=os.path.getmtime)


def scalars(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a run: tag -> [(step, value), ...] in logging order."""
    events = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def assert_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    """The process failed with exactly one `error:` line containing `fragment`, and no traceback."""
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr[-3000:]
