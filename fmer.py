"""FMER: Flow Matching Policy with Entropy Regularization (Gao et al., arXiv:2603.17685v1).

Online, off-policy RL with a flow policy in a tanh-squashed latent space: a = tanh(z_1), dz_t/dt = u_theta(z_t, t, s),
z_0 ~ N(0, I) (Eq. 1). Each update (Algorithm 1) draws N candidates per state by K Euler steps (Eq. 8); trains twin
critics on a clipped double-Q target from the best candidate at s' (Eqs. 19-20); trains the policy on a CFM loss
weighted by a softmax of the candidates' advantages (Eqs. 9, 11) plus alpha times an entropy loss, the divergence of
the velocity field with the tanh correction by Hutchinson's estimator at one t ~ U[0, 1] (Eqs. 13-16); and tunes alpha
against a target entropy (Eqs. 5, 17-18). Acting takes the max-Q candidate after a uniform warm-up (Sec. 4.4, 5.2).
"[ours]" marks what the paper does not state.
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
from common.envs import KITCHEN_ID, make_env


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

    # Environment
    env_id: str = "Hopper-v5"
    """the id of the environment (Gymnasium MuJoCo v5, classic control, or FrankaKitchen-v1)"""
    kitchen_tasks: int = 1
    """FrankaKitchen-v1 only: the task set N in {1, 2, 4, 7} of the paper (App. B.3)"""
    capture_video: bool = False
    """whether to capture videos of the agent's evaluation episodes (in `videos/{run_name}`)"""
    total_timesteps: int = 1_000_000
    """total environment steps of the experiment"""
    learning_starts: int = 10_000
    """uniformly random environment steps before the first update (Sec. 5.2)"""
    buffer_size: int = 1_000_000
    """the replay memory buffer size (kept on the training device)"""
    save_buffer: bool = False
    """with --save-model, also save the replay buffer (`buffer.pt`), so --resume continues exactly (Humanoid-v5: 2.9 GB)"""
    reward_scale: float = 1.0
    """multiplier of the reward in the critic target [ours: the paper does not state FMER's]"""
    # Networks and flow
    hidden_dim: int = 256
    """width of the hidden layers of the velocity field and the critics (B.2)"""
    num_layers: int = 3
    """number of hidden layers, mish activation (B.2)"""
    num_candidates: int = 8
    """candidate actions N per state (Sec. 4.2, B.2)"""
    flow_steps: int = 10
    """Euler steps K of the flow ODE (Eq. 8, B.2)"""
    # Optimization
    batch_size: int = 256
    """the batch size of sample from the replay memory"""
    gamma: float = 0.99
    """the discount factor gamma"""
    tau: float = 0.005
    """target smoothing coefficient"""
    actor_lr: float = 3e-4
    """initial learning rate of the velocity field"""
    actor_lr_end: float = 3e-5
    """final learning rate of the velocity field, annealed linearly over the updates [ours: the paper text lost them]"""
    critic_lr: float = 3e-4
    """learning rate of the critics (constant)"""
    # Policy improvement and entropy
    adv_temperature: float = 0.5
    """advantage temperature beta in w = exp(A / beta) (Eq. 11; "advantage weight 0.5", B.2)"""
    adv_temperature_mode: Literal["fixed", "ess"] = "fixed"
    """`fixed` (the paper's v1), or `ess`: a dual step on log beta drives the weights' mean ESS fraction to a target [ours]"""
    target_ess_fraction: float = 0.5
    """`ess` mode: the target of the mean ESS fraction of the normalized candidate weights, in (0, 1) [ours]"""
    adv_temperature_lr: float = 1e-3
    """`ess` mode: Adam learning rate of log beta [ours]"""
    weighting: Literal["softmax", "unnormalized", "top1"] = "softmax"
    """candidate weights: softmax over the N candidates (Eq. 11), unnormalized exp(A / beta), or top-1 (ablation, Fig. 6a)"""
    divergence: Literal["hutchinson", "exact"] = "hutchinson"
    """divergence estimator in the entropy loss: Hutchinson with one Rademacher probe (Eq. 16) or the exact trace"""
    autotune: bool = True
    """automatic tuning of the entropy multiplier alpha by dual descent (Sec. 4.3)"""
    alpha: float = 1.0
    """initial (or, without --autotune, fixed) entropy multiplier alpha"""
    alpha_lr: float = 3e-4
    """learning rate of log alpha [ours]"""
    target_entropy: float | None = None
    """target action-space entropy H-bar in nats; default -dim(A) [ours, SAC heuristic]"""
    entropy_off_step: int | None = None
    """switch the entropy term L_H off after this environment step (ablation, Fig. 6b); default never"""
    # Evaluation and logging
    eval_every: int = 10_000
    """evaluate every this many environment steps (Sec. 5.2)"""
    eval_episodes: int = 10
    """episodes per evaluation; actions are the best of N candidates by Q, as in data collection"""
    log_every: int = 1000
    """write losses and SPS to TensorBoard every this many environment steps"""


