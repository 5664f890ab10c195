"""FINO: Flow matching with Injected Noise for Offline-to-online RL (Shin et al., ICLR 2026, arXiv:2602.18117),
on the FQL skeleton (Park et al., Flow Q-Learning, arXiv:2502.02538); FQL itself is `--algo fql`.

Networks (FQL paper, Sec. 4): a BC flow velocity field v_theta(s, x, t), a one-step policy mu_omega(s, z) distilled
from the 10-step Euler roll-out of the flow (FINO paper, Eq. 5), and a 2-member critic ensemble with LayerNorm plus
its Polyak target. One update computes all four losses from the same pre-update parameters and takes one Adam step
on their sum (official FQL code):
    L = L_Q + L_flow + alpha * L_distill + L_q
FINO changes two things:
  1. L_flow is noise-injected flow matching. Default (the official FINO code, which produced the paper's numbers):
     the network sees x_t + 0.1 exp(10 (t - 1)) xi, xi ~ N(0, I), and regresses onto x1 - x0.
     `--noise-schedule paper`: Eq. 7, x_t + eps_t, eps_t ~ N(0, alpha_t^2 I), alpha_t^2 = (eta^2 - 2 eta) t^2 + 2 eta t,
     target x1 - (1 - eta) x0 (Thm. 2: the marginal variance is never below standard FM's; Prop. 1).
     eta = 0 is standard flow matching under either schedule.
  2. Entropy-guided sampling: online, the action is one of K = min(10, ceil(A / 2)) candidates of the one-step
     policy, drawn from softmax(beta Q / mean|Q|); evaluation takes the argmax. beta follows the entropy of the acting
     policy, estimated from a 3-component full-covariance Gaussian mixture fitted by EM:
     beta <- max(0, beta + 0.1 (H - H_target)), H_target = -A (the official code's sign, normaliser, cap and constants).
`--algo fql` is FQL as its paper ran it: eta 0, one stochastic one-step sample when acting and when evaluating, no
beta estimate, FQL's offline-to-online protocol and per-task flags. Ablations of the FINO paper: w/o noise injection
`--eta 0`; fixed temperature `--beta-lr 0`; noise injection only `--no-entropy-guidance`.
Protocol: offline updates on the dataset, then one env step and one update per online step, in one replay buffer
pre-filled with the dataset. "[ours]" marks choices that neither the papers nor the official code make.
Speed: the update's random inputs are drawn outside it (draw_noise) [ours], so it is a deterministic function of its
batch: `--compile` compiles it and acting; `--cudagraphs` replays the update (not acting) as a CUDA graph.
Resume [ours]: `--resume runs/NAME` continues a `--save-model` run exactly (networks, Adam, beta, step, every RNG; online
checkpoints fall between episodes, with the replay buffer's online rows in `buffer.pt` under `--save-buffer`).
"""

import dataclasses
import functools
import math
import os
import random
import signal
import time
from dataclasses import dataclass
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from common.datasets import FILE_SUFFIXES, is_ogbench_name, load_dataset
from common.flow import euler_sample, interpolate, target_velocity


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda will be used when available"""
    compile: bool = False
    """if toggled, `torch.compile` the update functions and acting: same results, faster after a start-up cost"""
    cudagraphs: bool = False
    """if toggled, replay the update functions and acting as CUDA graphs (needs CUDA; combines with --compile)"""
    save_model: bool = False
    """whether to save a checkpoint to `runs/{run_name}/{exp_name}.pt` at every evaluation, at the end and on a stop
    request (Ctrl-C, SIGTERM, SIGUSR2)"""
    run_name: str | None = None
    """the run's folder under `runs/` (default `{env or dataset}__{exp_name}__{seed}__{unix time}`)"""
    resume: str | None = None
    """continue the run in this folder (e.g. `runs/{run_name}`) from its last checkpoint; TensorBoard continues the same curves"""

    # Dataset
    dataset: str = "antmaze-large-navigate-singletask-v0"
    """an OGBench single-task name (e.g. cube-double-play-singletask-v0), a Minari id (e.g. D4RL/antmaze/large-play-v1) or a D4RL-layout .npz/.hdf5 file"""
    dataset_source: Literal["auto", "minari", "ogbench", "file"] = "auto"
    """where --dataset comes from; auto: an existing path -> file, an OGBench name -> ogbench, else minari"""
    dataset_dir: str | None = None
    """where Minari (default MINARI_DATASETS_PATH or ~/.minari/datasets) or OGBench (~/.ogbench/data) datasets live"""
    dataset_download: bool = False
    """download a Minari or OGBench dataset that is not on disk"""
    env_id: str | None = None
    """the Gymnasium env of a dataset file, for the online steps and evaluation (files only; Minari and OGBench datasets bring their env)"""
    d4rl_name: str | None = None
    """the D4RL dataset whose reference scores normalize a file dataset's returns (default: the file's base name when
    it is a D4RL name)"""

    # Warm start
    load_model: str | None = None
    """start a NEW run from a checkpoint of fino.py: its networks, optimizer, beta and step, with this run's flags (--save-model also writes `{exp_name}_offline.pt` at the end of the offline phase: loading it runs the online phase from the offline model; --resume continues a run instead)"""

    # Algorithm and protocol
    algo: Literal["fino", "fql"] = "fino"
    """`fino`: FINO as its official code runs it; `fql`: FQL as its paper runs it (eta 0, no guidance, no beta estimate, FQL's protocol and per-task table)"""
    offline_steps: int = 1_000_000
    """gradient steps on the offline data before any interaction"""
    online_steps: int | None = None
    """environment steps of online fine-tuning, one gradient step each (UTD 1); default 500k (fino) or 1M (fql)"""
    buffer_size: int | None = None
    """replay capacity; it holds max(this, N + 1) transitions, the dataset first, then a FIFO of online data; default 1.5M (fino) or 2M (fql)"""
    batch_size: int = 256
    """the batch size of sample from the replay memory"""
    save_buffer: bool = False
    """with --save-model, also save the replay buffer beside each checkpoint (`buffer.pt`), so --resume continues
    exactly; humanoidmaze at 1M online transitions: about 0.64 GB (rows of 2 * 69 + 21 + 2 float32; the dataset's rows are not saved)"""

    # The FQL skeleton
    preset: str = "auto"
    """per-task alpha / gamma / q_agg: `auto` (the first table key contained in --dataset or --d4rl-name), a key, or `none`"""
    alpha: float | None = None
    """distillation coefficient alpha (weights L_distill); default: from --preset, else 10"""
    gamma: float | None = None
    """the discount factor gamma; default: from --preset, else 0.99"""
    q_agg: Literal["mean", "min"] | None = None
    """ensemble aggregation in the TD target and the candidate scores (the actor's L_q always averages); default: from --preset, else mean"""
    learning_rate: float = 3e-4
    """Adam learning rate of all networks (one optimizer)"""
    tau: float = 0.005
    """target smoothing coefficient"""
    hidden_dim: int = 512
    """width of the hidden layers of every MLP"""
    num_layers: int = 4
    """number of hidden layers of every MLP (GELU; LayerNorm in the critic only)"""
    num_critics: int = 2
    """critic ensemble size"""
    flow_steps: int = 10
    """Euler steps of the BC flow roll-out that the one-step policy distils"""
    normalize_q_loss: bool = False
    """scale L_q by 1 / mean|Q| (off in FQL's and FINO's runs)"""

    # FINO: noise-injected flow matching
    noise_schedule: Literal["code", "paper"] = "code"
    """`code` (the official code, which produced the paper's numbers): input noise noise_scale * exp(10 (t - 1)), target x1 - x0; `paper`: Eq. 7 with eta"""
    eta: float | None = None
    """eta of Eq. 7 (paper schedule); 0 turns noise injection off under either schedule (standard flow matching); default 0.1 (fino) or 0 (fql)"""
    noise_scale: float = 0.1
    """scale of the code schedule's input noise (used when eta > 0)"""

    # FINO: entropy-guided sampling
    entropy_guidance: bool = True
    """act with softmax(beta Q) over K candidates and evaluate with their argmax; off (and under --algo fql): one one-step sample for both"""
    num_candidates: int | None = None
    """K candidates per state; default min(10, ceil(A / 2))"""
    beta: float = 10.0
    """initial inverse temperature beta of the candidate softmax"""
    beta_lr: float = 0.1
    """step size of the beta update (0 keeps beta fixed: the fixed-temperature ablation)"""
    target_entropy: float | None = None
    """target entropy H-bar in nats; default -A"""
    beta_update_every: int = 50_000
    """estimate the entropy (and update beta) every this many online steps (--algo fino)"""
    entropy_states: int = 256
    """states (from the latest training batch) at which the entropy is estimated"""
    entropy_samples: int = 200
    """actions drawn from the acting policy per state for the mixture fit"""
    gmm_components: int = 3
    """Gaussian mixture components (full covariance)"""
    gmm_iters: int = 100
    """maximum EM iterations"""
    gmm_tol: float = 1e-3
    """EM stops when no state's mean log-likelihood improves by more than this"""
    gmm_reg: float = 1e-6
    """added to every covariance diagonal (scikit-learn's reg_covar)"""

    # Evaluation and logging
    eval_every: int | None = None
    """evaluate every this many steps (offline and online), and at the end of each phase; default 50k (fino) or 100k (fql)"""
    eval_episodes: int = 50
    """episodes per evaluation"""
    log_every: int = 5_000
    """write losses and SPS to TensorBoard every this many steps"""


