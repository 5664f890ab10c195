"""FlowQ: Energy-Guided Flow Policies for Offline RL (Alles et al., arXiv:2505.14139), a reconstruction.

READ THIS FIRST. Only the paper's abstract and figure captions were available, and no official code. They state: the
target policy pi(a|s) ~ pi_beta(a|s) exp(lambda Q(s, a)) (energy E = -Q, Fig. 1), learned by energy-guided flow
matching that approximates the energy-guided probability path as a Gaussian path; no guidance at inference; training
time constant in the number of flow steps (Fig. 3a); energy schedules h(t) = t, t^2, t^2 / (1 - t) and a learnable
h_theta(t) (Fig. 2). Everything else is ours, explained in docs/flowq-reconstruction.md ("recon Sec. N"):
  - the actor target (recon Sec. 2): a_t = t a_1 + (1 - t) a_0, a_0 ~ N(0, I), a_1 ~ data, sigma_min = 0,
      u_hat_t = (a_1 - a_0) + lambda h(t) (1 - t) / t * grad_a Qbar(s, a_t),   L_pi = || u_theta(a_t, t, s) - u_hat_t ||^2,
    with the TARGET critic's gradient at a_t clamped to the action box; lambda divided by the batch mean
    |Qbar(s, a_data)| as DAC does (recon Sec. 4); h_theta(t) fitted to the Gaussian-matched schedule (recon Sec. 5);
  - the critic: IQL's expectile V, twin Q and a Polyak target (recon Sec. 6); 10 Euler steps when acting (recon Sec. 7);
  - every hyperparameter. No FlowQ scores were available to compare against.
"""

import dataclasses
import math
import os
import random
import signal
import time
from functools import partial
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from tensordict.nn import CudaGraphModule
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from common import flow
from common.datasets import is_ogbench_name, load_dataset


@dataclasses.dataclass
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
    """save a checkpoint `runs/{run_name}/{exp_name}.pt` at every evaluation, at the end and on Ctrl-C, SIGTERM, SIGUSR2"""
    run_name: str | None = None
    """the run's folder under `runs/` (default `{env or dataset}__{exp_name}__{seed}__{unix time}`)"""
    resume: str | None = None
    """continue the run in this folder (e.g. `runs/{run_name}`) from its last checkpoint, on the same TensorBoard curves"""

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
    """the D4RL dataset whose reference scores normalize a file's returns (default: the file's base name, if a D4RL name)"""
    clip_actions: bool = False
    """clip dataset actions outside the env's bounds (e.g. a Gaussian policy's raw samples, which the simulator clips)
    instead of refusing them, with a note counting them"""
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
    """expectile tau of the value loss; default IQL's: 0.9 on AntMaze (whose rewards common/datasets.py shifts), else 0.7"""
    # Energy-guided flow matching (docs/flowq-reconstruction.md Sec. 2-5)
    energy_scale: float = 2.5
    """lambda, the guidance strength in (a_1 - a_0) + lambda c(t) grad_a Q; 0 is plain flow matching (behaviour cloning).
    Not the temperature of pi_beta exp(lambda Q): with --no-normalize-energy a Gaussian behaviour of spread s moves by
    lambda J(s) grad Q (J(0.1) = 0.09, J(0.3) = 0.25; the exact tilt: lambda s^2 grad Q); by default the strength is
    lambda / mean|Qbar(s, a_data)| instead of lambda (recon Sec. 4). Default 2.5 [ours], untuned"""
    schedule: Literal["t", "t2", "t2_over_1mt", "learned"] = "t"
    """energy schedule h(t) (Fig. 2): t, t^2, t^2/(1-t), or `learned`: h_theta(t) fitted to the Gaussian-matched schedule
    t Var(a_1 - a_0 | a_t), which gives a Gaussian behaviour the exact tilt pi_beta exp(lambda Q) [ours, recon Sec. 5]"""
    normalize_energy: bool = True
    """divide lambda by the batch mean |Qbar(s, a_data)| of the target critic (DAC), so one lambda fits any reward scale
    [ours, recon Sec. 4]"""
    schedule_lr: float = 1e-3
    """learning rate of h_theta(t) (--schedule learned) [ours]"""
    # Evaluation and logging
    flow_steps: int = 10
    """Euler steps of the flow ODE when acting [ours, recon Sec. 7]"""
    eval_every: int = 10_000
    """evaluate every this many updates"""
    eval_episodes: int | None = None
    """evaluation episodes (one stochastic flow sample per action, no guidance); default 100 on D4RL AntMaze (IQL), else 50"""
    log_every: int = 1000
    """write losses and SPS to TensorBoard every this many updates"""


