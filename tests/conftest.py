"""Helpers shared by the end-to-end tests: run a script in a subprocess, read a run's TensorBoard scalars, spoil a
run's checkpoint for the resume tests."""

import glob
import os
import subprocess
import sys

import torch
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


def spoil_run(run_dir, script: str, how: str) -> None:
    """Break a finished run's checkpoint (`{script stem}.pt`) or `buffer.pt` in one of the ways a resume must refuse."""
    path = run_dir / f"{os.path.splitext(script)[0]}.pt"
    other = "fmer.py" if script != "fmer.py" else "fino.py"
    if how == "no checkpoint":
        os.remove(path)
    elif how == "not a checkpoint":
        path.write_text("not a checkpoint")
    elif how == "another script's":
        torch.save({"script": other, "args": {}}, path)
    elif how in ("other network sizes", "older checkpoint", "flags of another version"):
        checkpoint = torch.load(path, weights_only=False)
        if how == "other network sizes":
            checkpoint["args"]["hidden_dim"] = 32
        elif how == "older checkpoint":
            del checkpoint["rng"]
        else:
            checkpoint["args"]["no_such_flag"] = 1
        torch.save(checkpoint, path)
    elif how == "no buffer":
        os.remove(run_dir / "buffer.pt")
    elif how in ("buffer of another step", "buffer of another size"):
        buffer = torch.load(run_dir / "buffer.pt", weights_only=False)
        if how == "buffer of another step":
            buffer["global_step"] = 80
        else:
            buffer["buffer"]["added"] = 49
        torch.save(buffer, run_dir / "buffer.pt")
