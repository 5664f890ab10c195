"""fmer.py --resume: a run stopped by a signal and resumed ends exactly as the same run uninterrupted; checkpointing
itself changes nothing; bad resume inputs end in one `error:` line. CPU, tiny networks, Pendulum-v1: 200-step
episodes and evaluations every 300 steps, so checkpoints (at the first episode end at or after an evaluation) fall
at 400, 600, 1000, 1200 and 1400, and a checkpoint taken mid-episode (at the evaluation) would show."""

import io
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import gymnasium as gym
import numpy as np
import pytest
import torch

import fmer
from tests.conftest import ROOT, assert_one_line_error, run_script, scalars, spoil_run

TINY = ["--env-id", "Pendulum-v1", "--hidden-dim", "16", "--num-layers", "2", "--batch-size", "32", "--log-every", "20"]
TINY += ["--num-candidates", "4", "--flow-steps", "3", "--total-timesteps", "1400", "--eval-every", "300"]
# evaluations (3 episodes) slow the warm-up down enough that a stop sent after the first checkpoint (step 400)
# lands at step 600 or 800: after the warm-up with 64 warm-up steps, inside it with 1000
SCENARIOS = {"stop_after_warmup": ["--learning-starts", "64"], "stop_in_warmup": ["--learning-starts", "1000"]}
EVAL = ["--eval-episodes", "3"]
SAVE = ["--save-model", "--save-buffer"]


def curves(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar but the wall-clock SPS."""
    return {tag: points for tag, points in scalars(run_dir).items() if tag != "charts/SPS"}


def start(cwd, *flags: str) -> subprocess.Popen:
    command = [sys.executable, os.path.join(ROOT, "fmer.py"), *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def stop_after_first_checkpoint(cwd, name: str, *flags: str, signals=(signal.SIGTERM,)) -> subprocess.Popen:
    """Start a --save-model run named `name`, send `signals` once its first checkpoint exists, wait for its exit."""
    process = start(cwd, "--run-name", name, *flags)
    checkpoint = os.path.join(cwd, "runs", name, "fmer.pt")
    while not os.path.exists(checkpoint):  # written atomically: it exists only whole
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.02)
    for signum in signals:
        process.send_signal(signum)
        time.sleep(0.1)  # handled one by one
    process.stdout_text, process.stderr_text = process.communicate(timeout=600)
    return process


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The uninterrupted runs of each scenario (no checkpoints), computed once: name -> curves."""
    cwd = tmp_path_factory.mktemp("uninterrupted")
    result = {}
    for name, flags in SCENARIOS.items():
        done = run_script(cwd, "fmer.py", "--run-name", name, *TINY, *flags, *EVAL)
        assert done.returncode == 0, done.stderr[-3000:]
        result[name] = curves(os.path.join(cwd, "runs", name))
    return result


def test_checkpointing_does_not_change_the_run(tmp_path, uninterrupted):
    """--save-model --save-buffer (checkpoints at every evaluation, at episode ends) logs exactly what the run
    without checkpoints logs: saving reads the RNG states, it never draws from them."""
    done = run_script(tmp_path, "fmer.py", "--run-name", "saved", *TINY, *SCENARIOS["stop_after_warmup"], *EVAL, *SAVE)
    assert done.returncode == 0, done.stderr[-3000:]
    logged = curves(str(tmp_path / "runs" / "saved"))
    assert "losses/qf_loss" in logged and len(logged["eval/episodic_return"]) == 5
    assert logged == uninterrupted["stop_after_warmup"]
    checkpoint = torch.load(tmp_path / "runs" / "saved" / "fmer.pt", weights_only=False)
    assert checkpoint["global_step"] == 1400 and {"rng", "actor_schedule", "log_alpha", "beta_optimizer"} <= set(checkpoint)
    buffer = torch.load(tmp_path / "runs" / "saved" / "buffer.pt", weights_only=False)
    assert buffer["global_step"] == 1400 and buffer["replay"].shape == (1400, 2 * 3 + 1 + 2)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_stopped_and_resumed_run_ends_as_the_uninterrupted_one(tmp_path, uninterrupted, scenario):
    """SIGTERM once the first checkpoint exists: the run checkpoints at the next episode end and exits 143; --resume
    continues it to the same final losses and evaluation returns (and the same curves: events the stopped run wrote
    after its checkpoint are purged)."""
    stopped = stop_after_first_checkpoint(tmp_path, "run", *TINY, *SCENARIOS[scenario], *EVAL, *SAVE)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr_text[-3000:]
    stop_step = torch.load(tmp_path / "runs" / "run" / "fmer.pt", weights_only=False)["global_step"]
    assert f"interrupted at step {stop_step} by SIGTERM" in stopped.stdout_text
    assert 600 <= stop_step < 1400 and stop_step % 200 == 0  # between episodes, after the first checkpoint
    if scenario == "stop_in_warmup":  # the action space's RNG draws the rest of the warm-up
        assert stop_step < 1000
    resumed = run_script(tmp_path, "fmer.py", "--resume", "runs/run")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    logged, expected = curves(str(tmp_path / "runs" / "run")), uninterrupted[scenario]
    for tag in expected:
        if tag.startswith(("losses/", "eval/")):
            assert logged[tag][-1] == expected[tag][-1], tag  # the final values, exactly
    assert logged == expected


def test_kitchen_resume_restores_the_robots_observation_noise(tmp_path):
    """FrankaKitchen-v1 draws observation noise at every step from its inner robot env's generator: a resumed run
    (280-step episodes) still ends as the uninterrupted one."""
    flags = [
        *TINY,
        "--env-id",
        "FrankaKitchen-v1",
        "--learning-starts",
        "64",
        "--total-timesteps",
        "1200",
        "--eval-episodes",
        "1",
    ]
    done = run_script(tmp_path, "fmer.py", "--run-name", "whole", *flags)
    assert done.returncode == 0, done.stderr[-3000:]
    stopped = stop_after_first_checkpoint(tmp_path, "run", *flags, *SAVE)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr_text[-3000:]
    resumed = run_script(tmp_path, "fmer.py", "--resume", "runs/run")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    logged, expected = curves(str(tmp_path / "runs" / "run")), curves(str(tmp_path / "runs" / "whole"))
    assert "eval/success_rate" in expected and logged == expected


def test_killed_and_resumed_run_ends_as_the_uninterrupted_one(tmp_path, uninterrupted):
    """SIGKILL (no checkpoint on the way out) a while after the first checkpoint: --resume continues from the last
    checkpoint, and the TensorBoard events the killed run wrote after it are purged, so the curves are the same."""
    process = start(tmp_path, "--run-name", "run", *TINY, *SCENARIOS["stop_after_warmup"], *EVAL, *SAVE)
    while not os.path.exists(tmp_path / "runs" / "run" / "fmer.pt"):
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.02)
    time.sleep(1.0)  # it logs on past the checkpoint
    process.kill()
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    resumed = run_script(tmp_path, "fmer.py", "--resume", "runs/run")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert curves(str(tmp_path / "runs" / "run")) == uninterrupted["stop_after_warmup"]