def with_domain_defaults(args: Args) -> Args:
    """Fill the flags left at None from the dataset name (an explicit flag wins): IQL's expectile 0.9 on AntMaze, else
    0.7; 100 evaluation episodes on D4RL AntMaze (IQL), else 50 (FQL) (recon Sec. 9)."""
    antmaze = "antmaze" in f"{args.dataset} {args.env_id} {args.d4rl_name}".lower()
    d4rl_antmaze = antmaze and not is_ogbench_name(os.path.basename(args.dataset))
    expectile = (0.9 if antmaze else 0.7) if args.expectile is None else args.expectile
    episodes = (100 if d4rl_antmaze else 50) if args.eval_episodes is None else args.eval_episodes
    return dataclasses.replace(args, expectile=expectile, eval_episodes=episodes)


# ---- Networks -------------------------------------------------------------------------------------------------------
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
        self.act_dim, self.net = act_dim, mlp(obs_dim + act_dim + 1, act_dim, hidden_dim, num_layers)

    def forward(self, obs: torch.Tensor, a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([obs, a, t], -1))


class LearnedSchedule(nn.Module):
    """h_theta(t) = 2 t sigmoid(f_theta(t)): h(0) = 0, 0 <= h <= 2t, and h = t at initialization [ours, recon Sec. 5]."""

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
    """`num_critics` Q-networks stacked into one MLP: one batched matmul (baddbmm) per layer. Hidden layers are Linear ->
    activation [-> LayerNorm]; `xavier`: Xavier-uniform kernels and zero biases (FQL), else nn.Linear's init."""

    def __init__(self, in_dim: int, hidden_dim: int, num_layers: int, num_critics: int, activation, layer_norm, xavier):
        super().__init__()
        self.activation, self.layer_norm, dims = activation, layer_norm, [in_dim] + [hidden_dim] * num_layers + [1]
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        self.ln_scales, self.ln_biases = nn.ParameterList(), nn.ParameterList()
        for i, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:])):
            bound, shape = math.sqrt(6 / (fan_in + fan_out)) if xavier else fan_in**-0.5, (num_critics, 1, fan_out)
            self.weights.append(nn.Parameter(torch.empty(num_critics, fan_in, fan_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.zeros(shape) if xavier else torch.empty(shape).uniform_(-bound, bound)))
            if layer_norm and i < num_layers:
                self.ln_scales.append(nn.Parameter(torch.ones(shape)))
                self.ln_biases.append(nn.Parameter(torch.zeros(shape)))

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


# ---- ALGO LOGIC: losses and updates ---------------------------------------------------------------------------------
def expectile_loss(diff: torch.Tensor, expectile: float) -> torch.Tensor:
    """L_2^tau(u) = |tau - 1(u < 0)| u^2 (IQL, Kostrikov et al. 2022, Eq. 5)."""
    return (torch.where(diff < 0, 1.0 - expectile, expectile) * diff.pow(2)).mean()


def critic_loss(batch: dict, agent: dict, args: Args) -> tuple[torch.Tensor, dict]:
    """IQL (recon Sec. 6): L_V = L_2^tau(min_j Qbar_j(s, a) - V(s)), L_Q = mean_j (r + gamma m V(s') - Q_j(s, a))^2 with
    m the bootstrap mask. Returns L_V + L_Q and the metrics."""
    obs, actions, value = batch["observations"], batch["actions"], agent["value"]
    with torch.no_grad():
        target_q = agent["critic_target"](obs, actions).min(0).values
        q_backup = batch["rewards"] + args.gamma * batch["masks"] * value(batch["next_observations"])
    v = value(obs)  # V_psi(s)
    vf_loss = expectile_loss(target_q - v, args.expectile)
    q_values = agent["critic"](obs, actions)
    qf_loss = F.mse_loss(q_values, q_backup.expand_as(q_values))
    metrics = {"losses/qf_loss": qf_loss.detach(), "losses/qf_values": q_values.detach().mean()}
    return vf_loss + qf_loss, metrics | {"losses/vf_loss": vf_loss.detach(), "losses/vf_values": v.detach().mean()}


def update_critic(batch: dict, agent: dict, args: Args) -> dict:
    """One step on L_V + L_Q, then the Polyak update Qbar <- (1 - tau) Qbar + tau Q."""
    loss, metrics = critic_loss(batch, agent, args)
    agent["critic_optimizer"].zero_grad(set_to_none=True)
    loss.backward()
    agent["critic_optimizer"].step()
    with torch.no_grad():
        for target_param, param in zip(agent["critic_target"].parameters(), agent["critic"].parameters()):
            target_param.lerp_(param, args.tau)
    return metrics


def energy_coefficient(schedule: str, t: torch.Tensor, learned: LearnedSchedule | None = None) -> torch.Tensor:
    """c(t) = h(t) b_t with b_t = (1 - t) / t for the linear path, sigma_min = 0 (recon Sec. 3)."""
    coefficients = {"t": lambda: 1.0 - t, "t2": lambda: t * (1.0 - t), "t2_over_1mt": lambda: t}
    return coefficients[schedule]() if schedule in coefficients else learned.coefficient(t)


def guided_target(q_fn, obs, a0, a1, t, energy_scale: float, coefficient: torch.Tensor, normalize_energy: bool):
    """The energy-guided target u_hat_t = (a_1 - a_0) + lambda c(t) grad_a Q(s, a_t) (recon Sec. 2), q_fn the target
    critic's min_j Qbar_j; with `normalize_energy`, lambda / mean|Q(s, a_1)| at the DATA actions (DAC's normaliser,
    Fang et al. 2024, recon Sec. 4). Returns the target, a_t, grad_a Q at a_t and the effective scale; lambda = 0 is
    exactly the conditional flow-matching target, without querying the critic."""
    a_t, velocity = flow.interpolate(a0, a1, t), flow.target_velocity(a0, a1)
    if energy_scale == 0.0:
        return velocity, a_t, torch.zeros_like(a_t), torch.zeros_like(a_t[:, 0]).sum()
    # grad_a Q at a_t clamped to the action box [ours]; torch.func.grad compiles without graph breaks
    grad_q = torch.func.grad(lambda x: q_fn(obs, x).sum())(a_t.detach().clamp(-1.0, 1.0)).detach()
    if normalize_energy:
        with torch.no_grad():
            scale = energy_scale / q_fn(obs, a1).abs().mean().clamp_min(1e-6)
    else:
        scale = torch.full_like(grad_q[0, 0], energy_scale)  # a fill kernel, not a host copy (CUDA graphs)
    return velocity + scale * coefficient * grad_q, a_t, grad_q, scale


def actor_loss(obs, actions, a0, t, agent: dict, args: Args) -> tuple[torch.Tensor, dict]:
    """L_pi = || u_theta(a_t, t, s) - stopgrad(u_hat_t) ||^2 (recon Sec. 2); the unguided flow-matching loss (behaviour
    cloning) as a metric. a_0 ~ N(0, I) and t ~ U[0, 1] come from the caller."""
    q_fn = lambda o, a: agent["critic_target"](o, a).min(0).values  # the actor's energy: min_j Qbar_j (recon Sec. 4)
    coefficient = energy_coefficient(args.schedule, t, agent["schedule"]).detach()
    target, a_t, grad_q, scale = guided_target(
        q_fn, obs, a0, actions, t, args.energy_scale, coefficient, args.normalize_energy
    )
    velocity = agent["actor"](obs, a_t, t)
    loss, bc_target = F.mse_loss(velocity, target), flow.target_velocity(a0, actions)
    metrics = {"losses/actor_loss": loss.detach(), "losses/flow_loss": F.mse_loss(velocity.detach(), bc_target)}
    metrics["charts/guidance_norm"] = (target - bc_target).norm(dim=-1).mean()
    return loss, metrics | {"charts/grad_q_norm": grad_q.norm(dim=-1).mean(), "charts/effective_energy_scale": scale}


def update_schedule(obs, actions, a0, t, agent: dict, args: Args) -> dict:
    """Fit h_theta to the Gaussian-matched schedule h*(t) = t Var(a_1 - a_0 | a_t, s) per action dimension [ours, recon
    Sec. 4-5]: regress h_theta(t) / t onto the guided residual || u_theta(a_t, t, s) - u_hat_t ||^2 / d, whose mean at
    the optimum is that variance."""
    schedule, q_fn = agent["schedule"], lambda o, a: agent["critic_target"](o, a).min(0).values
    with torch.no_grad():
        scale, normalize = args.energy_scale, args.normalize_energy
        target, a_t, _, _ = guided_target(q_fn, obs, a0, actions, t, scale, schedule.coefficient(t), normalize)
        residual = (agent["actor"](obs, a_t, t) - target).pow(2).mean(-1, keepdim=True)
    loss = F.mse_loss(schedule.ratio(t), residual)
    agent["schedule_optimizer"].zero_grad(set_to_none=True)
    loss.backward()
    agent["schedule_optimizer"].step()
    return {"losses/schedule_loss": loss.detach(), "charts/h_at_half": 0.5 * schedule.ratio(t[:1] * 0 + 0.5)[0, 0].detach()}


def update_actor(obs, actions, a0, t, agent: dict, args: Args) -> dict:
    """One step on the guided flow-matching loss."""
    loss, metrics = actor_loss(obs, actions, a0, t, agent, args)
    agent["actor_optimizer"].zero_grad(set_to_none=True)
    loss.backward()
    agent["actor_optimizer"].step()
    return metrics


def update(batch: dict, a0: torch.Tensor, t: torch.Tensor, agent: dict, args: Args) -> dict:
    """One iteration on a batch: a critic step, an actor step and, with --schedule learned, an h_theta step."""
    metrics = update_critic(batch, agent, args) | update_actor(batch["observations"], batch["actions"], a0, t, agent, args)
    if agent["schedule"] is not None and args.energy_scale > 0.0:
        metrics |= update_schedule(batch["observations"], batch["actions"], a0, t, agent, args)
    return metrics


def make_agent(args: Args, obs_dim: int, act_dim: int, device: torch.device) -> dict:
    """The networks and optimizers: a checkpoint's contents but the RNG states."""
    actor = VelocityField(obs_dim, act_dim, args.hidden_dim, args.num_layers).to(device)
    make_critic = partial(CriticEnsemble, obs_dim + act_dim, args.hidden_dim, args.num_layers, 2, nn.GELU(), True, False)
    critic, critic_target = make_critic().to(device), make_critic().to(device)
    critic_target.load_state_dict(critic.state_dict())
    value = nn.Sequential(*mlp(obs_dim, 1, args.hidden_dim, args.num_layers, layer_norm=True), nn.Flatten(0)).to(device)
    schedule = LearnedSchedule().to(device) if args.schedule == "learned" else None
    adam = partial(torch.optim.Adam, capturable=args.cudagraphs)
    agent = dict(actor=actor, critic=critic, critic_target=critic_target, value=value, schedule=schedule)
    agent.update(actor_optimizer=adam(actor.parameters(), lr=args.actor_lr))
    agent.update(critic_optimizer=adam(list(critic.parameters()) + list(value.parameters()), lr=args.critic_lr))
    return agent | dict(schedule_optimizer=adam(schedule.parameters(), lr=args.schedule_lr) if schedule else None)


# ---- Acting and evaluation ------------------------------------------------------------------------------------------
def act(actor: VelocityField, obs: torch.Tensor, a0: torch.Tensor, flow_steps: int) -> torch.Tensor:
    """Euler-integrate u_theta from a_0 ~ N(0, I) (from the caller), no guidance (abstract), clip to [-1, 1] (recon Sec. 7)."""
    with torch.no_grad():
        return flow.euler_sample(lambda a, t: actor(obs, a, t), a0, flow_steps).clamp(-1.0, 1.0)


def sample_actions(actor: VelocityField, obs: torch.Tensor, flow_steps: int) -> torch.Tensor:
    """Actions for a batch of observations, with fresh a_0 ~ N(0, I)."""
    return act(actor, obs, torch.randn(obs.shape[0], actor.act_dim, device=obs.device), flow_steps)


def evaluate(policy, env: gym.Env, episodes: int, seed: int) -> dict[str, float]:
    """Mean return over `episodes` episodes and the mean of each success key of their last infos. The env is reseeded
    and the policy draws from a forked torch RNG seeded with `seed`: training's random streams are untouched (CORL)."""
    returns, finals = [], []
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
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
    for key in {"success", "success_rate", "tasks_completed", "all_tasks_success"} & finals[0].keys():
        result[f"eval/{key}"] = float(np.mean([info[key] for info in finals]))
    return result


def validation_losses(data, agent: dict, args: Args, seed: int) -> dict:
    """The critic's and actor's losses on a held-out batch (OGBench's validation split), no update, as `val/<name>`;
    {} without a split. Draws from a forked RNG seeded with `seed`: the training streams are untouched [ours]."""
    if data.validation is None:
        return {}
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []), torch.no_grad():
        torch.manual_seed(seed)
        batch = data.validation.sample(args.batch_size)
        a0, t = torch.randn_like(batch["actions"]), torch.rand(args.batch_size, 1, device=batch["actions"].device)
        metrics = (
            critic_loss(batch, agent, args)[1] | actor_loss(batch["observations"], batch["actions"], a0, t, agent, args)[1]
        )
    return {f"val/{k[len('losses/') :]}": v for k, v in metrics.items() if k.startswith("losses/")}