# ---- Networks -------------------------------------------------------------------------------------------------------
class Mish(nn.Module):
    """x tanh(softplus(x)), written out: torch's fused mish has NaN second derivatives for inputs above ~100, and the
    entropy loss differentiates the network twice (Eq. 16) on unnormalized observations (Humanoid-v5's reach 3000)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.tanh(F.softplus(x))


class VelocityField(nn.Module):
    """u_theta(z, t, s): the latent velocity field (Eq. 1), a mish MLP (B.2); the raw scalar t is an input [ours]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, num_layers: int):
        super().__init__()
        self.act_dim, layers, dim = act_dim, [], obs_dim + act_dim + 1
        for _ in range(num_layers):
            layers, dim = layers + [nn.Linear(dim, hidden_dim), Mish()], hidden_dim
        self.net = nn.Sequential(*layers, nn.Linear(dim, act_dim))

    def forward(self, obs: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([obs, z, t], -1))


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


def make_critic(obs_dim: int, act_dim: int, hidden_dim: int, num_layers: int) -> CriticEnsemble:
    """Q_phi1 and Q_phi2 (Eqs. 19-20): twin mish MLPs of the velocity field's size (B.2), nn.Linear's init [ours]."""
    return CriticEnsemble(obs_dim + act_dim, hidden_dim, num_layers, 2, F.mish, layer_norm=False, xavier=False)


# ---- ALGO LOGIC: candidates, losses and updates ---------------------------------------------------------------------
def sample_candidates(actor: VelocityField, obs: torch.Tensor, num_candidates: int, flow_steps: int, return_path=False):
    """N latents per state by K Euler steps of the flow from z_0 ~ N(0, I) (Eq. 8), no gradient: the repeated states
    (B*N, obs_dim), z_1 (B*N, d) and, with `return_path`, the Euler states z_{t_k} and velocities u_k, (K, B*N, d)."""
    obs_rep = obs.repeat_interleave(num_candidates, 0)
    z0 = torch.randn(obs_rep.shape[0], actor.act_dim, device=obs.device)
    with torch.no_grad():
        out = flow.euler_sample(lambda z, t: actor(obs_rep, z, t), z0, flow_steps, return_path)
    return (obs_rep, *out) if return_path else (obs_rep, out)


def td_target(rewards, terminated, next_q, gamma: float, reward_scale: float) -> torch.Tensor:
    """Eq. 20: y = r~ + gamma (1 - d) Q'(s', a'*), d the termination flag: a truncated episode still bootstraps."""
    return reward_scale * rewards + gamma * (1.0 - terminated) * next_q


def update_critic(obs, actions, rewards, terminated, next_obs_rep, next_z1, agent: dict, args: Args) -> dict:
    """Eqs. 19-20: each member regresses onto y = r~ + gamma (1 - d) min_j Q_target_j(s', a'*), a'* the best of the N
    candidates at s' by the same min (the target networks rank them [ours])."""
    with torch.no_grad():
        next_q = agent["critic_target"](next_obs_rep, torch.tanh(next_z1)).min(0).values.view(len(obs), -1).max(1).values
        target_q = td_target(rewards, terminated, next_q, args.gamma, args.reward_scale)
    q_values = agent["critic"](obs, actions)
    qf_loss = F.mse_loss(q_values, target_q.expand_as(q_values), reduction="none").mean(1).sum()
    agent["critic_optimizer"].zero_grad(set_to_none=True)
    qf_loss.backward()
    agent["critic_optimizer"].step()
    return {"losses/qf_loss": qf_loss.detach() / len(q_values), "losses/qf_values": q_values.detach().mean()}


