"""fino.py --resume: runs stopped by SIGTERM in the offline phase and in the online phase, then resumed, end exactly as
the same run uninterrupted (every losses/*, eval/* and charts/beta value); checkpointing changes nothing; bad resume
inputs end in one `error:` line; the online SPS clock restarts. CPU, tiny networks, the tiny OGBench pointmaze
fixture: 1000-step episodes, so online checkpoints (at the first episode end at or after an evaluation) fall at 2000,
3000 and 3500 (the end), and a checkpoint taken mid-episode (at the evaluations of 1500 and 2500) would show."""

import os
import shutil
import signal
import subprocess
import sys
import time

import gymnasium as gym
import numpy as np
import pytest
import torch

from fino import ReplayBuffer, rng_states
from tests.conftest import ROOT, assert_one_line_error, run_script, scalars, spoil_run
from tests.fixtures import FiveRows, write_ogbench_dataset

OGBENCH_NAME = "pointmaze-medium-navigate-singletask-v0"
TINY = ["--dataset", OGBENCH_NAME, "--hidden-dim", "16", "--num-layers", "2", "--batch-size", "32", "--flow-steps", "3"]
TINY += ["--eval-episodes", "1", "--entropy-states", "16", "--entropy-samples", "30"]
TINY += ["--gmm-iters", "20", "--no-cuda", "--num-candidates", "3"]
# evaluations at 500 (offline), 1000 (end of offline), 1500, ..., 3500; beta updates at 1500, 2000, ..., 3500
BUDGET = ["--offline-steps", "1000", "--online-steps", "2500", "--eval-every", "500", "--beta-update-every", "500"]
BUDGET += ["--log-every", "50"]
SAVE = ["--save-model", "--save-buffer"]


