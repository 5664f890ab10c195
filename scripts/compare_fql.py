"""fino.py --algo fql against the official JAX FQL (github.com/seohongpark/fql), same data, budget and seeds.

For each seed, both codes run offline-to-online on the same OGBench-format dataset with the same flags (below), each
process on one thread (--jobs 2 runs two at a time, ours and the official run of a seed side by side). Then, from their
logs (our TensorBoard events, the official train.csv / eval.csv):

- a table (markdown and JSON beside the figure): eval success after the offline phase and at the end, per seed and
  implementation, and each run's wall time;
- one figure: critic loss, mean Q, the flow's BC loss, the distillation loss, the actor's -Q term and eval success,
  ours against the official, as the seed mean with the seed range (min-max) as a band, over offline + online steps.

    python scripts/compare_fql.py --fql-dir FQL_CHECKOUT [--jobs 2]   # a work tree, or a bare git directory (HEAD)
    python scripts/compare_fql.py --fql-dir FQL_CHECKOUT --setup-jax  # first creates --jax-python's venv (JAX_REQUIREMENTS)
    python scripts/compare_fql.py --skip-runs                         # table and figure again from --work-dir's logs

At the default budget one run takes about 7 min on one thread (estimated from 2k + 2k steps on the 2-core development
machine: ours ~105 steps/s in both phases; official ~150 updates/s offline, ~130 steps/s online, 0.85 s per
evaluation episode that fails, plus ~15 s of start-up and jit), so 3 seeds take ~40 min with --jobs 1.

The official code runs unmodified, through a launcher (LAUNCHER) that only forces wandb.init(mode='disabled') (its
setup_wandb passes mode='online', utils/log_utils.py:67) and points ogbench.make_env_and_datasets at --dataset-dir
(envs/env_utils.py:105 reads ~/.ogbench/data). A missing pointmaze dataset is written by
scripts/make_pointmaze_dataset.py first. Before the table, the flags each run actually resolved (our TensorBoard
`hyperparameters` text, the official flags.json) are checked against the mapping.

Flag mapping (the defaults: the README's CPU budget on the scripted pointmaze):

| what | fino.py | official main.py |
|---|---|---|
| data | --dataset pointmaze-medium-navigate-singletask-task1-v0 --dataset-dir D | --env_name=(same); D by the launcher |
| algorithm | --algo fql (eta 0, no guidance: one one-step sample when acting and evaluating) | agents/fql.py (default) |
| budget | --offline-steps 20000 --online-steps 20000 | --offline_steps=20000 --online_steps=20000 |
| replay | --buffer-size 2000000 | --buffer_size=2000000 |
| batch | --batch-size 128 | --agent.batch_size=128 |
| networks | --hidden-dim 128 --num-layers 2 | --agent.actor_hidden_dims=(128, 128) --agent.value_hidden_dims=(128, 128) |
| critic ensemble | --num-critics 2 | 2, fixed (agents/fql.py:208) |
| LayerNorm | critic only, fixed (fino.make_critic) | --agent.layer_norm=True --agent.actor_layer_norm=False |
| BC coefficient | --alpha 1.0 | --agent.alpha=1.0 |
| discount | --gamma 0.99 | --agent.discount=0.99 |
| target Q aggregation | --q-agg mean | --agent.q_agg=mean |
| Polyak rate | --tau 0.05 | --agent.tau=0.05 |
| learning rate | --learning-rate 0.0003 | --agent.lr=0.0003 |
| Euler steps | --flow-steps 10 | --agent.flow_steps=10 |
| Q-loss normaliser | --no-normalize-q-loss | --agent.normalize_q_loss=False |
| evaluation | --eval-every 4000 --eval-episodes 10 | --eval_interval=4000 --eval_episodes=10 |
| logging | --log-every 1000 | --log_interval=1000 |
| seed | --seed S | --seed=S |
| checkpoints | (off) | --save_interval=offline+online+1 (never) |

Metrics: losses/qf_loss = critic/critic_loss, losses/qf_values = critic/q_mean (Q of the data actions, mean over the
ensemble and the batch), losses/flow_loss = actor/bc_flow_loss, losses/distill_loss = actor/distill_loss,
losses/actor_q_loss = actor/q_loss, eval/success = evaluation/success. Both log the losses of the update at step i at
i % log_every == 0, and number online steps on from the offline ones (step i > offline: one env step, then one
update). Both evaluate right after the update of step offline_steps and of the last step (this script requires both
phases to be multiples of --eval-every), so "after offline" and "final" compare like for like.

Known differences (official code at 719d044; paths in its repository):
- Random streams: JAX PRNG keys and NumPy batches there, torch here; no seed gives the same draws. Compare the spread
  over seeds, not seed by seed.
- Evaluation: the official one also evaluates at step 1 (main.py:192), resets its eval env without a seed
  (utils/evaluation.py:69) and draws its policy key from the global NumPy stream (utils/evaluation.py:60), which also
  draws the training batches (utils/datasets.py:64) and the validation batches (main.py:181): its evaluations shift
  its training run. Ours evaluates on its own env seeded with seed + 10000 + step, from a forked RNG, and never
  changes training. Both evaluate with one stochastic one-step sample (FQL's sample_actions ignores the temperature,
  agents/fql.py:136-153).
- Online env: official `env.reset()` without a seed (main.py:132); the start position's noise comes from the global
  NumPy stream (OGBench's maze add_noise). Ours: `env.reset(seed=seed)` once.
- OGBench version: the official code pins ogbench 1.1.0 and gymnasium 0.29.1 (requirements.txt); ours runs with the
  project's (ogbench 1.2.x, gymnasium 1.x). In ogbench 1.1.0 a single-task maze env computes success, reward and
  termination after the action (the point entering the goal); ogbench >= 1.2 computes them before it
  (`success_timing='pre'`, ogbench/locomaze/__init__.py), as the dataset relabelling does (success of s_t,
  relabel_utils.py, the same in both). So official online transitions carry the reward and mask of s_(t+1), the
  dataset's of s_t, and an official episode ends one step earlier; evaluation success differs only for an episode
  that reaches the goal on its very last step. ogbench 1.1.0 also renders once when a maze env is built (its camera
  set-up in locomaze/maze.py), so the official side needs an OpenGL context: MUJOCO_GL=egl (set here unless MUJOCO_GL is set).
- Extra work in the official update: the `actor/mse` metric samples the one-step policy every update
  (agents/fql.py:82-83); its first log interval also holds the jit compilation. Wall times include start-up and the
  evaluations (the official one has one more, at step 1).
- Logging: the official CSV header is fixed by its first row (utils/log_utils.py:26), so online-only keys
  (exploration/*) never reach train.csv; ours logs episodes as charts/episodic_return.
Matched by construction (checked in the code): Xavier-uniform kernels and zero biases (utils/networks.py:10), GELU
with the tanh approximation (flax nn.gelu), critic LayerNorm eps 1e-6, the actor's -Q through the frozen critic
averaged over the ensemble (agents/fql.py:69-71), the Polyak step from the pre-update critic (agents/fql.py:113-120),
Adam (optax.adam's defaults = torch's), dataset actions clipped to +-(1 - 1e-5) (envs/env_utils.py:139-146), replay
capacity max(buffer_size, N + 1) pre-filled with the dataset (main.py:80-82), online masks 1 - terminated (main.py:152),
no online reward shift on OGBench (main.py:140-144).
"""

