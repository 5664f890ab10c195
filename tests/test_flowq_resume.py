"""flowq.py --resume: a run stopped by SIGTERM (or killed) and resumed ends exactly as the same run uninterrupted
(every losses/* and eval/* value, and every curve but SPS); checkpointing changes nothing; stop signals exit with
128 + the signal number; bad resume inputs end in one `error:` line. CPU, tiny networks, --schedule learned (so
h_theta and its optimizer are part of the state), a tiny D4RL-layout Hopper file."""

import copy
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from flowq import restore, rng_states
from tests.conftest import ROOT, assert_one_line_error, run_script, scalars, spoil_run
from tests.fixtures import write_d4rl_file

TINY = ["--env-id", "Hopper-v5", "--hidden-dim", "16", "--num-layers", "2", "--batch-size", "32", "--flow-steps", "3"]
TINY += ["--schedule", "learned", "--eval-episodes", "1", "--log-every", "50", "--no-cuda"]
BUDGET = ["--total-steps", "1500", "--eval-every", "250"]  # checkpoints at 250, 500, ..., 1500


def curves(run_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar but the wall-clock SPS."""
    return {tag: points for tag, points in scalars(str(run_dir)).items() if tag != "charts/SPS"}


def saved_step(run_dir) -> int:
    return torch.load(os.path.join(run_dir, "flowq.pt"), weights_only=False)["global_step"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("data") / "tiny.npz")
    write_d4rl_file(path, "Hopper-v5", num_episodes=4, max_steps=30)
    return ["--dataset", path, *TINY]


def start(cwd, *flags: str) -> subprocess.Popen:
    command = [sys.executable, os.path.join(ROOT, "flowq.py"), *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for_checkpoint(cwd, name: str, process: subprocess.Popen) -> None:
    """Until runs/name/flowq.pt exists (written atomically: it exists only whole), with the run still running."""
    while not os.path.exists(os.path.join(cwd, "runs", name, "flowq.pt")):
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.02)
    assert process.poll() is None  # still running: the signal below reaches the training loop


def stop_once(cwd, name: str, *flags: str, signals=(signal.SIGTERM,)) -> subprocess.Popen:
    """Start a run named `name`, send `signals` once its first checkpoint exists, wait for its exit."""
    process = start(cwd, "--run-name", name, *flags)
    wait_for_checkpoint(cwd, name, process)
    for signum in signals:
        process.send_signal(signum)
    process.stdout_text, process.stderr_text = process.communicate(timeout=600)
    return process


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, dataset):
    """The uninterrupted run's curves, without and with --save-model."""
    cwd = tmp_path_factory.mktemp("uninterrupted")
    logged = {}
    for name, save in (("plain", []), ("saved", ["--save-model"])):
        done = run_script(cwd, "flowq.py", "--run-name", name, *dataset, *BUDGET, *save)
        assert done.returncode == 0, done.stderr[-3000:]
        logged[name] = curves(cwd / "runs" / name)
    return logged


def assert_same_run(logged: dict, expected: dict) -> None:
    """The final value of every loss and evaluation, exactly; then the whole curves (so nothing is missing or left
    over from the stopped run)."""
    final_tags = [tag for tag in expected if tag.startswith(("losses/", "eval/"))]
    assert len(final_tags) == 8 and {"losses/schedule_loss", "eval/episodic_return"} <= set(final_tags)
    for tag in final_tags:
        assert logged[tag][-1] == expected[tag][-1], tag
    assert logged == expected


def test_checkpointing_does_not_change_the_run(uninterrupted):
    assert uninterrupted["saved"] == uninterrupted["plain"]
    assert [s for s, _ in uninterrupted["plain"]["eval/episodic_return"]] == [250, 500, 750, 1000, 1250, 1500]


def test_stopped_and_resumed_run_ends_as_the_uninterrupted_run(tmp_path, dataset, uninterrupted):
    """SIGTERM once the first checkpoint (step 250) exists: the run checkpoints at the next step and exits 143; the
    resume (with the sweep's --run-name next to it) needs the networks, the target critic, h_theta, both optimizers
    and the torch RNG."""
    stopped = stop_once(tmp_path, "run", *dataset, *BUDGET, "--save-model")
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr_text[-3000:]
    step = saved_step(tmp_path / "runs" / "run")
    assert 250 < step < 1500, step
    assert f"interrupted at step {step} by SIGTERM; checkpoint of step {step}" in stopped.stdout_text
    resumed = run_script(tmp_path, "flowq.py", "--resume", "runs/run", "--run-name", "run", *dataset)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(curves(tmp_path / "runs" / "run"), uninterrupted["plain"])


def test_killed_run_resumes_from_its_last_checkpoint_and_drops_later_events(tmp_path, dataset, uninterrupted):
    """SIGKILL (no checkpoint on the way out) a while after the first checkpoint: --resume continues from the last
    one, and the TensorBoard events the killed run wrote after it are purged, so the curves are the same."""
    process = start(tmp_path, "--run-name", "run", *dataset, *BUDGET, "--save-model")
    wait_for_checkpoint(tmp_path, "run", process)
    time.sleep(0.5)  # it logs on past the checkpoint
    process.kill()
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert saved_step(tmp_path / "runs" / "run") in (250, 500, 750, 1000, 1250)
    resumed = run_script(tmp_path, "flowq.py", "--resume", "runs/run", *dataset)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert curves(tmp_path / "runs" / "run") == uninterrupted["plain"]


def test_stop_signals(tmp_path, dataset):
    """A SIGTERM after a Ctrl-C does not cancel the Ctrl-C's checkpoint (exit 130); without --save-model a stop
    request (SIGUSR2, Slurm's preemption) exits at the next step with 140 and writes no checkpoint."""
    stopped = stop_once(tmp_path, "run", *dataset, *BUDGET, "--save-model", signals=(signal.SIGINT, signal.SIGTERM))
    assert stopped.returncode == 128 + signal.SIGINT, stopped.stderr_text[-3000:]
    assert 250 < saved_step(tmp_path / "runs" / "run") < 1500
    assert "by SIGINT; checkpoint of step" in stopped.stdout_text
    process = start(tmp_path, "--run-name", "unsaved", *dataset, "--total-steps", "100000")
    while not os.path.exists(tmp_path / "runs" / "unsaved"):
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.02)
    process.send_signal(signal.SIGUSR2)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGUSR2, stderr[-3000:]
    assert "by SIGUSR2; no checkpoint" in stdout
    assert not os.path.exists(tmp_path / "runs" / "unsaved" / "flowq.pt")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, dataset):
    """A finished tiny run with its checkpoint (runs/ok), to copy and spoil."""
    cwd = tmp_path_factory.mktemp("finished")
    done = run_script(
        cwd, "flowq.py", "--run-name", "ok", *dataset, "--total-steps", "20", "--eval-every", "20", "--save-model"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return cwd / "runs" / "ok"


BAD_RESUMES = [
    ("missing folder", ["--resume", "runs/nope"], "no checkpoint at 'runs/nope/flowq.pt'"),
    ("no checkpoint", ["--resume", "runs/ok"], "no checkpoint at 'runs/ok/flowq.pt'"),
    ("not a checkpoint", ["--resume", "runs/ok"], "'runs/ok/flowq.pt' is not a checkpoint ("),
    ("another script's", ["--resume", "runs/ok"], "'runs/ok/flowq.pt' is not a checkpoint of flowq.py"),
    ("other network sizes", ["--resume", "runs/ok"], "holds networks of another size (--hidden-dim/--num-layers"),
    ("older checkpoint", ["--resume", "runs/ok"], "'runs/ok/flowq.pt' cannot be resumed: it lacks rng"),
    ("flags of another version", ["--resume", "runs/ok"], "holds flags of another version of flowq.py"),
    ("flag differs", ["--resume", "runs/ok", "--hidden-dim", "32"], "flag --hidden-dim differs from the run's (32 vs 16)"),
    (
        "resolved flag differs",
        ["--resume", "runs/ok", "--expectile", "0.9"],
        "flag --expectile differs from the run's (0.9 vs 0.7)",
    ),
    (
        "bool flag differs",
        ["--resume", "runs/ok", "--no-save-model"],
        "flag --save-model differs from the run's (False vs True)",
    ),
    ("other run name", ["--resume", "runs/ok", "--run-name", "other"], "--run-name other does not name the resumed folder"),
    ("run name with a slash", ["--run-name", "a/b"], "--run-name must be a folder name under runs/"),
]


@pytest.mark.parametrize("how, flags, message", BAD_RESUMES, ids=[how for how, _, _ in BAD_RESUMES])
def test_bad_resume_ends_with_one_error_line(tmp_path, finished_run, how, flags, message):
    """Only the flags of the table: the rest of a resumed run's flags come from its checkpoint."""
    shutil.copytree(finished_run, tmp_path / "runs" / "ok")
    spoil_run(tmp_path / "runs" / "ok", "flowq.py", how)
    assert_one_line_error(run_script(tmp_path, "flowq.py", *flags), message)


def test_resume_accepts_the_runs_own_flags(tmp_path, dataset, finished_run):
    """The sweep's call: --run-name naming the folder, flags equal to the run's (given or resolved), --no-cuda and
    --compile (free) next to --resume; a finished run resumes to nothing, writes nothing and exits 0."""
    shutil.copytree(finished_run, tmp_path / "runs" / "ok")
    before = {name: os.path.getmtime(tmp_path / "runs" / "ok" / name) for name in os.listdir(tmp_path / "runs" / "ok")}
    flags = ["--run-name", "ok", "--hidden-dim", "16", "--expectile", "0.7", "--save-model", "--compile"]
    done = run_script(tmp_path, "flowq.py", "--resume", "runs/ok", *flags, *dataset)
    assert done.returncode == 0, done.stderr[-3000:]
    assert os.path.getmtime(tmp_path / "runs" / "ok" / "flowq.pt") == before["flowq.pt"]
    assert saved_step(tmp_path / "runs" / "ok") == 20


def test_a_resume_keeps_the_new_runs_optimizer_settings():
    """A checkpoint of a --cudagraphs run (capturable Adam, written on CUDA) resumes in a run without --cudagraphs:
    the loaded optimizer keeps this run's capturable and foreach, and takes the run's moments and step, so its next
    step is the one the saved optimizer would take (a capturable Adam cannot step on the CPU)."""
    torch.manual_seed(0)
    saved_param = torch.nn.Parameter(torch.randn(5))
    saved = torch.optim.Adam([saved_param], lr=0.1)
    for _ in range(3):
        saved.zero_grad()
        saved_param.pow(3).sum().backward()
        saved.step()
    state = copy.deepcopy(saved.state_dict())
    state["param_groups"][0].update(capturable=True, foreach=True)  # as a --cudagraphs run saves it
    param = torch.nn.Parameter(saved_param.detach().clone())
    optimizer = torch.optim.Adam([param], lr=0.1, foreach=False)
    restore({"optimizer": state, "global_step": 0}, {"optimizer": optimizer}, "flowq.pt")
    assert optimizer.param_groups[0]["capturable"] is False and optimizer.param_groups[0]["foreach"] is False
    for p, opt in ((saved_param, saved), (param, optimizer)):
        opt.zero_grad()
        p.pow(3).sum().backward()
        opt.step()
    assert torch.equal(param, saved_param)


def test_restored_rng_states_draw_the_same_numbers_from_every_stream():
    """torch, numpy and python, restored after a reseeding (as --resume does), draw again what they drew right after
    being read."""
    states = rng_states()
    draws = lambda: (torch.rand(3), np.random.rand(3), random.random())
    expected = draws()
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    rng_states((), states)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(draws(), expected))
