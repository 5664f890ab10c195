"""FMER: Flow Matching Policy with Entropy Regularization (Gao et al., arXiv:2603.17685v1).

Online, off-policy RL with a flow-matching policy in a tanh-squashed latent space:
  a = tanh(z_1),  dz_t/dt = u_theta(z_t, t, s),  z_0 ~ N(0, I)                       (Eq. 1, Sec. 4.1)
Each update
  1. draws N candidates per state from the current policy by 10 Euler steps (Eq. 8),
  2. trains the twin critics on a clipped double-Q target built from the best of the N
     candidates at s' (Eqs. 19-20),
  3. trains the policy on a weighted CFM loss whose weights are a softmax of the candidates'
     advantages (Eqs. 9, 11) plus alpha times an entropy loss from the divergence of the velocity
     field with the tanh correction, estimated by Hutchinson's trace estimator at a single time
     t ~ U[0, 1] (Eqs. 13-16),
  4. tunes the Lagrange multiplier alpha against a target entropy (Eqs. 5, 17-18, SAC-style dual descent).
Acting picks the candidate with the highest Q after a random warm-up (Sec. 4.4, 5.2).
Equation numbers refer to the paper; where the paper is silent the choice is marked "[ours]".
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

from common.envs import KITCHEN_ID, KITCHEN_TASK_SETS, make_env
from common.flow import (
    euler_sample,
    exact_divergence,
    hutchinson_divergence,
    interpolate,
    tanh_divergence_correction,
    tanh_flow_entropy,
    target_velocity,
)


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
    """with --save-model, also save the replay buffer beside each checkpoint (`buffer.pt`), so --resume continues
    exactly; Humanoid-v5 at 1M transitions: about 2.9 GB (rows of 2 * 348 + 17 + 2 float32)"""
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
    """final learning rate of the velocity field, annealed linearly over the updates [ours: endpoints lost in the paper text]"""
    critic_lr: float = 3e-4
    """learning rate of the critics (constant)"""

    # Policy improvement and entropy
    adv_temperature: float = 0.5
    """advantage temperature beta in w = exp(A / beta) (Eq. 11; "advantage weight 0.5", B.2)"""
    adv_temperature_mode: Literal["fixed", "ess"] = "fixed"
    """`fixed`: beta = --adv-temperature throughout (v1 of the paper); `ess`: beta starts there and a dual step on log
    beta after every update drives the batch mean of the weights' ESS fraction 1 / (N sum_i w_i^2) to
    --target-ess-fraction (the adaptive temperature of the paper's v3, arXiv:2603.17685v3) [ours: its form and rate]"""
    target_ess_fraction: float = 0.5
    """`ess` mode: the target of the mean ESS fraction of the normalized candidate weights, in (0, 1) [ours]"""
    adv_temperature_lr: float = 1e-3
    """`ess` mode: Adam learning rate of log beta [ours]"""
    weighting: Literal["softmax", "unnormalized", "top1"] = "softmax"
    """candidate weights: softmax over the N candidates (Eq. 11), unnormalized exp(A / beta), or hard top-1 (ablation, Fig. 6a)"""
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


def check_args(args: Args) -> None:
    """Every size, count, budget, rate and coefficient range-checked before anything is built: one-line errors."""
    flag = lambda name: "--" + name.replace("_", "-")
    positive_ints = ["total_timesteps", "learning_starts", "buffer_size", "hidden_dim", "num_layers", "num_candidates"]
    positive_ints += ["flow_steps", "batch_size", "eval_every", "eval_episodes", "log_every"]
    for name in positive_ints:
        if getattr(args, name) < 1:
            raise SystemExit(f"error: {flag(name)} must be positive, got {getattr(args, name)}")
    for name in ["actor_lr", "critic_lr", "alpha_lr", "adv_temperature_lr", "adv_temperature", "alpha", "reward_scale"]:
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) > 0):
            raise SystemExit(f"error: {flag(name)} must be a positive number, got {getattr(args, name)}")
    problems = [
        (not 0 <= args.seed < 2**32, f"--seed must be in [0, 2**32), got {args.seed}"),
        (not 0 < args.gamma <= 1, f"--gamma must be in (0, 1], got {args.gamma}"),
        (not 0 < args.tau <= 1, f"--tau must be in (0, 1], got {args.tau}"),
        (
            not 0 <= args.actor_lr_end <= args.actor_lr,
            f"--actor-lr-end ({args.actor_lr_end}) must be in [0, --actor-lr ({args.actor_lr})]: the LR anneals down",
        ),
        (not 0 < args.target_ess_fraction < 1, f"--target-ess-fraction must be in (0, 1), got {args.target_ess_fraction}"),
        (
            args.target_entropy is not None and not math.isfinite(args.target_entropy),
            f"--target-entropy must be a finite number of nats, got {args.target_entropy}",
        ),
        (
            args.entropy_off_step is not None and args.entropy_off_step < 0,
            f"--entropy-off-step must be non-negative, got {args.entropy_off_step}",
        ),
        (
            args.learning_starts < args.batch_size,
            f"--learning-starts ({args.learning_starts}) must be at least --batch-size ({args.batch_size})",
        ),
        (
            args.total_timesteps <= args.learning_starts,
            f"--total-timesteps ({args.total_timesteps}) must exceed --learning-starts ({args.learning_starts}): no update would run",
        ),
        (
            args.buffer_size < args.learning_starts,
            f"--buffer-size ({args.buffer_size}) must hold the {args.learning_starts} warm-up steps",
        ),
        (
            args.adv_temperature_mode == "ess" and args.weighting == "top1",
            "--adv-temperature-mode ess has nothing to tune with --weighting top1 (its weights do not depend on beta)",
        ),
        (
            args.save_buffer and not args.save_model,
            "--save-buffer needs --save-model (the buffer is saved with the checkpoints)",
        ),
        (
            args.run_name is not None and (args.run_name in ("", ".", "..") or os.sep in args.run_name),
            f"--run-name must be a folder name under runs/, got '{args.run_name}'",
        ),
        (
            args.kitchen_tasks != 1 and args.env_id != KITCHEN_ID,
            f"--kitchen-tasks applies to {KITCHEN_ID} only, not {args.env_id}",
        ),
        (
            args.env_id == KITCHEN_ID and args.kitchen_tasks not in KITCHEN_TASK_SETS,
            f"--kitchen-tasks must be one of {sorted(KITCHEN_TASK_SETS)}, got {args.kitchen_tasks}",
        ),
    ]
    for failed, message in problems:
        if failed:
            raise SystemExit(f"error: {message}")