# ---- TRY NOT TO MODIFY: infrastructure (flag checks, speed path, checkpoints and resume, stop requests, NaN stop) ----
def check_args(a: Args) -> None:
    """Range checks before any dataset is loaded: the first failure ends the run with one `error:` line."""
    rules = {  # flags: (test of each value, rule)
        "total_steps batch_size hidden_dim num_layers": (lambda v: v >= 1, "be a positive integer"),
        "flow_steps eval_every eval_episodes log_every": (lambda v: v >= 1, "be a positive integer"),
        "actor_lr critic_lr schedule_lr": (lambda v: 0 < v < math.inf, "be positive and finite"),
        "gamma tau": (lambda v: 0 < v <= 1, "lie in (0, 1]"),
        "expectile": (lambda v: 0 < v < 1, "lie in (0, 1)"),
        "energy_scale": (lambda v: 0 <= v < math.inf, "be finite and >= 0"),
        "seed": (lambda v: 0 <= v < 2**32, "lie in [0, 2**32)"),
        "dataset": (lambda v: bool(v.strip()), "name a dataset"),
    }  # fmt: skip
    must = lambda k, rule: f"--{k.replace('_', '-')} must {rule}, got {getattr(a, k)!r}"
    require([(ok(getattr(a, k)), must(k, rule)) for flags, (ok, rule) in rules.items() for k in flags.split()])
    require([
        (a.run_name not in ("", ".", "..") and "/" not in (a.run_name or ""), "--run-name must be a folder name under runs/"),
        (not a.cudagraphs or a.cuda and torch.cuda.is_available(), "--cudagraphs needs a CUDA device (none, or --no-cuda)"),
    ])  # fmt: skip