FINO_TABLE = {  # (alpha, gamma, q_agg): the official FINO README's per-task flags
    "humanoidmaze-medium-navigate": (100.0, 0.995, "mean"),
    "humanoidmaze-large-navigate": (30.0, 0.995, "mean"),
    "antmaze-large-navigate": (10.0, 0.99, "min"),
    "antmaze-giant-navigate": (10.0, 0.995, "min"),
    "antsoccer-arena-navigate": (30.0, 0.995, "mean"),
    "cube-single-play": (300.0, 0.99, "mean"),  # not in FINO's README: FQL's offline flags
    "cube-double-play": (300.0, 0.99, "mean"),
    "scene-play": (300.0, 0.99, "mean"),  # not in FINO's README: FQL's offline-to-online flags
    "puzzle-3x3-play": (1000.0, 0.99, "mean"),  # not in FINO's README: FQL's offline flags
    "puzzle-4x4-play": (1000.0, 0.99, "mean"),
    "antmaze-umaze": (10.0, 0.99, "mean"),  # D4RL antmaze (umaze, umaze-diverse)
    "antmaze-medium": (10.0, 0.99, "mean"),  # D4RL antmaze (medium-play, medium-diverse)
    "antmaze-large-play": (3.0, 0.99, "mean"),
    "antmaze-large-diverse": (3.0, 0.99, "mean"),
    "pen-cloned": (1000.0, 0.99, "min"),
    "door-cloned": (1000.0, 0.99, "min"),
    "hammer-cloned": (1000.0, 0.99, "min"),
    "relocate-cloned": (10000.0, 0.99, "mean"),
}
FQL_O2O_TABLE = {  # the official FQL README's offline-to-online flags
    "humanoidmaze-medium-navigate": (100.0, 0.995, "mean"),
    "antsoccer-arena-navigate": (30.0, 0.995, "mean"),
    "cube-double-play": (300.0, 0.99, "mean"),
    "scene-play": (300.0, 0.99, "mean"),
    "puzzle-4x4-play": (1000.0, 0.99, "mean"),
    "antmaze-umaze": (10.0, 0.99, "mean"),
    "antmaze-medium": (10.0, 0.99, "mean"),
    "antmaze-large-play": (3.0, 0.99, "mean"),
    "antmaze-large-diverse": (3.0, 0.99, "mean"),
    "pen-cloned": (1000.0, 0.99, "min"),
    "door-cloned": (1000.0, 0.99, "min"),
    "hammer-cloned": (1000.0, 0.99, "min"),
    "relocate-cloned": (10000.0, 0.99, "min"),
}
FQL_OFFLINE_TABLE = {  # the official FQL README's offline flags (OGBench state-based, D4RL)
    "antmaze-large-navigate": (10.0, 0.99, "min"),
    "antmaze-giant-navigate": (10.0, 0.995, "min"),
    "humanoidmaze-medium-navigate": (30.0, 0.995, "mean"),
    "humanoidmaze-large-navigate": (30.0, 0.995, "mean"),
    "antsoccer-arena-navigate": (10.0, 0.995, "mean"),
    "cube-single-play": (300.0, 0.99, "mean"),
    "cube-double-play": (300.0, 0.99, "mean"),
    "scene-play": (300.0, 0.99, "mean"),
    "puzzle-3x3-play": (1000.0, 0.99, "mean"),
    "puzzle-4x4-play": (1000.0, 0.99, "mean"),
    "antmaze-umaze": (10.0, 0.99, "mean"),
    "antmaze-medium": (10.0, 0.99, "mean"),
    "antmaze-large-play": (3.0, 0.99, "mean"),
    "antmaze-large-diverse": (3.0, 0.99, "mean"),
    "pen-human": (10000.0, 0.99, "min"),
    "pen-cloned": (10000.0, 0.99, "min"),
    "pen-expert": (3000.0, 0.99, "min"),
    "door-": (30000.0, 0.99, "min"),  # door-human, -cloned, -expert
    "hammer-human": (30000.0, 0.99, "min"),
    "hammer-cloned": (10000.0, 0.99, "min"),
    "hammer-expert": (30000.0, 0.99, "min"),
    "relocate-human": (10000.0, 0.99, "min"),
    "relocate-cloned": (30000.0, 0.99, "min"),
    "relocate-expert": (30000.0, 0.99, "min"),
}
DEFAULT_HYPERPARAMETERS = (10.0, 0.99, "mean")  # FQL's defaults (official FQL code)
PROTOCOLS = {  # (eta, online_steps, buffer_size, eval_every): the official FINO code; the FQL paper's O2O runs
    "fino": (0.1, 500_000, 1_500_000, 50_000),
    "fql": (0.0, 1_000_000, 2_000_000, 100_000),
}


def preset_tables(args: Args) -> tuple[dict, ...]:
    """The per-task tables --preset searches, in order: FINO's; FQL's offline-to-online flags (then its offline ones
    for tasks it gives none); FQL's offline flags for offline-only runs (--online-steps 0)."""
    if args.algo == "fino":
        return (FINO_TABLE,)
    return (FQL_OFFLINE_TABLE,) if args.online_steps == 0 else (FQL_O2O_TABLE, FQL_OFFLINE_TABLE)


def resolve_args(args: Args) -> Args:
    """Fill every None-default flag: explicit flags win over --algo's protocol and the per-task preset, the preset
    over FQL's defaults. `--algo fql` also turns entropy guidance off."""
    eta, online_steps, buffer_size, eval_every = PROTOCOLS[args.algo]
    args = dataclasses.replace(
        args,
        eta=eta if args.eta is None else args.eta,
        online_steps=online_steps if args.online_steps is None else args.online_steps,
        buffer_size=buffer_size if args.buffer_size is None else args.buffer_size,
        eval_every=eval_every if args.eval_every is None else args.eval_every,
        entropy_guidance=args.entropy_guidance and args.algo == "fino",
    )
    tables = preset_tables(args)
    name = f"{args.dataset} {args.d4rl_name or ''}".lower().replace("/", "-").replace("_", "-")
    if args.preset == "auto":
        preset = next((v for table in tables for k, v in table.items() if k in name), DEFAULT_HYPERPARAMETERS)
    elif args.preset == "none":
        preset = DEFAULT_HYPERPARAMETERS
    elif any(args.preset in table for table in tables):
        preset = next(table[args.preset] for table in tables if args.preset in table)
    else:
        keys = ", ".join(dict.fromkeys(k for table in tables for k in table))
        raise SystemExit(f"error: unknown --preset '{args.preset}' for --algo {args.algo}; use auto, none or one of: {keys}")
    alpha, gamma, q_agg = (p if c is None else c for c, p in zip((args.alpha, args.gamma, args.q_agg), preset))
    return dataclasses.replace(args, alpha=alpha, gamma=gamma, q_agg=q_agg)


