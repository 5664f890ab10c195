"""Training speed of fmer.py, fino.py and flowq.py in eager mode, with --compile, and with --compile --cudagraphs.

Each configuration runs the REAL script as a subprocess for a short step budget, in its own working folder, with
evaluation pushed to the end of each phase and one evaluation episode. Each call starts with an empty torch.compile
cache, shared by the runs of one script and task: `compile` compiles cold, `compile-cudagraphs` reuses what it can
(--fresh-cache gives every run an empty one). The figures are read back from the runs' TensorBoard events:

- steady steps/s: the median, over the log intervals of a phase after its first one (start-up, compilation,
  CUDA-graph capture, the previous phase's evaluation), of steps per second between consecutive log events; steps
  are environment steps for fmer and fino's online phase, updates for fino's offline phase and flowq;
- mean steps/s: the same intervals pooled (steps / seconds), which a recompilation mid-run would pull down;
- SPS (script): the script's own `charts/SPS` at the last log step of the phase;
- peak GPU MB: the largest `charts/gpu_memory_mb` of the phase (CUDA only);
- start-up s: from the launch (fino online: from the last offline log) to the phase's first log event, less the
  time that interval's steps take at the steady rate; compile s: that start-up less the eager run's.

The data sets are generated here first, in the loaders' own formats: an OGBench-format antmaze-large-navigate set
of random-action episodes for fino.py (`{name}.npz` and `{name}-val.npz`, as OGBench's data scripts write them)
and a D4RL-layout .npz of random-action HalfCheetah-v5 episodes for flowq.py. The buffers are sized to the run,
so the memory column shows the training step's own memory (networks, optimizer, activations, CUDA-graph pools).
A configuration that fails, or runs past its wall-time cap, is a row saying so; a configuration that no longer fits
the suite's time budget is a row marked skipped. The table is printed as markdown and written as JSON.

    python scripts/benchmark.py --suite gpu --json benchmark_gpu.json     # one call, under 10 minutes on an H100
    OMP_NUM_THREADS=1 python scripts/benchmark.py --suite cpu             # tiny networks, eager and compile only
    python scripts/benchmark.py --suite gpu --scripts fmer --fmer-envs Humanoid-v5 --modes compile-cudagraphs
    python scripts/benchmark.py --suite flowq-steps                       # flowq's updates/s for several flow steps

`--suite flowq-steps` checks FlowQ's speed claim (Fig. 3a: the policy update's cost does not grow with the number
of flow steps K, since training regresses the velocity field on one guided target and never integrates the ODE):
flowq.py's updates/s for each K in --flow-steps (K enters acting and evaluation only, which are not timed).
"""

import glob
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Literal

import gymnasium as gym
import numpy as np
import tyro
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = {"eager": [], "compile": ["--compile"], "compile-cudagraphs": ["--compile", "--cudagraphs"]}
OGBENCH_NAME = "antmaze-large-navigate-singletask-v0"  # FQL's default task; the file is antmaze-large-navigate-v0
D4RL_ENV = "HalfCheetah-v5"


@dataclass
class Args:
    suite: Literal["gpu", "cpu", "flowq-steps"] = "gpu"
    """gpu: default networks, all three modes (needs CUDA); cpu: tiny networks on the CPU (--no-cuda), eager and
    compile; flowq-steps: flowq.py's updates/s for each of --flow-steps (default networks, the GPU when there is one;
    eager unless --modes)"""
    scripts: list[Literal["fmer", "fino", "flowq"]] = field(default_factory=lambda: ["flowq", "fino", "fmer"])
    """scripts to time, in this order (the time budget is spent in order: first the most wanted)"""
    modes: list[Literal["eager", "compile", "compile-cudagraphs"]] = field(default_factory=list)
    """modes to time (default: the suite's); `compile-cudagraphs` passes --compile --cudagraphs"""
    fmer_envs: list[str] = field(default_factory=list)
    """fmer.py's environments (default: Hopper-v5 and Humanoid-v5 on gpu, Hopper-v5 on cpu)"""
    flow_steps: list[int] = field(default_factory=lambda: [1, 10, 32])
    """--suite flowq-steps: the numbers of flow steps K to time"""
    json: str | None = None
    """where to write the results as JSON (default: benchmark_{suite}.json in the current folder)"""
    time_budget: float | None = None
    """seconds for the whole call, data generation included; a configuration that no longer fits is skipped
    (default: 530 on gpu, 600 on cpu, 300 for flowq-steps)"""
    config_timeout: float | None = None
    """wall-time cap of one configuration in seconds; past it the run is interrupted (Ctrl-C, so its logs are
    written) and reported as timed out (default: 150 on gpu, 180 on cpu, 120 for flowq-steps)"""
    steps_scale: float = 1.0
    """multiplies every step budget (more steps: steadier figures, longer runs)"""
    extra_flags: str = ""
    """more flags for every script, in one string, e.g. --extra-flags="--batch-size 1024\""""
    seed: int = 1
    """seed of the data sets and the runs"""
    fresh_cache: bool = False
    """give every run an empty torch.compile cache (cold compile times for compile-cudagraphs too; a longer suite)"""