def require(checks: list[tuple[bool, str]]) -> None:
    """Stop at the first failed check with its one-line message."""
    for ok, message in checks:
        if not ok:
            raise SystemExit(f"error: {message}")


def speed_up(fn, args: Args):
    """--compile: torch.compile(fn); --cudagraphs: replay it as a CUDA graph (tensordict's CudaGraphModule, as LeanRL)."""
    fn = torch.compile(fn) if args.compile else fn
    return CudaGraphModule(fn, warmup=3) if args.cudagraphs else fn


def check_finite(first_bad: dict, run_dir: str, metrics: dict | None = None, step: int = 0) -> None:
    """Note on the device (no host sync) the first step each metric was NaN or inf; without `metrics`, stop if one was."""
    if metrics is not None:
        values = torch.stack([v.float() for v in metrics.values()])
        if tuple(metrics) not in first_bad:  # one record per set of metric names, allocated once
            first_bad[tuple(metrics)] = torch.full(values.shape, -1, dtype=torch.long, device=values.device)
        steps = first_bad[tuple(metrics)]
        return steps.masked_fill_(~torch.isfinite(values) & (steps < 0), step)
    bad = sorted((step, name) for names, steps in first_bad.items() for name, step in zip(names, steps.tolist()) if step >= 0)
    if bad:
        raise SystemExit(f"error: {bad[0][1]} became non-finite at step {bad[0][0]}; stopping (logs kept in {run_dir})")


