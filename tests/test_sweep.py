"""scripts/sweep.py with tests/sweep_stub.py as the training script: runs end in DONE, reruns skip them, killed runs
resume from their checkpoints, submitit's checkpoint() stops the script and requeues a resuming run."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import ROOT, assert_one_line_error, run_script

submitit = pytest.importorskip("submitit", reason="pip install -r requirements.txt (submitit)")
from scripts import sweep  # noqa: E402

STUB = "tests/sweep_stub.py"


@pytest.fixture
def stub(monkeypatch):
    """The stub is an online script taking --env-id; submitit's job processes import scripts.sweep from ROOT."""
    monkeypatch.setitem(sweep.SCRIPTS, STUB, sweep.Script("--env-id", True))
    monkeypatch.setenv("PYTHONPATH", ROOT)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def progress(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "progress.jsonl")) as f:
        return [json.loads(line) for line in f]


def wait_for(condition, timeout=30.0):
    end = time.time() + timeout
    while not condition():
        assert time.time() < end, "timed out"
        time.sleep(0.05)


def checkpoint_step(run_dir):
    try:
        with open(os.path.join(run_dir, "sweep_stub.pt")) as f:
            return json.load(f)["step"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def test_grid_runs_to_done_and_a_rerun_skips_every_run(stub, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # local jobs see the GPUs the sweep sees
    runs = tmp_path / "runs"
    argv = ["--script", STUB, "--tasks", "Hopper-v5", "D4RL/door/human-v2", "--seeds", "1", "2"]
    argv += ["--runs-dir", str(runs), "--jobs-in-flight", "4", "--", "--total-steps", "7"]
    assert sweep.main(argv) == 0
    names = [f"{task}__sweep_stub__{seed}__sweep" for task in ("Hopper-v5", "D4RL-door-human-v2") for seed in (1, 2)]
    assert sorted(os.listdir(runs)) == sorted(names + [".submitit"])
    for name in names:
        task, _, seed, _ = name.split("__")
        assert (runs / name / "DONE").exists()
        (start, end) = progress(runs / name)
        assert start["start"] == 0 and end["end"] == 7 and start["cuda"] == "0,1"
        flags = start["argv"]
        assert flags[flags.index("--run-name") + 1] == name and flags[flags.index("--seed") + 1] == seed
        assert flags[flags.index("--env-id") + 1] == ("Hopper-v5" if task == "Hopper-v5" else "D4RL/door/human-v2")
        assert "--save-model" in flags and "--save-buffer" in flags and "--resume" not in flags
        assert flags[-2:] == ["--total-steps", "7"]
    out = capsys.readouterr().out
    assert all(f"done    {name}" in out for name in names) and "4 done, 0 failed, 0 skipped" in out

    assert sweep.main(argv) == 0  # rerun: nothing runs again
    out = capsys.readouterr().out
    assert all(f"skip    {name} (DONE)" in out for name in names) and "0 done, 0 failed, 4 skipped" in out
    assert all(len(progress(runs / name)) == 2 for name in names)


def test_a_killed_run_leaves_a_checkpoint_and_a_rerun_resumes_it(stub, tmp_path, capsys):
    run_dir = tmp_path / "runs" / "Hopper-v5__sweep_stub__3__sweep"
    argv = ["--script", STUB, "--tasks", "Hopper-v5", "--seeds", "3", "--runs-dir", str(tmp_path / "runs")]
    argv += ["--", "--total-steps", "300", "--step-time", "0.01"]
    result = []
    first = threading.Thread(target=lambda: result.append(sweep.main(argv)))
    first.start()
    wait_for(lambda: checkpoint_step(run_dir) >= 10)
    os.kill(progress(run_dir)[0]["pid"], signal.SIGTERM)  # as Ctrl-C or a cluster's kill would
    first.join(60)
    assert result == [1] and not (run_dir / "DONE").exists()
    assert "(exit 143); log: " in capsys.readouterr().out
    stopped = progress(run_dir)[-1]["interrupted"]
    assert checkpoint_step(run_dir) == stopped > 0

    assert sweep.main(argv) == 0
    assert f"(resumes from runs/{run_dir.name}/sweep_stub.pt)" in capsys.readouterr().out
    start, end = progress(run_dir)[-2:]
    assert start["start"] == stopped and end["end"] == 300
    assert start["argv"][-2:] == ["--resume", f"runs/{run_dir.name}"]
    assert (run_dir / "DONE").exists()


def test_checkpoint_stops_the_script_and_requeues_a_run_that_resumes(stub, tmp_path):
    args = sweep.Args(script=STUB, tasks=["Walker2d-v5"], seeds=[1], runs_dir=str(tmp_path / "runs"))
    (run,) = sweep.plan(args, ["--total-steps", "300", "--step-time", "0.01"])
    status = []
    job = threading.Thread(target=lambda: status.append(run()))
    job.start()
    wait_for(lambda: checkpoint_step(run.run_dir) >= 10)
    delayed = run.checkpoint()  # what submitit calls on preemption or before the time limit
    job.join(60)
    assert status == [128 + signal.SIGTERM]  # the script was stopped by SIGTERM (not left to finish)
    stopped = progress(run.run_dir)[-1]
    assert stopped["signal"] == signal.SIGTERM and checkpoint_step(run.run_dir) == stopped["interrupted"]
    assert not os.path.exists(os.path.join(run.run_dir, "DONE"))

    assert isinstance(delayed, submitit.helpers.DelayedSubmission) and isinstance(delayed.function, sweep.Run)
    delayed.dump(tmp_path / "requeued.pkl")  # submitit pickles it for the requeued job, which loads and runs it
    requeued = submitit.helpers.DelayedSubmission.load(tmp_path / "requeued.pkl")
    assert requeued.function.name == run.name and requeued.function.command == run.command
    assert requeued.result() == 0
    start, end = progress(run.run_dir)[-2:]
    assert start["start"] == stopped["interrupted"] > 0 and end["end"] == 300
    assert os.path.exists(os.path.join(run.run_dir, "DONE"))


def test_a_job_at_its_time_limit_is_requeued_and_resumes(stub, tmp_path, capsys):
    """The local executor signals the job 6 s into its 1-minute limit (--signal-delay-s 54): submitit calls
    checkpoint(), which stops the script, and requeues the run (each time it is signaled), which resumes and ends."""
    run_dir = tmp_path / "runs" / "Ant-v5__sweep_stub__1__sweep"
    argv = ["--script", STUB, "--tasks", "Ant-v5", "--runs-dir", str(tmp_path / "runs"), "--time-min", "1"]
    argv += ["--signal-delay-s", "54", "--", "--total-steps", "800", "--step-time", "0.01"]
    assert sweep.main(argv) == 0, capsys.readouterr().out
    starts = [entry for entry in progress(run_dir) if "start" in entry]
    interrupted = [entry for entry in progress(run_dir) if "interrupted" in entry]
    assert len(starts) >= 2 and starts[0]["start"] == 0 and starts[1]["start"] == interrupted[0]["interrupted"] > 0
    assert interrupted[0]["signal"] == signal.SIGTERM and progress(run_dir)[-1]["end"] == 800
    assert (run_dir / "DONE").exists()


def test_failing_runs_are_reported_with_their_logs_and_run_one_at_a_time_locally(stub, tmp_path, capsys):
    runs = tmp_path / "runs"
    argv = ["--script", STUB, "--tasks", "Hopper-v5", "--seeds", "1", "2", "--runs-dir", str(runs)]
    assert sweep.main(argv + ["--", "--exit-code", "3", "--total-steps", "20"]) == 1
    out = capsys.readouterr().out
    logs = [line.split("(exit 3); log: ")[1] for line in out.splitlines() if line.startswith("failed  ")]
    assert len(logs) == 2 and "0 done, 2 failed" in out
    for log in logs:
        assert os.path.exists(log) and os.path.dirname(os.path.abspath(log)) == str(runs / ".submitit")
    first, second = (progress(runs / f"Hopper-v5__sweep_stub__{seed}__sweep") for seed in (1, 2))
    assert not any((runs / f"Hopper-v5__sweep_stub__{seed}__sweep" / "DONE").exists() for seed in (1, 2))
    assert first[-1]["time"] <= second[0]["time"]  # --jobs-in-flight unset: one local run at a time


def test_a_requeued_run_whose_script_had_ended_does_not_run_it_again(stub, tmp_path):
    """The script may end just as submitit asks for a checkpoint: it wrote DONE, so the requeued run returns 0."""
    (run,) = sweep.plan(sweep.Args(script=STUB, tasks=["Hopper-v5"], runs_dir=str(tmp_path / "runs")), [])
    os.makedirs(run.run_dir)
    open(os.path.join(run.run_dir, "DONE"), "w").close()
    assert run.checkpoint().result() == 0 and os.listdir(run.run_dir) == ["DONE"]


def test_a_run_that_never_checkpointed_starts_over_with_its_logs_set_aside(stub, tmp_path):
    args = sweep.Args(script=STUB, tasks=["Hopper-v5"], runs_dir=str(tmp_path / "runs"))
    (run,) = sweep.plan(args, ["--total-steps", "3"])
    os.makedirs(run.run_dir)
    open(os.path.join(run.run_dir, "events.out.tfevents.1.host"), "w").close()  # a run killed before its checkpoint
    assert run() == 0
    assert sorted(os.listdir(run.run_dir)) == ["DONE", "progress.jsonl", "sweep_stub.pt"]
    (stale,) = os.listdir(tmp_path / "runs" / ".stale")
    assert stale.startswith(run.name + "__") and os.listdir(tmp_path / "runs" / ".stale" / stale) == [
        "events.out.tfevents.1.host"
    ]


def test_the_command_line_runs_a_real_script_in_a_local_job(tmp_path):
    """From the shell, the job pickles scripts/sweep.py's Run by value; here fmer.py refuses a flag: exit 2, logged."""
    result = run_script(tmp_path, "scripts/sweep.py", "--script", "fmer.py", "--tasks", "Pendulum-v1", "--", "--no-such-flag")
    assert result.returncode == 1, result.stderr[-2000:]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("failed  Pendulum-v1__fmer__1__sweep (exit 2)")]
    with open(tmp_path / line.split("; log: ")[1]) as f:
        assert "--no-such-flag" in f.read()
    with open(tmp_path / line.split("; log: ")[1].replace(".err", ".out")) as f:
        assert (
            f"{os.path.join(ROOT, 'fmer.py')} --env-id Pendulum-v1 --seed 1 --run-name Pendulum-v1__fmer__1__sweep" in f.read()
        )


def test_run_names_and_flags_per_script(tmp_path, monkeypatch):
    data = tmp_path / "hopper-medium-v2.hdf5"
    data.touch()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "Humanoid-v5").touch()  # an env id is never a file, even where a file has its name
    runs = str(tmp_path / "runs")
    plan = lambda script, *tasks: sweep.plan(sweep.Args(script=script, tasks=list(tasks), seeds=[4], runs_dir=runs), [])
    (fmer,) = plan("fmer.py", "Humanoid-v5")
    assert fmer.name == "Humanoid-v5__fmer__4__sweep" and fmer.command[2:4] == ["--env-id", "Humanoid-v5"]
    assert fmer.command[-2:] == ["--save-model", "--save-buffer"] and fmer.cwd == str(tmp_path)
    file, ogbench = plan("fino.py", str(data), "cube-double-play-singletask-v0")
    assert file.name == "hopper-medium-v2__fino__4__sweep" and file.command[2:4] == ["--dataset", str(data)]
    assert ogbench.name == "cube-double-play-singletask-v0__fino__4__sweep" and "--save-buffer" in ogbench.command
    (minari,) = plan("flowq.py", "mujoco/hopper/medium-v0")
    assert minari.name == "mujoco-hopper-medium-v0__flowq__4__sweep" and minari.command[-1] == "--save-model"
    (renamed,) = sweep.plan(sweep.Args(script="flowq.py", tasks=["x"], seeds=[1], runs_dir=runs), ["--exp-name=flowq_b"])
    assert renamed.name == "x__flowq_b__1__sweep" and renamed.exp_name == "flowq_b"