import csv
import glob
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import tyro
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPLS = ("ours", "official")
LABELS = {"ours": "fino.py --algo fql (PyTorch)", "official": "official FQL (JAX)"}
# (title, our TensorBoard tag, the official CSV key); the last one is the evaluation
METRICS = (
    ("critic loss", "losses/qf_loss", "training/critic/critic_loss"),
    ("mean Q (data actions)", "losses/qf_values", "training/critic/q_mean"),
    ("flow BC loss", "losses/flow_loss", "training/actor/bc_flow_loss"),
    ("distillation loss", "losses/distill_loss", "training/actor/distill_loss"),
    ("actor -Q term", "losses/actor_q_loss", "training/actor/q_loss"),
    ("eval success", "eval/success", "evaluation/success"),
)
JAX_REQUIREMENTS = (  # the official requirements.txt without D4RL (its pins: ogbench, gymnasium, numpy), mujoco pinned
    "jax[cpu]",
    "flax",
    "optax",
    "distrax",
    "ml_collections",
    "absl-py",
    "tqdm",
    "wandb==0.19.11",
    "ogbench==1.1.0",
    "gymnasium[mujoco]==0.29.1",
    "mujoco==3.11.0",
    "dm_control==1.0.44",
    "numpy==1.26.4",
    "matplotlib",
    "moviepy",
)
# Run main.py unmodified from its folder; argv[1] is the dataset folder, the rest main.py's flags.
LAUNCHER = """
import os, runpy, sys
import ogbench, wandb
data_dir = sys.argv.pop(1)
init = wandb.init
wandb.init = lambda *a, **k: init(*a, **{**k, "mode": "disabled"})
make = ogbench.make_env_and_datasets
ogbench.make_env_and_datasets = lambda name, *a, **k: make(name, *a, **({} if k.get("env_only") else {"dataset_dir": data_dir}), **k)
sys.path.insert(0, os.getcwd())
sys.argv[0] = os.path.join(os.getcwd(), "main.py")
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@dataclass
class Args:
    fql_dir: str | None = None
    """the official FQL code: a work tree of github.com/seohongpark/fql, or a bare git directory of it (its HEAD is
    extracted to a temporary folder); not needed with --skip-runs"""
    jax_python: str = "~/.cache/fql-bench/jaxvenv/bin/python"
    """a Python interpreter with the official code's requirements (JAX_REQUIREMENTS)"""
    setup_jax: bool = False
    """create --jax-python's venv (`python3 -m venv`, then pip install JAX_REQUIREMENTS) when it does not exist"""
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """seeds; each runs once per implementation"""
    jobs: int = 1
    """runs at a time, each on one thread (2: ours and the official run of a seed side by side)"""
    work_dir: str = "runs/compare_fql"
    """where both implementations' logs go (emptied per run); --skip-runs reads them back"""
    out: str = "results/fql_vs_official.png"
    """the figure; the table goes beside it as .md and .json"""
    skip_runs: bool = False
    """run nothing: make the table and the figure from the logs already in --work-dir"""

    # the shared budget (the README's CPU budget on the scripted pointmaze)
    dataset: str = "pointmaze-medium-navigate-singletask-task1-v0"
    """an OGBench single-task name"""
    dataset_dir: str = "/tmp/fino-data"
    """the folder of its OGBench files; a missing pointmaze dataset is written by scripts/make_pointmaze_dataset.py"""
    offline_steps: int = 20_000
    """offline updates"""
    online_steps: int = 20_000
    """online steps, one env step and one update each"""
    buffer_size: int = 2_000_000
    """replay capacity (both hold max(this, N + 1) rows, the dataset first); FQL's default"""
    batch_size: int = 128
    """batch size of every update"""
    hidden_dim: int = 128
    """width of every hidden layer (actor, flow and critic)"""
    num_layers: int = 2
    """hidden layers of every network"""
    alpha: float = 1.0
    """distillation (BC) coefficient alpha"""
    gamma: float = 0.99
    """discount"""
    q_agg: Literal["mean", "min"] = "mean"
    """ensemble aggregation of the TD target"""
    tau: float = 0.05
    """Polyak rate of the target critic"""
    learning_rate: float = 3e-4
    """Adam's learning rate"""
    flow_steps: int = 10
    """Euler steps of the distillation target"""
    eval_every: int = 4_000
    """evaluation interval (must divide both phases, so both codes evaluate at the end of each)"""
    eval_episodes: int = 10
    """episodes per evaluation"""
    log_every: int = 1_000
    """loss logging interval"""