def candidate_weights(q: torch.Tensor, temperature: float | torch.Tensor, weighting: str) -> torch.Tensor:
    """Eq. 11: weights of the N candidates from their Q-values q (B, N); the advantage A_i = Q_i - mean_j Q_j [ours]."""
    adv = (q - q.mean(1, keepdim=True)) / temperature
    if weighting == "softmax":
        return torch.softmax(adv, 1)
    if weighting == "unnormalized":
        return torch.exp(adv.clamp(max=20.0))  # clamped only to keep the loss finite [ours]
    return torch.zeros_like(q).scatter_(1, adv.argmax(1, keepdim=True), 1.0)  # one-hot without F.one_hot's host sync


def entropy_estimate(actor, obs: torch.Tensor, path: torch.Tensor, velocities: torch.Tensor, divergence_fn) -> torch.Tensor:
    """Eqs. 13-18: per state of `obs`, div_z u(z_t, t, s) + the tanh correction (Prop. 3, Eq. 14) at t ~ U[0, 1] and z_t
    on the Euler polyline of one of its N candidates, z_t = z_{t_k} + (t - t_k) u_k (Eq. 8; `path`, `velocities` from
    sample_candidates). Unbiased for straight Euler segments; a small bias on curved fields. z_t is detached [ours]."""
    steps, batch, num_candidates = path.shape[0], obs.shape[0], path.shape[1] // obs.shape[0]
    t = torch.rand(batch, 1, device=obs.device)
    k = (t[:, 0] * steps).long().clamp(max=steps - 1)
    rows = torch.arange(batch, device=obs.device) * num_candidates
    rows = rows + torch.randint(0, num_candidates, (batch,), device=obs.device)
    z_t = (path[k, rows] + (t - k.unsqueeze(-1) / steps) * velocities[k, rows]).detach()
    u, div = divergence_fn(lambda z: actor(obs, z, t), z_t)  # Eq. 16 (or the exact trace)
    return div + flow.tanh_divergence_correction(z_t, u)  # Eq. 14


def update_actor(obs, obs_rep, z1, path, velocities, agent: dict, args: Args, entropy_on: bool) -> dict:
    """Eq. 6: L = L_WCFM + alpha L_H. L_WCFM (Eqs. 9, 11) regresses onto the latents z_1 of candidates at the batch's
    states s (obs_rep, z1, path, velocities: sample_candidates(obs)), weighted by their advantages under the current
    critic; L_H = -(single-time corrected divergence) (Eq. 15), dropped when not `entropy_on`."""
    actor, num_candidates = agent["actor"], len(obs_rep) // len(obs)
    alpha = agent["log_alpha"].detach().exp()
    temperature = agent["log_beta"].detach().exp() if args.adv_temperature_mode == "ess" else args.adv_temperature
    with torch.no_grad():
        cand_q = agent["critic"](obs_rep, torch.tanh(z1)).min(0).values.view(len(obs), num_candidates)
        weights = candidate_weights(cand_q, temperature, args.weighting)
    z0, t = torch.randn_like(z1), torch.rand(len(z1), 1, device=z1.device)  # a (t, z_0) per candidate [ours]
    velocity = actor(obs_rep, flow.interpolate(z0, z1, t), t)
    cfm_error = (velocity - flow.target_velocity(z0, z1)).pow(2).sum(-1).view_as(weights)
    flow_loss = actor_loss = (weights * cfm_error).sum(1).mean()
    normalized = weights / weights.sum(1, keepdim=True)
    metrics = {"losses/flow_loss": flow_loss.detach(), "losses/alpha": alpha}
    metrics["charts/weight_ess_fraction"] = (1.0 / normalized.pow(2).sum(1)).mean() / num_candidates
    metrics["charts/adv_over_beta_std"] = (cand_q / temperature).std(1).mean()
    if entropy_on:
        divergence_fn = flow.hutchinson_divergence if args.divergence == "hutchinson" else flow.exact_divergence
        corrected_div = entropy_estimate(actor, obs, path, velocities, divergence_fn)
        entropy_loss = -corrected_div.mean()  # Eq. 15
        actor_loss = flow_loss + alpha * entropy_loss  # Eq. 6
        metrics["losses/entropy_loss"] = entropy_loss.detach()
        metrics["charts/entropy"] = flow.tanh_flow_entropy(actor.act_dim, corrected_div.detach().mean())  # Eqs. 17-18
    agent["actor_optimizer"].zero_grad(set_to_none=True)
    actor_loss.backward()
    agent["actor_optimizer"].step()
    return metrics | {"losses/actor_loss": actor_loss.detach()}