# ---- Environment ----------------------------------------------------------------------------------------------------


def action_bounds(env: gym.Env) -> tuple[np.ndarray, np.ndarray]:
    """The policy acts in (-1, 1)^d; the env gets a * scale + bias (e.g. +-0.4 for Humanoid-v5)."""
    scale = ((env.action_space.high - env.action_space.low) / 2.0).astype(np.float32)
    bias = ((env.action_space.high + env.action_space.low) / 2.0).astype(np.float32)
    return scale, bias


def store_transition(
    replay: torch.Tensor, step: int, obs, next_obs, action, reward: float, terminated: bool, truncated: bool
) -> None:
    """Row (step - 1) % len(replay) := [s, s', a, r, d] (one host-to-device copy). d is `terminated` alone: on
    truncation (a time limit) next_obs is the true final observation and the target bootstraps through it (Eq. 20)."""
    flag = float(terminated)  # not `terminated or truncated`
    row = np.concatenate([obs, next_obs, action, [reward, flag]], dtype=np.float32)
    replay[(step - 1) % len(replay)] = torch.from_numpy(row)


# ---- Networks -------------------------------------------------------------------------------------------------------


class Mish(nn.Module):
    """mish(x) = x tanh(softplus(x)), written out: torch's fused mish returns NaN second derivatives for
    inputs above ~100 (torch 2.13), and the entropy loss differentiates the network twice (Eq. 16).
    Unnormalized observations (Humanoid-v5's reach 3000) produce such inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.tanh(F.softplus(x))


def mlp(in_dim: int, out_dim: int, hidden_dim: int, num_layers: int) -> nn.Sequential:
    layers, dim = [], in_dim
    for _ in range(num_layers):
        layers += [nn.Linear(dim, hidden_dim), Mish()]
        dim = hidden_dim
    return nn.Sequential(*layers, nn.Linear(dim, out_dim))


class VelocityField(nn.Module):
    """u_theta(z, t, s): the latent velocity field (Eq. 1); the raw scalar t is an input [ours]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, num_layers: int):
        super().__init__()
        self.act_dim = act_dim
        self.net = mlp(obs_dim + act_dim + 1, act_dim, hidden_dim, num_layers)

    def forward(self, obs: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([obs, z, t], -1))


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


def make_critic(obs_dim: int, act_dim: int, hidden_dim: int, num_layers: int) -> CriticEnsemble:
    """Q_phi1 and Q_phi2 (Eqs. 19-20): twin mish MLPs of the velocity field's size (B.2) with nn.Linear's init [ours]."""
    return CriticEnsemble(obs_dim, act_dim, hidden_dim, num_layers, 2, F.mish, layer_norm=False, xavier=False)