def check_args(args: Args) -> None:
    """One-line errors for every flag value that cannot run, before any data is loaded (on resolved args)."""

    def finite(x: float) -> bool:
        return math.isfinite(x)

    problems = [
        (min(args.offline_steps, args.online_steps) < 0, "--offline-steps and --online-steps must be non-negative"),
        (args.offline_steps + args.online_steps < 1, "nothing to do: --offline-steps + --online-steps is 0"),
        (
            min(args.buffer_size, args.batch_size, args.hidden_dim, args.num_layers, args.num_critics, args.flow_steps) < 1,
            "--buffer-size, --batch-size, --hidden-dim, --num-layers, --num-critics and --flow-steps must be positive",
        ),
        (
            min(args.eval_every, args.eval_episodes, args.log_every, args.beta_update_every) < 1,
            "--eval-every, --eval-episodes, --log-every and --beta-update-every must be positive",
        ),
        (
            not (finite(args.learning_rate) and args.learning_rate > 0),
            f"--learning-rate must be positive, got {args.learning_rate}",
        ),
        (not 0.0 < args.tau <= 1.0, f"--tau must lie in (0, 1], got {args.tau}"),
        (not 0.0 < args.gamma <= 1.0, f"--gamma must lie in (0, 1], got {args.gamma}"),
        (not (finite(args.alpha) and args.alpha >= 0), f"--alpha must be a non-negative number, got {args.alpha}"),
        (not 0.0 <= args.eta <= 1.0, f"--eta must lie in [0, 1] (Prop. 1), got {args.eta}"),
        (
            not (finite(args.noise_scale) and args.noise_scale >= 0),
            f"--noise-scale must be non-negative, got {args.noise_scale}",
        ),
        (
            args.num_candidates is not None and args.num_candidates < 1,
            f"--num-candidates must be at least 1, got {args.num_candidates}",
        ),
        (
            not args.entropy_guidance and args.num_candidates not in (None, 1),
            "--num-candidates applies to entropy guidance only; without it (or with --algo fql) one sample is taken",
        ),
        (
            args.entropy_guidance and args.num_candidates == 1,
            "entropy guidance needs at least 2 candidates; pass --num-candidates 2 or more, or --no-entropy-guidance",
        ),
        (
            not (finite(args.beta) and args.beta >= 0 and finite(args.beta_lr) and args.beta_lr >= 0),
            f"--beta and --beta-lr must be non-negative numbers, got {args.beta} and {args.beta_lr}",
        ),
        (args.target_entropy is not None and not finite(args.target_entropy), "--target-entropy must be a finite number"),
        (
            min(args.entropy_states, args.entropy_samples, args.gmm_components, args.gmm_iters) < 1,
            "--entropy-states, --entropy-samples, --gmm-components and --gmm-iters must be positive",
        ),
        (args.entropy_samples < args.gmm_components, "--entropy-samples must be at least --gmm-components"),
        (not (finite(args.gmm_tol) and args.gmm_tol > 0), f"--gmm-tol must be positive, got {args.gmm_tol}"),
        (not (finite(args.gmm_reg) and args.gmm_reg > 0), f"--gmm-reg must be positive, got {args.gmm_reg}"),
        (
            args.save_buffer and not args.save_model,
            "--save-buffer needs --save-model (the buffer is saved with the checkpoints)",
        ),
        (
            args.run_name is not None and (args.run_name in ("", ".", "..") or os.sep in args.run_name),
            f"--run-name must be a folder name under runs/, got '{args.run_name}'",
        ),
    ]
    for failed, message in problems:
        if failed:
            raise SystemExit(f"error: {message}")


def candidate_count(args: Args, act_dim: int) -> int:
    """K: --num-candidates, else min(10, ceil(A / 2)) (the official code's cap on the paper's A / 2); 1 without guidance."""
    if not args.entropy_guidance:
        return 1
    k = args.num_candidates or min(10, math.ceil(act_dim / 2))
    if k < 2:
        raise SystemExit(
            f"error: entropy guidance needs at least 2 candidates (K = {k} for A = {act_dim}); pass --num-candidates 2 or more, or --no-entropy-guidance"
        )
    return k


# ---- Dataset --------------------------------------------------------------------------------------------------------
class ReplayBuffer:
    """Transitions on the training device, pre-filled with the dataset; online data from position N on, then FIFO
    over the oldest rows (official FQL code); batches are uniform over everything held."""

    KEYS = ("observations", "actions", "rewards", "next_observations", "masks")

    def __init__(self, data, capacity: int, device: torch.device):
        n = len(data)
        self.capacity = max(capacity, n + 1)
        self.storage = {}
        for key in self.KEYS:
            source = getattr(data, key).to(device)
            self.storage[key] = torch.zeros(self.capacity, *source.shape[1:], dtype=torch.float32, device=device)
            self.storage[key][:n] = source
        self.num_data, self.added = n, 0
        self.size, self.pos = n, n % self.capacity

    def add(self, obs, action, reward, next_obs, mask) -> None:
        for key, value in zip(self.KEYS, (obs, action, reward, next_obs, mask)):
            self.storage[key][self.pos] = torch.as_tensor(value, dtype=torch.float32)
        self.pos = (self.pos + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)
        self.added += 1

    def online_rows(self) -> torch.Tensor:
        """The positions of the online transitions still held, oldest first."""
        first = max(0, self.added - self.capacity)
        return (self.num_data + torch.arange(first, self.added)) % self.capacity

    def state_dict(self) -> dict:
        """The online part (host copies) and the count of adds, which fixes the position; the dataset's rows are
        reloaded from the dataset (for --resume)."""
        rows = self.online_rows().to(self.storage["masks"].device)
        return dict(added=self.added, rows={key: value[rows].cpu() for key, value in self.storage.items()})

    def load_state_dict(self, state: dict) -> None:
        """Put the online part back on top of the freshly loaded dataset (rows the FIFO had overwritten included)."""
        self.added = state["added"]
        rows = self.online_rows()
        if len(rows) != len(state["rows"]["masks"]):
            raise ValueError(f"{len(state['rows']['masks'])} online rows for {self.added} adds")
        for key, value in self.storage.items():
            value[rows.to(value.device)] = state["rows"][key].to(value.device)
        self.pos = (self.num_data + self.added) % self.capacity
        self.size = min(self.num_data + self.added, self.capacity)

    def sample(self, batch_size: int) -> dict[str, torch.Tensor]:
        """A uniform batch, drawn and gathered on the device (no host sync)."""
        idx = torch.randint(0, self.size, (batch_size,), device=self.storage["masks"].device)
        return {key: value[idx] for key, value in self.storage.items()}


def dataset_tag(name: str) -> str:
    """The run-name tag of a dataset: a file's base name without extension, else the name with '/' -> '-'."""
    if os.path.exists(name) or name.endswith(FILE_SUFFIXES):
        return os.path.splitext(os.path.basename(name))[0]
    return name.replace("/", "-")


def online_reward_shift(dataset: str, env_id: str | None) -> float:
    """-1 for D4RL antmaze, whose dataset rewards the loader shifts to r - 1 (IQL/FQL convention; the official FQL
    code shifts the online rewards too); 0 for OGBench, whose rewards come shifted already. The rule is the loader's:
    the env id of a file dataset (--env-id is for files only), else the Minari name, contains 'antmaze'."""
    if is_ogbench_name(dataset):
        return 0.0
    return -1.0 if "antmaze" in (env_id if env_id is not None else dataset).lower() else 0.0


