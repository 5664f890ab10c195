"""FlowQ: Energy-Guided Flow Policies for Offline RL (Alles et al., arXiv:2505.14139), a reconstruction.

READ THIS FIRST. The body of the FlowQ paper (its equations, tables and hyperparameters) was not
available, and no official code was found. Only the abstract, the figure captions and a partial
third-party summary were used (see shared spec flowq.md). What is taken from those sources:
  - the target policy pi(a|s) ~ pi_beta(a|s) exp(lambda Q(s, a)) (energy E = -Q), learned by
    "energy-guided flow matching" that approximates the energy-guided path as a Gaussian path;
  - no guidance at inference; policy training time constant in the number of flow steps;
  - the energy schedules h(t) = t, t^2, t^2 / (1 - t) and a learnable h_theta(t) (Fig. 2).
Everything below marked [RECON] is a reconstruction for this project, not the paper's method:
  - the actor target (spec Sec. 3, the guidance identity for Gaussian paths, Zheng et al. 2023):
      a_t = t a_1 + (1 - t) a_0,   a_0 ~ N(0, I),  a_1 ~ dataset,  sigma_min = 0,
      u_hat_t = (a_1 - a_0) + lambda h(t) (1 - t) / t * grad_a Q(s, a_t),
      L_pi = E || u_theta(a_t, t, s) - stopgrad(u_hat_t) ||^2,
    with grad_a Q evaluated at a_t (clamped to the action box [ours]);
  - how h_theta(t) is trained (ours: a learned step size, see `LearnedSchedule`);
  - lambda normalized by the batch mean |Q| by default (ours, TD3+BC style; spec Sec. 6);
  - the critic: IQL-style expectile regression (spec Sec. 4) with twin Q and a Polyak target;
  - 10 explicit Euler steps at inference, one stochastic sample per action (spec Sec. 5);
  - all hyperparameters, including lambda for each domain, network sizes and learning rates.
No FlowQ scores were available to compare against (spec Sec. 7).
"""

import math
import os
import random
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from common.datasets import load_dataset, success_from_info
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
    save_model: bool = False
    """whether to save all networks and optimizers to `runs/{run_name}/flowq.pt` (at every evaluation and at the end)"""

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

    # Training
    total_steps: int = 1_000_000
    """total gradient updates"""
    batch_size: int = 256
    """the batch size of sample from the dataset"""
    gamma: float = 0.99
    """the discount factor gamma"""
    tau: float = 0.005
    """target smoothing coefficient of the Q networks (spec Sec. 4)"""
    actor_lr: float = 3e-4
    """learning rate of the velocity field [RECON]"""
    critic_lr: float = 3e-4
    """learning rate of the Q and V networks [RECON]"""
    hidden_dim: int = 256
    """width of the hidden layers of all networks [RECON]"""
    num_layers: int = 3
    """number of hidden layers of all networks (GELU; LayerNorm in the Q and V networks, as in FQL) [RECON]"""

    # Critic (IQL-style, spec Sec. 4)
    expectile: float = 0.7
    """expectile tau of the value loss (IQL: 0.7 locomotion/adroit, 0.9 antmaze)"""

    # Energy-guided flow matching (spec Sec. 3)
    energy_scale: float = 2.5
    """lambda: the policy targets pi_beta exp(lambda Q); 0 gives plain conditional flow matching (behaviour cloning).
    Default [ours]: with h = t and --normalize-energy a sample moves by (lambda / 2) grad Q / mean|Q|, the shift of
    TD3+BC's alpha = 2.5"""
    schedule: Literal["t", "t2", "t2_over_1mt", "learned"] = "t"
    """energy schedule h(t): t (default), t^2, t^2/(1-t), or a learned h_theta(t) (Fig. 2)"""
    normalize_energy: bool = True
    """divide lambda by the batch mean |Q| so one lambda fits any reward scale [ours, spec Sec. 6]"""
    schedule_lr: float = 1e-3
    """learning rate of h_theta(t) (--schedule learned) [ours]"""

    # Evaluation and logging
    flow_steps: int = 10
    """Euler steps of the flow ODE when acting (spec Sec. 5) [RECON]"""
    eval_every: int = 10_000
    """evaluate every this many updates"""
    eval_episodes: int = 10
    """evaluation episodes, one stochastic flow sample per action, no guidance"""
    log_every: int = 1000
    """write losses and SPS to TensorBoard every this many updates"""