def mapping(args: Args, seed: int) -> list[tuple[str, dict, dict]]:
    """(what, our flags, the official flags): flag name without dashes -> value. Every budget flag of Args is in
    both; a value of None means fixed in that code (named in the docstring's table)."""
    dims = (args.hidden_dim,) * args.num_layers
    return [
        ("data", {"dataset": args.dataset}, {"env_name": args.dataset}),
        (
            "budget",
            {"offline-steps": args.offline_steps, "online-steps": args.online_steps},
            {"offline_steps": args.offline_steps, "online_steps": args.online_steps},
        ),
        ("replay", {"buffer-size": args.buffer_size}, {"buffer_size": args.buffer_size}),
        ("batch", {"batch-size": args.batch_size}, {"agent.batch_size": args.batch_size}),
        (
            "networks",
            {"hidden-dim": args.hidden_dim, "num-layers": args.num_layers},
            {"agent.actor_hidden_dims": dims, "agent.value_hidden_dims": dims},
        ),
        ("critic ensemble", {"num-critics": 2}, {}),
        ("LayerNorm (critic only)", {}, {"agent.layer_norm": True, "agent.actor_layer_norm": False}),
        ("BC coefficient", {"alpha": args.alpha}, {"agent.alpha": args.alpha}),
        ("discount", {"gamma": args.gamma}, {"agent.discount": args.gamma}),
        ("target Q aggregation", {"q-agg": args.q_agg}, {"agent.q_agg": args.q_agg}),
        ("Polyak rate", {"tau": args.tau}, {"agent.tau": args.tau}),
        ("learning rate", {"learning-rate": args.learning_rate}, {"agent.lr": args.learning_rate}),
        ("Euler steps", {"flow-steps": args.flow_steps}, {"agent.flow_steps": args.flow_steps}),
        ("Q-loss normaliser", {"normalize-q-loss": False}, {"agent.normalize_q_loss": False}),
        (
            "evaluation",
            {"eval-every": args.eval_every, "eval-episodes": args.eval_episodes},
            {"eval_interval": args.eval_every, "eval_episodes": args.eval_episodes},
        ),
        ("logging", {"log-every": args.log_every}, {"log_interval": args.log_every}),
        ("seed", {"seed": seed}, {"seed": seed}),
    ]


