"""Run a grid of training runs (script x env-or-dataset x seed) through submitit, locally or on Slurm, resumably.

Every run is `runs/{task}__{exp_name}__{seed}__sweep`, started with `--run-name` and `--save-model` (and
`--save-buffer` for the online scripts fmer.py and fino.py), with `--resume runs/NAME` when its checkpoint
`runs/NAME/{exp_name}.pt` exists. A run whose script exits 0 gets `runs/NAME/DONE`, and rerunning the same sweep
skips it, as it skips a run whose Slurm job from an earlier sweep squeue still lists (pending or running; the job
ids are noted in `{runs-dir}/.submitit/jobs/`); the other runs are resubmitted and resume from their checkpoints.
On a preemption or before the time limit, submitit asks the job to checkpoint: it sends SIGTERM to the script,
which saves and exits, and the job is requeued to resume from that checkpoint. Flags after `--` go to every run:

    python scripts/sweep.py --script fmer.py --tasks Hopper-v5 Walker2d-v5 --seeds 1 2 3 \\
        --executor slurm --partition gpu --gpus-per-job 1 --time-min 1440 -- --total-timesteps 1000000
    python scripts/aggregate.py --runs runs/* --out-dir results/sweep

Tasks are environment ids for fmer.py (`--env-id`) and datasets for fino.py and flowq.py (`--dataset`). The
scripts write `runs/` relative to their working directory, so each run's working directory is the parent of
--runs-dir; relative paths in the flags after `--` are read from there too. submitit's logs (each job's output)
go to `{runs-dir}/.submitit/`.
"""

import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import submitit
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILE_SUFFIXES = (".npz", ".hdf5", ".h5")  # dataset files, as common/datasets.py recognizes them


class Script(NamedTuple):
    task_flag: str
    """the flag that names the task"""
    online: bool
    """whether the script steps an environment and keeps a replay buffer (then runs also get --save-buffer)"""


SCRIPTS = {"fmer.py": Script("--env-id", True), "fino.py": Script("--dataset", True), "flowq.py": Script("--dataset", False)}


@dataclass
class Args:
    """Run a grid of training runs through submitit (local process pool, Slurm, or in-process for debugging);
    flags after `--` go to every run, e.g. `-- --total-timesteps 1000000`."""

    script: str
    """the training script: fmer.py, fino.py or flowq.py"""
    tasks: list[str] = field(default_factory=list)
    """environment ids (fmer.py) or datasets (fino.py, flowq.py: a Minari or OGBench name, or a dataset file)"""
    seeds: list[int] = field(default_factory=lambda: [1])
    """the seeds of every task"""
    runs_dir: str = "runs"
    """where the runs go; it must be a folder named `runs` (the scripts write `runs/` in their working directory,
    its parent)"""
    executor: Literal["local", "slurm", "debug"] = "local"
    """local: a process per job on this machine; slurm: one Slurm job per run (an array); debug: in this process"""
    jobs_in_flight: int | None = None
    """how many runs go at once; unset: 1 locally, all at once on Slurm (the job array's limit)"""
    time_min: int = 1440
    """time limit of a job in minutes (local and slurm); a run that reaches it checkpoints and is requeued"""
    requeues: int = 3
    """how many times a run that reaches --time-min is requeued (preemptions do not count)"""
    signal_delay_s: int = 120
    """seconds before the time limit that a job is told to checkpoint (online scripts first finish the episode)"""
    partition: str | None = None
    """Slurm partition; unset: the cluster's default"""
    gpus_per_job: int | None = None
    """GPUs per Slurm job; unset: 1"""
    cpus_per_job: int | None = None
    """CPU cores per Slurm job; unset: 4"""
    slurm_parameters: list[str] = field(default_factory=list)
    """more `#SBATCH` options as KEY=VALUE, e.g. `account=myproj qos=normal mem=32G constraint=a100`"""


