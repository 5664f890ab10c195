"""FMER: Flow Matching Policy with Entropy Regularization (Gao et al., arXiv:2603.17685v1).

Online, off-policy RL with a flow-matching policy in a tanh-squashed latent space:
  a = tanh(z_1),  dz_t/dt = u_theta(z_t, t, s),  z_0 ~ N(0, I)                       (Eq. 1, Sec. 4.1)
Each update
  1. draws N candidates per state from the current policy by 10 Euler steps (Eq. 8),
  2. trains the twin critics on a clipped double-Q target built from the best of the N
     candidates at s' (Eqs. 19-20),
  3. trains the policy on a weighted CFM loss whose weights are a softmax of the candidates'
     advantages (Eqs. 9, 11) plus alpha times an entropy loss from the divergence of the velocity
     field with the tanh correction, estimated by Hutchinson's trace estimator (Eqs. 13-16),
  4. tunes the Lagrange multiplier alpha against a target entropy (Eq. 5, SAC-style dual descent).
Acting picks the candidate with the highest Q after a random warm-up (Sec. 4.4, 5.2).
Equation numbers refer to the paper; where the paper is silent the choice is marked "[ours]".
"""

import math
import os
import random
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

from common.envs import KITCHEN_ID, make_env
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
    capture_video: bool = False
    """whether to capture videos of the agent's evaluation episodes (in `videos/{run_name}`)"""
    save_model: bool = False
    """whether to save all networks, optimizers and alpha to `runs/{run_name}/fmer.pt` (at every evaluation and at the end)"""

    # Environment
    env_id: str = "Hopper-v5"
    """the id of the environment (Gymnasium MuJoCo v5, classic control, or FrankaKitchen-v1)"""
    kitchen_tasks: int = 1
    """FrankaKitchen-v1 only: the task set N in {1, 2, 4, 7} of the paper (App. B.3)"""
    total_timesteps: int = 1_000_000
    """total environment steps of the experiment"""
    learning_starts: int = 10_000
    """uniformly random environment steps before the first update (Sec. 5.2)"""
    buffer_size: int = 1_000_000
    """the replay memory buffer size (kept on the training device)"""
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
    """One-line errors for flag combinations that cannot run."""
    problems = [
        (
            args.learning_starts < args.batch_size,
            f"--learning-starts ({args.learning_starts}) must be at least --batch-size ({args.batch_size})",
        ),
        (
            args.buffer_size < args.learning_starts,
            f"--buffer-size ({args.buffer_size}) must hold the {args.learning_starts} warm-up steps",
        ),
        (args.num_candidates < 1 or args.flow_steps < 1, "--num-candidates and --flow-steps must be positive"),
        (args.adv_temperature <= 0, "--adv-temperature must be positive"),
        (args.alpha <= 0, "--alpha must be positive (alpha is tuned in log space)"),
        (
            args.kitchen_tasks != 1 and args.env_id != KITCHEN_ID,
            f"--kitchen-tasks applies to {KITCHEN_ID} only, not {args.env_id}",
        ),
        (
            min(args.eval_every, args.eval_episodes, args.log_every) < 1,
            "--eval-every, --eval-episodes and --log-every must be positive",
        ),
    ]
    for failed, message in problems:
        if failed:
            raise SystemExit(f"error: {message}")


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


class TwinQ(nn.Module):
    """Q_phi1 and Q_phi2 (Eqs. 19-20) as one stacked MLP: batched matmuls instead of two networks."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, num_layers: int, num_q: int = 2):
        super().__init__()
        dims = [obs_dim + act_dim] + [hidden_dim] * num_layers + [1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(dims[:-1], dims[1:]):
            bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default initialization, per member
            self.weights.append(nn.Parameter(torch.empty(num_q, fan_in, fan_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(num_q, 1, fan_out).uniform_(-bound, bound)))

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Returns Q-values of shape (2, batch)."""
        x = torch.cat([obs, action], -1).unsqueeze(0).expand(len(self.weights[0]), -1, -1)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(b, x, w)
            if i < len(self.weights) - 1:
                x = F.mish(x)
        return x.squeeze(-1)


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
    z_t = path[k, rows] + (t - k.unsqueeze(-1) / steps) * velocities[k, rows]
    z_t = z_t.detach().requires_grad_(True)
    u = actor(obs, z_t, t)
    return divergence_fn(u, z_t) + tanh_divergence_correction(z_t, u)  # Eq. 16 (or exact) + Eq. 14


