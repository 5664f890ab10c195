"""FINO: Flow matching with Injected Noise for Offline-to-online RL (Shin et al., ICLR 2026, arXiv:2602.18117),
on the FQL skeleton (Park et al., arXiv:2502.02538); FQL itself is `--algo fql`.

Networks (FQL): a BC flow velocity field v_theta(s, x, t), a one-step policy mu_omega(s, z) distilled from the
10-step Euler roll-out of the flow, and a 2-member critic ensemble with LayerNorm plus its Polyak target.
One update, all four losses from the same pre-update parameters, one Adam step on their sum (FQL Sec. 4):
    L = L_Q + L_flow + alpha * L_distill + L_q
FINO changes two things:
  1. L_flow is noise-injected flow matching. Default (the official code, which produced the paper's numbers): the
     network sees x_t + 0.1 exp(10 (t - 1)) xi, xi ~ N(0, I), and regresses onto x1 - x0. `--noise-schedule paper`:
     Eq. 7, x_t + eps_t, eps_t ~ N(0, alpha_t^2 I), alpha_t^2 = (eta^2 - 2 eta) t^2 + 2 eta t, target x1 - (1 - eta) x0.
     eta = 0 is standard flow matching under either.
  2. Online, the action is one of K candidates of the one-step policy, drawn from softmax(beta Q / mean|Q|);
     evaluation takes the argmax. beta follows the entropy of the acting policy, estimated by a 3-component
     full-covariance Gaussian mixture fitted by EM: beta <- max(0, beta + 0.1 (H - H_target)), H_target = -A.
`--algo fql` is FQL as its paper ran it: eta 0, one stochastic one-step sample when acting and evaluating, no beta
estimate, FQL's offline-to-online protocol and per-task flags. Ablations of the FINO paper: w/o noise injection
`--eta 0`; fixed temperature `--beta-lr 0`; noise injection only `--no-entropy-guidance`.
Protocol: offline steps on the dataset, then one env step and one update per online step, in one replay buffer
pre-filled with the dataset. Spec: specs/fino.md (section numbers "§" below refer to it); "[ours]" marks choices
the paper and the official code leave open.
"""

import dataclasses
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

from common.datasets import is_ogbench_name, load_dataset
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
    """save networks, optimizer, beta and step to `runs/{run_name}/{exp_name}_offline.pt` after the offline phase and `{exp_name}.pt` at every evaluation and at the end"""
    load_model: str | None = None
    """a checkpoint written by --save-model: restore it and continue from its step (an `_offline.pt` file starts the online phase)"""

    # Data and environment
    dataset: str = "antmaze-large-navigate-singletask-v0"
    """dataset name: OGBench (e.g. `cube-double-play-singletask-v0`) or Minari/D4RL (e.g. `D4RL/antmaze/large-play-v1`)"""
    source: Literal["auto", "ogbench", "minari", "file"] = "auto"
    """where the dataset comes from (`auto` guesses from the name; `file`: a D4RL-layout .npz/.hdf5 with --env-id)"""
    dataset_dir: str | None = None
    """folder holding the dataset files (default: the library's own cache)"""
    env_id: str | None = None
    """environment id for online steps and evaluation of a dataset file (Minari and OGBench bring their own)"""
    dataset_download: bool = False
    """allow downloading a missing Minari or OGBench dataset"""

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

    # FQL skeleton (§1)
    preset: str = "auto"
    """per-task alpha / gamma / q_agg from PRESETS: `auto` (first key contained in --dataset), a key, or `none`"""
    alpha: float | None = None
    """distillation coefficient alpha (weights L_distill); default: from --preset, else 10"""
    gamma: float | None = None
    """the discount factor gamma; default: from --preset, else 0.99"""
    q_agg: Literal["mean", "min"] | None = None
    """ensemble aggregation in the TD target and the candidate scores; default: from --preset, else mean"""
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

    # FINO: noise-injected flow matching (§3.2)
    noise_schedule: Literal["code", "paper"] = "code"
    """`code` (the official code, which produced the paper's numbers): input noise noise_scale * exp(10 (t - 1)), target x1 - x0; `paper`: Eq. 7 with eta"""
    eta: float | None = None
    """eta of Eq. 7 (paper schedule); 0 turns noise injection off under either schedule (standard flow matching); default 0.1 (fino) or 0 (fql)"""
    noise_scale: float = 0.1
    """scale of the code schedule's input noise (used when eta > 0)"""

    # FINO: entropy-guided sampling (§3.4, §3.5)
    entropy_guidance: bool = True
    """act with softmax(beta Q) over K candidates and evaluate with their argmax; off: one one-step sample for both (FQL)"""
    num_candidates: int | None = None
    """K candidates per state; default min(10, ceil(A / 2))"""
    beta: float = 10.0
    """initial inverse temperature beta of the candidate softmax"""
    beta_lr: float = 0.1
    """step size of the beta update (0 keeps beta fixed: the fixed-temperature ablation)"""
    target_entropy: float | None = None
    """target entropy H-bar in nats; default -A"""
    beta_update_every: int = 50_000
    """estimate the entropy (and update beta) every this many online steps"""
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
    name = args.dataset.lower().replace("/", "-").replace("_", "-")
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