def update_alpha(entropy: torch.Tensor, agent: dict, target_entropy: float) -> dict:
    """Sec. 4.3: dual descent on log alpha (SAC's form): alpha grows while the entropy is below the target, else shrinks."""
    alpha_loss = agent["log_alpha"].exp() * (entropy - target_entropy)
    agent["alpha_optimizer"].zero_grad(set_to_none=True)
    alpha_loss.backward()
    agent["alpha_optimizer"].step()
    return {"losses/alpha_loss": alpha_loss.detach()}


def update_adv_temperature(ess_fraction: torch.Tensor, agent: dict, target_ess_fraction: float) -> dict:
    """--adv-temperature-mode ess: a dual step on log beta; weights too peaked (ESS below the target) raise beta [ours]."""
    beta = agent["log_beta"].detach().exp()  # the temperature this update's weights used
    beta_loss = agent["log_beta"] * (ess_fraction - target_ess_fraction)
    agent["beta_optimizer"].zero_grad(set_to_none=True)
    beta_loss.backward()
    agent["beta_optimizer"].step()
    return {"charts/adv_temperature": beta}


def update(obs, actions, rewards, terminated, next_obs, agent: dict, args: Args, entropy_on: bool) -> dict:
    """One update of Algorithm 1: critic, actor, alpha (and beta), then the target critic (Polyak, tau)."""
    # one ODE solve serves the critic target (states s') and the actor's candidates (states s)
    both = torch.cat([next_obs, obs])
    obs_rep, z1, path, velocities = sample_candidates(agent["actor"], both, args.num_candidates, args.flow_steps, True)
    n = len(obs) * args.num_candidates
    metrics = update_critic(obs, actions, rewards, terminated, obs_rep[:n], z1[:n], agent, args)
    metrics |= update_actor(obs, obs_rep[n:], z1[n:], path[:, n:], velocities[:, n:], agent, args, entropy_on)
    if entropy_on and args.autotune:
        target_entropy = -float(agent["actor"].act_dim) if args.target_entropy is None else args.target_entropy
        metrics |= update_alpha(metrics["charts/entropy"], agent, target_entropy)
    if args.adv_temperature_mode == "ess":
        metrics |= update_adv_temperature(metrics["charts/weight_ess_fraction"], agent, args.target_ess_fraction)
    with torch.no_grad():
        for target_param, param in zip(agent["critic_target"].parameters(), agent["critic"].parameters()):
            target_param.lerp_(param, args.tau)
    return metrics