def training_env(data, seed: int, reward_shift: float) -> gym.Env:
    """The env of the online phase: the dataset's env (episode statistics record the raw return), its rewards shifted
    by `reward_shift` on their way into the replay buffer."""
    env = data.make_env(seed)
    return gym.wrappers.TransformReward(env, lambda r: r + reward_shift) if reward_shift else env


# ---- Networks -------------------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """The actors' MLP (official FQL code): Dense -> GELU (tanh approximation) per hidden layer, Xavier-uniform kernels,
    zero biases; the inputs are concatenated."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, num_layers: int):
        super().__init__()
        layers, dim = [], in_dim
        for _ in range(num_layers):
            layers += [nn.Linear(dim, hidden_dim), nn.GELU(approximate="tanh")]
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim))
        self.net = nn.Sequential(*layers)
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat(inputs, -1))


class CriticEnsemble(nn.Module):
    """`num_critics` independent Q-networks as one stacked MLP: one batched matmul per layer (baddbmm) instead of a
    loop over members. Each hidden layer is Linear -> activation [-> LayerNorm]; `xavier` picks Xavier-uniform
    kernels with zero biases (FQL), else nn.Linear's default initialization, per member."""

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden_dim: int,
        num_layers: int,
        num_critics: int,
        activation,
        layer_norm: bool,
        xavier: bool,
    ):
        super().__init__()
        self.activation, self.layer_norm = activation, layer_norm
        dims = [obs_dim + act_dim] + [hidden_dim] * num_layers + [1]
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        self.ln_scales, self.ln_biases = nn.ParameterList(), nn.ParameterList()
        for i, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:])):
            bound = math.sqrt(6.0 / (fan_in + fan_out)) if xavier else 1.0 / math.sqrt(fan_in)
            self.weights.append(nn.Parameter(torch.empty(num_critics, fan_in, fan_out).uniform_(-bound, bound)))
            bias = (
                torch.zeros(num_critics, 1, fan_out)
                if xavier
                else torch.empty(num_critics, 1, fan_out).uniform_(-bound, bound)
            )
            self.biases.append(nn.Parameter(bias))
            if layer_norm and i < num_layers:
                self.ln_scales.append(nn.Parameter(torch.ones(num_critics, 1, fan_out)))
                self.ln_biases.append(nn.Parameter(torch.zeros(num_critics, 1, fan_out)))

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Q-values of shape (num_critics, batch)."""
        x = torch.cat([obs, action], -1).unsqueeze(0).expand(len(self.weights[0]), -1, -1)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(b, x, w)
            if i < len(self.weights) - 1:
                x = self.activation(x)
                if self.layer_norm:
                    x = F.layer_norm(x, x.shape[-1:], eps=1e-6) * self.ln_scales[i] + self.ln_biases[i]
        return x.squeeze(-1)


def make_critic(obs_dim: int, act_dim: int, args: Args) -> CriticEnsemble:
    """FQL's critic: GELU (tanh approximation), LayerNorm (eps 1e-6), Xavier-uniform kernels, zero biases."""
    return CriticEnsemble(
        obs_dim, act_dim, args.hidden_dim, args.num_layers, args.num_critics, nn.GELU(approximate="tanh"), True, True
    )


def make_nets(obs_dim: int, act_dim: int, args: Args) -> nn.ModuleDict:
    """The trained networks: the critic ensemble Q_phi, the flow v_theta(s, x, t) (raw t) and the one-step policy
    mu_omega(s, z)."""
    return nn.ModuleDict(
        dict(
            critic=make_critic(obs_dim, act_dim, args),
            flow=MLP(obs_dim + act_dim + 1, act_dim, args.hidden_dim, args.num_layers),
            onestep=MLP(obs_dim + act_dim, act_dim, args.hidden_dim, args.num_layers),
        )
    )


def aggregate(q: torch.Tensor, how: str) -> torch.Tensor:
    """Combine the ensemble axis (dim 0): mean or min (q_agg)."""
    return q.mean(0) if how == "mean" else q.min(0).values