def check_args(args: Args) -> None:
    """One-line errors for flag values that cannot run."""
    problems = [
        (args.energy_scale < 0, "--energy-scale must be >= 0"),
        (not 0.0 < args.expectile < 1.0, "--expectile must lie in (0, 1)"),
        (
            min(args.total_steps, args.batch_size, args.hidden_dim, args.num_layers, args.flow_steps) < 1,
            "--total-steps, --batch-size, --hidden-dim, --num-layers and --flow-steps must be positive",
        ),
        (
            min(args.eval_every, args.eval_episodes, args.log_every) < 1,
            "--eval-every, --eval-episodes and --log-every must be positive",
        ),
    ]
    for failed, message in problems:
        if failed:
            raise SystemExit(f"error: {message}")


def mlp(in_dim: int, out_dim: int, hidden_dim: int, num_layers: int, layer_norm: bool = False) -> nn.Sequential:
    layers, dim = [], in_dim
    for _ in range(num_layers):
        layers += [nn.Linear(dim, hidden_dim)] + ([nn.LayerNorm(hidden_dim)] if layer_norm else []) + [nn.GELU()]
        dim = hidden_dim
    return nn.Sequential(*layers, nn.Linear(dim, out_dim))


class VelocityField(nn.Module):
    """u_theta(a_t, t, s); the raw scalar t is an input (FQL convention) [RECON]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, num_layers: int):
        super().__init__()
        self.act_dim = act_dim
        self.net = mlp(obs_dim + act_dim + 1, act_dim, hidden_dim, num_layers)

    def forward(self, obs: torch.Tensor, a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([obs, a, t], -1))


class TwinQ(nn.Module):
    """Q_phi1, Q_phi2 (spec Sec. 4); returns (2, batch)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, num_layers: int):
        super().__init__()
        self.q1 = mlp(obs_dim + act_dim, 1, hidden_dim, num_layers, layer_norm=True)
        self.q2 = mlp(obs_dim + act_dim, 1, hidden_dim, num_layers, layer_norm=True)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        x = torch.cat([obs, action], -1)
        return torch.stack([self.q1(x), self.q2(x)]).squeeze(-1)