@dataclass
class Budget:
    """Step budgets and network flags of a suite."""

    net_flags: list[str]
    """flags that set network sizes and batch size for every script (empty: the scripts' defaults)"""
    updates: int
    """timed updates of fmer (after its random warm-up), of fino's offline phase and of flowq"""
    online_steps: int
    """fino's online environment steps"""
    log_every: int
    """log interval of every run (the rate is measured between log events)"""
    warmup: int
    """fmer's random warm-up steps (--learning-starts)"""
    episodes: int
    """episodes per generated data set (plus one validation episode for OGBench)"""
    episode_length: int
    """steps per generated episode"""
    device_flags: list[str]
    """--no-cuda on the CPU suite"""


BUDGETS = {
    "gpu": Budget([], 2000, 1000, 200, 1000, 10, 1000, []),
    "cpu": Budget(["--hidden-dim", "32", "--num-layers", "2", "--batch-size", "64"], 300, 150, 50, 200, 4, 250, ["--no-cuda"]),
}
BUDGETS["flowq-steps"] = BUDGETS["gpu"]


@dataclass
class Config:
    """One subprocess run of a script; `phases` are the (row name, first step, last step) it is timed over."""

    script: str
    task: str
    mode: str
    flags: list[str]
    phases: list[tuple[str, int, int]]


@dataclass
class Row:
    script: str
    task: str
    phase: str
    mode: str
    status: str = "skipped: suite time budget spent"
    steady_sps: float | None = None
    mean_sps: float | None = None
    script_sps: float | None = None
    peak_gpu_mb: float | None = None
    startup_s: float | None = None
    compile_s: float | None = None
    wall_s: float | None = None
    command: str = ""
    log_tail: str = ""


# ---- Data sets -------------------------------------------------------------------------------------------------------
def write_ogbench_dataset(out_dir: str, episodes: int, length: int, seed: int) -> int:
    """Random-action episodes on OGBench's own env, written as OGBench's data scripts do: per row the observation
    before the action, the action, `terminals` (True on an episode's last row) and the MuJoCo state before the action
    (info['prev_qpos'], info['prev_qvel']), from which `ogbench.make_env_and_datasets` relabels the single-task
    rewards. Returns the number of training rows."""
    import ogbench

    env = ogbench.make_env_and_datasets(OGBENCH_NAME, env_only=True)
    rng = np.random.default_rng(seed)
    file_name = OGBENCH_NAME.replace("-singletask", "")
    rows = 0
    for suffix, count in (("", episodes), ("-val", 1)):
        data = {k: [] for k in ("observations", "actions", "terminals", "qpos", "qvel")}
        for _ in range(count):
            obs, _ = env.reset(seed=int(rng.integers(2**31)))
            for t in range(length):
                action = np.clip(rng.normal(0.0, 0.5, env.action_space.shape), -1.0, 1.0)
                next_obs, _, _, _, info = env.step(action)
                for key, value in zip(data, (obs, action, t == length - 1, info["prev_qpos"], info["prev_qvel"])):
                    data[key].append(value)
                obs = next_obs
        arrays = {k: np.asarray(v, np.bool_ if k == "terminals" else np.float32) for k, v in data.items()}
        np.savez_compressed(os.path.join(out_dir, f"{file_name}{suffix}.npz"), **arrays)
        rows = rows or len(arrays["actions"])
    env.close()
    return rows