def frozen(critic: CriticEnsemble, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """Q-values through detached critic parameters: gradients reach the action, never phi (the actor's L_q)."""
    params = {k: v.detach() for k, v in critic.named_parameters()}
    return torch.func.functional_call(critic, params, (obs, action))


# ---- ALGO LOGIC: losses and updates ---------------------------------------------------------------------------------
def noise_std(t: torch.Tensor, eta: float) -> torch.Tensor:
    """alpha_t of Eq. 7: alpha_t^2 = (eta^2 - 2 eta) t^2 + 2 eta t, which is >= 0 on [0, 1] (Prop. 1)."""
    return ((eta**2 - 2.0 * eta) * t**2 + 2.0 * eta * t).clamp_min(0.0).sqrt()


def noisy_flow_pair(
    x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, schedule: str, eta: float, noise_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Network input and regression target of noise-injected flow matching; `noise` ~ N(0, I) like x0.

    code (the official FINO code): input x_t + noise_scale exp(10 (t - 1)) noise, target x1 - x0.
    paper (Eq. 7): input x_t + alpha_t noise, target x1 - (1 - eta) x0. Given x1 the input is N(t x1, (1 - (1 - eta) t)^2 I):
      the optimal-transport path with sigma_min = eta (Lipman et al.), whose variance is never below FM's (Thm. 2).
    eta = 0 is standard flow matching under both.
    """
    x_t = interpolate(x0, x1, t)
    if eta == 0.0:
        return x_t, target_velocity(x0, x1)
    if schedule == "paper":
        return x_t + noise_std(t, eta) * noise, x1 - (1.0 - eta) * x0
    return x_t + noise_scale * torch.exp(10.0 * (t - 1.0)) * noise, target_velocity(x0, x1)


NOISE_KEYS = ("z_next", "x0", "t", "xi", "z")
BATCH_KEYS = ReplayBuffer.KEYS + NOISE_KEYS


def draw_noise(batch_size: int, act_dim: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The update's random inputs, drawn outside it (so the update is a deterministic function of its batch, and
    --compile / --cudagraphs reproduce eager exactly) [ours]: z' of the TD target's next action, x0 ~ N(0, I),
    t ~ U[0, 1) and the injected noise xi ~ N(0, I) of L_flow, z of L_distill and L_q."""
    shape = (batch_size, act_dim)
    z_next, x0 = torch.randn(shape, device=device), torch.randn(shape, device=device)
    t = torch.rand(batch_size, 1, device=device)
    xi, z = torch.randn(shape, device=device), torch.randn(shape, device=device)
    return dict(z_next=z_next, x0=x0, t=t, xi=xi, z=z)


def fql_losses(batch: dict, nets: nn.ModuleDict, target_critic: CriticEnsemble, args: Args) -> dict[str, torch.Tensor]:
    """L_Q, L_flow, L_distill and L_q from one parameter snapshot (official FQL code; L_flow: FINO's noise injection).
    Each loss reaches only its own network. `batch` holds BATCH_KEYS; `args` the resolved alpha, gamma and q_agg."""
    obs, actions = batch["observations"], batch["actions"]
    critic, flow, onestep = nets["critic"], nets["flow"], nets["onestep"]
    # L_Q: y = r + gamma * mask * agg_k Qbar_k(s', clip(mu(s', z'))); the mask is 0 only at termination
    with torch.no_grad():
        next_actions = onestep(batch["next_observations"], batch["z_next"]).clamp(-1.0, 1.0)
        next_q = aggregate(target_critic(batch["next_observations"], next_actions), args.q_agg)
        target_q = batch["rewards"] + args.gamma * batch["masks"] * next_q
    q = critic(obs, actions)
    qf_loss = (q - target_q).pow(2).mean()

    # L_flow: noise-injected flow matching; eta = 0 is FQL's standard loss
    t = batch["t"]
    flow_input, flow_target = noisy_flow_pair(
        batch["x0"], actions, t, batch["xi"], args.noise_schedule, args.eta, args.noise_scale
    )
    flow_loss = (flow(obs, flow_input, t) - flow_target).pow(2).mean()

    # L_distill (Eq. 5): the one-step policy regresses onto the clipped Euler roll-out of the (stop-gradient) flow
    z = batch["z"]
    with torch.no_grad():
        distill_target = euler_sample(lambda x, tt: flow(obs, x, tt), z, args.flow_steps).clamp(-1.0, 1.0)
    policy_actions = onestep(obs, z)
    distill_loss = (policy_actions - distill_target).pow(2).mean()

    # L_q: -mean_k Q_k(s, clip(mu(s, z))) with the critic frozen; the actor always averages the ensemble
    q_pi = frozen(critic, obs, policy_actions.clamp(-1.0, 1.0)).mean(0)
    actor_q_loss = -q_pi.mean()
    if args.normalize_q_loss:
        actor_q_loss = actor_q_loss / q_pi.abs().mean().detach()

    total_loss = qf_loss + flow_loss + args.alpha * distill_loss + actor_q_loss
    return dict(
        qf_loss=qf_loss,
        qf_values=q.mean(),
        flow_loss=flow_loss,
        distill_loss=distill_loss,
        actor_q_loss=actor_q_loss,
        total_loss=total_loss,
    )


def update(
    nets: nn.ModuleDict, target_critic: CriticEnsemble, optimizer: torch.optim.Optimizer, args: Args, *batch: torch.Tensor
) -> dict[str, torch.Tensor]:
    """One update on `batch` (the tensors of BATCH_KEYS, in order): the summed loss from one parameter snapshot, one
    Adam step, and the Polyak update from the pre-step critic, phi_bar <- tau phi + (1 - tau) phi_bar (official FQL
    code). Returns detached metrics."""
    batch = dict(zip(BATCH_KEYS, batch))
    losses = fql_losses(batch, nets, target_critic, args)
    optimizer.zero_grad(set_to_none=True)
    losses["total_loss"].backward()
    with torch.no_grad():
        for target_param, param in zip(target_critic.parameters(), nets["critic"].parameters()):
            target_param.lerp_(param, args.tau)
    optimizer.step()
    return {f"losses/{name}": value.detach() for name, value in losses.items()}


@torch.no_grad()
def validation_metrics(validation, nets: nn.ModuleDict, target_critic: CriticEnsemble, args: Args, seed: int) -> dict:
    """The losses on a batch of the held-out split (OGBench's validation file), without any update, as `val/<name>`;
    {} when there is no split. Draws from a forked RNG seeded with `seed`: the training streams are untouched [ours]."""
    if validation is None:
        return {}
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        batch = validation.sample(args.batch_size)
        batch.update(draw_noise(args.batch_size, validation.act_dim, validation.observations.device))
        losses = fql_losses(batch, nets, target_critic, args)
    return {f"val/{name}": value for name, value in losses.items()}


# Entropy of the acting policy: batched EM for a full-covariance Gaussian mixture (the official code fits
# scikit-learn's GaussianMixture per state; here all states at once, in PyTorch)
def gaussian_log_prob(x: torch.Tensor, means: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """log N(x_n | mu_c, L_c L_c^T) for x (S, N, d), means (S, C, d), Cholesky factors (S, C, d, d) -> (S, N, C)."""
    diff = (x.unsqueeze(1) - means.unsqueeze(2)).transpose(-1, -2)  # (S, C, d, N)
    solved = torch.linalg.solve_triangular(chol, diff, upper=False)
    maha = solved.pow(2).sum(-2)  # (S, C, N)
    log_det = 2.0 * torch.diagonal(chol, dim1=-2, dim2=-1).log().sum(-1)  # (S, C)
    d = x.shape[-1]
    return (-0.5 * (maha + log_det.unsqueeze(-1) + d * math.log(2.0 * math.pi))).transpose(1, 2)


def fit_gmm(
    x: torch.Tensor, num_components: int = 3, max_iter: int = 100, tol: float = 1e-3, reg: float = 1e-6, kmeans_iters: int = 10
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EM for one full-covariance Gaussian mixture per state, all states at once, in float64.

    x: (S, N, d) samples. Returns weights (S, C), means (S, C, d), covariances (S, C, d, d).
    Mirrors scikit-learn's GaussianMixture defaults (reg_covar added to each diagonal, <= 100 iterations,
    tol on the mean log-likelihood) with one initialisation from batched k-means: greedy k-means++ seeding as in
    scikit-learn, then `kmeans_iters` Lloyd steps [ours: scikit-learn runs k-means to convergence]. Each
    covariance is a weighted sum of outer products plus reg * I, so it is positive definite by construction.
    """
    x = x.double()
    S, N, d = x.shape
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    rows = torch.arange(S, device=x.device)
    means = x[rows, torch.randint(0, N, (S,), device=x.device)].unsqueeze(1)
    d2 = torch.cdist(x, means).pow(2).min(-1).values  # (S, N): squared distance to the nearest centre
    trials = 2 + int(math.log(num_components))
    for _ in range(num_components - 1):  # D^2 sampling; of `trials` draws keep the one with the lowest potential
        picks = torch.multinomial(d2 + 1e-12, trials, replacement=True)  # (S, trials)
        cand = x[rows[:, None], picks]  # (S, trials, d)
        cand_d2 = torch.minimum(d2.unsqueeze(1), torch.cdist(cand, x).pow(2))  # (S, trials, N)
        best = cand_d2.sum(-1).argmin(-1)
        means = torch.cat([means, cand[rows, best].unsqueeze(1)], 1)
        d2 = cand_d2[rows, best]
    for _ in range(kmeans_iters):
        resp = F.one_hot(torch.cdist(x, means).argmin(-1), num_components).to(x.dtype)
        counts = resp.sum(1)  # (S, C); an empty cluster keeps its centre
        means = torch.where(counts[..., None] > 0, resp.transpose(1, 2) @ x / counts.clamp_min(1.0)[..., None], means)

    def m_step(resp):
        counts = resp.sum(1) + 10 * torch.finfo(x.dtype).eps  # (S, C)
        means = resp.transpose(1, 2) @ x / counts[..., None]
        diff = x.unsqueeze(1) - means.unsqueeze(2)  # (S, C, N, d)
        cov = (resp.transpose(1, 2)[..., None] * diff).transpose(-1, -2) @ diff / counts[..., None, None] + reg * eye
        return counts / N, means, cov

    weights, means, cov = m_step(resp)
    lower_bound = torch.full((S,), -math.inf, dtype=x.dtype, device=x.device)
    for _ in range(max_iter):
        log_joint = gaussian_log_prob(x, means, torch.linalg.cholesky(cov)) + weights.log().unsqueeze(1)
        log_norm = torch.logsumexp(log_joint, -1, keepdim=True)
        new_bound = log_norm.mean((1, 2))
        weights, means, cov = m_step((log_joint - log_norm).exp())
        converged = bool(((new_bound - lower_bound).abs() < tol).all())  # one host sync per EM iteration
        lower_bound = new_bound
        if converged:
            break
    return weights, means, cov


def gmm_entropy_bound(weights: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """H(s) <= -sum_j w_j log(w_j + 1e-8) + sum_j w_j [d/2 (1 + log 2 pi) + 1/2 log det Sigma_j], per state (the
    official code's upper bound on the mixture entropy)."""
    d = cov.shape[-1]
    component_entropy = 0.5 * d * (1.0 + math.log(2.0 * math.pi)) + 0.5 * torch.logdet(cov)
    return -(weights * (weights + 1e-8).log()).sum(-1) + (weights * component_entropy).sum(-1)


@torch.no_grad()
def policy_entropy(obs: torch.Tensor, onestep, critic, act_dim, num_candidates, guided, beta, q_agg, args) -> torch.Tensor:
    """Mean over states of the mixture entropy bound of the acting policy's actions (entropy_samples draws per state).
    Draws go in chunks of 25 as in the official code; each draw's softmax normaliser spans all states of the draw."""
    draws = []
    for start in range(0, args.entropy_samples, 25):
        n = min(25, args.entropy_samples - start)
        draws.append(
            act(obs.expand(n, *obs.shape), beta, onestep, critic, act_dim, num_candidates, guided, q_agg, greedy=False)
        )
    samples = torch.cat(draws).transpose(0, 1)  # (S, samples, A)
    weights, _, cov = fit_gmm(samples, args.gmm_components, args.gmm_iters, args.gmm_tol, args.gmm_reg)
    return gmm_entropy_bound(weights, cov).mean().float()


def update_beta(beta: torch.Tensor, entropy: torch.Tensor, target_entropy: float, lr: float) -> torch.Tensor:
    """beta <- max(0, beta + lr (H - H_target)): entropy above the target makes the softmax greedier (the official
    FINO code's sign, and the paper's prose: high entropy favours exploitation)."""
    return (beta + lr * (entropy - target_entropy)).clamp_min(0.0)


# ---- Acting and evaluation ------------------------------------------------------------------------------------------
def candidate_logits(q: torch.Tensor, beta: float | torch.Tensor) -> torch.Tensor:
    """beta * Q / mean|Q| for q (..., states, K), the normaliser taken over all states and candidates of one call
    (the official code: per state when acting on one state, across the batch in the entropy estimate)."""
    scale = q.abs().flatten(-2).mean(-1)[..., None, None].clamp_min(1e-8)
    return beta * q / scale


def select_candidates(q: torch.Tensor, beta: float | torch.Tensor, greedy: bool) -> torch.Tensor:
    """Index of the chosen candidate per row of q (..., states, K): argmax (evaluation) or a draw from
    softmax(candidate_logits) (acting online), by the Gumbel-max trick [ours]: no host sync, so it runs in a CUDA graph."""
    if greedy:
        return q.argmax(-1)
    gumbel = -torch.empty_like(q).exponential_().log()
    return (candidate_logits(q, beta) + gumbel).argmax(-1)


@torch.no_grad()
def act(
    obs: torch.Tensor,
    beta: float | torch.Tensor,
    onestep: MLP,
    critic: CriticEnsemble,
    act_dim: int,
    num_candidates: int,
    guided: bool,
    q_agg: str,
    greedy: bool,
) -> torch.Tensor:
    """Actions in [-1, 1] for states obs (..., B, obs_dim); leading dimensions are independent calls.

    Not guided (FQL): one sample clip(mu(s, z)), when acting and when evaluating (official FQL code).
    Guided (FINO): K candidates clip(mu(s, z_i)), scored by the online critics with q_agg; argmax or softmax."""
    if not guided:
        return onestep(obs, torch.randn(*obs.shape[:-1], act_dim, device=obs.device)).clamp(-1.0, 1.0)
    obs_rep = obs.unsqueeze(-2).expand(*obs.shape[:-1], num_candidates, obs.shape[-1])
    candidates = onestep(obs_rep, torch.randn(*obs_rep.shape[:-1], act_dim, device=obs.device)).clamp(-1.0, 1.0)
    q = aggregate(critic(obs_rep.reshape(-1, obs.shape[-1]), candidates.reshape(-1, act_dim)), q_agg)
    choice = select_candidates(q.view(candidates.shape[:-1]), beta, greedy)
    return torch.gather(candidates, -2, choice[..., None, None].expand(*choice.shape, 1, act_dim)).squeeze(-2)


EVAL_INFO_KEYS = ("success", "success_rate", "tasks_completed", "all_tasks_success")


def evaluate(policy, env: gym.Env, episodes: int, seed: int) -> dict[str, float]:
    """Mean return over `episodes` episodes, and the mean of every EVAL_INFO_KEYS entry of the episodes' last info.
    The env is reseeded with `seed` and the policy draws from a forked torch RNG seeded with `seed`, so an
    evaluation never shifts the training run's random streams (CORL reseeds its eval env the same way)."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    returns, finals = [], []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        obs, _ = env.reset(seed=seed)
        for _ in range(episodes):
            done = False
            while not done:
                obs, _, terminated, truncated, info = env.step(policy(obs))
                done = terminated or truncated
            returns.append(float(info["episode"]["r"]))
            finals.append(info)
            obs, _ = env.reset()
    result = {"eval/episodic_return": float(np.mean(returns))}
    for key in EVAL_INFO_KEYS:
        if key in finals[0]:
            result[f"eval/{key}"] = float(np.mean([float(info[key]) for info in finals]))
    return result


# ---- TRY NOT TO MODIFY: checkpoints, speed, checks ------------------------------------------------------------------
def save_checkpoint(*files: tuple[str, dict]) -> None:
    """Write each (path, state) pair, modules and optimizers as state dicts: all files under temporary names first,
    then renamed into place, so a crash mid-write leaves the previous files whole and matching (a checkpoint and
    its replay buffer of one step), bar the instant between the renames."""
    for path, state in files:
        torch.save({k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in state.items()}, path + ".tmp")
    for path, _ in files:
        os.replace(path + ".tmp", path)


def load_checkpoint(path: str, script: str, device: torch.device) -> dict:
    """Read a checkpoint written by `script`'s save_checkpoint; one-line errors for a missing file, a file that is
    not a checkpoint, or one of another script."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: no checkpoint at '{path}'")
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # not a torch file: pickle, zip or EOF errors
        raise SystemExit(
            f"error: '{path}' is not a checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    if not isinstance(state, dict) or state.get("script") != script:
        raise SystemExit(f"error: '{path}' is not a checkpoint of {script}")
    return state


RESUME_KEYS = ("args", "global_step", "nets", "target_critic", "optimizer", "beta", "rng")


def resume_args(args: Args, device: torch.device) -> tuple[Args, dict]:
    """--resume DIR: the checkpoint DIR/{exp_name}.pt and the run's own flags. Flags given next to --resume must equal
    the run's, except --resume, --cuda, --compile and --cudagraphs; --run-name, if given, must name DIR."""
    path = os.path.join(args.resume, f"{args.exp_name}.pt")
    state = load_checkpoint(path, "fino.py", device)
    missing = [key for key in RESUME_KEYS if key not in state]
    if missing:
        raise SystemExit(f"error: '{path}' cannot be resumed: it lacks {', '.join(missing)} (written by an older fino.py?)")
    run_name = os.path.basename(os.path.normpath(args.resume))
    if args.run_name not in (None, run_name):
        raise SystemExit(f"error: --resume: --run-name {args.run_name} does not name the resumed folder {args.resume}")
    free = dict(resume=args.resume, cuda=args.cuda, compile=args.compile, cudagraphs=args.cudagraphs, run_name=run_name)
    try:
        saved = Args(**state["args"])
    except TypeError as e:
        raise SystemExit(f"error: '{path}' holds flags of another version of fino.py ({e})") from None
    given = tyro.cli(Args, default=dataclasses.replace(saved, **free))  # flags not given take the run's values
    for name, value in vars(given).items():
        if name not in free and value != getattr(saved, name):
            flag = "--" + name.replace("_", "-")
            raise SystemExit(f"error: --resume: flag {flag} differs from the run's ({value} vs {getattr(saved, name)})")
    return given, state


def env_generators(env: gym.Env) -> list[np.random.Generator]:
    """The training env's own random generators: its reset noise (e.g. Gymnasium-Robotics' maze start and goal) and
    its action space's (OGBench's reset takes random steps with it)."""
    return [env.unwrapped.np_random, env.action_space.np_random]


def rng_states(env: gym.Env) -> dict:
    """Every random stream the rest of a run draws from: torch (CPU, CUDA), numpy, python and the training env's own.
    Reading them draws nothing."""
    return dict(
        torch=torch.get_rng_state(),
        cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        numpy=np.random.get_state(),
        python=random.getstate(),
        env=[generator.bit_generator.state for generator in env_generators(env)],
    )


def set_rng_states(states: dict, env: gym.Env) -> None:
    """Put back the streams rng_states read (the CUDA ones only where CUDA is available)."""
    torch.set_rng_state(states["torch"].cpu())
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state.cpu() for state in states["cuda"]])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    for generator, state in zip(env_generators(env), states["env"], strict=True):
        generator.bit_generator.state = state


def load_optimizer(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """optimizer.load_state_dict, keeping this run's speed settings, which a resume may change: capturable and foreach
    (--cudagraphs, --compile) and the LR's type (a tensor on the speed paths, a float in eager mode)."""
    for group, saved in zip(optimizer.param_groups, state["param_groups"]):
        saved.update(capturable=group["capturable"], foreach=group["foreach"])
        for key in ("lr", "initial_lr"):
            if key in group:
                lr = float(saved[key])
                saved[key] = torch.tensor(lr, device=group[key].device) if isinstance(group[key], torch.Tensor) else lr
    optimizer.load_state_dict(state)


def compiled(fn):
    """torch.compile(fn), with inductor's random ops falling back to eager's generator so that --compile draws the
    same numbers as eager from the same seed [ours]."""
    torch._inductor.config.fallback_random = True
    return torch.compile(fn)


class CudaGraphStep:
    """--cudagraphs: runs `fn` eagerly for `warmup` calls (real steps, on a side stream, so the allocator, cuBLAS and
    the optimizers' state settle), then captures one call in a CUDA graph and from then on replays it: the tensor
    arguments are copied into static buffers and the returned dict holds the graph's static output tensors (read
    them before the next call). `fn` must not sync with the host or branch on tensor values, its shapes must be
    fixed, and its optimizers must be built with capturable=True. Every call performs exactly one step."""

    def __init__(self, fn, warmup: int = 3):
        self.fn, self.warmup, self.calls = fn, warmup, 0
        self.graph, self.inputs, self.outputs = None, None, None

    def __call__(self, *args):
        self.calls += 1
        if self.calls <= self.warmup:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                out = self.fn(*args)
            torch.cuda.current_stream().wait_stream(stream)
            return out
        if self.graph is None:
            self.inputs = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = self.fn(*self.inputs)
        for static, a in zip(self.inputs, args):
            if isinstance(a, torch.Tensor):
                static.copy_(a)
        self.graph.replay()
        return self.outputs


def record_nonfinite(metrics: dict[str, torch.Tensor], step: int, first_bad: dict) -> None:
    """Remember, on the device and without a host sync, the first step at which each metric was NaN or inf."""
    names = tuple(metrics)
    values = torch.stack([v.float() for v in metrics.values()])
    if names not in first_bad:
        first_bad[names] = torch.full(values.shape, -1, dtype=torch.long, device=values.device)
    first_bad[names].masked_fill_(~torch.isfinite(values) & (first_bad[names] < 0), step)


def raise_if_nonfinite(first_bad: dict, run_name: str) -> None:
    """At a log step (one host copy): stop with one line naming the first non-finite metric and its step."""
    bad = [(step, name) for names, steps in first_bad.items() for name, step in zip(names, steps.tolist()) if step >= 0]
    if bad:
        step, name = min(bad)
        raise SystemExit(f"error: {name} became non-finite at step {step}; stopping (logs kept in runs/{run_name})")


if __name__ == "__main__":
    # TRY NOT TO MODIFY: seeding, device, run name, logging
    args = resolve_args(tyro.cli(Args))
    check_args(args)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    resumed = None
    if args.resume:  # the run's own flags and its last checkpoint
        args, resumed = resume_args(args, device)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if args.cudagraphs and device.type != "cuda":
        raise SystemExit("error: --cudagraphs needs a CUDA device (none is available, or --no-cuda was given)")
    run_name = args.run_name or f"{dataset_tag(args.dataset)}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = args.resume or f"runs/{run_name}"
    checkpoint_path, buffer_path = f"{run_dir}/{args.exp_name}.pt", f"{run_dir}/buffer.pt"
    saved_path = checkpoint_path if resumed else args.load_model  # --resume continues this run, --load-model starts one
    saved = resumed or (None if args.load_model is None else load_checkpoint(args.load_model, "fino.py", device))
    if saved is not None and any(key not in saved for key in RESUME_KEYS[1:6]):
        raise SystemExit(f"error: '{saved_path}' lacks the networks, optimizer, beta or step of a fino.py checkpoint")
    online_checkpoint = resumed is not None and resumed["global_step"] > args.offline_steps
    if online_checkpoint and not os.path.isfile(buffer_path):
        raise SystemExit(
            f"error: --resume: the checkpoint is of the online phase and there is no replay buffer '{buffer_path}'; "
            "run with --save-model --save-buffer to resume"
        )

    data = load_dataset(
        args.dataset,
        source=args.dataset_source,
        dataset_dir=args.dataset_dir,
        env_id=args.env_id,
        download=args.dataset_download,
        device=str(device),
        d4rl_name=args.d4rl_name,
    )
    obs_dim, act_dim = data.obs_dim, data.act_dim
    num_candidates = candidate_count(args, act_dim)
    guided = args.entropy_guidance
    target_entropy = -float(act_dim) if args.target_entropy is None else args.target_entropy

    # ALGO LOGIC: networks, optimizer, update function (+ torch.compile / CudaGraphStep when asked)
    nets = make_nets(obs_dim, act_dim, args).to(device)
    target_critic = make_critic(obs_dim, act_dim, args).to(device)
    target_critic.load_state_dict(nets["critic"].state_dict())
    optimizer = torch.optim.Adam(nets.parameters(), lr=args.learning_rate, capturable=args.cudagraphs)  # one Adam
    beta, start_step = torch.tensor(args.beta, device=device), 0
    if saved is not None:
        try:
            nets.load_state_dict(saved["nets"])
            target_critic.load_state_dict(saved["target_critic"])
            load_optimizer(optimizer, saved["optimizer"])
        except (RuntimeError, ValueError) as e:
            raise SystemExit(
                f"error: checkpoint '{saved_path}' holds networks of another size (--hidden-dim/--num-layers/--num-critics or the dataset's dimensions): {str(e).strip().splitlines()[0]}"
            ) from None
        beta.fill_(float(saved["beta"]))
        start_step = saved["global_step"]
    update_step = functools.partial(compiled(update) if args.compile else update, nets, target_critic, optimizer, args)
    if args.cudagraphs:
        update_step = CudaGraphStep(update_step)
    act_fn = compiled(act) if args.compile else act
    act_fns = {  # one per mode, greedy (evaluation) and sampled (online steps): `greedy` is Python control flow
        greedy: functools.partial(
            act_fn,
            onestep=nets["onestep"],
            critic=nets["critic"],
            act_dim=act_dim,
            num_candidates=num_candidates,
            guided=guided,
            q_agg=args.q_agg,
            greedy=greedy,
        )
        for greedy in (False, True)
    }
    if args.cudagraphs:
        act_fns = {greedy: CudaGraphStep(fn) for greedy, fn in act_fns.items()}

    def policy(obs: np.ndarray, greedy: bool) -> np.ndarray:
        obs_t = torch.as_tensor(obs, dtype=torch.float32, device=device).view(1, obs_dim)
        return act_fns[greedy](obs_t, beta)[0].cpu().numpy()

    total_steps = args.offline_steps + args.online_steps
    buffer = ReplayBuffer(data, args.buffer_size, device)
    if online_checkpoint:  # the online part of the replay buffer, of the checkpoint's step
        saved_buffer = load_checkpoint(buffer_path, "fino.py", torch.device("cpu"))
        if saved_buffer.get("global_step") != start_step:
            raise SystemExit(
                f"error: '{buffer_path}' is of step {saved_buffer.get('global_step')}, the checkpoint of step {start_step}"
            )
        try:
            buffer.load_state_dict(saved_buffer["buffer"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise SystemExit(
                f"error: '{buffer_path}' does not fit this run's replay buffer ({type(e).__name__}: {e})"
            ) from None
        del saved_buffer  # the host copy
    env = training_env(data, args.seed, online_reward_shift(args.dataset, args.env_id))
    eval_env = data.make_env(args.seed + 10_000)

    writer = SummaryWriter(run_dir, purge_step=start_step + 1 if resumed else None)  # a resume drops later events
    if not resumed:
        writer.add_text(
            "hyperparameters",
            "|param|value|\n|-|-|\n"
            + "\n".join(f"|{k}|{v}|" for k, v in {**vars(args), "num_candidates": num_candidates}.items()),
        )

    def training_state() -> dict:
        """Everything that shapes the rest of the run (--resume; --load-model takes the networks, optimizer, beta and
        step). Online it is taken between episodes, so the env needs no simulator state, only its RNGs."""
        return dict(
            script="fino.py",
            args=vars(args),
            global_step=global_step,
            nets=nets,
            target_critic=target_critic,
            optimizer=optimizer,
            beta=beta.item(),
            rng=rng_states(env),
        )

    # stop requests (Ctrl-C, SIGTERM, Slurm's SIGUSR2) are checked where a checkpoint may be written: any offline
    # step, online episode ends; checkpoint there, then exit with 128 + the signal number
    stop_signal = None

    def request_stop(signum, frame):
        global stop_signal
        stop_signal = stop_signal or signum  # a later SIGTERM never cancels the checkpoint of a Ctrl-C
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C exits at once

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2):
        signal.signal(signum, request_stop)

    obs, _ = env.reset(seed=args.seed)
    if resumed:  # every random stream as the checkpoint left it (set last: building the networks drew from torch's)
        set_rng_states(resumed["rng"], env)
        if online_checkpoint:  # taken between episodes: the restored env RNG draws the reset the uninterrupted run drew
            obs, _ = env.reset()
    global_step, first_bad, checkpoint_due = start_step, {}, False
    clock_step, clock_start, excluded = start_step + 4, None, 0.0  # SPS after a 3-update burn-in, training time only
    progress = tqdm(
        range(start_step + 1, total_steps + 1),
        desc=run_name,
        initial=start_step,
        total=total_steps,
        mininterval=5.0,
        disable=None,
    )
    try:
        for global_step in progress:
            online, episode_done = global_step > args.offline_steps, False
            # ALGO LOGIC: online, one env step with the acting policy (FINO: softmax over K), stored in the buffer
            if online:
                if global_step == args.offline_steps + 1:  # online SPS counts env steps: the clock restarts [ours]
                    clock_step, clock_start = global_step + 3, None
                action = policy(obs, greedy=False)
                next_obs, reward, terminated, truncated, info = env.step(action)
                buffer.add(obs, action, reward, next_obs, 1.0 - float(terminated))  # truncation bootstraps
                episode_done = terminated or truncated
                if episode_done:
                    writer.add_scalar("charts/episodic_return", info["episode"]["r"], global_step)
                    writer.add_scalar("charts/episodic_length", info["episode"]["l"], global_step)
            # ALGO LOGIC: one update on a uniform batch of the buffer
            batch = {**buffer.sample(args.batch_size), **draw_noise(args.batch_size, act_dim, device)}
            metrics = update_step(*(batch[key] for key in BATCH_KEYS))
            record_nonfinite(metrics, global_step, first_bad)
            if global_step == clock_step:
                clock_start, excluded = time.time(), 0.0

            # TRY NOT TO MODIFY: logging, beta, evaluation, checkpoints
            if global_step % args.log_every == 0:
                raise_if_nonfinite(first_bad, run_name)
                excluded_from = time.time()
                logged = {**metrics, "charts/beta": beta} if args.algo == "fino" else dict(metrics)
                logged.update(validation_metrics(data.validation, nets, target_critic, args, args.seed + global_step))
                values = torch.stack([v.float() for v in logged.values()]).tolist()  # one device-to-host copy
                for name, value in zip(logged, values):
                    writer.add_scalar(name, value, global_step)
                if device.type == "cuda":
                    writer.add_scalar("charts/gpu_memory_mb", torch.cuda.max_memory_allocated() / 2**20, global_step)
                if clock_start is not None and global_step > clock_step:
                    sps = (global_step - clock_step) / (excluded_from - clock_start - excluded)
                    writer.add_scalar("charts/SPS", sps, global_step)
                excluded += time.time() - excluded_from

            # ALGO LOGIC: every beta_update_every online steps, the GMM entropy of the acting policy, then beta
            if online and args.algo == "fino" and (global_step - args.offline_steps) % args.beta_update_every == 0:
                excluded_from = time.time()
                states = batch["observations"][: args.entropy_states]  # the latest training batch's states
                entropy = policy_entropy(
                    states, nets["onestep"], nets["critic"], act_dim, num_candidates, guided, beta, args.q_agg, args
                )
                if guided:
                    beta = update_beta(beta, entropy, target_entropy, args.beta_lr)
                writer.add_scalar("charts/entropy", entropy.item(), global_step)
                writer.add_scalar("charts/beta", beta.item(), global_step)
                excluded += time.time() - excluded_from

            # TRY NOT TO MODIFY: evaluation at eval_every and at the end of each phase
            if global_step % args.eval_every == 0 or global_step in (args.offline_steps, total_steps):
                excluded_from = time.time()
                result = evaluate(
                    lambda o: policy(o, greedy=guided), eval_env, args.eval_episodes, args.seed + 10_000 + global_step
                )
                if data.normalize_score is not None:
                    result["eval/normalized_score"] = float(data.normalize_score(result["eval/episodic_return"]))
                for name, value in result.items():
                    writer.add_scalar(name, value, global_step)
                progress.set_postfix(
                    {data.metric: f"{result.get(f'eval/{data.metric}', result['eval/episodic_return']):.3f}"}, refresh=False
                )
                checkpoint_due = args.save_model
                excluded += time.time() - excluded_from

            # TRY NOT TO MODIFY: checkpoints after an evaluation or a stop request, offline at once, online at the next
            # episode end (the env then needs only its RNGs, read before its reset); and at the end
            between_episodes = episode_done or not online
            if args.save_model and ((checkpoint_due or stop_signal) and between_episodes or global_step == total_steps):
                excluded_from = time.time()
                raise_if_nonfinite(first_bad, run_name)
                state = training_state()
                files = [(checkpoint_path, state)]
                if args.save_buffer and online:
                    files.insert(0, (buffer_path, dict(script="fino.py", global_step=global_step, buffer=buffer)))
                if global_step == args.offline_steps:
                    files.append((checkpoint_path.replace(".pt", "_offline.pt"), state))
                save_checkpoint(*files)
                checkpoint_due = False
                excluded += time.time() - excluded_from
            if stop_signal and (between_episodes or not args.save_model):
                break
            if episode_done:
                obs, _ = env.reset()
            elif online:
                obs = next_obs
        raise_if_nonfinite(first_bad, run_name)
    except KeyboardInterrupt:  # a second Ctrl-C
        print(f"interrupted at step {global_step}, no checkpoint written; TensorBoard logs kept in {run_dir}")
        raise SystemExit(128 + signal.SIGINT) from None
    finally:
        progress.close()
        env.close()
        eval_env.close()
        writer.close()
    if stop_signal and global_step < total_steps:
        saved = f"checkpoint of step {global_step} in {checkpoint_path}" if args.save_model else "no checkpoint (--save-model)"
        print(f"interrupted at step {global_step} by {signal.Signals(stop_signal).name}; {saved}; logs in {run_dir}")
        raise SystemExit(128 + stop_signal)
    if args.save_model:
        print(f"model saved to {checkpoint_path}")
