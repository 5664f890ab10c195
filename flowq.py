"""FlowQ: Energy-Guided Flow Policies for Offline RL (Alles et al., arXiv:2505.14139), a reconstruction.

READ THIS FIRST. The body of the FlowQ paper (its equations, tables and hyperparameters) was not available and
no official code was found: only the abstract and the figure captions were. What they state:
  - the target policy pi(a|s) ~ pi_beta(a|s) exp(lambda Q(s, a)) (energy E = -Q; Fig. 1), learned by
    "energy-guided flow matching", which approximates the energy-guided probability path as a Gaussian path;
  - no guidance at inference; policy training time constant in the number of flow steps (abstract, Fig. 3a);
  - the energy schedules h(t) = t, t^2, t^2 / (1 - t) and a learnable h_theta(t) (Fig. 2).
Everything else is our reconstruction, explained in docs/flowq-reconstruction.md (cited below as "recon Sec. N"):
  - the actor target (recon Sec. 2, the guidance identity of Gaussian paths):
      a_t = t a_1 + (1 - t) a_0,   a_0 ~ N(0, I),  a_1 ~ dataset,  sigma_min = 0,
      u_hat_t = (a_1 - a_0) + lambda h(t) (1 - t) / t * grad_a Q(s, a_t),
      L_pi = E || u_theta(a_t, t, s) - stopgrad(u_hat_t) ||^2,
    with grad_a Q of the TARGET critic evaluated at a_t, clamped to the action box;
  - lambda divided by the batch mean |Qbar(s, a_data)| of the target critic, as DAC does (recon Sec. 4). lambda is
    a guidance strength, not the temperature of pi_beta exp(lambda Q): the tilt it realises scales with each state's
    behaviour spread (recon Sec. 4, checked in tests/test_flowq.py);
  - how h_theta(t) is trained: fitted to the Gaussian-matched schedule (recon Sec. 5);
  - the critic: IQL-style expectile V, twin Q and a Polyak target (recon Sec. 6);
  - 10 explicit Euler steps at inference, one stochastic sample per action (recon Sec. 7);
  - all hyperparameters, including lambda for each domain, network sizes and learning rates.
No FlowQ scores were available to compare against.
"""