def write_d4rl_file(path: str, episodes: int, length: int, seed: int) -> int:
    """Uniformly random-action HalfCheetah-v5 episodes in D4RL's flat layout (observations, actions, rewards,
    next_observations, terminals, timeouts). Returns the number of rows."""
    env = gym.make(D4RL_ENV, max_episode_steps=length)
    env.action_space.seed(seed)
    data = {k: [] for k in ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")}
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        done = False
        while not done:
            action = env.action_space.sample()
            next_obs, reward, terminated, truncated, _ = env.step(action)
            for key, value in zip(data, (obs, action, reward, next_obs, terminated, truncated)):
                data[key].append(value)
            obs, done = next_obs, terminated or truncated
    env.close()
    np.savez(path, **{k: np.asarray(v, np.bool_ if k in ("terminals", "timeouts") else np.float32) for k, v in data.items()})
    return len(data["rewards"])


# ---- Configurations --------------------------------------------------------------------------------------------------
def configs(args: Args, budget: Budget, data_dir: str, sizes: dict[str, int]) -> list[Config]:
    """The runs of the suite, in the order they are timed."""
    scale = lambda n: max(3 * budget.log_every, int(round(n * args.steps_scale / budget.log_every)) * budget.log_every)
    updates, online = scale(budget.updates), scale(budget.online_steps)
    never = str(10**9)  # an evaluation interval past the budget: only the end-of-phase evaluations run
    common = [*budget.net_flags, *budget.device_flags, "--eval-episodes", "1", "--log-every", str(budget.log_every)]
    common += [*shlex.split(args.extra_flags), "--seed", str(args.seed)]
    modes = args.modes or (["eager"] if args.suite == "flowq-steps" else list(MODES)[: 2 if args.suite == "cpu" else 3])
    envs = args.fmer_envs or (["Hopper-v5"] if args.suite == "cpu" else ["Hopper-v5", "Humanoid-v5"])
    d4rl_path = os.path.join(data_dir, "halfcheetah_random.npz")
    flowq_flags = ["--dataset", d4rl_path, "--env-id", D4RL_ENV, "--total-steps", str(updates), "--eval-every", never]
    runs = []
    if args.suite == "flowq-steps":
        for steps in args.flow_steps:
            for mode in modes:
                flags = [*flowq_flags, "--flow-steps", str(steps), *common, *MODES[mode]]
                runs.append(Config("flowq", f"{D4RL_ENV} random, K={steps}", mode, flags, [("offline", 1, updates)]))
        return runs
    for script in args.scripts:
        for task in envs if script == "fmer" else [None]:
            for mode in modes:
                if script == "flowq":
                    flags, phases, task = flowq_flags, [("offline", 1, updates)], f"{D4RL_ENV} random"
                elif script == "fino":
                    total = updates + online
                    flags = ["--dataset", OGBENCH_NAME, "--dataset-dir", data_dir, "--offline-steps", str(updates)]
                    flags += ["--online-steps", str(online), "--eval-every", never, "--beta-update-every", never]
                    flags += ["--buffer-size", str(sizes["ogbench"] + online + 1)]
                    phases, task = [("offline", 1, updates), ("online", updates + 1, total)], "antmaze-large random"
                else:
                    total = budget.warmup + updates
                    flags = ["--env-id", task, "--total-timesteps", str(total), "--learning-starts", str(budget.warmup)]
                    flags += ["--buffer-size", str(total), "--eval-every", never]
                    phases = [("online", budget.warmup + 1, total)]
                runs.append(Config(script, task, mode, [*flags, *common, *MODES[mode]], phases))
    return runs


# ---- Running and reading back ----------------------------------------------------------------------------------------
def one_line(text: str) -> str:
    """The one line that says why a run failed: an `error:` line, else a traceback's last exception line, else the
    first line that mentions an error (tyro's boxed messages), else the last line; box-drawing characters removed."""
    lines = [re.sub(r"[\u2500-\u257f]", "", line).strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    for pattern in (r"^error:", r"^[\w.]*(Error|Exception|Interrupt|Unsupported)\b", r"(?i)error|unrecognized"):
        found = [line for line in lines if re.search(pattern, line)]
        if found:
            if not pattern.startswith("^["):  # the first line, preferring one that says what (tyro: "...: --flag")
                found = sorted(found, key=lambda line: ":" not in line)
            return (found[-1] if pattern.startswith("^[") else found[0])[:200]
    return lines[-1][:200] if lines else "no output"


def run_config(config: Config, timeout: float, workdir: str, cache_dir: str) -> tuple[str, float, float, str]:
    """Run one configuration in `workdir` with a wall-time cap; returns (status, launch time, wall seconds, output)."""
    command = [sys.executable, os.path.join(ROOT, f"{config.script}.py"), *config.flags]
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(cache_dir, "inductor"))
    env["TRITON_CACHE_DIR"] = os.path.join(cache_dir, "triton")
    log_path = os.path.join(workdir, "output.log")
    with open(log_path, "w") as log:
        start = time.time()
        proc = subprocess.Popen(command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout)
            status = "ok" if returncode == 0 else None
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGINT)  # the scripts catch Ctrl-C and close their TensorBoard writer
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            status = f"timeout after {timeout:.0f} s"
        except BaseException:  # Ctrl-C of the benchmark itself: end the run too
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        wall = time.time() - start
    with open(log_path, errors="replace") as f:
        output = f.read()
    return status or f"failed: {one_line(output)}", start, wall, output