# ---- ALGO LOGIC: losses and updates ---------------------------------------------------------------------------------


def sample_candidates(
    actor: VelocityField, obs: torch.Tensor, num_candidates: int, flow_steps: int, return_path: bool = False
):
    """N latent candidates per state by Euler integration of the flow from z_0 ~ N(0, I) (Eq. 8), no gradient.

    Returns the repeated states (B*N, obs_dim), the terminal latents z_1 (B*N, d) and, with `return_path`, the
    Euler states z_{t_k}, k = 0..K-1, and the velocities u_k evaluated there, each of shape (K, B*N, d).
    """
    obs_rep = obs.repeat_interleave(num_candidates, 0)
    z0 = torch.randn(obs_rep.shape[0], actor.act_dim, device=obs.device)
    with torch.no_grad():
        out = euler_sample(lambda z, t: actor(obs_rep, z, t), z0, flow_steps, return_path)
    return (obs_rep, *out) if return_path else (obs_rep, out)


def entropy_estimate(actor, obs: torch.Tensor, path: torch.Tensor, velocities: torch.Tensor, divergence_fn) -> torch.Tensor:
    """Single-time estimate, per state, of the action-space divergence integral int_0^1 E[div_a v_t] dt (Eqs. 13-18).

    For each of the B states of `obs`: one of its N candidates, t ~ U[0, 1], and z_t on that candidate's Euler
    polyline, z_t = z_{t_k} + (t - t_k) u_k (Eq. 8; `path`, `velocities` of shape (K, B*N, d) from
    sample_candidates); returns div_z u(z_t, t, s) + the tanh correction of Prop. 3 (Eq. 14), shape (B,).
    A uniform t makes the estimate unbiased for the roll-out's flow; t only on the grid k / K would be a left
    Riemann sum, biased upward where the flow contracts. z_t is detached, so the entropy loss is a semi-gradient:
    it changes u_theta at the visited states, not through the states the solver visits [ours].
    """
    steps, batch = path.shape[0], obs.shape[0]
    num_candidates = path.shape[1] // batch
    t = torch.rand(batch, 1, device=obs.device)
    k = (t[:, 0] * steps).long().clamp(max=steps - 1)
    rows = torch.arange(batch, device=obs.device) * num_candidates
    rows = rows + torch.randint(0, num_candidates, (batch,), device=obs.device)
    z_t = (path[k, rows] + (t - k.unsqueeze(-1) / steps) * velocities[k, rows]).detach()
    u, div = divergence_fn(lambda z: actor(obs, z, t), z_t)  # Eq. 16 (or the exact trace)
    return div + tanh_divergence_correction(z_t, u)  # Eq. 14


def candidate_weights(q: torch.Tensor, temperature: float | torch.Tensor, weighting: str) -> torch.Tensor:
    """Weights of the N candidates per state from their Q-values q of shape (B, N) (Eq. 11).

    The advantage A_i = Q_i - mean_j Q_j [ours]; under the softmax any per-state baseline cancels.
    """
    adv = (q - q.mean(1, keepdim=True)) / temperature
    if weighting == "softmax":
        return torch.softmax(adv, 1)
    if weighting == "unnormalized":
        return torch.exp(adv.clamp(max=20.0))  # clamped only to keep the loss finite [ours]
    return torch.zeros_like(q).scatter_(1, adv.argmax(1, keepdim=True), 1.0)  # one-hot without F.one_hot's host sync


def td_target(
    rewards: torch.Tensor, terminated: torch.Tensor, next_q: torch.Tensor, gamma: float, reward_scale: float
) -> torch.Tensor:
    """Eq. 20: y = r~ + gamma (1 - d) Q'(s', a'*), with d the termination flag: truncation still bootstraps."""
    return reward_scale * rewards + gamma * (1.0 - terminated) * next_q