STOP = []  # stop requests (Ctrl-C, SIGTERM, Slurm's SIGUSR2): checkpoint at the next safe point, then exit 128 + signum


def request_stop(signum, frame) -> None:
    STOP.append(signum)
    if signum == signal.SIGINT:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C exits at once


def save_checkpoint(*files: tuple[str, dict]) -> None:
    """Write all (path, state dict) under temporary names, then rename them: a crash leaves the previous files whole."""
    for path, state in files:
        torch.save({k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in state.items()}, path + ".tmp")
    for path, _ in files:
        os.replace(path + ".tmp", path)


def load_checkpoint(path: str, script: str, device: torch.device, step: int | None = None) -> dict:
    """A checkpoint (or replay buffer) of `script` [and `step`], else one error line saying what it is instead."""
    require([(os.path.isfile(path), f"no checkpoint at '{path}'")])
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # not a torch file: pickle, zip or EOF errors
        raise SystemExit(
            f"error: '{path}' is not a checkpoint ({type(e).__name__}: {' '.join(str(e).split())[:99]})"
        ) from None
    require([(isinstance(state, dict) and state.get("script") == script, f"'{path}' is not a checkpoint of {script}")])
    found = state["global_step"]
    require([(step in (None, found), f"'{path}' is of step {found}, the checkpoint of step {step}")])
    return state