def read_phase(run_dir: str, launch: float, first: int, last: int, previous_end: float | None) -> dict:
    """Rates, start-up and memory of one phase (log steps first..last) from a run's TensorBoard events."""
    events = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    timing_tag = "losses/qf_loss" if "losses/qf_loss" in tags else next((t for t in tags if t.startswith("losses/")), None)
    if timing_tag is None:
        return {}
    points = [e for e in events.Scalars(timing_tag) if first <= e.step <= last]
    result = {"end_time": points[-1].wall_time if points else None}
    if len(points) >= 3:  # intervals between log events: the phase's first interval (start-up, compilation) is not one
        steps = np.diff([e.step for e in points])
        seconds = np.diff([e.wall_time for e in points])
        result["steady_sps"] = float(statistics.median(steps / np.maximum(seconds, 1e-9)))
        result["mean_sps"] = float(steps.sum() / max(seconds.sum(), 1e-9))
        start = launch if previous_end is None else previous_end
        result["startup_s"] = points[0].wall_time - start - (points[0].step - first + 1) / result["steady_sps"]
    if "charts/SPS" in tags:
        sps = [e.value for e in events.Scalars("charts/SPS") if first <= e.step <= last]
        result["script_sps"] = sps[-1] if sps else None
    if "charts/gpu_memory_mb" in tags:
        memory = [e.value for e in events.Scalars("charts/gpu_memory_mb") if e.step <= last]
        result["peak_gpu_mb"] = max(memory) if memory else None
    return result


def measure(config: Config, timeout: float, cache_dir: str) -> list[Row]:
    """Run one configuration and turn its events into one row per phase."""
    rows = [Row(config.script, config.task, phase, config.mode) for phase, _, _ in config.phases]
    command = " ".join(shlex.quote(x) for x in [f"{config.script}.py", *config.flags])
    with tempfile.TemporaryDirectory(prefix="benchmark-") as workdir:
        status, launch, wall, output = run_config(config, timeout, workdir, cache_dir)
        run_dirs = glob.glob(os.path.join(workdir, "runs", "*"))
        previous_end = None
        for row, (_, first, last) in zip(rows, config.phases):
            row.status, row.wall_s, row.command = status, wall, command
            row.log_tail = "\n".join(output.splitlines()[-15:]) if status != "ok" else ""
            if len(run_dirs) == 1 and not status.startswith("failed"):
                phase = read_phase(run_dirs[0], launch, first, last, previous_end)
                previous_end = phase.pop("end_time", None)
                for key, value in phase.items():
                    setattr(row, key, value)
            if row.status == "ok" and row.steady_sps is None:
                row.status = "no steady rate: fewer than 3 log events in the phase"
    return rows


# ---- Report ----------------------------------------------------------------------------------------------------------
def fill_compile_times(rows: list[Row]) -> None:
    """compile s = start-up of a compiled run less the eager run's, per script, task and phase."""
    eager = {(r.script, r.task, r.phase): r.startup_s for r in rows if r.mode == "eager" and r.startup_s is not None}
    for r in rows:
        base = eager.get((r.script, r.task, r.phase))
        if r.mode != "eager" and r.startup_s is not None and base is not None:
            r.compile_s = r.startup_s - base