def test_stop_signals(tmp_path):
    """A SIGTERM after a Ctrl-C does not cancel the Ctrl-C's checkpoint (exit 130); a second Ctrl-C exits at once,
    without a checkpoint; without --save-model a stop request (SIGUSR2, Slurm's preemption) exits at once with 140."""
    stopped = stop_after_first_checkpoint(
        tmp_path, "run", *TINY, "--learning-starts", "64", *SAVE, signals=(signal.SIGINT, signal.SIGTERM)
    )
    assert stopped.returncode == 128 + signal.SIGINT, stopped.stderr_text[-3000:]
    assert torch.load(tmp_path / "runs" / "run" / "fmer.pt", weights_only=False)["global_step"] >= 600
    twice = stop_after_first_checkpoint(
        tmp_path, "twice", *TINY, "--learning-starts", "64", *SAVE, signals=(signal.SIGINT,) * 2
    )
    assert twice.returncode == 128 + signal.SIGINT and "no checkpoint written" in twice.stdout_text
    assert torch.load(tmp_path / "runs" / "twice" / "fmer.pt", weights_only=False)["global_step"] == 400  # the first
    process = start(tmp_path, "--run-name", "unsaved", *TINY, "--learning-starts", "64", "--total-timesteps", "100000")
    while not os.path.exists(tmp_path / "runs" / "unsaved"):
        time.sleep(0.02)
    time.sleep(1.0)  # past the set-up
    process.send_signal(signal.SIGUSR2)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGUSR2, stderr[-3000:]
    assert "by SIGUSR2; no checkpoint" in stdout


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished tiny run with its checkpoint and buffer (runs/ok), to copy and spoil."""
    cwd = tmp_path_factory.mktemp("finished")
    flags = [*TINY, "--learning-starts", "64", "--total-timesteps", "100", "--eval-every", "100", "--eval-episodes", "1"]
    done = run_script(cwd, "fmer.py", "--run-name", "ok", *flags, *SAVE)
    assert done.returncode == 0, done.stderr[-3000:]
    return cwd / "runs" / "ok"


BAD_RESUMES = [
    ("missing folder", ["--resume", "runs/nope"], "no checkpoint at 'runs/nope/fmer.pt'"),
    ("no checkpoint", ["--resume", "runs/ok"], "no checkpoint at 'runs/ok/fmer.pt'"),
    ("not a checkpoint", ["--resume", "runs/ok"], "'runs/ok/fmer.pt' is not a checkpoint ("),
    ("another script's", ["--resume", "runs/ok"], "'runs/ok/fmer.pt' is not a checkpoint of fmer.py"),
    ("other network sizes", ["--resume", "runs/ok"], "holds networks of another size (--hidden-dim/--num-layers"),
    ("older checkpoint", ["--resume", "runs/ok"], "'runs/ok/fmer.pt' cannot be resumed: it lacks rng"),
    ("flags of another version", ["--resume", "runs/ok"], "holds flags of another version of fmer.py"),
    ("no buffer", ["--resume", "runs/ok"], "no replay buffer 'runs/ok/buffer.pt'; run with --save-model --save-buffer"),
    ("buffer of another step", ["--resume", "runs/ok"], "'runs/ok/buffer.pt' is of step 80, the checkpoint of step 100"),
    ("flag differs", ["--resume", "runs/ok", "--hidden-dim", "32"], "flag --hidden-dim differs from the run's (32 vs 16)"),
    ("bool flag differs", ["--resume", "runs/ok", "--no-autotune"], "flag --autotune differs from the run's (False vs True)"),
    ("other run name", ["--resume", "runs/ok", "--run-name", "other"], "--run-name other does not name the resumed folder"),
    ("buffer without model", ["--save-buffer"], "--save-buffer needs --save-model"),
    ("run name with a slash", ["--run-name", "a/b"], "--run-name must be a folder name under runs/"),
]


@pytest.mark.parametrize("how, flags, message", BAD_RESUMES, ids=[how for how, _, _ in BAD_RESUMES])
def test_bad_resume_ends_with_one_error_line(tmp_path, finished_run, how, flags, message):
    shutil.copytree(finished_run, tmp_path / "runs" / "ok")
    spoil_run(tmp_path / "runs" / "ok", "fmer.py", how)
    assert_one_line_error(run_script(tmp_path, "fmer.py", *flags), message)


def test_resume_accepts_the_runs_own_flags(tmp_path, finished_run):
    """The sweep's call: --run-name naming the folder, flags equal to the run's, --no-cuda (free) next to --resume."""
    shutil.copytree(finished_run, tmp_path / "runs" / "ok")
    done = run_script(tmp_path, "fmer.py", "--resume", "runs/ok", "--run-name", "ok", "--hidden-dim", "16", "--no-cuda")
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("saved_fast", [False, True], ids=["eager_to_compile", "compile_to_eager"])
def test_resume_keeps_the_new_runs_optimizer_settings(saved_fast):
    """--compile may change at a resume: the optimizers keep the new run's LR type (a tensor on the speed paths,
    which the LR schedule then fills in place) and foreach setting, with the run's LR value and Adam moments."""

    def agent(fast: bool) -> dict:
        args = fmer.Args(compile=fast, hidden_dim=8, num_layers=1, batch_size=8, learning_starts=8, total_timesteps=20)
        return fmer.make_agent(args, 3, 2, torch.device("cpu"))

    saved = agent(saved_fast)
    saved["actor"](torch.randn(4, 3), torch.randn(4, 2), torch.rand(4, 1)).sum().backward()
    saved["actor_optimizer"].step()
    for _ in range(5):
        saved["actor_schedule"].step()
    file = io.BytesIO()
    torch.save({k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in saved.items()} | {"global_step": 5}, file)
    file.seek(0)
    restored = agent(not saved_fast)
    fmer.restore(torch.load(file, weights_only=False), restored, "fmer.pt")
    group, saved_group = restored["actor_optimizer"].param_groups[0], saved["actor_optimizer"].param_groups[0]
    new_fast = not saved_fast
    assert isinstance(group["lr"], torch.Tensor) == new_fast and group["foreach"] == (False if new_fast else None)
    assert float(group["lr"]) == pytest.approx(float(saved_group["lr"]), rel=1e-6)
    moments = [state["exp_avg"] for agent_ in (restored, saved) for state in agent_["actor_optimizer"].state.values()]
    assert torch.equal(moments[0], moments[len(moments) // 2])
    restored["actor_schedule"].step()
    saved["actor_schedule"].step()
    assert float(group["lr"]) == pytest.approx(float(saved_group["lr"]), rel=1e-6)  # the schedule goes on


def test_restored_rng_states_draw_the_same_numbers_from_every_stream():
    """torch, numpy, python and the env's generators, restored after a reseeding (as --resume does), draw again what
    they drew right after being read."""
    env = gym.make("Pendulum-v1")
    env.reset(seed=3)
    generators = lambda: [env.unwrapped.np_random, env.action_space.np_random]  # reseeding replaces them
    states = fmer.rng_states(generators())
    draws = lambda: (torch.rand(3), np.random.rand(3), random.random(), env.reset()[0], env.action_space.sample())
    expected = draws()
    torch.manual_seed(1), np.random.seed(1), random.seed(1), env.reset(seed=1), env.action_space.seed(1)
    fmer.rng_states(generators(), states)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(draws(), expected))
