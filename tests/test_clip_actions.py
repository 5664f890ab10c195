"""Offline data whose actions the simulator clips (a Gaussian policy's raw samples): flowq.py and fino.py refuse it with
one line that names --clip-actions, and with the flag they clip it, say how much in one note, and train."""

import numpy as np
import pytest

from tests.conftest import assert_one_line_error, run_dirs, run_script, scalars
from tests.fixtures import write_d4rl_file

TINY = {
    "flowq.py": ["--hidden-dim", "16", "--num-layers", "2", "--batch-size", "16", "--total-steps", "20"],
    "fino.py": [
        "--algo",
        "fql",
        "--hidden-dim",
        "16",
        "--num-layers",
        "2",
        "--batch-size",
        "16",
        "--offline-steps",
        "20",
        "--online-steps",
        "0",
    ],
}
COMMON = ["--eval-every", "20", "--eval-episodes", "1", "--log-every", "10", "--no-cuda", "--env-id", "Pendulum-v1"]


@pytest.fixture(scope="module")
def raw_actions(tmp_path_factory):
    """A Pendulum-v1 file (bounds +-2) whose actions are 3x the recorded ones, as a Gaussian policy's raw samples."""
    path = str(tmp_path_factory.mktemp("raw") / "pendulum-raw.npz")
    write_d4rl_file(path, "Pendulum-v1", num_episodes=2, max_steps=40)
    data = dict(np.load(path))
    data["actions"] = 3.0 * data["actions"]
    np.savez(path, **data)
    outside = int((np.abs(data["actions"]) > 2.0).any(axis=1).sum())
    return path, outside, len(data["actions"])


@pytest.mark.parametrize("script", ["flowq.py", "fino.py"])
def test_raw_actions_are_refused_with_the_way_forward(tmp_path, raw_actions, script):
    path, outside, total = raw_actions
    result = run_script(tmp_path, script, "--dataset", path, *COMMON, *TINY[script])
    assert_one_line_error(result, f"{outside} of {total} transitions have actions outside Pendulum-v1's action bounds")
    assert "rerun with --clip-actions" in result.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("script", ["flowq.py", "fino.py"])
def test_clip_actions_clips_says_how_much_and_trains(tmp_path, raw_actions, script):
    path, outside, total = raw_actions
    result = run_script(tmp_path, script, "--dataset", path, "--clip-actions", *COMMON, *TINY[script])
    assert result.returncode == 0, result.stderr[-2000:]
    notes = [line for line in result.stdout.splitlines() if "--clip-actions clipped" in line]
    assert len(notes) == 1 and f"the actions of {outside} of {total} transitions" in notes[0], result.stdout
    (run_dir,) = run_dirs(tmp_path)
    logged = scalars(run_dir)
    assert len(logged["losses/qf_loss"]) == 2 and "eval/episodic_return" in logged