import math
import os
import random
import signal
import time
from dataclasses import dataclass, replace
from functools import partial
from types import SimpleNamespace
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from common.datasets import TRANSITION_KEYS, is_ogbench_name, load_dataset
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
    dataset: str = "mujoco/hopper/medium-v0"
    """a Minari id, an OGBench single-task name (e.g. antmaze-large-navigate-singletask-v0) or a D4RL-layout .npz/.hdf5 file"""
    dataset_source: Literal["auto", "minari", "ogbench", "file"] = "auto"
    """where --dataset comes from; auto: an existing path -> file, an OGBench name -> ogbench, else minari"""
    dataset_dir: str | None = None
    """where Minari (default MINARI_DATASETS_PATH or ~/.minari/datasets) or OGBench (~/.ogbench/data) datasets live"""
    dataset_download: bool = False
    """download a Minari or OGBench dataset that is not on disk"""
    env_id: str | None = None
    """the Gymnasium env to evaluate a dataset file in (files only; Minari and OGBench datasets bring their env)"""
    d4rl_name: str | None = None
    """the D4RL dataset whose reference scores normalize a file dataset's returns (default: the file's base name when
    it is a D4RL name)"""

    # Training
    total_steps: int = 1_000_000
    """total gradient updates"""
    batch_size: int = 256
    """the batch size of sample from the dataset"""
    gamma: float = 0.99
    """the discount factor gamma"""
    tau: float = 0.005
    """target smoothing coefficient of the Q networks (IQL's value)"""
    actor_lr: float = 3e-4
    """learning rate of the velocity field [ours]"""
    critic_lr: float = 3e-4
    """learning rate of the Q and V networks [ours]"""
    hidden_dim: int = 256
    """width of the hidden layers of all networks [ours]"""
    num_layers: int = 3
    """number of hidden layers of all networks (GELU; LayerNorm after it in the Q and V networks, as in FQL) [ours]"""

    # Critic (IQL-style; docs/flowq-reconstruction.md Sec. 6)
    expectile: float | None = None
    """expectile tau of the value loss; default: IQL's per-domain value, 0.9 on AntMaze, else 0.7 (AntMaze's reward
    convention, r - 1 on D4RL AntMaze, is applied by common/datasets.py)"""

    # Energy-guided flow matching (docs/flowq-reconstruction.md Sec. 2-5)
    energy_scale: float = 2.5
    """lambda, the guidance strength of the target (a_1 - a_0) + lambda c(t) grad_a Q; 0 gives plain conditional flow
    matching (behaviour cloning). Not the temperature of pi_beta exp(lambda Q): the realised tilt scales with each
    state's behaviour spread s (a Gaussian behaviour moves by lambda J(s) grad Q, J(0.1) = 0.09, J(0.3) = 0.25, where
    the exact tilt moves by lambda s^2 grad Q; docs/flowq-reconstruction.md Sec. 4). Default 2.5 [ours], untuned"""
    schedule: Literal["t", "t2", "t2_over_1mt", "learned"] = "t"
    """energy schedule h(t) of the paper's Fig. 2: t (default), t^2, t^2/(1-t), or `learned`: h_theta(t) fitted to
    the Gaussian-matched schedule t Var(a_1 - a_0 | a_t), with which a Gaussian behaviour gets the exact tilt
    pi_beta exp(lambda Q) [ours, docs/flowq-reconstruction.md Sec. 5]"""
    normalize_energy: bool = True
    """divide lambda by the batch mean |Qbar(s, a_data)| of the target critic (as DAC does), so one lambda fits any
    reward scale [ours, docs/flowq-reconstruction.md Sec. 4]"""
    schedule_lr: float = 1e-3
    """learning rate of h_theta(t) (--schedule learned) [ours]"""

    # Evaluation and logging
    flow_steps: int = 10
    """Euler steps of the flow ODE when acting [ours, docs/flowq-reconstruction.md Sec. 7]"""
    eval_every: int = 10_000
    """evaluate every this many updates"""
    eval_episodes: int | None = None
    """evaluation episodes, one stochastic flow sample per action, no guidance; default: as the papers evaluate,
    100 on D4RL AntMaze (IQL), else 50 (FQL)"""
    log_every: int = 1000
    """write losses and SPS to TensorBoard every this many updates"""


def with_domain_defaults(args: Args) -> Args:
    """Fill the flags left at None from the dataset name / env id (an explicit flag always wins), as fino.py's
    presets do: IQL's expectile 0.9 on AntMaze, else 0.7; 100 evaluation episodes on D4RL AntMaze (IQL), else 50
    (FQL). Runs before any dataset is loaded (docs/flowq-reconstruction.md Sec. 9)."""
    antmaze = "antmaze" in " ".join(str(x) for x in (args.dataset, args.env_id, args.d4rl_name)).lower()
    d4rl_antmaze = antmaze and not is_ogbench_name(os.path.basename(args.dataset))
    return replace(
        args,
        expectile=(0.9 if antmaze else 0.7) if args.expectile is None else args.expectile,
        eval_episodes=(100 if d4rl_antmaze else 50) if args.eval_episodes is None else args.eval_episodes,
    )


def check_args(args: Args) -> None:
    """One-line errors for flag values that cannot run, before any dataset is loaded: every size, count and budget
    a positive integer, every rate positive and finite, every coefficient in its range."""
    finite = math.isfinite
    counts = (
        "total_steps",
        "batch_size",
        "hidden_dim",
        "num_layers",
        "flow_steps",
        "eval_every",
        "eval_episodes",
        "log_every",
    )
    rules = [(name, "be a positive integer", getattr(args, name) >= 1) for name in counts]
    rules += [
        (name, "be positive and finite", finite(getattr(args, name)) and getattr(args, name) > 0)
        for name in ("actor_lr", "critic_lr", "schedule_lr")
    ]
    rules += [
        ("gamma", "lie in (0, 1]", 0.0 < args.gamma <= 1.0),
        ("tau", "lie in (0, 1]", 0.0 < args.tau <= 1.0),
        ("expectile", "lie in (0, 1)", 0.0 < args.expectile < 1.0),
        ("energy_scale", "be finite and >= 0", finite(args.energy_scale) and args.energy_scale >= 0.0),
        ("seed", "lie in [0, 2**32)", 0 <= args.seed < 2**32),
        ("dataset", "name a dataset", bool(args.dataset.strip())),
    ]
    for name, rule, holds in rules:
        if not holds:
            raise SystemExit(f"error: --{name.replace('_', '-')} must {rule}, got {getattr(args, name)!r}")
    if args.run_name is not None and (args.run_name in ("", ".", "..") or os.sep in args.run_name):
        raise SystemExit(f"error: --run-name must be a folder name under runs/, got '{args.run_name}'")
    if args.cudagraphs and not (args.cuda and torch.cuda.is_available()):
        raise SystemExit("error: --cudagraphs needs a CUDA device (none is available, or --no-cuda was given)")