def check_args(args: Args, num_candidates: int) -> None:
    """One-line errors for flag combinations that cannot run."""
    problems = [
        (
            args.entropy_guidance and num_candidates < 2,
            f"entropy guidance needs at least 2 candidates (K = {num_candidates}); pass --num-candidates 2 or more, or --no-entropy-guidance",
        ),
        (
            not args.entropy_guidance and args.num_candidates not in (None, 1),
            "--num-candidates applies to entropy guidance only; without it FQL acts with one sample",
        ),
        (not 0.0 <= args.eta <= 1.0, f"--eta must lie in [0, 1] (Prop. 1), got {args.eta}"),
        (min(args.offline_steps, args.online_steps) < 0, "--offline-steps and --online-steps must be non-negative"),
        (args.offline_steps + args.online_steps < 1, "nothing to do: --offline-steps + --online-steps is 0"),
        (
            min(args.batch_size, args.hidden_dim, args.num_layers, args.num_critics, args.flow_steps) < 1,
            "--batch-size, --hidden-dim, --num-layers, --num-critics and --flow-steps must be positive",
        ),
        (
            min(args.eval_every, args.eval_episodes, args.log_every, args.beta_update_every) < 1,
            "--eval-every, --eval-episodes, --log-every and --beta-update-every must be positive",
        ),
        (args.entropy_samples < args.gmm_components, "--entropy-samples must be at least --gmm-components"),
        (args.beta < 0 or args.beta_lr < 0, "--beta and --beta-lr must be non-negative"),
    ]
    for failed, message in problems:
        if failed:
            raise SystemExit(f"error: {message}")