def our_flag(name: str, value) -> list[str]:
    if isinstance(value, bool):
        return [f"--{name}" if value else f"--no-{name}"]
    return [f"--{name}", str(value)]


def official_flag(name: str, value) -> str:
    return f"--{name}={value}"


def our_command(args: Args, seed: int, run_name: str) -> list[str]:
    """fino.py's command line (run from the folder that is to hold runs/{run_name})."""
    flags = ["--algo", "fql", "--dataset-dir", os.path.abspath(args.dataset_dir), "--no-cuda", "--exp-name", "fql"]
    for _, ours, _ in mapping(args, seed):
        for name, value in ours.items():
            flags += our_flag(name, value)
    return [sys.executable, os.path.join(ROOT, "fino.py"), *flags, "--run-name", run_name]


def official_command(args: Args, seed: int, save_dir: str) -> list[str]:
    """The launcher's arguments after the interpreter: -c LAUNCHER, the dataset folder, then main.py's flags."""
    flags = [official_flag(n, v) for _, _, official in mapping(args, seed) for n, v in official.items()]
    total = args.offline_steps + args.online_steps
    flags += [
        official_flag("save_dir", os.path.abspath(save_dir)),
        official_flag("run_group", "compare_fql"),
        official_flag("save_interval", total + 1),  # no checkpoints
        official_flag("video_episodes", 0),
        official_flag("balanced_sampling", 0),
    ]
    return ["-c", LAUNCHER, os.path.abspath(args.dataset_dir), *flags]


def official_flag_names(fql_dir: str) -> set[str]:
    """The flags main.py defines and the agent.* keys of agents/fql.py's get_config."""
    with open(os.path.join(fql_dir, "main.py")) as f:
        names = set(re.findall(r"flags\.DEFINE_\w+\(\s*'(\w+)'", f.read()))
    with open(os.path.join(fql_dir, "agents", "fql.py")) as f:
        config = f.read().split("def get_config", 1)[-1]
    return names | {f"agent.{key}" for key in re.findall(r"\b(\w+)=", config)}


def check_official_flags(args: Args, fql_dir: str) -> None:
    known = official_flag_names(fql_dir)
    used = [flag[2:].split("=", 1)[0] for flag in official_command(args, 0, "x")[3:]]
    missing = [name for name in used if name not in known]
    if missing:
        raise SystemExit(f"error: the FQL code in {fql_dir} has no flag {', '.join(missing)} (another version?)")