def best_of_candidates(q: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """The latent of the highest-valued candidate per state; q is (B, N), latents (B*N, d)."""
    best = q.argmax(1)
    return latents.view(*q.shape, -1)[torch.arange(q.shape[0], device=q.device), best]


def update_critic(
    obs: torch.Tensor,
    actions: torch.Tensor,
    rewards: torch.Tensor,
    terminated: torch.Tensor,
    next_obs_rep: torch.Tensor,
    next_z1: torch.Tensor,
    critic: CriticEnsemble,
    critic_target: CriticEnsemble,
    critic_optimizer: torch.optim.Optimizer,
    gamma: float,
    reward_scale: float,
) -> dict[str, torch.Tensor]:
    """Eqs. 19-20: y = r~ + gamma (1 - d) min_j Q_target_j(s', a'*), a'* the best of the N candidates at s' by the
    same min (the target networks rank them [ours]); each member regresses onto y."""
    with torch.no_grad():
        next_q = critic_target(next_obs_rep, torch.tanh(next_z1)).min(0).values
        next_q = next_q.view(obs.shape[0], -1).max(1).values
        target_q = td_target(rewards, terminated, next_q, gamma, reward_scale)
    q_values = critic(obs, actions)
    qf_loss = F.mse_loss(q_values, target_q.expand_as(q_values), reduction="none").mean(1).sum()
    critic_optimizer.zero_grad(set_to_none=True)
    qf_loss.backward()
    critic_optimizer.step()
    return {"losses/qf_loss": qf_loss.detach() / len(q_values), "losses/qf_values": q_values.detach().mean()}


def update_actor(
    obs: torch.Tensor,
    obs_rep: torch.Tensor,
    z1: torch.Tensor,
    path: torch.Tensor,
    velocities: torch.Tensor,
    log_alpha: torch.Tensor,
    actor: VelocityField,
    critic: CriticEnsemble,
    actor_optimizer: torch.optim.Optimizer,
    adv_temperature: float | torch.Tensor,
    weighting: str,
    divergence_fn,
    entropy_on: bool,
) -> dict[str, torch.Tensor]:
    """Eq. 6: L = L_WCFM + alpha L_H. The weighted CFM loss (Eqs. 9, 11) regresses onto the candidates' latents z_1
    of the batch's states s (obs_rep, z1, path, velocities: sample_candidates(obs)), weighted by their advantages
    under the current critic; L_H = -(single-time corrected divergence) (Eq. 15), dropped when not `entropy_on`."""
    batch, num_candidates = obs.shape[0], obs_rep.shape[0] // obs.shape[0]
    alpha = log_alpha.detach().exp()
    with torch.no_grad():
        cand_q = critic(obs_rep, torch.tanh(z1)).min(0).values.view(batch, num_candidates)
        weights = candidate_weights(cand_q, adv_temperature, weighting)
    z0 = torch.randn_like(z1)
    t = torch.rand(z1.shape[0], 1, device=z1.device)  # an independent (t, z_0) per candidate [ours]
    velocity = actor(obs_rep, interpolate(z0, z1, t), t)
    cfm_error = (velocity - target_velocity(z0, z1)).pow(2).sum(-1).view_as(weights)
    flow_loss = (weights * cfm_error).sum(1).mean()
    normalized = weights / weights.sum(1, keepdim=True)
    metrics = {
        "losses/flow_loss": flow_loss.detach(),
        "losses/alpha": alpha,
        "charts/weight_ess_fraction": (1.0 / normalized.pow(2).sum(1)).mean() / num_candidates,
        "charts/adv_over_beta_std": (cand_q / adv_temperature).std(1).mean(),
    }
    actor_loss = flow_loss
    if entropy_on:
        corrected_div = entropy_estimate(actor, obs, path, velocities, divergence_fn)
        entropy_loss = -corrected_div.mean()  # Eq. 15
        actor_loss = flow_loss + alpha * entropy_loss  # Eq. 6
        metrics["losses/entropy_loss"] = entropy_loss.detach()
        metrics["charts/entropy"] = tanh_flow_entropy(actor.act_dim, corrected_div.detach().mean())  # Eqs. 17-18
    actor_optimizer.zero_grad(set_to_none=True)
    actor_loss.backward()
    actor_optimizer.step()
    metrics["losses/actor_loss"] = actor_loss.detach()
    return metrics


def update_adv_temperature(
    ess_fraction: torch.Tensor, log_beta: torch.Tensor, beta_optimizer: torch.optim.Optimizer, target_ess_fraction: float
) -> dict[str, torch.Tensor]:
    """--adv-temperature-mode ess: one dual step on log beta against the batch's mean ESS fraction of the weights.
    A smaller ESS than the target (weights too peaked) raises beta, flattening them; a larger one lowers it."""
    beta = log_beta.detach().exp()  # the temperature this update's weights used
    beta_loss = log_beta * (ess_fraction - target_ess_fraction)
    beta_optimizer.zero_grad(set_to_none=True)
    beta_loss.backward()
    beta_optimizer.step()
    return {"charts/adv_temperature": beta}


def update_alpha(
    entropy: torch.Tensor, log_alpha: torch.Tensor, alpha_optimizer: torch.optim.Optimizer, target_entropy: float
) -> dict[str, torch.Tensor]:
    """Sec. 4.3: dual descent on log alpha against the absolute action-space entropy (Eqs. 17-18): alpha grows
    while the entropy is below the target and shrinks above it (SAC's form)."""
    alpha_loss = log_alpha.exp() * (entropy - target_entropy)
    alpha_optimizer.zero_grad(set_to_none=True)
    alpha_loss.backward()
    alpha_optimizer.step()
    return {"losses/alpha_loss": alpha_loss.detach()}


def train_step(
    obs: torch.Tensor,
    actions: torch.Tensor,
    rewards: torch.Tensor,
    terminated: torch.Tensor,
    next_obs: torch.Tensor,
    *,
    actor: VelocityField,
    critic: CriticEnsemble,
    critic_target: CriticEnsemble,
    log_alpha: torch.Tensor,
    log_beta: torch.Tensor,
    actor_optimizer: torch.optim.Optimizer,
    critic_optimizer: torch.optim.Optimizer,
    alpha_optimizer: torch.optim.Optimizer,
    beta_optimizer: torch.optim.Optimizer,
    args: Args,
    target_entropy: float,
    entropy_on: bool,
) -> dict[str, torch.Tensor]:
    """One update of Algorithm 1 on a batch: critic, actor, alpha, then the target networks (Polyak, tau)."""
    batch = obs.shape[0]
    # one ODE solve serves the critic target (states s') and the actor's candidate set (states s)
    obs_rep, z1, path, velocities = sample_candidates(
        actor, torch.cat([next_obs, obs]), args.num_candidates, args.flow_steps, return_path=True
    )
    half = batch * args.num_candidates
    metrics = update_critic(
        obs,
        actions,
        rewards,
        terminated,
        obs_rep[:half],
        z1[:half],
        critic,
        critic_target,
        critic_optimizer,
        args.gamma,
        args.reward_scale,
    )
    divergence_fn = hutchinson_divergence if args.divergence == "hutchinson" else exact_divergence
    adaptive = args.adv_temperature_mode == "ess"
    adv_temperature = log_beta.detach().exp() if adaptive else args.adv_temperature
    metrics |= update_actor(
        obs,
        obs_rep[half:],
        z1[half:],
        path[:, half:],
        velocities[:, half:],
        log_alpha,
        actor,
        critic,
        actor_optimizer,
        adv_temperature,
        args.weighting,
        divergence_fn,
        entropy_on,
    )
    if entropy_on and args.autotune:
        metrics |= update_alpha(metrics["charts/entropy"], log_alpha, alpha_optimizer, target_entropy)
    if adaptive:
        ess_fraction = metrics["charts/weight_ess_fraction"]
        metrics |= update_adv_temperature(ess_fraction, log_beta, beta_optimizer, args.target_ess_fraction)
    with torch.no_grad():
        for target_param, param in zip(critic_target.parameters(), critic.parameters()):
            target_param.lerp_(param, args.tau)
    return metrics


def build_agent(args: Args, obs_dim: int, act_dim: int, device: torch.device):
    """The networks, optimizers, alpha and LR schedule (the checkpoint's contents), and the per-step functions:
    `step_fns[entropy_on](obs, actions, rewards, terminated, next_obs) -> metrics` and `act_fn(obs) -> actions`.

    --compile / --cudagraphs wrap the whole update (ODE solve, three optimizer steps, Polyak) and acting, the units
    that run once per environment step; entropy_on is a Python flag, so each value gets its own compiled graph or
    CUDA graph. torch.compile traces the entropy loss's double differentiation because the divergence is a
    torch.func.vjp (common/flow.py), where torch.autograd.grad(create_graph=True) cannot be traced; the optimizers'
    zero_grad and the backward calls stay graph breaks, as in LeanRL. For --cudagraphs the step has fixed shapes, no
    host sync and no branch on tensor values: the batch is gathered outside it, alpha is read from log_alpha and the
    annealed LR from a tensor inside it. That path has not been run here (no GPU was available)."""
    actor = VelocityField(obs_dim, act_dim, args.hidden_dim, args.num_layers).to(device)
    critic = make_critic(obs_dim, act_dim, args.hidden_dim, args.num_layers).to(device)
    critic_target = make_critic(obs_dim, act_dim, args.hidden_dim, args.num_layers).to(device)
    critic_target.load_state_dict(critic.state_dict())
    # the annealed actor LR is a tensor on the speed paths, updated in place, so a compiled or captured step reads it
    # without recompiling; a tensor LR needs foreach=False unless the optimizer is capturable
    fast = args.compile or args.cudagraphs
    actor_lr = torch.tensor(args.actor_lr, device=device) if fast else args.actor_lr
    foreach = False if fast and not args.cudagraphs else None
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=actor_lr, capturable=args.cudagraphs, foreach=foreach)
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=args.critic_lr, capturable=args.cudagraphs)
    num_updates = max(1, args.total_timesteps - args.learning_starts)
    actor_schedule = torch.optim.lr_scheduler.LinearLR(
        actor_optimizer, 1.0, args.actor_lr_end / args.actor_lr, total_iters=num_updates
    )
    log_alpha = torch.tensor(math.log(args.alpha), device=device, requires_grad=args.autotune)
    alpha_optimizer = torch.optim.Adam([log_alpha], lr=args.alpha_lr, capturable=args.cudagraphs)
    adaptive = args.adv_temperature_mode == "ess"
    log_beta = torch.tensor(math.log(args.adv_temperature), device=device, requires_grad=adaptive)
    beta_optimizer = torch.optim.Adam([log_beta], lr=args.adv_temperature_lr, capturable=args.cudagraphs)
    target_entropy = -float(act_dim) if args.target_entropy is None else args.target_entropy

    nets = dict(actor=actor, critic=critic, critic_target=critic_target, log_alpha=log_alpha, log_beta=log_beta)
    optimizers = dict(
        actor_optimizer=actor_optimizer,
        critic_optimizer=critic_optimizer,
        alpha_optimizer=alpha_optimizer,
        beta_optimizer=beta_optimizer,
    )
    act_fn = functools.partial(act, actor=actor, critic=critic, num_candidates=args.num_candidates, flow_steps=args.flow_steps)
    step_fns = {
        on: functools.partial(train_step, **nets, **optimizers, args=args, target_entropy=target_entropy, entropy_on=on)
        for on in (True, False)
    }
    if args.compile:
        step_fns = {on: torch.compile(fn) for on, fn in step_fns.items()}
        act_fn = torch.compile(act_fn)
    if args.cudagraphs:
        step_fns = {on: CudaGraphStep(fn) for on, fn in step_fns.items()}
        act_fn = CudaGraphStep(act_fn)
    return dict(**nets, **optimizers, actor_schedule=actor_schedule), step_fns, act_fn