# ---------------------------------------------------------------------------------------------------------------------
# Networks (§1.1): Dense -> GELU (tanh approximation) -> [LayerNorm], Xavier-uniform kernels, zero biases
# ---------------------------------------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, num_layers: int, layer_norm: bool = False):
        super().__init__()
        layers, dim = [], in_dim
        for _ in range(num_layers):
            layers += [nn.Linear(dim, hidden_dim), nn.GELU(approximate="tanh")]
            if layer_norm:
                layers.append(nn.LayerNorm(hidden_dim, eps=1e-6))
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
    """Q_phi_k(s, a), k = 1..num_critics, independently initialised, as one stacked MLP: one batched matmul per
    layer (baddbmm) instead of a Python loop over members; per-member LayerNorm (eps 1e-6, learnable affine)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, num_layers: int, num_critics: int):
        super().__init__()
        dims = [obs_dim + act_dim] + [hidden_dim] * num_layers + [1]
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        self.ln_scales, self.ln_biases = nn.ParameterList(), nn.ParameterList()
        for i, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:])):
            bound = math.sqrt(6.0 / (fan_in + fan_out))  # Xavier uniform, per member
            self.weights.append(nn.Parameter(torch.empty(num_critics, fan_in, fan_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.zeros(num_critics, 1, fan_out)))
            if i < num_layers:
                self.ln_scales.append(nn.Parameter(torch.ones(num_critics, 1, fan_out)))
                self.ln_biases.append(nn.Parameter(torch.zeros(num_critics, 1, fan_out)))

    def forward(self, obs: torch.Tensor, action: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        """Q-values of shape (num_critics, batch); `frozen` stops gradients into phi (the actor's L_q)."""
        p = [list(ps) for ps in (self.weights, self.biases, self.ln_scales, self.ln_biases)]
        if frozen:
            p = [[x.detach() for x in ps] for ps in p]
        weights, biases, scales, shifts = p
        x = torch.cat([obs, action], -1).unsqueeze(0).expand(len(weights[0]), -1, -1)
        for i, (w, b) in enumerate(zip(weights, biases)):
            x = torch.baddbmm(b, x, w)
            if i < len(scales):
                x = F.layer_norm(F.gelu(x, approximate="tanh"), x.shape[-1:], eps=1e-6) * scales[i] + shifts[i]
        return x.squeeze(-1)


def aggregate(q: torch.Tensor, how: str) -> torch.Tensor:
    """Combine the ensemble axis (dim 0): mean or min (q_agg)."""
    return q.mean(0) if how == "mean" else q.min(0).values


# ---------------------------------------------------------------------------------------------------------------------
# Losses (§1.2, §3.2)
# ---------------------------------------------------------------------------------------------------------------------
def noise_std(t: torch.Tensor, eta: float) -> torch.Tensor:
    """alpha_t of Eq. 7: alpha_t^2 = (eta^2 - 2 eta) t^2 + 2 eta t, which is >= 0 on [0, 1] (Prop. 1)."""
    return ((eta**2 - 2.0 * eta) * t**2 + 2.0 * eta * t).clamp_min(0.0).sqrt()


def noisy_flow_pair(
    x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, schedule: str, eta: float, noise_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Network input and regression target of noise-injected flow matching; `noise` ~ N(0, I) like x0.

    paper (Eq. 7): input x_t + alpha_t noise, target x1 - (1 - eta) x0. Given x1 the input is N(t x1, (1 - (1 - eta) t)^2 I):
      the optimal-transport path with sigma_min = eta (Lipman et al.), whose variance is never below FM's (Thm. 2).
    code (official repository): input x_t + noise_scale exp(10 (t - 1)) noise, target x1 - x0.
    eta = 0 is standard flow matching under both (§3.8: the two forms then agree).
    """
    x_t = interpolate(x0, x1, t)
    if eta == 0.0:
        return x_t, target_velocity(x0, x1)
    if schedule == "paper":
        return x_t + noise_std(t, eta) * noise, x1 - (1.0 - eta) * x0
    return x_t + noise_scale * torch.exp(10.0 * (t - 1.0)) * noise, target_velocity(x0, x1)


def fql_losses(
    batch: dict, nets: dict, target_critic: CriticEnsemble, args: Args, alpha: float, gamma: float, q_agg: str
) -> dict:
    """L_Q, L_flow, L_distill and L_q from one parameter snapshot (§1.2, §3.7). Each loss reaches only its own network."""
    obs, actions = batch["observations"], batch["actions"]
    critic, flow, onestep = nets["critic"], nets["flow"], nets["onestep"]
    # L_Q: y = r + gamma * mask * agg_k Qbar_k(s', clip(mu(s', z'))); the mask is 0 only at termination
    with torch.no_grad():
        next_actions = onestep(batch["next_observations"], torch.randn_like(actions)).clamp(-1.0, 1.0)
        next_q = aggregate(target_critic(batch["next_observations"], next_actions), q_agg)
        target_q = batch["rewards"] + gamma * batch["masks"] * next_q
    q = critic(obs, actions)
    critic_loss = (q - target_q).pow(2).mean()

    # L_flow: noise-injected flow matching (Eq. 7); eta = 0 is FQL's standard loss
    x0 = torch.randn_like(actions)
    t = torch.rand(actions.shape[0], 1, device=actions.device)
    flow_input, flow_target = noisy_flow_pair(
        x0, actions, t, torch.randn_like(actions), args.noise_schedule, args.eta, args.noise_scale
    )
    flow_loss = (flow(obs, flow_input, t) - flow_target).pow(2).mean()

    # L_distill: the one-step policy regresses onto the clipped Euler roll-out of the (stop-gradient) flow
    z = torch.randn_like(actions)
    with torch.no_grad():
        distill_target = euler_sample(lambda x, tt: flow(obs, x, tt), z, args.flow_steps).clamp(-1.0, 1.0)
    policy_actions = onestep(obs, z)
    distill_loss = (policy_actions - distill_target).pow(2).mean()

    # L_q: -mean_k Q_k(s, clip(mu(s, z))) with the critic frozen; the actor always averages the ensemble
    q_pi = critic(obs, policy_actions.clamp(-1.0, 1.0), frozen=True).mean(0)
    q_loss = -q_pi.mean()
    if args.normalize_q_loss:
        q_loss = q_loss / q_pi.abs().mean().detach()

    total = critic_loss + flow_loss + alpha * distill_loss + q_loss
    return dict(
        total_loss=total,
        critic_loss=critic_loss,
        flow_loss=flow_loss,
        distill_loss=distill_loss,
        q_loss=q_loss,
        q_values=q.mean(),
    )


# ---------------------------------------------------------------------------------------------------------------------
# Acting (§3.4)
# ---------------------------------------------------------------------------------------------------------------------
def select_candidates(q: torch.Tensor, beta: float | torch.Tensor, greedy: bool) -> torch.Tensor:
    """Index of the chosen candidate per row of q (..., K): argmax (evaluation) or a draw from
    softmax(beta * Q / mean|Q|), the normaliser taken over all candidates and states of the call (§3.4)."""
    if greedy:
        return q.argmax(-1)
    scale = q.abs().flatten(-2).mean(-1)[..., None, None].clamp_min(1e-8)  # q is (..., states, K)
    logits = beta * q / scale
    return torch.distributions.Categorical(logits=logits).sample()


@torch.no_grad()
def act(
    obs: torch.Tensor,
    onestep: MLP,
    critic: CriticEnsemble,
    act_dim: int,
    num_candidates: int,
    guided: bool,
    beta,
    q_agg: str,
    greedy: bool,
) -> torch.Tensor:
    """Actions in [-1, 1] for states obs (..., B, obs_dim); leading dimensions are independent calls.

    FQL (not guided): one sample clip(mu(s, z)), when acting and when evaluating (§1.3).
    FINO: K candidates clip(mu(s, z_i)), scored by the online critics (q_agg); argmax or softmax (§3.4)."""
    if not guided:
        return onestep(obs, torch.randn(*obs.shape[:-1], act_dim, device=obs.device)).clamp(-1.0, 1.0)
    obs_rep = obs.unsqueeze(-2).expand(*obs.shape[:-1], num_candidates, obs.shape[-1])
    candidates = onestep(obs_rep, torch.randn(*obs_rep.shape[:-1], act_dim, device=obs.device)).clamp(-1.0, 1.0)
    q = aggregate(critic(obs_rep.reshape(-1, obs.shape[-1]), candidates.reshape(-1, act_dim)), q_agg)
    choice = select_candidates(q.view(candidates.shape[:-1]), beta, greedy)
    return torch.gather(candidates, -2, choice[..., None, None].expand(*choice.shape, 1, act_dim)).squeeze(-2)


# ---------------------------------------------------------------------------------------------------------------------
# Entropy of the acting policy: batched EM for a full-covariance Gaussian mixture (§3.5)
# ---------------------------------------------------------------------------------------------------------------------
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
    """H(s) <= -sum_j w_j log(w_j + 1e-8) + sum_j w_j [d/2 (1 + log 2 pi) + 1/2 log det Sigma_j] (§3.5), per state."""
    d = cov.shape[-1]
    component_entropy = 0.5 * d * (1.0 + math.log(2.0 * math.pi)) + 0.5 * torch.logdet(cov)
    return -(weights * (weights + 1e-8).log()).sum(-1) + (weights * component_entropy).sum(-1)


@torch.no_grad()
def policy_entropy(obs: torch.Tensor, onestep, critic, act_dim, num_candidates, guided, beta, q_agg, args) -> torch.Tensor:
    """Mean over states of the mixture entropy bound of the acting policy's actions (200 draws per state, §3.5).
    Draws go in chunks of 25 as in the official code; each draw's softmax normaliser spans all states of the draw."""
    draws = []
    for start in range(0, args.entropy_samples, 25):
        n = min(25, args.entropy_samples - start)
        draws.append(
            act(obs.expand(n, *obs.shape), onestep, critic, act_dim, num_candidates, guided, beta, q_agg, greedy=False)
        )
    samples = torch.cat(draws).transpose(0, 1)  # (S, samples, A)
    weights, _, cov = fit_gmm(samples, args.gmm_components, args.gmm_iters, args.gmm_tol, args.gmm_reg)
    return gmm_entropy_bound(weights, cov).mean().float()


def update_beta(beta: float, entropy: float, target_entropy: float, lr: float) -> float:
    """beta <- max(0, beta + lr (H - H_target)): entropy above the target makes the softmax greedier (code's sign, §3.5)."""
    return max(0.0, beta + lr * (entropy - target_entropy))


# ---------------------------------------------------------------------------------------------------------------------
# Replay buffer and evaluation
# ---------------------------------------------------------------------------------------------------------------------
class ReplayBuffer:
    """Transitions on the training device, pre-filled with the dataset; online data from position N on, then FIFO
    over the oldest rows (§2.1); batches are uniform over everything held."""

    KEYS = ("observations", "actions", "rewards", "next_observations", "masks")

    def __init__(self, data, capacity: int, device: torch.device):
        n = len(data)
        self.capacity = max(capacity, n + 1)
        self.storage = {}
        for key in self.KEYS:
            source = getattr(data, key).to(device)
            self.storage[key] = torch.zeros(self.capacity, *source.shape[1:], dtype=torch.float32, device=device)
            self.storage[key][:n] = source
        self.size, self.pos = n, n % self.capacity

    def add(self, obs, action, reward, next_obs, mask) -> None:
        for key, value in zip(self.KEYS, (obs, action, reward, next_obs, mask)):
            self.storage[key][self.pos] = torch.as_tensor(value, dtype=torch.float32)
        self.pos = (self.pos + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int) -> dict:
        idx = torch.randint(0, self.size, (batch_size,), device=self.storage["masks"].device)
        return {key: value[idx] for key, value in self.storage.items()}


def evaluate(env, policy, episodes: int, normalize_score) -> dict:
    """Mean return, success (final step's info['success']) and normalised score over `episodes` episodes."""
    returns, successes = [], []
    for _ in range(episodes):
        obs, _ = env.reset()
        done = False
        while not done:
            obs, _, terminated, truncated, info = env.step(policy(obs))
            done = terminated or truncated
        returns.append(float(info["episode"]["r"]))
        successes.append(float(info.get("success", 0.0)))
    mean_return = float(np.mean(returns))
    result = {"eval/episodic_return": mean_return, "eval/success": float(np.mean(successes))}
    if normalize_score is not None:
        result["eval/normalized_score"] = float(normalize_score(mean_return))
    return result


def save_checkpoint(path: str, state: dict) -> None:
    """Write atomically: a crash mid-write never leaves a truncated checkpoint."""
    tmp = path + ".tmp"
    torch.save({k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in state.items()}, tmp)
    os.replace(tmp, path)


if __name__ == "__main__":
    args = resolve_args(tyro.cli(Args))
    alpha, gamma, q_agg = args.alpha, args.gamma, args.q_agg
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    data = load_dataset(
        args.dataset,
        source=args.source,
        dataset_dir=args.dataset_dir,
        env_id=args.env_id,
        download=args.dataset_download,
        device=str(device),
    )
    obs_dim, act_dim = data.observations.shape[1], data.actions.shape[1]
    num_candidates = args.num_candidates or (min(10, math.ceil(act_dim / 2)) if args.entropy_guidance else 1)
    check_args(args, num_candidates)
    target_entropy = -float(act_dim) if args.target_entropy is None else args.target_entropy
    guided = args.entropy_guidance
    # D4RL antmaze rewards are r - 1 in the dataset (common/datasets.py), so online too; OGBench needs no shift (§2.2)
    reward_shift = -1.0 if "antmaze" in f"{args.dataset} {args.env_id}".lower() and not is_ogbench_name(args.dataset) else 0.0
    run_name = f"{data.name.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"

    nets = nn.ModuleDict(
        dict(
            critic=CriticEnsemble(obs_dim, act_dim, args.hidden_dim, args.num_layers, args.num_critics),
            flow=MLP(obs_dim + act_dim + 1, act_dim, args.hidden_dim, args.num_layers),  # v_theta(s, x, t): raw t
            onestep=MLP(obs_dim + act_dim, act_dim, args.hidden_dim, args.num_layers),  # mu_omega(s, z)
        )
    ).to(device)
    target_critic = CriticEnsemble(obs_dim, act_dim, args.hidden_dim, args.num_layers, args.num_critics).to(device)
    target_critic.load_state_dict(nets["critic"].state_dict())
    optimizer = torch.optim.Adam(nets.parameters(), lr=args.learning_rate)  # one Adam over all losses (§1.3)
    beta, start_step = args.beta, 1
    if args.load_model is not None:
        if not os.path.isfile(args.load_model):
            raise SystemExit(f"error: --load-model: no such file '{args.load_model}'")
        saved = torch.load(args.load_model, map_location=device, weights_only=False)
        try:
            nets.load_state_dict(saved["nets"])
            target_critic.load_state_dict(saved["target_critic"])
        except RuntimeError as e:
            raise SystemExit(
                f"error: --load-model does not fit these networks (same --hidden-dim/--num-layers?): {str(e).splitlines()[0]}"
            ) from None
        optimizer.load_state_dict(saved["optimizer"])
        beta, start_step = saved["beta"], saved["global_step"] + 1

    total_steps = args.offline_steps + args.online_steps
    buffer = ReplayBuffer(data, args.buffer_size, device)
    env = data.make_env(args.seed)
    eval_env = data.make_env(args.seed + 10_000)

    def policy(obs, greedy):
        obs_t = torch.as_tensor(obs, dtype=torch.float32, device=device).view(1, obs_dim)
        a = act(obs_t, nets["onestep"], nets["critic"], act_dim, num_candidates, guided, beta, q_agg, greedy)
        return a[0].cpu().numpy()

    writer = SummaryWriter(f"runs/{run_name}")
    writer.add_text(
        "hyperparameters",
        "|param|value|\n|-|-|\n"
        + "\n".join(
            f"|{k}|{v}|"
            for k, v in {
                **vars(args),
                "resolved alpha/gamma/q_agg": (alpha, gamma, q_agg),
                "num_candidates": num_candidates,
            }.items()
        ),
    )
    checkpoint_path = f"runs/{run_name}/{args.exp_name}.pt"

    def training_state() -> dict:
        """Everything `--load-model` restores (not the online part of the replay buffer)."""
        return dict(
            nets=nets, target_critic=target_critic, optimizer=optimizer, beta=beta, global_step=global_step, args=vars(args)
        )

    obs, _ = env.reset(seed=args.seed)
    start_time, global_step = time.time(), start_step - 1
    progress = tqdm(range(start_step, total_steps + 1), desc=run_name, mininterval=5.0, disable=None)
    try:
        for global_step in progress:
            online = global_step > args.offline_steps
            # ---- online: one env step with the acting policy (softmax over K for FINO), stored in the buffer ----
            if online:
                action = policy(obs, greedy=False)
                next_obs, reward, terminated, truncated, info = env.step(action)
                buffer.add(
                    obs, action, reward + reward_shift, next_obs, 1.0 - float(terminated)
                )  # truncation bootstraps (§2.1)
                obs = next_obs
                if terminated or truncated:
                    writer.add_scalar("charts/episodic_return", info["episode"]["r"], global_step)
                    writer.add_scalar("charts/episodic_length", info["episode"]["l"], global_step)
                    obs, _ = env.reset()

            # ---- one update: the summed loss from one parameter snapshot; Polyak from the pre-step critic ----
            batch = buffer.sample(args.batch_size)
            losses = fql_losses(batch, nets, target_critic, args, alpha, gamma, q_agg)
            optimizer.zero_grad(set_to_none=True)
            losses["total_loss"].backward()
            with torch.no_grad():  # before optimizer.step(): phi_bar <- tau phi_old + (1 - tau) phi_bar (§1.3)
                for target_param, param in zip(target_critic.parameters(), nets["critic"].parameters()):
                    target_param.lerp_(param, args.tau)
            optimizer.step()

            if global_step % args.log_every == 0:
                values = torch.stack(list(losses.values())).tolist()  # one device-to-host copy per log step
                for name, value in zip(losses, values):
                    if not math.isfinite(value):
                        raise SystemExit(
                            f"error: losses/{name} became {value} at step {global_step}; stopping (logs kept in runs/{run_name})"
                        )
                    writer.add_scalar(f"losses/{name}", value, global_step)
                writer.add_scalar("charts/beta", beta, global_step)
                writer.add_scalar("charts/SPS", int((global_step - start_step + 1) / (time.time() - start_time)), global_step)

            # ---- every beta_update_every online steps: GMM entropy of the acting policy, then beta (§3.5) ----
            online_step = global_step - args.offline_steps
            if online and online_step % args.beta_update_every == 0 and args.algo == "fino":
                states = batch["observations"][: args.entropy_states]  # the latest training batch's states
                entropy = policy_entropy(
                    states, nets["onestep"], nets["critic"], act_dim, num_candidates, guided, beta, q_agg, args
                ).item()
                writer.add_scalar("charts/entropy", entropy, global_step)
                if guided:
                    beta = update_beta(beta, entropy, target_entropy, args.beta_lr)
                    writer.add_scalar("charts/beta", beta, global_step)

            end_of_offline = global_step == args.offline_steps
            if global_step % args.eval_every == 0 or end_of_offline or global_step == total_steps:
                result = evaluate(eval_env, lambda o: policy(o, greedy=guided), args.eval_episodes, data.normalize_score)
                for name, value in result.items():
                    if name == "eval/episodic_return" or name == f"eval/{data.metric}":
                        writer.add_scalar(name, value, global_step)
                progress.set_postfix(
                    {data.metric: f"{result.get(f'eval/{data.metric}', result['eval/episodic_return']):.3f}"}, refresh=False
                )
                if args.save_model:
                    save_checkpoint(checkpoint_path, training_state())
                    if end_of_offline:
                        save_checkpoint(checkpoint_path.replace(".pt", "_offline.pt"), training_state())
    except KeyboardInterrupt:
        print(f"interrupted at step {global_step}; TensorBoard logs kept in runs/{run_name}")
        if args.save_model:
            save_checkpoint(checkpoint_path, training_state())
    finally:
        progress.close()
        env.close()
        eval_env.close()
        writer.close()
    if args.save_model:
        print(f"model saved to {checkpoint_path}")