class LearnedSchedule(nn.Module):
    """h_theta(t) = 2 t sigmoid(f_theta(t)): h(0) = 0, 0 <= h <= 2t, and h = t at initialization [ours].

    How the paper trains h_theta is unknown (spec Sec. 3.5, 10). Our choice: h_theta is a learned
    step size along grad_a Q. It maximizes Q(s, a_1_hat) at the one-step endpoint of the guided
    target, a_1_hat = a_t + (1 - t) u_hat_t, which rises while the step climbs Q and falls once it
    overshoots; the 2t bound keeps it within twice the default schedule. One extra critic pass per
    sample, so training time stays independent of the number of flow steps.
    """

    def __init__(self, hidden_dim: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def coefficient(self, t: torch.Tensor) -> torch.Tensor:
        """c(t) = h(t) (1 - t) / t = 2 sigmoid(f(t)) (1 - t), without the 1/t singularity."""
        return 2.0 * torch.sigmoid(self.net(t)) * (1.0 - t)


def energy_coefficient(schedule: str, t: torch.Tensor, learned: LearnedSchedule | None = None) -> torch.Tensor:
    """c(t) = h(t) b_t with b_t = (1 - t) / t for the linear path, sigma_min = 0 (spec Sec. 3.2 table)."""
    if schedule == "t":
        return 1.0 - t
    if schedule == "t2":
        return t * (1.0 - t)
    if schedule == "t2_over_1mt":
        return t
    return learned.coefficient(t)


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
    """The energy-guided flow-matching target u_hat_t = (a_1 - a_0) + lambda c(t) grad_a Q(s, a_t) (spec Sec. 3.2).

    q_fn(obs, a) -> Q of shape (batch,). Returns the target (with gradient only through `coefficient`),
    the point a_t, and the raw gradient grad_a Q and Q at a_t (both detached). With lambda = 0 the
    target is exactly the conditional flow-matching target a_1 - a_0 and no critic is queried.
    """
    a_t = interpolate(a0, a1, t)
    velocity = target_velocity(a0, a1)
    if energy_scale == 0.0:
        return velocity, a_t, torch.zeros_like(a_t), torch.zeros_like(a_t[:, 0])
    with torch.enable_grad():
        a_q = a_t.detach().clamp(-1.0, 1.0).requires_grad_(True)  # query Q inside the action box [ours, spec Sec. 3.5]
        q = q_fn(obs, a_q)
        (grad_q,) = torch.autograd.grad(q.sum(), a_q)
    scale = energy_scale / q.detach().abs().mean().clamp_min(1e-6) if normalize_energy else energy_scale
    return velocity + scale * coefficient * grad_q, a_t, grad_q, q.detach()


def expectile_loss(diff: torch.Tensor, expectile: float) -> torch.Tensor:
    """L_2^tau(u) = |tau - 1(u < 0)| u^2 (IQL, spec Sec. 4)."""
    weight = torch.where(diff < 0, 1.0 - expectile, expectile)
    return (weight * diff.pow(2)).mean()


def sample_actions(actor: VelocityField, obs: torch.Tensor, flow_steps: int) -> torch.Tensor:
    """Euler-integrate u_theta from a_0 ~ N(0, I), no guidance, clip to [-1, 1] (spec Sec. 5)."""
    a0 = torch.randn(obs.shape[0], actor.act_dim, device=obs.device)
    with torch.no_grad():
        return euler_sample(lambda a, t: actor(obs, a, t), a0, flow_steps).clamp(-1.0, 1.0)


def evaluate(actor: VelocityField, env, episodes: int, flow_steps: int, device: torch.device):
    """Mean episodic return and mean final-step success over `episodes` episodes."""
    returns, successes = [], []
    for _ in range(episodes):
        obs, _ = env.reset()
        done = False
        while not done:
            obs_t = torch.as_tensor(obs, dtype=torch.float32, device=device).view(1, -1)
            action = sample_actions(actor, obs_t, flow_steps)[0].cpu().numpy()
            obs, _, terminated, truncated, info = env.step(action)
            done = terminated or truncated
        returns.append(info["episode"]["r"])
        successes.append(success_from_info(info))
    return float(np.mean(returns)), float(np.mean(successes))


def save_checkpoint(path: str, modules: dict) -> None:
    """Write the state dicts atomically: a crash mid-write never leaves a truncated checkpoint."""
    tmp = path + ".tmp"
    torch.save({name: m.state_dict() if hasattr(m, "state_dict") else m for name, m in modules.items()}, tmp)
    os.replace(tmp, path)


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_args(args)

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    data = load_dataset(args.dataset, args.dataset_source, args.dataset_dir, args.env_id, args.dataset_download, device)
    env = data.make_env(args.seed)
    dataset_tag = os.path.splitext(os.path.basename(args.dataset))[0] if os.path.exists(args.dataset) else args.dataset
    run_name = f"{dataset_tag.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    obs_dim, act_dim = data.obs_dim, data.act_dim

    actor = VelocityField(obs_dim, act_dim, args.hidden_dim, args.num_layers).to(device)
    critic = TwinQ(obs_dim, act_dim, args.hidden_dim, args.num_layers).to(device)
    critic_target = TwinQ(obs_dim, act_dim, args.hidden_dim, args.num_layers).to(device)
    critic_target.load_state_dict(critic.state_dict())
    value = mlp(obs_dim, 1, args.hidden_dim, args.num_layers, layer_norm=True).to(device)
    schedule = LearnedSchedule().to(device) if args.schedule == "learned" else None
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.actor_lr)
    critic_optimizer = torch.optim.Adam(list(critic.parameters()) + list(value.parameters()), lr=args.critic_lr)
    schedule_optimizer = torch.optim.Adam(schedule.parameters(), lr=args.schedule_lr) if schedule else None
    q_min = lambda o, a: critic(o, a).min(0).values  # the actor's energy: min_j Q_phi_j (spec Sec. 4)

    writer = SummaryWriter(f"runs/{run_name}")
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    writer.add_text("dataset", f"{data.name}: {len(data)} transitions, metric {data.metric}")
    checkpoint_path = f"runs/{run_name}/{args.exp_name}.pt"
    checkpoint = dict(
        actor=actor,
        critic=critic,
        critic_target=critic_target,
        value=value,
        actor_optimizer=actor_optimizer,
        critic_optimizer=critic_optimizer,
        args=vars(args),
    )
    if schedule:
        checkpoint.update(schedule=schedule, schedule_optimizer=schedule_optimizer)
    start_time = time.time()
    global_step = 0
    progress = tqdm(range(1, args.total_steps + 1), desc=run_name, mininterval=5.0, disable=None)
    try:
        for global_step in progress:
            batch = data.sample(args.batch_size)
            obs, actions = batch["observations"], batch["actions"]

            # ---- actor target from the pre-update critic (spec Sec. 3.2): one grad_a Q per sample, no ODE roll-out ----
            a0 = torch.randn_like(actions)
            t = torch.rand(args.batch_size, 1, device=device)
            coefficient = energy_coefficient(args.schedule, t, schedule)
            target, a_t, grad_q, q_at = guided_target(
                q_min, obs, a0, actions, t, args.energy_scale, coefficient.detach(), args.normalize_energy
            )

            # ---- critic: IQL expectile value and twin Q regression (spec Sec. 4) ----
            with torch.no_grad():
                target_q = critic_target(obs, actions).min(0).values
                next_v = value(batch["next_observations"]).squeeze(-1)
                q_backup = batch["rewards"] + args.gamma * batch["masks"] * next_v  # masks: no bootstrap after termination
            v = value(obs).squeeze(-1)
            value_loss = expectile_loss(target_q - v, args.expectile)
            q_values = critic(obs, actions)
            q_loss = F.mse_loss(q_values, q_backup.expand_as(q_values))
            critic_optimizer.zero_grad(set_to_none=True)
            (value_loss + q_loss).backward()
            critic_optimizer.step()

            # ---- actor: regress u_theta(a_t, t, s) onto the stop-gradient guided target (spec Sec. 3.2) ----
            actor_loss = F.mse_loss(actor(obs, a_t, t), target.detach())
            actor_optimizer.zero_grad(set_to_none=True)
            actor_loss.backward()
            actor_optimizer.step()

            # ---- learned schedule h_theta(t): step size that maximizes Q at the target's one-step endpoint [ours] ----
            if schedule is not None and args.energy_scale > 0.0:
                scale = args.energy_scale / q_at.abs().mean().clamp_min(1e-6) if args.normalize_energy else args.energy_scale
                endpoint = a_t + (1.0 - t) * (target_velocity(a0, actions) + scale * coefficient * grad_q)
                schedule_loss = -q_min(obs, endpoint.clamp(-1.0, 1.0)).mean()
                schedule_optimizer.zero_grad(set_to_none=True)
                schedule_loss.backward(inputs=list(schedule.parameters()))
                schedule_optimizer.step()

            with torch.no_grad():
                for target_param, param in zip(critic_target.parameters(), critic.parameters()):
                    target_param.lerp_(param, args.tau)

            if global_step % args.log_every == 0:
                metrics = {
                    "losses/actor_loss": actor_loss,
                    "losses/q_loss": q_loss,
                    "losses/value_loss": value_loss,
                    "losses/q_values": q_values.mean(),
                    "losses/v_values": v.mean(),
                    "charts/guidance_norm": (target - target_velocity(a0, actions)).norm(dim=-1).mean(),
                    "charts/grad_q_norm": grad_q.norm(dim=-1).mean(),
                }
                if schedule is not None and args.energy_scale > 0.0:
                    metrics["losses/schedule_loss"] = schedule_loss
                    metrics["charts/h_at_half"] = schedule.coefficient(torch.full((1, 1), 0.5, device=device))[
                        0, 0
                    ]  # h(1/2) = c(1/2)
                values = torch.stack([m.detach().float() for m in metrics.values()]).tolist()  # one device-to-host copy
                for name, val in zip(metrics, values):
                    if not math.isfinite(val):
                        raise SystemExit(
                            f"error: {name} became {val} at step {global_step}; stopping (logs kept in runs/{run_name})"
                        )
                    writer.add_scalar(name, val, global_step)
                writer.add_scalar("charts/SPS", int(global_step / (time.time() - start_time)), global_step)

            if global_step % args.eval_every == 0 or global_step == args.total_steps:
                eval_return, eval_success = evaluate(actor, env, args.eval_episodes, args.flow_steps, device)
                writer.add_scalar("eval/episodic_return", eval_return, global_step)
                postfix = {"eval_return": f"{eval_return:.1f}"}
                if data.normalize_score is not None:
                    writer.add_scalar("eval/normalized_score", data.normalize_score(eval_return), global_step)
                    postfix["score"] = f"{data.normalize_score(eval_return):.1f}"
                if data.metric == "success":
                    writer.add_scalar("eval/success", eval_success, global_step)
                    postfix["success"] = f"{eval_success:.2f}"
                progress.set_postfix(postfix, refresh=False)
                if args.save_model:
                    save_checkpoint(checkpoint_path, dict(checkpoint, global_step=global_step))
    except KeyboardInterrupt:
        print(f"interrupted at step {global_step}; TensorBoard logs kept in runs/{run_name}")
        if args.save_model:
            save_checkpoint(checkpoint_path, dict(checkpoint, global_step=global_step))
    finally:
        progress.close()
        env.close()
        writer.close()
    if args.save_model:
        print(f"model saved to {checkpoint_path}")