def resume_args(args: Args, device: torch.device, script: str, resolve=lambda args: args) -> tuple[Args, dict]:
    """--resume DIR: the run's flags and checkpoint; flags given beside it must be the run's, but the device and speed's."""
    path, name = os.path.join(args.resume, f"{args.exp_name}.pt"), os.path.basename(os.path.normpath(args.resume))
    state = load_checkpoint(path, script, device)
    require([("rng" in state, f"'{path}' cannot be resumed: it lacks rng")])
    require([(args.run_name in (None, name), f"--resume: --run-name {args.run_name} does not name the resumed folder")])
    free = dict(resume=args.resume, cuda=args.cuda, compile=args.compile, cudagraphs=args.cudagraphs, run_name=name)
    try:
        saved = Args(**state["args"])
    except TypeError as e:
        raise SystemExit(f"error: '{path}' holds flags of another version of {script} ({e})") from None
    given = resolve(tyro.cli(Args, default=dataclasses.replace(saved, **free)))  # flags not given take the run's values
    for name, value in vars(given).items():
        old, flag = getattr(saved, name), "--" + name.replace("_", "-")
        require([(name in free or value == old, f"--resume: flag {flag} differs from the run's ({value} vs {old})")])
    return given, state


def restore(state: dict, agent: dict, path: str) -> int:
    """Load a checkpoint into the agent in place, optimizers keeping this run's capturable, foreach and LR type."""
    require([(key in state, f"'{path}' lacks {key}") for key in agent])
    try:
        for name, part in agent.items():
            if isinstance(part, torch.Tensor):
                part.data.copy_(torch.as_tensor(state[name]))
                continue
            for group, saved in zip(getattr(part, "param_groups", []), state[name].get("param_groups", [])):
                saved.update(capturable=group["capturable"], foreach=group["foreach"])
                for key in {"lr", "initial_lr"} & group.keys():
                    lr = float(saved[key])
                    saved[key] = torch.tensor(lr, device=group[key].device) if torch.is_tensor(group[key]) else lr
            part.load_state_dict(state[name])
    except (RuntimeError, ValueError) as e:
        raise SystemExit(
            f"error: '{path}' holds networks of another size (--hidden-dim/--num-layers ...): {' '.join(str(e).split())[:150]}"
        )
    return state["global_step"]


def rng_states(generators=(), states: dict | None = None) -> dict:
    """Every random stream a run draws from (torch, CUDA, numpy, python, the env's `generators`); or put `states` back."""
    if states is None:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        states = dict(torch=torch.get_rng_state(), cuda=cuda, numpy=np.random.get_state(), python=random.getstate())
        return states | dict(env=[generator.bit_generator.state for generator in generators])
    torch.set_rng_state(states["torch"].cpu()), np.random.set_state(states["numpy"]), random.setstate(states["python"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state.cpu() for state in states["cuda"]])
    for generator, state in zip(generators, states["env"], strict=True):
        generator.bit_generator.state = state
    return states