# ---- logs -------------------------------------------------------------------------------------------------------
def read_ours(run_dir: str) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, str]]:
    """Every scalar of a TensorBoard run (tag -> (steps, values)) and its `hyperparameters` text table as a dict."""
    events = EventAccumulator(run_dir, size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = {}
    for tag in events.Tags()["scalars"]:
        points = events.Scalars(tag)
        scalars[tag] = (np.array([p.step for p in points]), np.array([p.value for p in points]))
    hparams = {}
    if "hyperparameters/text_summary" in events.Tags()["tensors"]:
        text = events.Tensors("hyperparameters/text_summary")[0].tensor_proto.string_val[0].decode()
        for line in text.splitlines()[2:]:
            key, value = line.strip("|").split("|", 1)
            hparams[key] = value
    return scalars, hparams


def read_official_csv(path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """An official CsvLogger file (a header row, `step` last): key -> (steps, values); empty cells are skipped."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    columns = {}
    for key in rows[0] if rows else []:
        points = [(int(float(row["step"])), float(row[key])) for row in rows if key != "step" and row.get(key)]
        if points:
            columns[key] = (np.array([s for s, _ in points]), np.array([v for _, v in points]))
    return columns


def read_official(save_dir: str) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict]:
    """train.csv and eval.csv of one official run under save_dir (main.py nests them), and its flags.json."""
    found = glob.glob(os.path.join(save_dir, "**", "train.csv"), recursive=True)
    if len(found) != 1:
        raise SystemExit(f"error: expected one official train.csv under {save_dir}, found {len(found)}")
    run_dir = os.path.dirname(found[0])
    columns = read_official_csv(found[0])
    if os.path.exists(os.path.join(run_dir, "eval.csv")):
        columns.update(read_official_csv(os.path.join(run_dir, "eval.csv")))
    with open(os.path.join(run_dir, "flags.json")) as f:
        return columns, json.load(f)


def same(logged, expected) -> bool:
    """A logged value (a string in our text table, JSON in flags.json) equals the value the mapping asked for."""
    if isinstance(expected, bool):
        return str(logged) == str(expected)
    if isinstance(expected, tuple):
        return isinstance(logged, list) and [int(x) for x in logged] == list(expected)
    if isinstance(expected, (int, float)):
        try:
            return math.isclose(float(logged), float(expected), rel_tol=1e-9)
        except (TypeError, ValueError):
            return False
    return str(logged) == str(expected)


def check_resolved(args: Args, seed: int, hparams: dict[str, str], flags: dict) -> list[str]:
    """Mismatches between the mapping and what each run resolved (our hyperparameters text, the official
    flags.json); our --algo fql must also have resolved eta 0 and no entropy guidance."""
    expected_ours = {"eta": 0.0, "entropy_guidance": False, "algo": "fql"}
    expected_official = {}
    for _, ours, official in mapping(args, seed):
        expected_ours.update({name.replace("-", "_"): value for name, value in ours.items()})
        expected_official.update(official)
    problems = []
    if hparams:
        for key, value in expected_ours.items():
            if not same(hparams.get(key), value):
                problems.append(f"ours seed {seed}: {key} = {hparams.get(key)}, expected {value}")
    for name, value in expected_official.items():
        logged = flags.get("agent", {}).get(name[6:]) if name.startswith("agent.") else flags.get(name)
        if not same(logged, value):
            problems.append(f"official seed {seed}: {name} = {logged}, expected {value}")
    return problems


# ---- summary ----------------------------------------------------------------------------------------------------
def value_at(curve: tuple[np.ndarray, np.ndarray] | None, step: int) -> float:
    """The value logged at exactly `step` (the last one if logged twice), NaN when there is none."""
    if curve is None:
        return math.nan
    hits = np.flatnonzero(curve[0] == step)
    return float(curve[1][hits[-1]]) if len(hits) else math.nan


def seed_band(curves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, min, max) over seeds at the steps every seed logged."""
    steps = curves[0][0]
    for s, _ in curves[1:]:
        steps = np.intersect1d(steps, s)
    steps = np.unique(steps)
    values = np.stack([np.array([value_at(c, int(step)) for step in steps]) for c in curves])
    return steps, values.mean(0), values.min(0), values.max(0)


def summarize(args: Args, logs: dict, walls: dict) -> list[dict]:
    """One row per (implementation, seed): success after the offline phase and at the end, wall seconds."""
    rows = []
    for impl in IMPLS:
        key = 1 if impl == "ours" else 2
        success_key = METRICS[-1][key]
        for seed in args.seeds:
            curve = logs[impl][seed].get(success_key)
            rows.append(
                dict(
                    impl=impl,
                    seed=seed,
                    success_offline=value_at(curve, args.offline_steps),
                    success_final=value_at(curve, args.offline_steps + args.online_steps),
                    wall_s=walls.get(f"{impl}/{seed}", math.nan),
                )
            )
    return rows


def fmt(x: float, digits: int = 2) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def table(args: Args, rows: list[dict], commit: str) -> str:
    """Markdown: a row per seed, then the mean over seeds (NaN entries left out of it)."""
    off, total = args.offline_steps, args.offline_steps + args.online_steps
    by = {(r["impl"], r["seed"]): r for r in rows}
    lines = [
        f"FQL on {args.dataset}, {off} offline + {args.online_steps} online steps, {args.eval_episodes} evaluation "
        f"episodes: {LABELS['ours']} against the {LABELS['official']} at {commit[:7]}",
        "",
        f"| seed | ours: success after offline ({off}) | ours: final ({total}) | official: after offline ({off}) | "
        f"official: final ({total}) | ours: wall (s) | official: wall (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    cells = ("success_offline", "success_final")
    for seed in args.seeds:
        values = [fmt(by[impl, seed][c]) for impl in IMPLS for c in cells]
        walls = [fmt(by[impl, seed]["wall_s"], 0) for impl in IMPLS]
        lines.append(f"| {seed} | {' | '.join(values + walls)} |")
    means = [fmt(mean_of(rows, impl, c)) for impl in IMPLS for c in cells]
    walls = [fmt(mean_of(rows, impl, "wall_s"), 0) for impl in IMPLS]
    lines.append(f"| mean | {' | '.join(means + walls)} |")
    return "\n".join(lines) + "\n"


def mean_of(rows: list[dict], impl: str, key: str) -> float:
    values = [r[key] for r in rows if r["impl"] == impl and not math.isnan(r[key])]
    return float(np.mean(values)) if values else math.nan


def mapping_table(args: Args) -> str:
    lines = ["| what | fino.py | official main.py |", "|---|---|---|"]
    for what, ours, official in mapping(args, seed=0):
        left = " ".join(" ".join(our_flag(n, v)) for n, v in ours.items()) or "fixed in the code"
        right = " ".join(official_flag(n, v) for n, v in official.items()) or "fixed in the code"
        lines.append(f"| {what} | {left} | {right} |")
    return "\n".join(lines).replace("--seed 0", "--seed S").replace("--seed=0", "--seed=S") + "\n"


def plot(args: Args, logs: dict, path: str, commit: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5), dpi=110)
    for ax, (title, our_tag, official_key) in zip(axes.flat, METRICS):
        for color, marker, impl, key in (("C0", "o", "ours", our_tag), ("C1", "x", "official", official_key)):
            curves = [logs[impl][seed][key] for seed in args.seeds if key in logs[impl][seed]]
            if not curves:
                continue
            steps, mean, low, high = seed_band(curves)
            label = f"{LABELS[impl]}" + (f" {commit[:7]}" if impl == "official" else "")
            ax.plot(steps, mean, color=color, label=f"{label} (n={len(curves)})", marker=marker if "eval" in key else None)
            ax.fill_between(steps, low, high, color=color, alpha=0.2, linewidth=0)
        if our_tag == "losses/qf_loss":
            ax.set_yscale("log")  # one success row in a batch lifts it by orders of magnitude
        ax.axvline(args.offline_steps, color="0.5", linestyle="--", linewidth=1)
        ax.set_title(f"{title}\n{our_tag} | {official_key.split('/', 1)[1]}", fontsize=9)
        ax.set_xlabel("step (offline, then online)")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"FQL on {args.dataset}: seed mean, band = seed range (min-max); dashed: end of the offline phase")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---- runs -------------------------------------------------------------------------------------------------------
def check_args(args: Args) -> None:
    problems = [
        (args.offline_steps < 1 or args.online_steps < 0, "--offline-steps must be positive, --online-steps non-negative"),
        (
            min(args.eval_every, args.log_every, args.eval_episodes, args.jobs) < 1,
            "--eval-every, --log-every, --eval-episodes and --jobs must be positive",
        ),
        (
            args.offline_steps % args.eval_every or args.online_steps % args.eval_every,
            "--eval-every must divide --offline-steps and --online-steps (the official code evaluates at multiples only)",
        ),
        (not args.seeds or len(set(args.seeds)) != len(args.seeds), "--seeds must be distinct, at least one"),
        (not args.skip_runs and args.fql_dir is None, "--fql-dir is needed (or --skip-runs to re-read old logs)"),
    ]
    for failed, message in problems:
        if failed:
            raise SystemExit(f"error: {message}")


def ogbench_files(args: Args) -> list[str]:
    words = args.dataset.split("-")
    if "singletask" not in words:
        raise SystemExit(f"error: '{args.dataset}' is not an OGBench single-task name")
    stem = "-".join(words[: words.index("singletask")] + words[-1:])
    return [os.path.join(args.dataset_dir, f"{stem}{suffix}.npz") for suffix in ("", "-val")]


def ensure_dataset(args: Args) -> None:
    files = ogbench_files(args)
    if all(os.path.exists(f) for f in files):
        return
    words = args.dataset.split("-")
    if words[0] != "pointmaze":
        raise SystemExit(f"error: {files[0]} not found; download it with ogbench.download_datasets into --dataset-dir")
    print(f"writing the {words[1]} pointmaze dataset into {args.dataset_dir}")
    script = os.path.join(ROOT, "scripts", "make_pointmaze_dataset.py")
    flags = ["--out-dir", args.dataset_dir, "--maze", words[1], "--dataset-type", words[2]]
    subprocess.run([sys.executable, script, *flags], check=True)


def ensure_jax_python(args: Args) -> str:
    python = os.path.expanduser(args.jax_python)
    if os.path.exists(python):
        return python
    venv = os.path.dirname(os.path.dirname(python))
    recipe = f"python3 -m venv {venv} && {venv}/bin/pip install " + " ".join(f"'{r}'" for r in JAX_REQUIREMENTS)
    if not args.setup_jax:
        raise SystemExit(f"error: no interpreter at {python}; pass --setup-jax, or create it: {recipe}")
    print(f"creating {venv}: {recipe}")
    subprocess.run(["python3", "-m", "venv", venv], check=True)
    subprocess.run([os.path.join(venv, "bin", "pip"), "install", "-q", *JAX_REQUIREMENTS], check=True)
    return python


def official_source(fql_dir: str, scratch: str) -> tuple[str, str]:
    """(a folder holding main.py, the commit): a work tree as is, a bare git directory's HEAD extracted to scratch."""
    git = lambda *a: subprocess.run(["git", "-C", fql_dir, *a], capture_output=True, text=True)
    if os.path.isfile(os.path.join(fql_dir, "main.py")):
        top = git("rev-parse", "--show-toplevel").stdout.strip()
        if not top or os.path.realpath(top) != os.path.realpath(fql_dir):  # not a checkout of its own
            return fql_dir, "unknown"
        modified = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return fql_dir, git("rev-parse", "HEAD").stdout.strip() + (" (modified)" if modified else "")
    if git("rev-parse", "--is-bare-repository").stdout.strip() != "true":
        raise SystemExit(f"error: --fql-dir {fql_dir} has no main.py and is not a bare git directory")
    archive = subprocess.run(["git", "-C", fql_dir, "archive", "--format=tar", "HEAD"], capture_output=True, check=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(scratch, filter="data")
    if not os.path.isfile(os.path.join(scratch, "main.py")):
        raise SystemExit(f"error: the HEAD of {fql_dir} has no main.py")
    return scratch, git("rev-parse", "HEAD").stdout.strip()


def run_one(impl: str, seed: int, args: Args, jax_python: str, fql_src: str) -> float:
    """One run in its own emptied folder under --work-dir, its output in logs/; returns wall seconds."""
    folder = os.path.join(args.work_dir, impl, f"seed{seed}")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if impl == "ours":
        command, cwd = our_command(args, seed, "run"), folder
    else:
        command, cwd = [jax_python, *official_command(args, seed, folder)], fql_src
        xla = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        env.update(XLA_FLAGS=f"{env.get('XLA_FLAGS', '')} {xla}".strip(), JAX_PLATFORMS="cpu", WANDB_MODE="disabled")
        env.setdefault("MUJOCO_GL", "egl")
    log = os.path.join(args.work_dir, "logs", f"{impl}_seed{seed}.log")
    start = time.time()
    with open(log, "w") as f:
        result = subprocess.run(command, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.time() - start
    if result.returncode:
        with open(log) as f:
            tail = "".join(f.readlines()[-15:])
        raise RuntimeError(f"{impl} seed {seed} failed (exit {result.returncode}; {log}):\n{tail}")
    print(f"{impl} seed {seed}: {wall:.0f} s")
    return wall


def run_all(args: Args) -> str:
    """Both implementations for every seed, --jobs at a time; returns the official commit. Wall times and the commit
    go to {work_dir}/runs.json."""
    jax_python = ensure_jax_python(args)
    ensure_dataset(args)
    os.makedirs(os.path.join(args.work_dir, "logs"), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fql-src-") as scratch:
        fql_src, commit = official_source(os.path.abspath(args.fql_dir), scratch)
        check_official_flags(args, fql_src)
        print(f"official FQL {commit} from {args.fql_dir}; runs in {args.work_dir}")
        tasks = [(impl, seed) for seed in args.seeds for impl in IMPLS]
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = {task: pool.submit(run_one, *task, args, jax_python, fql_src) for task in tasks}
            failures = [str(f.exception()) for f in futures.values() if f.exception()]
        if failures:
            raise SystemExit("error: " + "\n".join(failures))
    walls = {f"{impl}/{seed}": future.result() for (impl, seed), future in futures.items()}
    with open(os.path.join(args.work_dir, "runs.json"), "w") as f:
        json.dump(dict(commit=commit, wall_s=walls, args=asdict(args)), f, indent=1)
    return commit


def read_all(args: Args) -> tuple[dict, list[str]]:
    """logs[impl][seed] = {tag or key: (steps, values)}, and the mismatches of the resolved flags."""
    logs, problems = {impl: {} for impl in IMPLS}, []
    for seed in args.seeds:
        run_dir = os.path.join(args.work_dir, "ours", f"seed{seed}", "runs", "run")
        if not os.path.isdir(run_dir):
            raise SystemExit(f"error: no run of ours for seed {seed} in {run_dir}")
        logs["ours"][seed], hparams = read_ours(run_dir)
        logs["official"][seed], flags = read_official(os.path.join(args.work_dir, "official", f"seed{seed}"))
        problems += check_resolved(args, seed, hparams, flags)
    return logs, problems


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_args(args)
    print("flag mapping:\n" + mapping_table(args))
    if args.skip_runs:
        with open(os.path.join(args.work_dir, "runs.json")) as f:
            meta = json.load(f)
        commit, walls = meta["commit"], meta["wall_s"]
    else:
        commit = run_all(args)
        with open(os.path.join(args.work_dir, "runs.json")) as f:
            walls = json.load(f)["wall_s"]
    logs, problems = read_all(args)
    if problems:
        raise SystemExit("error: a run did not resolve the mapped flags:\n" + "\n".join(problems))
    rows = summarize(args, logs, walls)
    text = table(args, rows, commit)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    stem = os.path.splitext(args.out)[0]
    with open(stem + ".md", "w") as f:
        f.write(text + "\nFlag mapping:\n\n" + mapping_table(args))
    with open(stem + ".json", "w") as f:
        means = {impl: {k: mean_of(rows, impl, k) for k in ("success_offline", "success_final", "wall_s")} for impl in IMPLS}
        no_nan = lambda d: {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in d.items()}
        summary = dict(official_commit=commit, args=asdict(args), runs=[no_nan(r) for r in rows])
        json.dump({**summary, "mean": {impl: no_nan(m) for impl, m in means.items()}}, f, indent=1)
    plot(args, logs, args.out, commit)
    print(text)
    print(f"wrote {args.out}, {stem}.md, {stem}.json")