class Run(submitit.helpers.Checkpointable):
    """One run as a submitit job: the training script in a child process. On preemption or time-out submitit calls
    `checkpoint()`, which makes the script save and exit, and requeues the run, which then resumes."""

    def __init__(self, name: str, command: list[str], cwd: str, exp_name: str, env: dict[str, str | None]):
        self.name, self.command, self.cwd, self.exp_name, self.env = name, command, cwd, exp_name, env
        self._child: subprocess.Popen | None = None
        self._status: int | None = None

    @property
    def run_dir(self) -> str:
        return os.path.join(self.cwd, "runs", self.name)

    def __call__(self) -> int:
        """Run the script to its end, from the run's checkpoint if there is one; returns its exit status."""
        if os.path.exists(os.path.join(self.run_dir, "DONE")):  # it ended as the job was told to checkpoint
            return 0
        command = list(self.command)
        if os.path.exists(os.path.join(self.run_dir, f"{self.exp_name}.pt")):
            command += ["--resume", f"runs/{self.name}"]
        elif os.path.exists(self.run_dir):  # [ours] started but never checkpointed: set its logs aside, start over
            stale = os.path.join(self.cwd, "runs", ".stale", f"{self.name}__{int(time.time())}")
            os.makedirs(os.path.dirname(stale), exist_ok=True)
            os.rename(self.run_dir, stale)
            print(f"{self.name} has no checkpoint: moved it to {stale} and starting over", flush=True)
        env = {k: v for k, v in {**os.environ, **self.env}.items() if v is not None}
        print(shlex.join(command), flush=True)
        self._status = None
        self._child = subprocess.Popen(command, cwd=self.cwd, env=env)
        # a thread waits for the child, so that checkpoint(), called from a signal handler, never blocks on Popen's lock
        threading.Thread(target=self._wait, args=(self._child,), daemon=True).start()
        try:
            while self._status is None:
                time.sleep(0.2)
        finally:
            self._stop()  # on KeyboardInterrupt or SystemExit too: the script checkpoints before the job ends
        return self._status

    def _wait(self, child: subprocess.Popen) -> None:
        status = child.wait()
        if status == 0:
            os.makedirs(self.run_dir, exist_ok=True)
            open(os.path.join(self.run_dir, "DONE"), "w").close()
        self._status = status

    def _stop(self) -> None:
        """Send SIGTERM to a running script (it saves a checkpoint and exits) and wait until it has exited."""
        if self._child is not None and self._status is None:
            self._child.send_signal(signal.SIGTERM)
            while self._status is None:
                time.sleep(0.2)

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on preemption or before the time limit: stop the script, requeue the same run."""
        self._stop()
        return submitit.helpers.DelayedSubmission(Run(self.name, self.command, self.cwd, self.exp_name, self.env))


def is_file(task: str, script: Script) -> bool:
    """Whether a task is a dataset file (as common/datasets.py decides: an existing path or a file suffix)."""
    return script.task_flag == "--dataset" and (os.path.exists(task) or task.endswith(FILE_SUFFIXES))


def task_name(task: str, script: Script) -> str:
    """The task part of a run name, as the scripts write it: a dataset file's base name without its extension,
    else the env id or dataset name with '/' -> '-'."""
    if is_file(task, script):
        return os.path.splitext(os.path.basename(task))[0]
    return task.replace("/", "-")


def flag_value(flags: list[str], name: str) -> str | None:
    """The value of `--name V` or `--name=V` in flags (dashes or underscores), the last one given; None if absent."""
    value = None
    for i, flag in enumerate(flags):
        key, eq, rest = flag.partition("=")
        if key.replace("_", "-") == name:
            value = rest if eq else (flags[i + 1] if i + 1 < len(flags) else "")
    return value


def plan(args: Args, extra: list[str]) -> list[Run]:
    """The runs of the grid (DONE ones included), validated; one-line errors."""
    if args.script not in SCRIPTS:
        raise SystemExit(f"error: --script '{args.script}' is not one of {', '.join(SCRIPTS)}")
    script = SCRIPTS[args.script]
    kind = "environment ids" if script.task_flag == "--env-id" else "datasets"
    if not args.tasks:
        raise SystemExit(f"error: no tasks: pass --tasks with {kind} ({args.script} takes them as {script.task_flag})")
    if not args.seeds:
        raise SystemExit("error: no seeds: pass --seeds, e.g. --seeds 1 2 3")
    for flags, what in ((args.tasks, "--tasks"), ([str(s) for s in args.seeds], "--seeds")):
        twice = sorted({x for x in flags if flags.count(x) > 1})
        if twice:
            raise SystemExit(f"error: {what} lists {', '.join(twice)} more than once")
    reserved = ["--seed", script.task_flag, "--run-name", "--resume", "--save-model", "--no-save-model"]
    reserved += ["--save-buffer", "--no-save-buffer"] if script.online else []
    for flag in extra:
        key = flag.partition("=")[0].replace("_", "-")
        if key in reserved:
            raise SystemExit(f"error: {key} is set by the sweep per run; leave it out of the flags after --")
    runs_dir = os.path.abspath(args.runs_dir)
    if os.path.basename(runs_dir) != "runs":
        raise SystemExit(
            f"error: --runs-dir '{args.runs_dir}' must be a folder named runs (the scripts write runs/ in their working directory)"
        )
    exp_name = flag_value(extra, "--exp-name") or os.path.basename(args.script)[: -len(".py")]
    names = {}
    for task in args.tasks:
        name = task_name(task, script)
        if "__" in name + exp_name:
            raise SystemExit(f"error: '{name}__{exp_name}' has '__', which separates the parts of a run name")
        if name in names:
            raise SystemExit(f"error: tasks '{names[name]}' and '{task}' would both be named {name}")
        names[name] = task
    env = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")} if args.executor == "local" else {}
    runs = []
    for name, task in names.items():
        task_arg = os.path.abspath(task) if is_file(task, script) else task  # runs start in the parent of --runs-dir
        for seed in args.seeds:
            run_name = f"{name}__{exp_name}__{seed}__sweep"
            command = [sys.executable, os.path.join(ROOT, args.script), script.task_flag, task_arg, "--seed", str(seed)]
            command += ["--run-name", run_name, "--save-model"] + (["--save-buffer"] if script.online else []) + extra
            runs.append(Run(run_name, command, os.path.dirname(runs_dir), exp_name, env))
    return runs


def make_executor(args: Args, folder: str) -> submitit.Executor:
    """The submitit executor of --executor with its options; one-line errors."""
    for value, flag in ((args.time_min, "--time-min"), (args.jobs_in_flight, "--jobs-in-flight")):
        if value is not None and value < 1:
            raise SystemExit(f"error: {flag} must be at least 1, not {value}")
    if args.requeues < 0 or args.signal_delay_s < 0:
        raise SystemExit("error: --requeues and --signal-delay-s must not be negative")
    if args.signal_delay_s >= 60 * args.time_min:
        raise SystemExit(f"error: --signal-delay-s {args.signal_delay_s} leaves no time before --time-min {args.time_min}")
    slurm_only = {
        "partition": "--partition",
        "gpus_per_job": "--gpus-per-job",
        "cpus_per_job": "--cpus-per-job",
        "slurm_parameters": "--slurm-parameters",
    }
    if args.executor != "slurm":
        given = [flag for key, flag in slurm_only.items() if getattr(args, key)]
        if given:
            raise SystemExit(f"error: {', '.join(given)} applies to --executor slurm only, not {args.executor}")
    if args.executor == "debug":
        return submitit.DebugExecutor(folder)
    if args.executor == "local":
        executor = submitit.LocalExecutor(folder, max_num_timeout=args.requeues)
        executor.update_parameters(timeout_min=args.time_min, signal_delay_s=args.signal_delay_s)
        return executor
    gpus, cpus = 1 if args.gpus_per_job is None else args.gpus_per_job, 4 if args.cpus_per_job is None else args.cpus_per_job
    if gpus < 0 or cpus < 1:
        raise SystemExit(f"error: --gpus-per-job must be at least 0 and --cpus-per-job at least 1 (got {gpus}, {cpus})")
    extra = {}
    for entry in args.slurm_parameters:
        key, eq, value = entry.partition("=")
        if not eq or not key:
            raise SystemExit(f"error: --slurm-parameters '{entry}' is not KEY=VALUE")
        extra[key] = value
    if any(shutil.which(tool) is None for tool in ("sbatch", "srun", "squeue")):
        raise SystemExit(
            "error: --executor slurm needs Slurm's sbatch, srun and squeue on PATH: run the sweep on the cluster's login node"
        )
    executor = submitit.SlurmExecutor(folder, max_num_timeout=args.requeues)
    executor.update_parameters(
        job_name=f"sweep-{os.path.basename(args.script)[: -len('.py')]}",
        partition=args.partition,
        time=args.time_min,
        gpus_per_node=gpus or None,
        cpus_per_task=cpus,
        signal_delay_s=args.signal_delay_s,
        additional_parameters=extra,
        **({} if args.jobs_in_flight is None else dict(array_parallelism=args.jobs_in_flight)),
    )
    return executor


def outcome(run: Run, job: submitit.Job, executor: str) -> tuple[bool, str]:
    """(done?, a one-line summary) of a finished job."""
    log = "the output above" if executor == "debug" else os.path.relpath(job.paths.stderr)
    try:
        status = job.result()
    except Exception as e:  # the job ended without a result: killed, out of memory, requeued too often, ...
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return False, f"failed  {run.name} ({reason}); log: {log}"
    if status == 0:
        return True, f"done    {run.name}"
    return False, f"failed  {run.name} (exit {status}); log: {log}"


def job_file(folder: str, run: Run) -> str:
    """Where the sweep notes the Slurm job id of a run it submitted (beside submitit's logs)."""
    return os.path.join(folder, "jobs", run.name)


def queued_job(folder: str, run: Run) -> str | None:
    """'ID STATE' of the Slurm job an earlier sweep submitted for this run, while squeue still lists it (pending,
    running, requeued, ...); else None. A rerun skips such a run instead of submitting it a second time."""
    try:
        with open(job_file(folder, run)) as f:
            job_id = f.read().strip()
    except FileNotFoundError:
        return None
    listed = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    states = listed.stdout.split() if listed.returncode == 0 else []  # an ended job: "Invalid job id", or no line
    return f"{job_id} {states[0]}" if states else None


def submit(args: Args, executor: submitit.Executor, todo: list[Run]) -> list[tuple[Run, submitit.Job]]:
    """Submit the runs; returns them with their jobs, which have ended (local) or may still run (slurm, debug)."""
    if args.executor != "local":
        try:
            jobs = list(zip(todo, executor.submit_array(todo))) if todo else []
        except submitit.core.utils.FailedJobError as e:  # sbatch refused them (its message is on stderr already)
            raise SystemExit(
                f"error: sbatch refused the jobs: {(str(e).strip().splitlines() or ['no message'])[-1]}"
            ) from None
        if args.executor == "slurm" and jobs:
            for run, job in jobs:
                os.makedirs(os.path.dirname(job_file(executor.folder, run)), exist_ok=True)
                with open(job_file(executor.folder, run), "w") as f:
                    f.write(job.job_id)
            print(f"submitted {len(jobs)} Slurm jobs ({jobs[0][1].job_id.split('_')[0]}); waiting for them", flush=True)
        return jobs
    # LocalExecutor starts every job at once: keep at most jobs_in_flight running
    limit, pending, running, finished = args.jobs_in_flight or 1, list(todo), [], []
    while pending or running:
        while pending and len(running) < limit:
            run = pending.pop(0)
            running.append((run, executor.submit(run)))
        time.sleep(0.5)
        done = [job.done() for _, job in running]
        finished += [entry for entry, d in zip(running, done) if d]
        running = [entry for entry, d in zip(running, done) if not d]
    return sorted(finished, key=lambda entry: todo.index(entry[0]))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    args = tyro.cli(Args, args=argv[:cut])
    extra = argv[cut + 1 :]
    runs = plan(args, extra)
    folder = os.path.join(os.path.abspath(args.runs_dir), ".submitit")
    executor = make_executor(args, folder)
    todo = []
    for run in runs:
        if os.path.exists(os.path.join(run.run_dir, "DONE")):
            print(f"skip    {run.name} (DONE)")
        elif args.executor == "slurm" and (queued := queued_job(folder, run)):
            print(f"skip    {run.name} (Slurm job {queued}, submitted by an earlier sweep)")
        else:
            resume = os.path.exists(os.path.join(run.run_dir, f"{run.exp_name}.pt"))
            print(f"submit  {run.name}" + (f" (resumes from runs/{run.name}/{run.exp_name}.pt)" if resume else ""))
            todo.append(run)
    sys.stdout.flush()
    try:
        summary = [outcome(run, job, args.executor) for run, job in submit(args, executor, todo)]
    except KeyboardInterrupt:
        if args.executor == "slurm":
            print("stopped waiting: the Slurm jobs go on (squeue --me); a rerun skips them while squeue lists them")
        else:
            print("interrupted: running scripts save a checkpoint and exit; rerun the same command to resume them")
        return 130
    for _, line in summary:
        print(line)
    failed = sum(not ok for ok, _ in summary)
    print(f"{len(summary) - failed} done, {failed} failed, {len(runs) - len(todo)} skipped (DONE, or still queued)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