def curves(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar but the wall-clock SPS."""
    return {tag: points for tag, points in scalars(run_dir).items() if tag != "charts/SPS"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ogbench")
    write_ogbench_dataset(str(path), OGBENCH_NAME, num_episodes=3, episode_length=60)
    return str(path)


def start(cwd, *flags: str) -> subprocess.Popen:
    command = [sys.executable, os.path.join(ROOT, "fino.py"), *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def stop_once(cwd, name: str, wait_for: str, *flags: str, signals=(signal.SIGTERM,), delay=0.0) -> subprocess.Popen:
    """Start a run named `name`, send `signals` `delay` seconds after `runs/name/wait_for` exists, wait for its exit."""
    process = start(cwd, "--run-name", name, *flags)
    path = os.path.join(cwd, "runs", name, wait_for)
    while not os.path.exists(path):  # checkpoints are written atomically: they exist only whole
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.02)
    time.sleep(delay)
    for signum in signals:
        process.send_signal(signum)
    process.stdout_text, process.stderr_text = process.communicate(timeout=600)
    return process


def saved_step(run_dir) -> int:
    return torch.load(os.path.join(run_dir, "fino.pt"), weights_only=False)["global_step"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
    """The uninterrupted run, without checkpoints: its curves."""
    cwd = tmp_path_factory.mktemp("uninterrupted")
    done = run_script(cwd, "fino.py", "--run-name", "whole", "--dataset-dir", data_dir, *TINY, *BUDGET)
    assert done.returncode == 0, done.stderr[-3000:]
    return curves(os.path.join(cwd, "runs", "whole"))


def assert_same_run(logged: dict, expected: dict) -> None:
    """The final value of every loss, evaluation and beta, exactly; then the whole curves (so the events a stopped
    run wrote after its checkpoint were purged and nothing is missing)."""
    final_tags = [tag for tag in expected if tag.startswith(("losses/", "eval/")) or tag == "charts/beta"]
    assert len(final_tags) == 9 and "eval/success" in final_tags and "val/qf_loss" in expected
    for tag in final_tags:
        assert logged[tag][-1] == expected[tag][-1], tag
    assert len({v for _, v in expected["charts/beta"]}) > 2  # beta moved twice before the end
    assert logged == expected


def test_stopped_offline_and_resumed_ends_as_the_uninterrupted_run(tmp_path, data_dir, uninterrupted):
    """SIGTERM once the first checkpoint (step 500) exists: the run checkpoints at the next offline step and exits 143.
    An offline checkpoint needs no replay buffer (no --save-buffer here)."""
    stopped = stop_once(tmp_path, "run", "fino.pt", "--dataset-dir", data_dir, *TINY, *BUDGET, "--save-model")
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr_text[-3000:]
    step = saved_step(tmp_path / "runs" / "run")
    assert 500 < step < 1000, step  # stopped inside the offline phase, off the evaluation steps
    assert f"interrupted at step {step} by SIGTERM" in stopped.stdout_text
    assert not os.path.exists(tmp_path / "runs" / "run" / "buffer.pt")
    resumed = run_script(tmp_path, "fino.py", "--resume", "runs/run", "--dataset-dir", data_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(curves(str(tmp_path / "runs" / "run")), uninterrupted)


def test_stopped_online_and_resumed_ends_as_the_uninterrupted_run(tmp_path, data_dir, uninterrupted):
    """SIGTERM once the first online checkpoint (step 2000) exists: the run goes on to the next episode end (step
    3000, after the evaluation of 2500 and four beta updates), checkpoints there with the buffer's online part, and
    exits 143. The resume needs the buffer, beta, optimizer and every RNG, the env's included: its next reset draws
    from generators that the first online reset moved on (a stop at the first online episode end would not show)."""
    flags = ["--dataset-dir", data_dir, *TINY, *BUDGET, *SAVE]
    stopped = stop_once(tmp_path, "run", "buffer.pt", *flags, delay=0.3)  # buffer.pt: step 2000, just before fino.pt
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr_text[-3000:]
    run_dir = tmp_path / "runs" / "run"
    assert saved_step(run_dir) == 3000  # between episodes, not at the evaluation of step 2500
    buffer = torch.load(run_dir / "buffer.pt", weights_only=False)
    assert buffer["global_step"] == 3000 and buffer["buffer"]["added"] == 2000
    assert buffer["buffer"]["rows"]["observations"].shape[0] == 2000  # the online rows only
    resumed = run_script(tmp_path, "fino.py", "--resume", "runs/run", "--run-name", "run", "--dataset-dir", data_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(curves(str(run_dir)), uninterrupted)


def test_killed_and_resumed_run_ends_as_the_uninterrupted_run(tmp_path, data_dir, uninterrupted):
    """SIGKILL (no checkpoint on the way out) a while after the first online checkpoint: --resume continues from it,
    and the TensorBoard events the killed run wrote after it are purged, so the curves are the same."""
    process = start(tmp_path, "--run-name", "run", "--dataset-dir", data_dir, *TINY, *BUDGET, *SAVE)
    while not os.path.exists(tmp_path / "runs" / "run" / "buffer.pt"):  # written at step 2000, before fino.pt
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.02)
    time.sleep(0.5)  # it logs on past the checkpoint
    process.kill()
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert saved_step(tmp_path / "runs" / "run") == 2000
    resumed = run_script(tmp_path, "fino.py", "--resume", "runs/run", "--dataset-dir", data_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert curves(str(tmp_path / "runs" / "run")) == uninterrupted


def test_stop_signals_and_the_online_sps_clock(tmp_path, data_dir):
    """A SIGTERM after a Ctrl-C does not cancel the Ctrl-C's checkpoint (exit 130); without --save-model a stop
    request (SIGUSR2, Slurm's preemption) exits at once with 140. charts/SPS restarts its clock, with its 3-update
    burn-in, when the online phase begins: logged from step 5 offline and from step 15 online, not in between."""
    flags = ["--dataset-dir", data_dir, *TINY, *BUDGET]
    stopped = stop_once(tmp_path, "run", "fino.pt", *flags, *SAVE, signals=(signal.SIGINT, signal.SIGTERM))
    assert stopped.returncode == 128 + signal.SIGINT, stopped.stderr_text[-3000:]
    assert 500 < saved_step(tmp_path / "runs" / "run") < 1000
    process = start(tmp_path, "--run-name", "unsaved", *flags)
    while not os.path.exists(tmp_path / "runs" / "unsaved"):
        time.sleep(0.02)
    time.sleep(1.0)  # past the set-up
    process.send_signal(signal.SIGUSR2)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGUSR2, stderr[-3000:]
    assert "by SIGUSR2; no checkpoint" in stdout

    budget = ["--offline-steps", "10", "--online-steps", "10", "--eval-every", "100", "--log-every", "1"]
    done = run_script(tmp_path, "fino.py", "--run-name", "sps", "--dataset-dir", data_dir, *TINY, *budget)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [s for s, _ in scalars(str(tmp_path / "runs" / "sps"))["charts/SPS"]] == [*range(5, 11), *range(15, 21)]


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory, data_dir):
    """A finished tiny run (runs/ok, its last checkpoint online) and one that ended offline (runs/off), to copy
    and spoil."""
    cwd = tmp_path_factory.mktemp("finished")
    flags = ["--dataset-dir", data_dir, *TINY, "--offline-steps", "50", "--eval-every", "100", "--beta-update-every", "50"]
    for name, online_steps in (("ok", "50"), ("off", "0")):
        done = run_script(
            cwd, "fino.py", "--run-name", name, *flags, "--online-steps", online_steps, "--log-every", "50", *SAVE
        )
        assert done.returncode == 0, done.stderr[-3000:]
    return cwd / "runs"


BAD_RESUMES = [
    ("missing folder", ["--resume", "runs/nope"], "no checkpoint at 'runs/nope/fino.pt'"),
    ("no checkpoint", ["--resume", "runs/ok"], "no checkpoint at 'runs/ok/fino.pt'"),
    ("not a checkpoint", ["--resume", "runs/ok"], "'runs/ok/fino.pt' is not a checkpoint ("),
    ("another script's", ["--resume", "runs/ok"], "'runs/ok/fino.pt' is not a checkpoint of fino.py"),
    ("other network sizes", ["--resume", "runs/ok"], "holds networks of another size (--hidden-dim/--num-layers"),
    ("older checkpoint", ["--resume", "runs/ok"], "'runs/ok/fino.pt' cannot be resumed: it lacks rng"),
    ("flags of another version", ["--resume", "runs/ok"], "holds flags of another version of fino.py"),
    ("no buffer", ["--resume", "runs/ok"], "no replay buffer 'runs/ok/buffer.pt'; run with --save-model --save-buffer"),
    ("buffer of another step", ["--resume", "runs/ok"], "'runs/ok/buffer.pt' is of step 80, the checkpoint of step 100"),
    ("buffer of another size", ["--resume", "runs/ok"], "'runs/ok/buffer.pt' does not fit this run's replay buffer"),
    ("flag differs", ["--resume", "runs/ok", "--hidden-dim", "32"], "flag --hidden-dim differs from the run's (32 vs 16)"),
    ("resolved flag differs", ["--resume", "runs/ok", "--eta", "0"], "flag --eta differs from the run's (0.0 vs 0.1)"),
    (
        "bool flag differs",
        ["--resume", "runs/ok", "--no-save-buffer"],
        "flag --save-buffer differs from the run's (False vs True)",
    ),
    ("other run name", ["--resume", "runs/ok", "--run-name", "other"], "--run-name other does not name the resumed folder"),
    ("buffer without model", ["--save-buffer"], "--save-buffer needs --save-model"),
    ("run name with a slash", ["--run-name", "a/b"], "--run-name must be a folder name under runs/"),
]


@pytest.mark.parametrize("how, flags, message", BAD_RESUMES, ids=[how for how, _, _ in BAD_RESUMES])
def test_bad_resume_ends_with_one_error_line(tmp_path, data_dir, finished_runs, how, flags, message):
    shutil.copytree(finished_runs / "ok", tmp_path / "runs" / "ok")
    spoil_run(tmp_path / "runs" / "ok", "fino.py", how)
    assert_one_line_error(run_script(tmp_path, "fino.py", *flags, "--dataset-dir", data_dir), message)


def test_resume_accepts_the_runs_own_flags_and_an_offline_checkpoint_needs_no_buffer(tmp_path, data_dir, finished_runs):
    """The sweep's call: --run-name naming the folder, flags equal to the run's (given or resolved), --no-cuda (free)
    next to --resume; a finished run resumes to nothing and exits 0. An offline checkpoint resumes without buffer.pt."""
    shutil.copytree(finished_runs / "ok", tmp_path / "runs" / "ok")
    flags = ["--run-name", "ok", "--hidden-dim", "16", "--eta", "0.1", "--no-cuda", "--dataset-dir", data_dir]
    done = run_script(tmp_path, "fino.py", "--resume", "runs/ok", *flags)
    assert done.returncode == 0, done.stderr[-3000:]
    shutil.copytree(finished_runs / "off", tmp_path / "runs" / "off")
    assert not os.path.exists(tmp_path / "runs" / "off" / "buffer.pt")  # offline checkpoints write none
    done = run_script(tmp_path, "fino.py", "--resume", "runs/off", "--dataset-dir", data_dir)
    assert done.returncode == 0, done.stderr[-3000:]


def test_restored_env_generators_draw_the_same_reset():
    """The training env's generators, restored after a fresh seeding (as --resume does), draw the reset the run would
    have drawn: Gymnasium-Robotics' AntMaze (D4RL antmaze's env) draws its start and goal noise from its own. The
    pointmaze fixture cannot show this: OGBench's maze takes its noise from numpy's global RNG and zeroes velocities."""
    gymnasium_robotics = pytest.importorskip("gymnasium_robotics")
    gym.register_envs(gymnasium_robotics)
    env = gym.wrappers.RecordEpisodeStatistics(gym.make("AntMaze_UMaze-v5"))
    env.reset(seed=1)
    env.reset()  # every generator has moved on from its seed
    generators = lambda: [env.unwrapped.np_random, env.action_space.np_random]  # reseeding replaces them
    states = rng_states(generators())
    expected, _ = env.reset()
    env.reset(seed=1)
    rng_states(generators(), states)
    obs, _ = env.reset()
    assert all(np.array_equal(obs[key], expected[key]) for key in expected)
    env.close()


@pytest.mark.parametrize("adds", [0, 1, 2, 3, 9, 16])
def test_buffer_state_restores_the_online_rows_and_position_after_the_fifo_wrapped(adds):
    """The replay buffer's saved state (online rows and their count) put back on a freshly filled buffer gives the
    same storage, size and position, also once the FIFO has overwritten dataset rows and wrapped more than once."""

    buffer = ReplayBuffer(FiveRows(), capacity=7, device=torch.device("cpu"))
    for i in range(adds):
        buffer.add(np.array([10.0 + i]), np.full(2, i), float(i), np.array([11.0 + i]), 0.0)
    state = buffer.state_dict()
    assert len(state["rows"]["masks"]) == min(adds, 7)  # the online rows only
    restored = ReplayBuffer(FiveRows(), capacity=7, device=torch.device("cpu"))
    restored.load_state_dict(state)
    assert (restored.size, restored.pos, restored.added) == (buffer.size, buffer.pos, buffer.added)
    assert all(torch.equal(restored.storage[key], buffer.storage[key]) for key in ReplayBuffer.KEYS)