def make_agent(args: Args, obs_dim: int, act_dim: int, device: torch.device) -> dict:
    """The networks, alpha, beta, optimizers and the actor's LR schedule: a checkpoint's contents but the RNG states."""
    actor = VelocityField(obs_dim, act_dim, args.hidden_dim, args.num_layers).to(device)
    critic = make_critic(obs_dim, act_dim, args.hidden_dim, args.num_layers).to(device)
    critic_target = make_critic(obs_dim, act_dim, args.hidden_dim, args.num_layers).to(device)
    critic_target.load_state_dict(critic.state_dict())
    fast, adam = args.compile or args.cudagraphs, partial(torch.optim.Adam, capturable=args.cudagraphs)
    actor_lr = torch.tensor(args.actor_lr, device=device) if fast else args.actor_lr  # a tensor: no recompilation
    actor_optimizer = adam(actor.parameters(), lr=actor_lr, foreach=False if fast and not args.cudagraphs else None)
    updates = max(1, args.total_timesteps - args.learning_starts)
    schedule = torch.optim.lr_scheduler.LinearLR(actor_optimizer, 1.0, args.actor_lr_end / args.actor_lr, updates)
    log_alpha = torch.tensor(math.log(args.alpha), device=device, requires_grad=args.autotune)
    log_beta = torch.tensor(math.log(args.adv_temperature), device=device, requires_grad=args.adv_temperature_mode == "ess")
    agent = dict(actor=actor, critic=critic, critic_target=critic_target, log_alpha=log_alpha, log_beta=log_beta)
    agent.update(actor_optimizer=actor_optimizer, critic_optimizer=adam(critic.parameters(), lr=args.critic_lr))
    agent.update(
        alpha_optimizer=adam([log_alpha], lr=args.alpha_lr), beta_optimizer=adam([log_beta], lr=args.adv_temperature_lr)
    )
    return agent | dict(actor_schedule=schedule)