def test_slurm_options_reach_sbatch(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))
    args = sweep.Args(script="fmer.py", tasks=["Hopper-v5"], executor="slurm", partition="gpu", gpus_per_job=2)
    args.jobs_in_flight, args.time_min, args.slurm_parameters = 5, 600, ["account=proj", "mem=32G"]
    executor = sweep.make_executor(args, str(tmp_path / ".submitit"))
    sbatch = submitit.slurm.slurm._make_sbatch_string(command="x", folder=executor.folder, map_count=20, **executor.parameters)
    for line in ("--partition=gpu", "--gpus-per-node=2", "--cpus-per-task=4", "--time=600", "--signal=USR2@120"):
        assert f"#SBATCH {line}\n" in sbatch
    assert "#SBATCH --account=proj\n" in sbatch and "#SBATCH --mem=32G\n" in sbatch and "#SBATCH --array=0-19%5\n" in sbatch
    assert executor.max_num_timeout == 3


def test_sbatch_refusing_the_jobs_is_one_error_line(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    refuse = "echo 'sbatch: error: invalid partition specified: nope' >&2; exit 1"
    for name, body in (("srun", "exit 0"), ("squeue", "exit 0"), ("sbatch", refuse)):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    flags = ["--script", "fmer.py", "--tasks", "Hopper-v5", "Ant-v5", "--executor", "slurm", "--partition", "nope"]
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts/sweep.py"), *flags],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert_one_line_error(result, "sbatch refused the jobs: sbatch: error: invalid partition specified: nope")


def test_slurm_without_squeue_is_one_error_line(tmp_path):
    """A rerun asks squeue which runs are still queued: sbatch and srun alone are not enough."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("srun", "sbatch"):
        (bin_dir / name).write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "scripts/sweep.py"),
            "--script",
            "fmer.py",
            "--tasks",
            "Hopper-v5",
            "--executor",
            "slurm",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert_one_line_error(result, "needs Slurm's sbatch, srun and squeue on PATH")


def test_submitted_slurm_jobs_are_noted_for_a_rerun(tmp_path, monkeypatch):
    """Each submitted run's Slurm job id lands in `.submitit/jobs/{run}`, where a rerun looks it up in squeue."""
    monkeypatch.chdir(tmp_path)

    class Executor:
        folder = str(tmp_path / "runs" / ".submitit")

        def submit_array(self, runs):
            return [type("Job", (), {"job_id": f"5_{i}"}) for i in range(len(runs))]

    args = sweep.Args(script="fmer.py", tasks=["Hopper-v5", "Ant-v5"], executor="slurm")
    runs = sweep.plan(args, [])
    sweep.submit(args, Executor(), runs)
    assert [open(sweep.job_file(Executor.folder, run)).read() for run in runs] == ["5_0", "5_1"]


def test_a_rerun_skips_runs_whose_slurm_jobs_are_still_queued(tmp_path):
    """A rerun while an earlier sweep's jobs wait in the queue: the run whose job squeue still lists is skipped (its
    job id noted at submission), the run whose job squeue no longer knows is submitted again (here sbatch refuses)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    squeue = 'case "$3" in 77_0) echo PENDING;; *) echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1;; esac'
    sbatch = 'echo called >> "$(dirname "$0")/sbatch_calls"; echo \'sbatch: error: refused\' >&2; exit 1'
    for name, body in (("srun", "exit 0"), ("squeue", squeue), ("sbatch", sbatch)):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    jobs = tmp_path / "runs" / ".submitit" / "jobs"
    jobs.mkdir(parents=True)
    (jobs / "Hopper-v5__fmer__1__sweep").write_text("77_0")
    (jobs / "Ant-v5__fmer__1__sweep").write_text("76_0")  # ended: squeue no longer knows it
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", OMP_NUM_THREADS="1")
    run = lambda task: subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "scripts/sweep.py"),
            "--script",
            "fmer.py",
            "--executor",
            "slurm",
            "--tasks",
            task,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    queued = run("Hopper-v5")
    assert queued.returncode == 0, queued.stderr
    assert "skip    Hopper-v5__fmer__1__sweep (Slurm job 77_0 PENDING, submitted by an earlier sweep)" in queued.stdout
    assert "0 done, 0 failed, 1 skipped" in queued.stdout and not (bin_dir / "sbatch_calls").exists()
    ended = run("Ant-v5")
    assert "submit  Ant-v5__fmer__1__sweep" in ended.stdout and (bin_dir / "sbatch_calls").exists()
    assert_one_line_error(ended, "sbatch refused the jobs: sbatch: error: refused")


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--script", "sac.py", "--tasks", "Hopper-v5"], "--script 'sac.py' is not one of fmer.py, fino.py, flowq.py"),
        (["--script", "flowq.py"], "no tasks: pass --tasks with datasets"),
        (
            ["--script", "fmer.py", "--tasks", "Hopper-v5", "--partition", "gpu"],
            "--partition applies to --executor slurm only",
        ),
        (["--script", "fmer.py", "--tasks", "Hopper-v5", "--jobs-in-flight", "0"], "--jobs-in-flight must be at least 1"),
        (
            ["--script", "fmer.py", "--tasks", "Hopper-v5", "--executor", "slurm"],
            "needs Slurm's sbatch, srun and squeue on PATH",
        ),
        (["--script", "fino.py", "--tasks", "a", "--", "--dataset", "b"], "--dataset is set by the sweep per run"),
        (["--script", "fmer.py", "--tasks", "Hopper-v5", "--runs-dir", "out"], "must be a folder named runs"),
        (["--script", "fmer.py", "--tasks", "Hopper-v5", "--seeds", "1", "1"], "--seeds lists 1 more than once"),
    ],
)
def test_bad_input_is_one_error_line(tmp_path, flags, fragment):
    if "slurm" in flags and sweep.shutil.which("sbatch"):
        pytest.skip("Slurm is installed here")
    assert_one_line_error(run_script(tmp_path, "scripts/sweep.py", *flags, timeout=60), fragment)
    assert not os.path.exists(tmp_path / "runs"), "nothing is submitted"