def candidate_weights(q: torch.Tensor, temperature: float, weighting: str) -> torch.Tensor:
    """Weights of the N candidates per state from their Q-values q of shape (B, N) (Eq. 11).

    The advantage A_i = Q_i - mean_j Q_j [ours]; under the softmax any per-state baseline cancels.
    """
    adv = (q - q.mean(1, keepdim=True)) / temperature
    if weighting == "softmax":
        return torch.softmax(adv, 1)
    if weighting == "unnormalized":
        return torch.exp(adv.clamp(max=20.0))  # clamped only to keep the loss finite [ours]
    return F.one_hot(adv.argmax(1), q.shape[1]).to(q.dtype)


def td_target(
    rewards: torch.Tensor, terminated: torch.Tensor, next_q: torch.Tensor, gamma: float, reward_scale: float
) -> torch.Tensor:
    """Eq. 20: y = r~ + gamma (1 - d) Q'(s', a'*), with d the termination flag: truncation still bootstraps."""
    return reward_scale * rewards + gamma * (1.0 - terminated) * next_q


def best_of_candidates(q: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """The latent of the highest-valued candidate per state; q is (B, N), latents (B*N, d)."""
    best = q.argmax(1)
    return latents.view(*q.shape, -1)[torch.arange(q.shape[0], device=q.device), best]


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


def act(actor, critic, obs, args, device, obs_dim) -> np.ndarray:
    """Data collection and evaluation: the max-Q candidate among N (Sec. 4.4), in (-1, 1)^d."""
    obs_t = torch.as_tensor(obs, dtype=torch.float32, device=device).view(1, obs_dim)
    with torch.no_grad():
        obs_rep, z1 = sample_candidates(actor, obs_t, args.num_candidates, args.flow_steps)
        actions = torch.tanh(z1)
        q = critic(obs_rep, actions).min(0).values.view(1, -1)
        return best_of_candidates(q, actions)[0].cpu().numpy()


def save_checkpoint(path: str, modules: dict) -> None:
    """Write the state dicts atomically: a crash mid-write never leaves a truncated checkpoint."""
    tmp = path + ".tmp"
    torch.save({name: m.state_dict() if hasattr(m, "state_dict") else m for name, m in modules.items()}, tmp)
    os.replace(tmp, path)


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_args(args)
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    env = make_env(args.env_id, args.seed, kitchen_tasks=args.kitchen_tasks)
    eval_env = make_env(args.env_id, args.seed + 10_000, args.capture_video, f"videos/{run_name}", args.kitchen_tasks)
    obs_dim = int(np.prod(env.observation_space.shape))
    act_dim = int(np.prod(env.action_space.shape))
    # the policy acts in (-1, 1)^d; the env gets a * scale + bias (e.g. +-0.4 for Humanoid-v5)
    action_scale = ((env.action_space.high - env.action_space.low) / 2.0).astype(np.float32)
    action_bias = ((env.action_space.high + env.action_space.low) / 2.0).astype(np.float32)
    target_entropy = -float(act_dim) if args.target_entropy is None else args.target_entropy
    is_kitchen = args.env_id == KITCHEN_ID

    actor = VelocityField(obs_dim, act_dim, args.hidden_dim, args.num_layers).to(device)
    critic = TwinQ(obs_dim, act_dim, args.hidden_dim, args.num_layers).to(device)
    critic_target = TwinQ(obs_dim, act_dim, args.hidden_dim, args.num_layers).to(device)
    critic_target.load_state_dict(critic.state_dict())
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.actor_lr)
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=args.critic_lr)
    num_updates = max(1, args.total_timesteps - args.learning_starts)
    actor_schedule = torch.optim.lr_scheduler.LinearLR(
        actor_optimizer, 1.0, args.actor_lr_end / args.actor_lr, total_iters=num_updates
    )
    log_alpha = torch.tensor(math.log(args.alpha), device=device, requires_grad=args.autotune)
    alpha_optimizer = torch.optim.Adam([log_alpha], lr=args.alpha_lr)
    divergence_fn = hutchinson_divergence if args.divergence == "hutchinson" else exact_divergence

    # replay buffer on the training device, one row per transition: [s, s', a, r, terminated];
    # actions are stored in the policy's (-1, 1) space
    buffer_size = min(args.buffer_size, args.total_timesteps)
    replay = torch.zeros(buffer_size, 2 * obs_dim + act_dim + 2, device=device)

    writer = SummaryWriter(f"runs/{run_name}")
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    checkpoint_path = f"runs/{run_name}/{args.exp_name}.pt"
    checkpoint = dict(
        actor=actor,
        critic=critic,
        critic_target=critic_target,
        log_alpha=log_alpha,
        actor_optimizer=actor_optimizer,
        critic_optimizer=critic_optimizer,
        alpha_optimizer=alpha_optimizer,
        actor_schedule=actor_schedule,
        args=vars(args),
    )
    obs, _ = env.reset(seed=args.seed)
    start_time = time.time()
    progress = tqdm(range(1, args.total_timesteps + 1), desc=run_name, mininterval=5.0, disable=None)
    try:
        for global_step in progress:
            # ---- act: uniform warm-up (Sec. 5.2), then the max-Q candidate (Sec. 4.4) ----
            if global_step <= args.learning_starts:
                env_action = env.action_space.sample()
                action = (env_action - action_bias) / action_scale
            else:
                action = act(actor, critic, obs, args, device, obs_dim)
                env_action = action * action_scale + action_bias
            next_obs, reward, terminated, truncated, info = env.step(env_action)

            # next_obs is the true final observation on truncation: bootstrap through it, cut only on termination
            row = np.concatenate([obs, next_obs, action, [reward, terminated]], dtype=np.float32)
            replay[(global_step - 1) % buffer_size] = torch.from_numpy(row)  # one host-to-device copy per step
            obs = next_obs
            if terminated or truncated:
                writer.add_scalar("charts/episodic_return", info["episode"]["r"], global_step)
                writer.add_scalar("charts/episodic_length", info["episode"]["l"], global_step)
                if is_kitchen:
                    writer.add_scalar("charts/tasks_completed", info["tasks_completed"], global_step)
                    writer.add_scalar("charts/success_rate", info["success_rate"], global_step)
                obs, _ = env.reset()

            # ---- update: one gradient step per environment step ----
            if global_step > args.learning_starts:
                batch = replay[torch.randint(0, min(global_step, buffer_size), (args.batch_size,), device=device)]
                b_obs, b_next_obs, b_actions, b_rewards, b_terminated = batch.split([obs_dim, obs_dim, act_dim, 1, 1], 1)
                alpha = log_alpha.detach().exp()
                # One ODE solve serves the critic target (states s') and the actor's candidate set (states s).
                obs_rep, z1, path, velocities = sample_candidates(
                    actor, torch.cat([b_next_obs, b_obs]), args.num_candidates, args.flow_steps, return_path=True
                )
                half = args.batch_size * args.num_candidates
                next_obs_rep, next_z1 = obs_rep[:half], z1[:half]
                obs_rep, z1, path, velocities = obs_rep[half:], z1[half:], path[:, half:], velocities[:, half:]

                # critic (Eqs. 19-20): y = r + gamma (1 - d) min_j Q_target_j(s', a'*), a'* the best of N at s'
                with torch.no_grad():
                    next_q = critic_target(next_obs_rep, torch.tanh(next_z1)).min(0).values
                    next_q = next_q.view(args.batch_size, args.num_candidates).max(1).values
                    target_q = td_target(b_rewards[:, 0], b_terminated[:, 0], next_q, args.gamma, args.reward_scale)
                q_values = critic(b_obs, b_actions)
                qf_loss = F.mse_loss(q_values, target_q.expand_as(q_values), reduction="none").mean(1).sum()
                critic_optimizer.zero_grad(set_to_none=True)
                qf_loss.backward()
                critic_optimizer.step()

                # actor: weighted CFM over the candidates (Eqs. 9, 11), regressing onto the latents z_1
                with torch.no_grad():
                    cand_q = critic(obs_rep, torch.tanh(z1)).min(0).values.view(args.batch_size, args.num_candidates)
                    weights = candidate_weights(cand_q, args.adv_temperature, args.weighting)
                z0 = torch.randn_like(z1)
                t = torch.rand(z1.shape[0], 1, device=device)  # an independent (t, z_0) per candidate [ours]
                velocity = actor(obs_rep, interpolate(z0, z1, t), t)
                cfm_error = (velocity - target_velocity(z0, z1)).pow(2).sum(-1).view_as(weights)
                wcfm_loss = (weights * cfm_error).sum(1).mean()

                # entropy (Eqs. 13-16): one detached state z_t, t ~ U[0, 1], on a candidate's Euler polyline
                entropy_on = args.entropy_off_step is None or global_step <= args.entropy_off_step
                if entropy_on:
                    corrected_div = entropy_estimate(actor, b_obs, path, velocities, divergence_fn)
                    entropy_loss = -corrected_div.mean()  # Eq. 15
                    actor_loss = wcfm_loss + alpha * entropy_loss  # Eq. 6
                else:
                    actor_loss = wcfm_loss
                actor_optimizer.zero_grad(set_to_none=True)
                actor_loss.backward()
                actor_optimizer.step()
                actor_schedule.step()

                # alpha (Sec. 4.3): dual descent against the absolute action-space entropy (Eqs. 17-18)
                if entropy_on:
                    entropy = tanh_flow_entropy(act_dim, corrected_div.detach().mean())
                    if args.autotune:
                        alpha_loss = log_alpha.exp() * (entropy - target_entropy)
                        alpha_optimizer.zero_grad(set_to_none=True)
                        alpha_loss.backward()
                        alpha_optimizer.step()

                with torch.no_grad():
                    for target_param, param in zip(critic_target.parameters(), critic.parameters()):
                        target_param.lerp_(param, args.tau)

                if global_step % args.log_every == 0:
                    normalized = weights / weights.sum(1, keepdim=True)
                    metrics = {
                        "losses/qf_loss": qf_loss / 2.0,
                        "losses/qf_values": q_values.mean(),
                        "losses/actor_loss": actor_loss,
                        "losses/wcfm_loss": wcfm_loss,
                        "losses/alpha": alpha,
                        "charts/weight_ess_fraction": (1.0 / normalized.pow(2).sum(1)).mean() / args.num_candidates,
                        "charts/adv_over_beta_std": (cand_q / args.adv_temperature).std(1).mean(),
                    }
                    if entropy_on:
                        metrics.update({"losses/entropy_loss": entropy_loss, "charts/entropy": entropy})
                        if args.autotune:
                            metrics["losses/alpha_loss"] = alpha_loss
                    values = torch.stack(list(metrics.values())).tolist()  # one device-to-host copy
                    for name, value in zip(metrics, values):
                        if not math.isfinite(value):
                            raise SystemExit(
                                f"error: {name} became {value} at step {global_step}; stopping (logs kept in runs/{run_name})"
                            )
                        writer.add_scalar(name, value, global_step)
                    writer.add_scalar("charts/actor_lr", actor_schedule.get_last_lr()[0], global_step)

            if global_step % args.log_every == 0:
                sps = int(global_step / (time.time() - start_time))
                writer.add_scalar("charts/SPS", sps, global_step)
                if device.type == "cuda":
                    writer.add_scalar("charts/gpu_memory_mb", torch.cuda.max_memory_allocated() / 2**20, global_step)

            if global_step % args.eval_every == 0 or global_step == args.total_timesteps:
                policy = lambda o: act(actor, critic, o, args, device, obs_dim) * action_scale + action_bias
                eval_metrics = evaluate(policy, eval_env, args.eval_episodes, args.seed + 10_000 + global_step)
                for name, value in eval_metrics.items():
                    writer.add_scalar(name, value, global_step)
                eval_return = eval_metrics["eval/episodic_return"]
                progress.set_postfix(eval_return=f"{eval_return:.1f}", refresh=False)
                if args.save_model:
                    save_checkpoint(checkpoint_path, dict(checkpoint, global_step=global_step))
    except KeyboardInterrupt:
        print(f"interrupted at step {global_step}; TensorBoard logs kept in runs/{run_name}")
        if args.save_model:
            save_checkpoint(checkpoint_path, dict(checkpoint, global_step=global_step))
    finally:
        progress.close()
        env.close()
        eval_env.close()
        writer.close()
    if args.save_model:
        print(f"model saved to {checkpoint_path}")