# ---- Acting, replay and evaluation ----------------------------------------------------------------------------------
def best_of_candidates(q: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """The latent of the highest-valued candidate per state; q is (B, N), latents (B*N, d)."""
    return latents.view(*q.shape, -1)[torch.arange(q.shape[0], device=q.device), q.argmax(1)]


def act(obs: torch.Tensor, agent: dict, args: Args) -> torch.Tensor:
    """Per state of obs (B, obs_dim), the max-Q candidate among N (Sec. 4.4) by the online critics' min [ours], in (-1, 1)."""
    with torch.no_grad():
        obs_rep, z1 = sample_candidates(agent["actor"], obs, args.num_candidates, args.flow_steps)
        actions = torch.tanh(z1)
        return best_of_candidates(agent["critic"](obs_rep, actions).min(0).values.view(len(obs), -1), actions)


def store_transition(replay: torch.Tensor, step: int, obs, next_obs, action, reward, terminated, truncated) -> None:
    """Row (step - 1) % len(replay) := [s, s', a, r, d], d = `terminated` alone: truncation (a time limit) bootstraps."""
    row = np.concatenate([obs, next_obs, action, [reward, float(terminated)]], dtype=np.float32)  # not `or truncated`
    replay[(step - 1) % len(replay)] = torch.from_numpy(row)


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


# ---- TRY NOT TO MODIFY: infrastructure (flag checks, speed path, checkpoints and resume, stop requests, NaN stop) ----
def check_args(a: Args) -> None:
    """Range checks before anything is built: the first failure ends the run with one `error:` line."""
    rules = {  # flags: (test of each value, rule)
        "total_timesteps learning_starts buffer_size hidden_dim num_layers num_candidates": (lambda v: v >= 1, "be positive"),
        "flow_steps batch_size eval_every eval_episodes log_every": (lambda v: v >= 1, "be positive"),
        "actor_lr critic_lr alpha_lr adv_temperature_lr adv_temperature": (lambda v: 0 < v < math.inf, "be a positive number"),
        "alpha reward_scale": (lambda v: 0 < v < math.inf, "be a positive number"),
        "gamma tau": (lambda v: 0 < v <= 1, "be in (0, 1]"),
        "target_ess_fraction": (lambda v: 0 < v < 1, "be in (0, 1)"),
        "seed": (lambda v: 0 <= v < 2**32, "be in [0, 2**32)"),
        "target_entropy": (lambda v: v is None or math.isfinite(v), "be a finite number"),
        "entropy_off_step": (lambda v: v is None or v >= 0, "be non-negative"),
    }  # fmt: skip
    must = lambda k, rule: f"--{k.replace('_', '-')} must {rule}, got {getattr(a, k)}"
    require([(ok(getattr(a, k)), must(k, rule)) for flags, (ok, rule) in rules.items() for k in flags.split()])
    steps, start, batch, lr, lr_end = a.total_timesteps, a.learning_starts, a.batch_size, a.actor_lr, a.actor_lr_end
    require([
        (0 <= lr_end <= lr, f"--actor-lr-end ({lr_end}) must be in [0, --actor-lr ({lr})]"),
        (start >= batch, f"--learning-starts ({start}) must be at least --batch-size ({batch})"),
        (steps > start, f"--total-timesteps ({steps}) must exceed --learning-starts ({start}): no update would run"),
        (a.buffer_size >= start, f"--buffer-size ({a.buffer_size}) must hold the {start} warm-up steps"),
        (a.adv_temperature_mode == "fixed" or a.weighting != "top1", "--adv-temperature-mode ess has nothing to tune in top1"),
        (a.kitchen_tasks == 1 or a.env_id == KITCHEN_ID, f"--kitchen-tasks applies to {KITCHEN_ID} only, not {a.env_id}"),
        (a.save_model or not a.save_buffer, "--save-buffer needs --save-model (the buffer is saved with the checkpoints)"),
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
    args = tyro.cli(Args)
    check_args(args)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    args, resumed = resume_args(args, device, "fmer.py") if args.resume else (args, None)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    run_name = args.run_name or f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = args.resume or f"runs/{run_name}"
    checkpoint_path, buffer_path = f"{run_dir}/{args.exp_name}.pt", f"{run_dir}/buffer.pt"

    # env setup: the policy acts in (-1, 1)^d, which common/envs.py rescales to the env's action bounds
    env = make_env(args.env_id, args.seed, kitchen_tasks=args.kitchen_tasks)
    eval_env = make_env(args.env_id, args.seed + 10_000, args.capture_video, f"videos/{run_name}", args.kitchen_tasks)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    robot = getattr(env.unwrapped, "robot_env", None)  # FrankaKitchen-v1's observation noise comes from its robot env
    env_generators = lambda: [env.unwrapped.np_random, env.action_space.np_random] + ([robot.np_random] if robot else [])

    # ALGO LOGIC: networks, optimizers, the replay buffer (rows [s, s', a, r, terminated]); update and acting functions
    agent = make_agent(args, obs_dim, act_dim, device)
    buffer_size = min(args.buffer_size, args.total_timesteps)
    replay = torch.zeros(buffer_size, 2 * obs_dim + act_dim + 2, device=device)
    start_step = restore(resumed, agent, checkpoint_path) if resumed else 0
    if resumed:  # the replay buffer and every RNG as the checkpoint left them
        require([(os.path.isfile(buffer_path), f"no replay buffer '{buffer_path}'; run with --save-model --save-buffer")])
        saved_rows = load_checkpoint(buffer_path, "fmer.py", torch.device("cpu"), start_step)["replay"]
        replay[: len(saved_rows)] = saved_rows
        rng_states(env_generators(), resumed["rng"])
    first_update = max(start_step, args.learning_starts) + 1  # L_H is on while the step is <= --entropy-off-step
    entropy_on = args.entropy_off_step is None or first_update <= args.entropy_off_step
    train_step = speed_up(partial(update, agent=agent, args=args, entropy_on=entropy_on), args)
    policy = speed_up(partial(act, agent=agent, args=args), args)
    policy_action = lambda o: policy(torch.as_tensor(o, dtype=torch.float32, device=device).view(1, -1))[0].cpu().numpy()

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2):
        signal.signal(signum, request_stop)  # before the run folder appears: a stop request sent once it exists is caught
    writer = SummaryWriter(run_dir, purge_step=start_step + 1 if resumed else None)  # a resume drops later events
    if not resumed:
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    metrics, first_bad, sps_start, checkpoint_due, global_step = {}, {}, None, False, start_step
    obs, _ = env.reset() if resumed else env.reset(seed=args.seed)  # a resumed run restarts between episodes
    steps_left = range(start_step + 1, args.total_timesteps + 1)  # the bar counts from start_step to total_timesteps
    progress = tqdm(steps_left, run_name, initial=start_step, total=args.total_timesteps, mininterval=5, disable=None)
    try:
        for global_step in progress:
            # ALGO LOGIC: act: uniform warm-up (Sec. 5.2), then the max-Q candidate (Sec. 4.4)
            action = env.action_space.sample() if global_step <= args.learning_starts else policy_action(obs)
            next_obs, reward, terminated, truncated, info = env.step(action)
            store_transition(replay, global_step, obs, next_obs, action, reward, terminated, truncated)
            if terminated or truncated:
                writer.add_scalar("charts/episodic_return", info["episode"]["r"], global_step)
                writer.add_scalar("charts/episodic_length", info["episode"]["l"], global_step)
                for key in {"tasks_completed", "success_rate"} & info.keys():  # FrankaKitchen-v1
                    writer.add_scalar(f"charts/{key}", info[key], global_step)

            # ALGO LOGIC: one update per environment step; L_H is dropped after --entropy-off-step (Fig. 6b)
            if global_step > args.learning_starts:
                if args.entropy_off_step is not None and global_step == args.entropy_off_step + 1:
                    train_step = speed_up(partial(update, agent=agent, args=args, entropy_on=False), args)
                batch = replay[torch.randint(0, min(global_step, buffer_size), (args.batch_size,), device=device)]
                b_obs, b_next_obs, b_actions, b_rewards, b_dones = batch.split([obs_dim, obs_dim, act_dim, 1, 1], 1)
                metrics = train_step(b_obs, b_actions, b_rewards[:, 0], b_dones[:, 0], b_next_obs)
                agent["actor_schedule"].step()
                check_finite(first_bad, run_dir, metrics, global_step)
                if global_step == max(args.learning_starts, start_step) + 4:  # SPS after a 3-update burn-in (LeanRL)
                    sps_start, sps_step = time.time(), global_step

            # TRY NOT TO MODIFY: logging, evaluation, checkpoints (between episodes: the env then needs only its RNGs)
            if global_step % args.log_every == 0 and metrics:
                check_finite(first_bad, run_dir)
                for name, value in zip(metrics, torch.stack(list(metrics.values())).tolist()):  # one device-to-host copy
                    writer.add_scalar(name, value, global_step)
                writer.add_scalar("charts/actor_lr", float(agent["actor_schedule"].get_last_lr()[0]), global_step)
                if sps_start is not None and global_step > sps_step:
                    writer.add_scalar("charts/SPS", int((global_step - sps_step) / (time.time() - sps_start)), global_step)
                if device.type == "cuda":
                    writer.add_scalar("charts/gpu_memory_mb", torch.cuda.max_memory_allocated() / 2**20, global_step)
            if global_step % args.eval_every == 0 or global_step == args.total_timesteps:
                for name, value in evaluate(
                    policy_action, eval_env, args.eval_episodes, args.seed + 10_000 + global_step
                ).items():
                    writer.add_scalar(name, value, global_step)
                checkpoint_due = args.save_model
            episode_done = terminated or truncated
            if args.save_model and (episode_done and (checkpoint_due or STOP) or global_step == args.total_timesteps):
                check_finite(first_bad, run_dir)
                saved = dict(script="fmer.py", global_step=global_step)
                checkpoint = dict(agent, **saved, args=vars(args), rng=rng_states(env_generators()))
                buffer = dict(saved, replay=replay[: min(global_step, buffer_size)].cpu()) if args.save_buffer else None
                save_checkpoint(*[(buffer_path, buffer)] * args.save_buffer, (checkpoint_path, checkpoint))
                checkpoint_due = False
            if STOP and (episode_done or not args.save_model):
                break
            obs = env.reset()[0] if episode_done else next_obs
        check_finite(first_bad, run_dir)
    except KeyboardInterrupt:  # a second Ctrl-C
        print(f"interrupted at step {global_step}, no checkpoint written; TensorBoard logs kept in {run_dir}")
        raise SystemExit(128 + signal.SIGINT) from None
    finally:
        progress.close(), env.close(), eval_env.close(), writer.close()
    if STOP and global_step < args.total_timesteps:
        saved = f"checkpoint of step {global_step} in {checkpoint_path}" if args.save_model else "no checkpoint (--save-model)"
        print(f"interrupted at step {global_step} by {signal.Signals(STOP[0]).name}; {saved}; logs in {run_dir}")
        raise SystemExit(128 + STOP[0])