def markdown(rows: list[Row]) -> str:
    fmt = lambda x, digits=0: "-" if x is None else f"{x:.{digits}f}"
    lines = [
        "| script | task | phase | mode | steady steps/s | mean steps/s | SPS (script) | peak GPU MB | start-up s | compile s | status |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        cells = [r.script, r.task, r.phase, r.mode, fmt(r.steady_sps, 1), fmt(r.mean_sps, 1), fmt(r.script_sps)]
        cells += [fmt(r.peak_gpu_mb), fmt(r.startup_s, 1), fmt(r.compile_s, 1), r.status.replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def device_name(cpu: bool) -> str:
    if not cpu and shutil.which("nvidia-smi"):
        query = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
        if query.returncode == 0 and query.stdout.strip():
            return query.stdout.strip().splitlines()[0]
    return f"CPU ({os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})"


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.steps_scale <= 0 or (args.time_budget is not None and args.time_budget <= 0):
        raise SystemExit("error: --steps-scale and --time-budget must be positive")
    if args.config_timeout is not None and args.config_timeout <= 0:
        raise SystemExit("error: --config-timeout must be positive")
    if not args.flow_steps or min(args.flow_steps) < 1:
        raise SystemExit("error: --flow-steps must list positive numbers of flow steps")
    import torch

    if args.suite == "gpu" and not torch.cuda.is_available():
        raise SystemExit("error: --suite gpu needs a CUDA device; on a machine without one use --suite cpu")
    budget = BUDGETS[args.suite]
    time_budget = args.time_budget or {"gpu": 530.0, "cpu": 600.0, "flowq-steps": 300.0}[args.suite]
    config_timeout = args.config_timeout or {"gpu": 150.0, "cpu": 180.0, "flowq-steps": 120.0}[args.suite]
    json_path = args.json or f"benchmark_{args.suite}.json"
    suite_start = time.time()
    device = f"{device_name(args.suite == 'cpu')}, torch {torch.__version__}"
    print(f"benchmark --suite {args.suite} on {device}; time budget {time_budget:.0f} s, cap {config_timeout:.0f} s per run")
    rows: list[Row] = []

    def report() -> str:
        """Write the JSON (after every run, so a call cut short keeps what it measured) and return the table."""
        fill_compile_times(rows)
        summary = {"suite": args.suite, "device": device, "total_s": time.time() - suite_start, "args": asdict(args)}
        with open(json_path, "w") as f:
            json.dump({**summary, "rows": [asdict(r) for r in rows]}, f, indent=1)
        return markdown(rows)

    with tempfile.TemporaryDirectory(prefix="benchmark-data-") as data_dir:
        sizes = {}
        if args.suite == "flowq-steps" or "flowq" in args.scripts:
            sizes["d4rl"] = write_d4rl_file(
                os.path.join(data_dir, "halfcheetah_random.npz"), budget.episodes, budget.episode_length, args.seed
            )
        if args.suite != "flowq-steps" and "fino" in args.scripts:
            sizes["ogbench"] = write_ogbench_dataset(data_dir, budget.episodes, budget.episode_length, args.seed)
        print(f"data sets written in {time.time() - suite_start:.0f} s: {sizes} rows", flush=True)
        try:
            for config in configs(args, budget, data_dir, sizes):
                left = time_budget - (time.time() - suite_start)
                if left < min(60.0, config_timeout):
                    rows += [Row(config.script, config.task, phase, config.mode) for phase, _, _ in config.phases]
                    continue
                key = [config.script, config.task] + ([config.mode] if args.fresh_cache else [])
                cache_dir = os.path.join(data_dir, "compile-cache", re.sub(r"[^\w.-]+", "_", "-".join(key)))
                new = measure(config, min(config_timeout, left - 15.0), cache_dir)  # 15 s: an interrupted run's grace
                rows += new
                report()
                for r in new:
                    rate = "-" if r.steady_sps is None else f"{r.steady_sps:.1f} steps/s"
                    print(f"  {r.script} {r.task} {r.phase} {r.mode}: {rate}, {r.status} ({r.wall_s:.0f} s)", flush=True)
        except KeyboardInterrupt:
            print("interrupted: the table holds the runs finished so far")
    table = report()
    print(f"\n{device}; {time.time() - suite_start:.0f} s in all\n\n{table}\n\nwrote {json_path}")