# ---- Dataset ----------------------------------------------------------------------------------------------------------


def dataset_tag(name: str) -> str:
    """The run-name tag of a dataset: a file's base name without extension, else the id with '/' -> '-'."""
    return (os.path.splitext(os.path.basename(name))[0] if os.path.exists(name) else name).replace("/", "-")


# ---- Networks ---------------------------------------------------------------------------------------------------------


def mlp(in_dim: int, out_dim: int, hidden_dim: int, num_layers: int, layer_norm: bool = False) -> nn.Sequential:
    """Linear -> GELU [-> LayerNorm] hidden layers (the critics' order, as in FQL), then a linear output."""
    layers, dim = [], in_dim
    for _ in range(num_layers):
        layers += [nn.Linear(dim, hidden_dim), nn.GELU()] + ([nn.LayerNorm(hidden_dim, eps=1e-6)] if layer_norm else [])
        dim = hidden_dim
    return nn.Sequential(*layers, nn.Linear(dim, out_dim))


class VelocityField(nn.Module):
    """u_theta(a_t, t, s); the raw scalar t is an input (FQL's convention) [ours]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, num_layers: int):
        super().__init__()
        self.act_dim = act_dim
        self.net = mlp(obs_dim + act_dim + 1, act_dim, hidden_dim, num_layers)

    def forward(self, obs: torch.Tensor, a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([obs, a, t], -1))


class ValueNetwork(nn.Module):
    """V_psi(s) of the IQL-style critic (docs/flowq-reconstruction.md Sec. 6); returns (batch,)."""

    def __init__(self, obs_dim: int, hidden_dim: int, num_layers: int):
        super().__init__()
        self.net = mlp(obs_dim, 1, hidden_dim, num_layers, layer_norm=True)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs).squeeze(-1)


class LearnedSchedule(nn.Module):
    """h_theta(t) = 2 t sigmoid(f_theta(t)): h(0) = 0, 0 <= h <= 2t, and h = t at initialization [ours].

    The paper names a learnable h_theta(t) (Fig. 2) but not how it is trained; ours is fitted to the Gaussian-matched
    schedule (`update_schedule`, docs/flowq-reconstruction.md Sec. 5).
    """

    def __init__(self, hidden_dim: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def ratio(self, t: torch.Tensor) -> torch.Tensor:
        """h_theta(t) / t = 2 sigmoid(f_theta(t))."""
        return 2.0 * torch.sigmoid(self.net(t))

    def coefficient(self, t: torch.Tensor) -> torch.Tensor:
        """c(t) = h(t) (1 - t) / t = 2 sigmoid(f(t)) (1 - t), without the 1/t singularity."""
        return self.ratio(t) * (1.0 - t)


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


# ---- ALGO LOGIC: losses and updates -----------------------------------------------------------------------------------


def energy_coefficient(schedule: str, t: torch.Tensor, learned: LearnedSchedule | None = None) -> torch.Tensor:
    """c(t) = h(t) b_t with b_t = (1 - t) / t for the linear path, sigma_min = 0 (docs/flowq-reconstruction.md Sec. 3)."""
    if schedule == "t":
        return 1.0 - t
    if schedule == "t2":
        return t * (1.0 - t)
    if schedule == "t2_over_1mt":
        return t
    return learned.coefficient(t)


def q_gradient(q_fn, obs: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """grad_a Q(s, a) per sample, with a clamped to the action box [ours]; torch.func.grad compiles without graph
    breaks, where torch.autograd.grad does not."""
    return torch.func.grad(lambda x: q_fn(obs, x).sum())(a.detach().clamp(-1.0, 1.0)).detach()


def guided_target(
    q_fn,
    obs: torch.Tensor,
    a0: torch.Tensor,
    a1: torch.Tensor,
    t: torch.Tensor,
    energy_scale: float,
    coefficient: torch.Tensor,
    normalize_energy: bool,
):
    """The energy-guided flow-matching target u_hat_t = (a_1 - a_0) + lambda c(t) grad_a Q(s, a_t)
    (docs/flowq-reconstruction.md Sec. 2). q_fn(obs, a) -> Q of shape (batch,): the target critic's min_j Qbar_j.
    With `normalize_energy`, lambda is divided by the batch mean |Q(s, a_1)| at the DATA actions, on the device
    (DAC's normaliser, Fang et al. 2024, arXiv:2405.20555; docs/flowq-reconstruction.md Sec. 4).

    Returns the target (with gradient only through `coefficient`), the point a_t, the raw gradient grad_a Q at a_t
    (detached) and the effective scale. With lambda = 0 the target is exactly the conditional flow-matching target
    a_1 - a_0 and no critic is queried.
    """
    a_t = interpolate(a0, a1, t)
    velocity = target_velocity(a0, a1)
    if energy_scale == 0.0:
        return velocity, a_t, torch.zeros_like(a_t), torch.zeros_like(a_t[:, 0]).sum()
    grad_q = q_gradient(q_fn, obs, a_t)
    if normalize_energy:
        with torch.no_grad():
            scale = energy_scale / q_fn(obs, a1).abs().mean().clamp_min(1e-6)
    else:
        scale = torch.full_like(grad_q[0, 0], energy_scale)  # a fill kernel, not a host copy (CUDA graphs)
    return velocity + scale * coefficient * grad_q, a_t, grad_q, scale


def expectile_loss(diff: torch.Tensor, expectile: float) -> torch.Tensor:
    """L_2^tau(u) = |tau - 1(u < 0)| u^2 (IQL, Kostrikov et al. 2022, Eq. 5)."""
    weight = torch.where(diff < 0, 1.0 - expectile, expectile)
    return (weight * diff.pow(2)).mean()


def critic_loss(
    critic: CriticEnsemble, critic_target: CriticEnsemble, value: ValueNetwork, batch: dict, gamma: float, expectile: float
):
    """IQL's losses (docs/flowq-reconstruction.md Sec. 6): L_V = L_2^tau(min_j Qbar_j(s, a) - V(s)) and
    L_Q = mean_j (r + gamma m V(s') - Q_j(s, a))^2 with m the bootstrap mask (batch means). Returns (L_V + L_Q, metrics)."""
    with torch.no_grad():
        target_q = critic_target(batch["observations"], batch["actions"]).min(0).values
        q_backup = batch["rewards"] + gamma * batch["masks"] * value(batch["next_observations"])
    v = value(batch["observations"])
    vf_loss = expectile_loss(target_q - v, expectile)
    q_values = critic(batch["observations"], batch["actions"])
    qf_loss = F.mse_loss(q_values, q_backup.expand_as(q_values))
    metrics = {
        "losses/qf_loss": qf_loss.detach(),
        "losses/qf_values": q_values.detach().mean(),
        "losses/vf_loss": vf_loss.detach(),
        "losses/vf_values": v.detach().mean(),
    }
    return vf_loss + qf_loss, metrics


def update_critic(critic, critic_target, value, optimizer, *transition, gamma: float, expectile: float, tau: float):
    """One step on L_V + L_Q, then the Polyak update Qbar <- (1 - tau) Qbar + tau Q. `transition`: the batch's
    tensors in TRANSITION_KEYS order (positional, so CudaGraphStep can copy them)."""
    loss, metrics = critic_loss(critic, critic_target, value, dict(zip(TRANSITION_KEYS, transition)), gamma, expectile)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        for target_param, param in zip(critic_target.parameters(), critic.parameters()):
            target_param.lerp_(param, tau)
    return metrics


def actor_loss(
    actor: VelocityField,
    q_fn,
    schedule: LearnedSchedule | None,
    obs: torch.Tensor,
    actions: torch.Tensor,
    a0: torch.Tensor,
    t: torch.Tensor,
    schedule_name: str,
    energy_scale: float,
    normalize_energy: bool,
):
    """Guided flow matching: L_pi = || u_theta(a_t, t, s) - stopgrad(u_hat_t) ||^2 (docs/flowq-reconstruction.md
    Sec. 2); also the unguided flow-matching loss || u_theta - (a_1 - a_0) ||^2 (behaviour cloning) as a metric."""
    coefficient = energy_coefficient(schedule_name, t, schedule).detach()
    target, a_t, grad_q, scale = guided_target(q_fn, obs, a0, actions, t, energy_scale, coefficient, normalize_energy)
    velocity = actor(obs, a_t, t)
    loss = F.mse_loss(velocity, target)
    metrics = {
        "losses/actor_loss": loss.detach(),
        "losses/flow_loss": F.mse_loss(velocity.detach(), target_velocity(a0, actions)),
        "charts/guidance_norm": (target - target_velocity(a0, actions)).norm(dim=-1).mean(),
        "charts/grad_q_norm": grad_q.norm(dim=-1).mean(),
        "charts/effective_energy_scale": scale,
    }
    return loss, metrics


def update_actor(
    actor, q_fn, schedule, optimizer, obs, actions, a0, t, *, schedule_name: str, energy_scale: float, normalize_energy: bool
):
    """One step on the guided flow-matching loss; `a0 ~ N(0, I)` and `t ~ U[0, 1]` are drawn by the caller."""
    loss, metrics = actor_loss(actor, q_fn, schedule, obs, actions, a0, t, schedule_name, energy_scale, normalize_energy)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return metrics


def update_schedule(
    schedule, actor, q_fn, optimizer, obs, actions, a0, t, *, energy_scale: float, normalize_energy: bool
) -> dict[str, torch.Tensor]:
    """Fit h_theta to the Gaussian-matched schedule h*(t) = t Var(a_1 - a_0 | a_t, s) per action dimension [ours,
    docs/flowq-reconstruction.md Sec. 4-5]: regress h_theta(t) / t onto the guided flow-matching residual
    || u_theta(a_t, t, s) - u_hat_t ||^2 / d, whose mean at the optimum is that variance. On a Gaussian behaviour the
    guided flow then realises the exact tilt pi_beta exp(lambda Q) (tests/test_flowq.py)."""
    with torch.no_grad():
        coefficient = schedule.coefficient(t)
        target, a_t, _, _ = guided_target(q_fn, obs, a0, actions, t, energy_scale, coefficient, normalize_energy)
        residual = (actor(obs, a_t, t) - target).pow(2).mean(-1, keepdim=True)
    loss = F.mse_loss(schedule.ratio(t), residual)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {
        "losses/schedule_loss": loss.detach(),
        "charts/h_at_half": 0.5 * schedule.ratio(torch.full_like(t[:1], 0.5))[0, 0].detach(),
    }


def build_agent(args: Args, obs_dim: int, act_dim: int, device: torch.device) -> SimpleNamespace:
    """The networks, optimizers and step functions of a run; --compile and --cudagraphs wrap the steps."""
    actor = VelocityField(obs_dim, act_dim, args.hidden_dim, args.num_layers).to(device)
    make_critic = partial(CriticEnsemble, obs_dim, act_dim, args.hidden_dim, args.num_layers, 2, nn.GELU(), True, False)
    critic, critic_target = make_critic().to(device), make_critic().to(device)
    critic_target.load_state_dict(critic.state_dict())
    value = ValueNetwork(obs_dim, args.hidden_dim, args.num_layers).to(device)
    schedule = LearnedSchedule().to(device) if args.schedule == "learned" else None
    adam = partial(torch.optim.Adam, capturable=args.cudagraphs)
    actor_optimizer = adam(actor.parameters(), lr=args.actor_lr)
    critic_optimizer = adam(list(critic.parameters()) + list(value.parameters()), lr=args.critic_lr)
    schedule_optimizer = adam(schedule.parameters(), lr=args.schedule_lr) if schedule else None
    q_target_min = lambda o, a: critic_target(o, a).min(0).values  # the actor's energy: min_j Qbar_j (recon Sec. 4)
    guidance = dict(energy_scale=args.energy_scale, normalize_energy=args.normalize_energy)
    speed_up = torch.compile if args.compile else lambda fn: fn  # compile the functions, not the partials: one cache each
    steps = dict(
        critic_step=partial(
            speed_up(update_critic),
            critic,
            critic_target,
            value,
            critic_optimizer,
            gamma=args.gamma,
            expectile=args.expectile,
            tau=args.tau,
        ),
        actor_step=partial(
            speed_up(update_actor), actor, q_target_min, schedule, actor_optimizer, schedule_name=args.schedule, **guidance
        ),
        policy_step=partial(speed_up(act), actor, flow_steps=args.flow_steps),
    )
    if schedule is not None and args.energy_scale > 0.0:
        steps["schedule_step"] = partial(
            speed_up(update_schedule), schedule, actor, q_target_min, schedule_optimizer, **guidance
        )
    if args.cudagraphs:
        steps = {k: CudaGraphStep(f) for k, f in steps.items()}
    return SimpleNamespace(
        actor=actor,
        critic=critic,
        critic_target=critic_target,
        value=value,
        schedule=schedule,
        actor_optimizer=actor_optimizer,
        critic_optimizer=critic_optimizer,
        schedule_optimizer=schedule_optimizer,
        energy=q_target_min,
        **{"schedule_step": None, **steps},
    )


def validation_losses(agent: SimpleNamespace, args: Args, batch: dict, a0: torch.Tensor, t: torch.Tensor):
    """The critic's and actor's losses on a held-out batch, without any update, as `val/<name>` (OGBench's
    validation split)."""
    with torch.no_grad():
        _, metrics = critic_loss(agent.critic, agent.critic_target, agent.value, batch, args.gamma, args.expectile)
        _, actor_metrics = actor_loss(
            agent.actor,
            agent.energy,
            agent.schedule,
            batch["observations"],
            batch["actions"],
            a0,
            t,
            args.schedule,
            args.energy_scale,
            args.normalize_energy,
        )
    return {f"val/{k[len('losses/') :]}": v for k, v in {**metrics, **actor_metrics}.items() if k.startswith("losses/")}


def train_step(agent: SimpleNamespace, batch: dict[str, torch.Tensor], a0: torch.Tensor, t: torch.Tensor):
    """One iteration: a critic step, then an actor step (and an h_theta step) on the same batch; a_0 ~ N(0, I) and
    t ~ U[0, 1] are drawn by the caller. Returns the steps' detached metrics."""
    metrics = agent.critic_step(*(batch[k] for k in TRANSITION_KEYS))
    metrics = {**metrics, **agent.actor_step(batch["observations"], batch["actions"], a0, t)}
    if agent.schedule_step is not None:
        metrics = {**metrics, **agent.schedule_step(batch["observations"], batch["actions"], a0, t)}
    return metrics


# ---- Acting and evaluation --------------------------------------------------------------------------------------------


def act(actor: VelocityField, obs: torch.Tensor, a0: torch.Tensor, flow_steps: int) -> torch.Tensor:
    """Euler-integrate u_theta from a_0 ~ N(0, I) (drawn by the caller), no guidance, clip to [-1, 1] (abstract:
    no guidance at inference; docs/flowq-reconstruction.md Sec. 7)."""
    with torch.no_grad():
        return euler_sample(lambda a, t: actor(obs, a, t), a0, flow_steps).clamp(-1.0, 1.0)


def sample_actions(actor: VelocityField, obs: torch.Tensor, flow_steps: int) -> torch.Tensor:
    """Actions for a batch of observations, with fresh a_0 ~ N(0, I)."""
    return act(actor, obs, torch.randn(obs.shape[0], actor.act_dim, device=obs.device), flow_steps)


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


# ---- TRY NOT TO MODIFY: checkpoints, speed, checks --------------------------------------------------------------------


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


RESUME_KEYS = (
    "args",
    "global_step",
    "rng",
    "actor",
    "critic",
    "critic_target",
    "value",
    "actor_optimizer",
    "critic_optimizer",
)


def resume_args(args: Args, device: torch.device) -> tuple[Args, dict]:
    """--resume DIR: the checkpoint DIR/{exp_name}.pt and the run's own flags. Flags given next to --resume must equal
    the run's, except --resume, --cuda, --compile and --cudagraphs; --run-name, if given, must name DIR."""
    path = os.path.join(args.resume, f"{args.exp_name}.pt")
    state = load_checkpoint(path, "flowq.py", device)
    missing = [key for key in RESUME_KEYS if key not in state]
    if missing:
        raise SystemExit(f"error: '{path}' cannot be resumed: it lacks {', '.join(missing)} (written by an older flowq.py?)")
    run_name = os.path.basename(os.path.normpath(args.resume))
    if args.run_name not in (None, run_name):
        raise SystemExit(f"error: --resume: --run-name {args.run_name} does not name the resumed folder {args.resume}")
    free = dict(resume=args.resume, cuda=args.cuda, compile=args.compile, cudagraphs=args.cudagraphs, run_name=run_name)
    try:
        saved = Args(**state["args"])
    except TypeError as e:
        raise SystemExit(f"error: '{path}' holds flags of another version of flowq.py ({e})") from None
    given = with_domain_defaults(tyro.cli(Args, default=replace(saved, **free)))  # flags not given take the run's values
    for name, value in vars(given).items():
        if name not in free and value != getattr(saved, name):
            flag = "--" + name.replace("_", "-")
            raise SystemExit(f"error: --resume: flag {flag} differs from the run's ({value} vs {getattr(saved, name)})")
    return given, state


def rng_states() -> dict:
    """Every random stream the rest of a run draws from: torch (CPU, CUDA), numpy and python (evaluation and the
    validation losses fork and reseed their own). Reading them draws nothing."""
    return dict(
        torch=torch.get_rng_state(),
        cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        numpy=np.random.get_state(),
        python=random.getstate(),
    )


def set_rng_states(states: dict) -> None:
    """Put back the streams rng_states read (the CUDA ones only where CUDA is available)."""
    torch.set_rng_state(states["torch"].cpu())
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state.cpu() for state in states["cuda"]])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])


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
    args = with_domain_defaults(tyro.cli(Args))
    check_args(args)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    resumed = None
    if args.resume:  # the run's own flags and its last checkpoint
        args, resumed = resume_args(args, device)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic

    data = load_dataset(
        args.dataset, args.dataset_source, args.dataset_dir, args.env_id, args.dataset_download, device, args.d4rl_name
    )
    env = data.make_env(args.seed)
    run_name = args.run_name or f"{dataset_tag(args.dataset)}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = args.resume or f"runs/{run_name}"

    # ALGO LOGIC: networks, optimizers, update functions (+ torch.compile / CudaGraphStep when asked)
    agent = build_agent(args, data.obs_dim, data.act_dim, device)
    modules = {k: v for k, v in vars(agent).items() if isinstance(v, (nn.Module, torch.optim.Optimizer))}
    start_step = 0
    if resumed:
        try:
            for name, part in modules.items():
                if isinstance(part, nn.Module):
                    part.load_state_dict(resumed[name])
                else:
                    load_optimizer(part, resumed[name])
        except (RuntimeError, ValueError, KeyError) as e:
            raise SystemExit(
                f"error: checkpoint '{run_dir}/{args.exp_name}.pt' holds networks of another size (--hidden-dim/--num-layers or the dataset's dimensions): {str(e).strip().splitlines()[0]}"
            ) from None
        start_step = resumed["global_step"]

    # stop requests (Ctrl-C, SIGTERM, Slurm's SIGUSR2; caught from before the run folder exists) are checked after every
    # step: checkpoint there, then exit with 128 + the signal number
    stop_signal = None

    def request_stop(signum, frame):
        global stop_signal
        stop_signal = stop_signal or signum  # a later SIGTERM never cancels the checkpoint of a Ctrl-C
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C exits at once

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2):
        signal.signal(signum, request_stop)

    writer = SummaryWriter(run_dir, purge_step=start_step + 1 if resumed else None)  # a resume drops later events
    if not resumed:
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
        writer.add_text("dataset", f"{data.name}: {len(data)} transitions, metric {data.metric}")

    def policy(obs: np.ndarray) -> np.ndarray:
        obs_t = torch.as_tensor(obs, dtype=torch.float32, device=device).view(1, -1)
        return agent.policy_step(obs_t, torch.randn(1, data.act_dim, device=device))[0].cpu().numpy()

    checkpoint_path = f"{run_dir}/{args.exp_name}.pt"

    def training_state() -> dict:
        """Everything that shapes the rest of the run (--resume): flags, step, networks (the target critic and h_theta
        included), optimizers and every RNG."""
        return dict(script="flowq.py", args=vars(args), global_step=global_step, rng=rng_states(), **modules)

    if resumed:  # every random stream as the checkpoint left it (set last: building the networks drew from torch's)
        set_rng_states(resumed["rng"])
    first_bad, burn_in = {}, 3
    sps_start, sps_start_step, excluded = None, 0, 0.0  # a resumed run restarts the SPS clock with its burn-in [ours]
    global_step = start_step
    progress = tqdm(
        range(start_step + 1, args.total_steps + 1),
        desc=run_name,
        initial=start_step,
        total=args.total_steps,
        mininterval=5.0,
        disable=None,
    )
    try:
        for global_step in progress:
            # ALGO LOGIC: one critic step, one actor step (and one h_theta step) on a fresh batch
            if global_step == start_step + 1 + burn_in:  # charts/SPS counts training only, after a burn-in (LeanRL)
                sps_start, sps_start_step = time.time(), global_step - 1
            batch = data.sample(args.batch_size)
            a0, t = torch.randn_like(batch["actions"]), torch.rand(args.batch_size, 1, device=device)
            metrics = train_step(agent, batch, a0, t)
            record_nonfinite(metrics, global_step, first_bad)

            # TRY NOT TO MODIFY: logging, evaluation, checkpoints
            if global_step % args.log_every == 0:
                raise_if_nonfinite(first_bad, run_name)
                values = torch.stack(list(metrics.values())).tolist()  # one device-to-host copy per log step
                for name, val in zip(metrics, values):
                    writer.add_scalar(name, val, global_step)
                if data.validation is not None:  # held-out losses, on their own seeded random stream
                    val_start = time.time()
                    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.type == "cuda" else []):
                        torch.manual_seed(args.seed + 20_000 + global_step)
                        val_batch = data.validation.sample(args.batch_size)
                        val_a0 = torch.randn_like(val_batch["actions"])
                        val_t = torch.rand(args.batch_size, 1, device=device)
                        val_metrics = validation_losses(agent, args, val_batch, val_a0, val_t)
                    for name, val in zip(val_metrics, torch.stack(list(val_metrics.values())).tolist()):
                        writer.add_scalar(name, val, global_step)
                    excluded += time.time() - val_start if sps_start is not None else 0.0
                if sps_start is not None and global_step > sps_start_step:
                    sps = (global_step - sps_start_step) / max(time.time() - sps_start - excluded, 1e-9)
                    writer.add_scalar("charts/SPS", int(sps), global_step)
                if device.type == "cuda":
                    writer.add_scalar("charts/gpu_memory_mb", torch.cuda.max_memory_allocated() / 2**20, global_step)

            evaluation = global_step % args.eval_every == 0 or global_step == args.total_steps
            if evaluation:
                eval_start = time.time()
                result = evaluate(policy, env, args.eval_episodes, args.seed + 10_000 + global_step)
                if data.normalize_score is not None:
                    result["eval/normalized_score"] = data.normalize_score(result["eval/episodic_return"])
                for name, val in result.items():
                    writer.add_scalar(name, val, global_step)
                progress.set_postfix({k.split("/")[1]: f"{v:.2f}" for k, v in result.items()}, refresh=False)
                excluded += time.time() - eval_start if sps_start is not None else 0.0
            if args.save_model and (evaluation or stop_signal):  # at every evaluation, at the end, on a stop request
                save_start = time.time()
                raise_if_nonfinite(first_bad, run_name)
                save_checkpoint((checkpoint_path, training_state()))
                excluded += time.time() - save_start if sps_start is not None else 0.0
            if stop_signal:
                break
        raise_if_nonfinite(first_bad, run_name)
    except KeyboardInterrupt:  # a second Ctrl-C
        print(f"interrupted at step {global_step}, no checkpoint written; TensorBoard logs kept in {run_dir}")
        raise SystemExit(128 + signal.SIGINT) from None
    finally:
        progress.close()
        env.close()
        writer.close()
    if stop_signal and global_step < args.total_steps:
        saved = f"checkpoint of step {global_step} in {checkpoint_path}" if args.save_model else "no checkpoint (--save-model)"
        print(f"interrupted at step {global_step} by {signal.Signals(stop_signal).name}; {saved}; logs in {run_dir}")
        raise SystemExit(128 + stop_signal)
    if args.save_model:
        print(f"model saved to {checkpoint_path}")