# ---- Acting and evaluation ------------------------------------------------------------------------------------------


def act(obs: torch.Tensor, actor: VelocityField, critic: CriticEnsemble, num_candidates: int, flow_steps: int):
    """Data collection and evaluation: per state of obs (B, obs_dim), the max-Q candidate among N (Sec. 4.4),
    ranked by the min of the online critics [ours], in (-1, 1)^d."""
    with torch.no_grad():
        obs_rep, z1 = sample_candidates(actor, obs, num_candidates, flow_steps)
        actions = torch.tanh(z1)
        q = critic(obs_rep, actions).min(0).values.view(obs.shape[0], -1)
        return best_of_candidates(q, actions)


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


RESUME_KEYS = (
    "args",
    "global_step",
    "actor",
    "critic",
    "critic_target",
    "log_alpha",
    "log_beta",
    "actor_optimizer",
    "critic_optimizer",
    "alpha_optimizer",
    "beta_optimizer",
    "actor_schedule",
    "rng",
)


def resume_args(args: Args, device: torch.device) -> tuple[Args, dict]:
    """--resume DIR: the checkpoint DIR/{exp_name}.pt and the run's own flags. Flags given next to --resume must equal
    the run's, except --resume, --cuda, --compile and --cudagraphs; --run-name, if given, must name DIR."""
    path = os.path.join(args.resume, f"{args.exp_name}.pt")
    state = load_checkpoint(path, "fmer.py", device)
    missing = [key for key in RESUME_KEYS if key not in state]
    if missing:
        raise SystemExit(f"error: '{path}' cannot be resumed: it lacks {', '.join(missing)} (written by an older fmer.py?)")
    run_name = os.path.basename(os.path.normpath(args.resume))
    if args.run_name not in (None, run_name):
        raise SystemExit(f"error: --resume: --run-name {args.run_name} does not name the resumed folder {args.resume}")
    free = dict(resume=args.resume, cuda=args.cuda, compile=args.compile, cudagraphs=args.cudagraphs, run_name=run_name)
    try:
        saved = Args(**state["args"])
    except TypeError as e:
        raise SystemExit(f"error: '{path}' holds flags of another version of fmer.py ({e})") from None
    given = tyro.cli(Args, default=dataclasses.replace(saved, **free))  # flags not given take the run's values
    for name, value in vars(given).items():
        if name not in free and value != getattr(saved, name):
            flag = "--" + name.replace("_", "-")
            raise SystemExit(f"error: --resume: flag {flag} differs from the run's ({value} vs {getattr(saved, name)})")
    return given, state