if __name__ == "__main__":
    args = with_domain_defaults(tyro.cli(Args))
    check_args(args)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    args, resumed = resume_args(args, device, "flowq.py", with_domain_defaults) if args.resume else (args, None)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic

    # data setup: transitions on the training device, actions in [-1, 1], and the evaluation env
    source, directory, download = args.dataset_source, args.dataset_dir, args.dataset_download
    data = load_dataset(args.dataset, source, directory, args.env_id, download, device, args.d4rl_name, args.clip_actions)
    env = data.make_env(args.seed)
    tag = (os.path.splitext(os.path.basename(args.dataset))[0] if os.path.exists(args.dataset) else args.dataset).replace(
        "/", "-"
    )
    run_name = args.run_name or f"{tag}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = args.resume or f"runs/{run_name}"
    checkpoint_path = f"{run_dir}/{args.exp_name}.pt"

    # ALGO LOGIC: networks and optimizers; the update and acting functions (compiled / CUDA-graphed on request)
    agent = make_agent(args, data.obs_dim, data.act_dim, device)
    start_step = restore(resumed, agent, checkpoint_path) if resumed else 0
    train_step = speed_up(partial(update, agent=agent, args=args), args)
    policy = speed_up(partial(act, agent["actor"], flow_steps=args.flow_steps), args)
    to_obs = lambda o: torch.as_tensor(o, dtype=torch.float32, device=device).view(1, -1)
    policy_action = lambda o: policy(to_obs(o), torch.randn(1, data.act_dim, device=device))[0].cpu().numpy()

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2):
        signal.signal(signum, request_stop)  # before the run folder appears: a stop request sent once it exists is caught
    writer = SummaryWriter(run_dir, purge_step=start_step + 1 if resumed else None)  # a resume drops later events
    if not resumed:
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
        writer.add_text("dataset", f"{data.name}: {len(data)} transitions, metric {data.metric}")
    if resumed:  # every random stream as the checkpoint left it (set last: building the networks drew from torch's)
        rng_states((), resumed["rng"])
    first_bad, sps_start, global_step = {}, None, start_step
    steps_left = range(start_step + 1, args.total_steps + 1)  # the bar counts from start_step to total_steps
    progress = tqdm(steps_left, run_name, initial=start_step, total=args.total_steps, mininterval=5, disable=None)
    try:
        for global_step in progress:
            # ALGO LOGIC: a critic, an actor (and an h_theta) step on a fresh batch
            batch = data.sample(args.batch_size)
            a0, t = torch.randn_like(batch["actions"]), torch.rand(args.batch_size, 1, device=device)
            metrics = train_step(batch, a0, t)
            check_finite(first_bad, run_dir, metrics, global_step)
            if global_step == start_step + 4:  # SPS after a 3-update burn-in (LeanRL)
                sps_start, sps_step = time.time(), global_step

            # TRY NOT TO MODIFY: logging, evaluation, checkpoints
            if global_step % args.log_every == 0:
                check_finite(first_bad, run_dir)
                metrics |= validation_losses(data, agent, args, args.seed + 20_000 + global_step)  # held-out losses
                for name, value in zip(metrics, torch.stack(list(metrics.values())).tolist()):  # one device-to-host copy
                    writer.add_scalar(name, value, global_step)
                if sps_start is not None and global_step > sps_step:
                    writer.add_scalar("charts/SPS", int((global_step - sps_step) / (time.time() - sps_start)), global_step)
                if device.type == "cuda":
                    writer.add_scalar("charts/gpu_memory_mb", torch.cuda.max_memory_allocated() / 2**20, global_step)
            evaluation = global_step % args.eval_every == 0 or global_step == args.total_steps
            if evaluation:
                result = evaluate(policy_action, env, args.eval_episodes, args.seed + 10_000 + global_step)
                if data.normalize_score is not None:
                    result["eval/normalized_score"] = data.normalize_score(result["eval/episodic_return"])
                for name, value in result.items():
                    writer.add_scalar(name, value, global_step)
            if args.save_model and (evaluation or STOP):  # at every evaluation, at the end, on a stop request
                check_finite(first_bad, run_dir)
                saved = dict(script="flowq.py", global_step=global_step, args=vars(args), rng=rng_states())
                save_checkpoint((checkpoint_path, dict(agent, **saved)))
            if STOP:
                break
        check_finite(first_bad, run_dir)
    except KeyboardInterrupt:  # a second Ctrl-C
        print(f"interrupted at step {global_step}, no checkpoint written; TensorBoard logs kept in {run_dir}")
        raise SystemExit(128 + signal.SIGINT) from None
    finally:
        progress.close(), env.close(), writer.close()
    if STOP and global_step < args.total_steps:
        saved = f"checkpoint of step {global_step} in {checkpoint_path}" if args.save_model else "no checkpoint (--save-model)"
        print(f"interrupted at step {global_step} by {signal.Signals(STOP[0]).name}; {saved}; logs in {run_dir}")
        raise SystemExit(128 + STOP[0])