def env_generators(env: gym.Env) -> list[np.random.Generator]:
    """The training env's own random generators: its reset noise, its action space's warm-up samples and, in
    FrankaKitchen-v1, the robot's observation noise (drawn at every step)."""
    robot_env = getattr(env.unwrapped, "robot_env", None)
    return [env.unwrapped.np_random, env.action_space.np_random] + ([robot_env.np_random] if robot_env else [])


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


def restore_agent(agent: dict, state: dict, path: str) -> None:
    """Load a checkpoint into the agent IN PLACE (the step functions hold these very modules, tensors, optimizers)."""
    try:
        for name, value in agent.items():
            if isinstance(value, torch.Tensor):  # log alpha, log beta
                with torch.no_grad():
                    value.copy_(state[name])
            elif isinstance(value, torch.optim.Optimizer):
                load_optimizer(value, state[name])
            else:  # networks, the LR schedule
                value.load_state_dict(state[name])
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise SystemExit(
            f"error: checkpoint '{path}' holds networks of another size (--hidden-dim/--num-layers ...): {first}"
        ) from None


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
    args = tyro.cli(Args)
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
    run_name = args.run_name or f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = args.resume or f"runs/{run_name}"
    checkpoint_path, buffer_path = f"{run_dir}/{args.exp_name}.pt", f"{run_dir}/buffer.pt"
    if resumed and not os.path.isfile(buffer_path):
        raise SystemExit(f"error: --resume: no replay buffer '{buffer_path}'; run with --save-model --save-buffer to resume")

    # stop requests (Ctrl-C, SIGTERM, Slurm's SIGUSR2) are checked between episodes: checkpoint there, then exit
    stop_signal = None

    def request_stop(signum, frame):
        global stop_signal
        stop_signal = stop_signal or signum  # a later SIGTERM never cancels the checkpoint of a Ctrl-C
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C exits at once

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2):
        signal.signal(signum, request_stop)

    env = make_env(args.env_id, args.seed, kitchen_tasks=args.kitchen_tasks)
    eval_env = make_env(args.env_id, args.seed + 10_000, args.capture_video, f"videos/{run_name}", args.kitchen_tasks)
    obs_dim = int(np.prod(env.observation_space.shape))
    act_dim = int(np.prod(env.action_space.shape))
    action_scale, action_bias = action_bounds(env)
    is_kitchen = args.env_id == KITCHEN_ID

    # ALGO LOGIC: networks, optimizers, update functions (+ torch.compile / CudaGraphStep when asked)
    agent, step_fns, act_fn = build_agent(args, obs_dim, act_dim, device)
    actor_schedule = agent["actor_schedule"]

    # replay buffer on the training device, one row per transition: [s, s', a, r, terminated];
    # actions are stored in the policy's (-1, 1) space
    buffer_size = min(args.buffer_size, args.total_timesteps)
    replay = torch.zeros(buffer_size, 2 * obs_dim + act_dim + 2, device=device)

    start_step = 0
    if resumed:  # networks, optimizers, schedule, alpha, beta, RNGs and the replay buffer as the checkpoint left them
        start_step = resumed["global_step"]
        restore_agent(agent, resumed, checkpoint_path)
        saved_replay = load_checkpoint(buffer_path, "fmer.py", torch.device("cpu"))
        if saved_replay["global_step"] != start_step:
            raise SystemExit(
                f"error: '{buffer_path}' is of step {saved_replay['global_step']}, the checkpoint of step {start_step}"
            )
        replay[: len(saved_replay["replay"])] = saved_replay["replay"]
        set_rng_states(resumed["rng"], env)
        del saved_replay  # the host copy

    writer = SummaryWriter(run_dir, purge_step=start_step + 1 if start_step else None)  # a resume drops later events
    if not start_step:
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))

    def policy_action(o: np.ndarray) -> np.ndarray:
        """The max-Q candidate for one observation, in the policy's (-1, 1) space."""
        return act_fn(torch.as_tensor(o, dtype=torch.float32, device=device).view(1, obs_dim))[0].cpu().numpy()

    policy = lambda o: policy_action(o) * action_scale + action_bias  # the env's action space

    checkpoint = dict(script="fmer.py", **agent, args=vars(args))
    first_update_step = args.learning_starts + 1
    sps_clock_step = max(first_update_step, start_step + 1) + 3  # SPS burn-in: compilation and warm-up are not timed
    first_bad, metrics = {}, {}
    sps_start, sps_step, excluded = None, 0, 0.0
    checkpoint_due, global_step = False, start_step
    # a resumed run starts between episodes: the restored env RNG draws the reset the uninterrupted run drew
    obs, _ = env.reset() if start_step else env.reset(seed=args.seed)
    progress = tqdm(
        range(start_step + 1, args.total_timesteps + 1), desc=run_name, initial=start_step, mininterval=5.0, disable=None
    )
    try:
        for global_step in progress:
            # ALGO LOGIC: act: uniform warm-up (Sec. 5.2), then the max-Q candidate (Sec. 4.4)
            if global_step <= args.learning_starts:
                env_action = env.action_space.sample()
                action = (env_action - action_bias) / action_scale
            else:
                action = policy_action(obs)
                env_action = action * action_scale + action_bias
            next_obs, reward, terminated, truncated, info = env.step(env_action)

            store_transition(replay, global_step, obs, next_obs, action, reward, terminated, truncated)
            episode_done = terminated or truncated
            if episode_done:
                writer.add_scalar("charts/episodic_return", info["episode"]["r"], global_step)
                writer.add_scalar("charts/episodic_length", info["episode"]["l"], global_step)
                if is_kitchen:
                    writer.add_scalar("charts/tasks_completed", info["tasks_completed"], global_step)
                    writer.add_scalar("charts/success_rate", info["success_rate"], global_step)

            # ALGO LOGIC: one gradient step per environment step
            if global_step >= first_update_step:
                batch = replay[torch.randint(0, min(global_step, buffer_size), (args.batch_size,), device=device)]
                b_obs, b_next_obs, b_actions, b_rewards, b_terminated = batch.split([obs_dim, obs_dim, act_dim, 1, 1], 1)
                entropy_on = args.entropy_off_step is None or global_step <= args.entropy_off_step
                metrics = step_fns[entropy_on](b_obs, b_actions, b_rewards[:, 0], b_terminated[:, 0], b_next_obs)
                actor_schedule.step()
                record_nonfinite(metrics, global_step, first_bad)
                if global_step == sps_clock_step:
                    sps_start, sps_step, excluded = time.time(), global_step, 0.0

            # TRY NOT TO MODIFY: logging, evaluation, checkpoints
            if global_step % args.log_every == 0 and metrics:
                raise_if_nonfinite(first_bad, run_name)
                values = torch.stack(list(metrics.values())).tolist()  # one device-to-host copy per log step
                for name, value in zip(metrics, values):
                    writer.add_scalar(name, value, global_step)
                writer.add_scalar("charts/actor_lr", float(actor_schedule.get_last_lr()[0]), global_step)
                if sps_start is not None and global_step > sps_step:
                    sps = (global_step - sps_step) / (time.time() - sps_start - excluded)
                    writer.add_scalar("charts/SPS", int(sps), global_step)
                if device.type == "cuda":
                    writer.add_scalar("charts/gpu_memory_mb", torch.cuda.max_memory_allocated() / 2**20, global_step)

            if global_step % args.eval_every == 0 or global_step == args.total_timesteps:
                eval_start = time.time()
                eval_metrics = evaluate(policy, eval_env, args.eval_episodes, args.seed + 10_000 + global_step)
                for name, value in eval_metrics.items():
                    writer.add_scalar(name, value, global_step)
                progress.set_postfix(eval_return=f"{eval_metrics['eval/episodic_return']:.1f}", refresh=False)
                checkpoint_due = args.save_model
                excluded += time.time() - eval_start

            # checkpoints only between episodes (the first episode end at or after an evaluation, a stop request), so
            # the env needs no simulator state, only its RNGs (read before its reset), and at the end
            last_step = global_step == args.total_timesteps
            if args.save_model and (episode_done and (checkpoint_due or stop_signal) or last_step):
                save_start = time.time()
                raise_if_nonfinite(first_bad, run_name)
                files = [(checkpoint_path, dict(checkpoint, global_step=global_step, rng=rng_states(env)))]
                if args.save_buffer:
                    rows = replay[: min(global_step, buffer_size)].to("cpu", copy=True)
                    files.insert(0, (buffer_path, dict(script="fmer.py", global_step=global_step, replay=rows)))
                save_checkpoint(*files)
                checkpoint_due = False
                excluded += time.time() - save_start
            if stop_signal and (episode_done or not args.save_model):
                break
            obs = env.reset()[0] if episode_done else next_obs
        raise_if_nonfinite(first_bad, run_name)
    except KeyboardInterrupt:  # a second Ctrl-C
        print(f"interrupted at step {global_step}, no checkpoint written; TensorBoard logs kept in {run_dir}")
        raise SystemExit(128 + signal.SIGINT) from None
    finally:
        progress.close()
        env.close()
        eval_env.close()
        writer.close()
    if stop_signal:
        saved = f"checkpoint of step {global_step} in {checkpoint_path}" if args.save_model else "no checkpoint (--save-model)"
        print(f"interrupted at step {global_step} by {signal.Signals(stop_signal).name}; {saved}; logs in {run_dir}")
        raise SystemExit(128 + stop_signal)
    if args.save_model:
        print(f"model saved to {checkpoint_path}")
