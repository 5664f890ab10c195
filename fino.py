"""FINO: Flow matching with Injected Noise for Offline-to-online RL (Shin et al., ICLR 2026, arXiv:2602.18117), on the
FQL skeleton (Park et al., Flow Q-Learning, arXiv:2502.02538); FQL itself is `--algo fql`.

Networks (FQL, Sec. 4): a BC flow v_theta(s, x, t), a one-step policy mu_omega(s, z) distilled from the flow's 10-step
Euler roll-out (FINO Eq. 5), a 2-member LayerNorm critic ensemble and its Polyak target. One update takes one Adam step
on L = L_Q + L_flow + alpha L_distill + L_q, all four from the same pre-update parameters (official FQL code). FINO:
  1. L_flow is noise-injected flow matching. Default (the official FINO code, which produced the paper's numbers): the
     network sees x_t + 0.1 exp(10 (t - 1)) xi, xi ~ N(0, I), and regresses onto x1 - x0. `--noise-schedule paper`: Eq. 7.
  2. Entropy-guided sampling: online, the action is one of K = min(10, ceil(A / 2)) one-step candidates drawn from
     softmax(beta Q / mean|Q|), evaluation takes the argmax; beta <- max(0, beta + 0.1 (H - H_target)), H_target = -A,
     with H the entropy bound of a 3-component Gaussian mixture fitted to the acting policy (official FINO code).
`--algo fql` is FQL as its paper ran it: eta 0, one stochastic one-step sample when acting and evaluating, no beta.
Ablations (FINO paper): `--eta 0` (no noise injection), `--beta-lr 0` (fixed temperature), `--no-entropy-guidance`.
Protocol: offline updates on the dataset, then one env step and one update per online step, in one replay buffer
pre-filled with the dataset. "[ours]" marks what neither the papers nor the official code do.
"""

import dataclasses
import math
import os
import random
import signal
import time
import tomllib
from functools import partial
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from sklearn.mixture import GaussianMixture
from tensordict.nn import CudaGraphModule
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from common import flow
from common.datasets import FILE_SUFFIXES, is_ogbench_name, load_dataset


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
    dataset: str = "antmaze-large-navigate-singletask-v0"
    """an OGBench single-task name (e.g. cube-double-play-singletask-v0), a Minari id or a D4RL-layout .npz/.hdf5 file"""
    dataset_source: Literal["auto", "minari", "ogbench", "file"] = "auto"
    """where --dataset comes from; auto: an existing path -> file, an OGBench name -> ogbench, else minari"""
    dataset_dir: str | None = None
    """where Minari (default MINARI_DATASETS_PATH or ~/.minari/datasets) or OGBench (~/.ogbench/data) datasets live"""
    dataset_download: bool = False
    """download a Minari or OGBench dataset that is not on disk"""
    env_id: str | None = None
    """the Gymnasium env of a dataset file, online and for evaluation (files only; Minari and OGBench bring their env)"""
    d4rl_name: str | None = None
    """the D4RL dataset whose reference scores normalize a file's returns (default: the file's base name, if a D4RL name)"""
    clip_actions: bool = False
    """clip dataset actions outside the env's bounds (e.g. a Gaussian policy's raw samples, which the simulator clips)
    instead of refusing them, with a note counting them"""
    load_model: str | None = None
    """start a NEW run from a fino.py checkpoint's networks, optimizer, beta and step, with this run's flags (e.g. the
    `{exp_name}_offline.pt` that --save-model writes at the end of the offline phase: the online phase alone)"""
    # Algorithm and protocol
    algo: Literal["fino", "fql"] = "fino"
    """`fino`: FINO as its official code runs it; `fql`: FQL as its paper runs it (eta 0, no guidance, FQL's protocol)"""
    offline_steps: int = 1_000_000
    """gradient steps on the offline data before any interaction"""
    online_steps: int | None = None
    """environment steps of online fine-tuning, one gradient step each (UTD 1); default 500k (fino) or 1M (fql)"""
    buffer_size: int | None = None
    """replay capacity, at least N + 1: the dataset first, then a FIFO of online data; default 1.5M (fino) or 2M (fql)"""
    batch_size: int = 256
    """the batch size of sample from the replay memory"""
    save_buffer: bool = False
    """with --save-model, also save the replay buffer's online rows (`buffer.pt`), so --resume continues exactly"""
    # The FQL skeleton
    preset: str = "auto"
    """per-task alpha / gamma / q_agg (fino_presets.toml): `auto` (the first key in --dataset or --d4rl-name), a key, `none`"""
    alpha: float | None = None
    """distillation coefficient alpha (weights L_distill); default: from --preset, else 10"""
    gamma: float | None = None
    """the discount factor gamma; default: from --preset, else 0.99"""
    q_agg: Literal["mean", "min"] | None = None
    """ensemble aggregation in the TD target and the candidate scores (L_q always averages); default: --preset, else mean"""
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
    """`code` (the official code): input noise noise_scale * exp(10 (t - 1)), target x1 - x0; `paper`: Eq. 7 with eta"""
    eta: float | None = None
    """eta of Eq. 7; 0 turns noise injection off under either schedule (flow matching); default 0.1 (fino) or 0 (fql)"""
    noise_scale: float = 0.1
    """scale of the code schedule's input noise (used when eta > 0)"""
    # FINO: entropy-guided sampling
    entropy_guidance: bool = True
    """act by softmax(beta Q) over K candidates, evaluate by their argmax; off (and --algo fql): one one-step sample"""
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
    """maximum EM iterations (scikit-learn's max_iter)"""
    gmm_tol: float = 1e-3
    """EM stops when the mean log-likelihood gains less than this (scikit-learn's tol)"""
    gmm_reg: float = 1e-6
    """added to every covariance diagonal (scikit-learn's reg_covar)"""
    # Evaluation and logging
    eval_every: int | None = None
    """evaluate every this many steps, and at the end of each phase; default 50k (fino) or 100k (fql)"""
    eval_episodes: int = 50
    """episodes per evaluation"""
    log_every: int = 5_000
    """write losses and SPS to TensorBoard every this many steps"""


# ---- Networks -------------------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """The actors' MLP (official FQL code): Dense -> GELU (tanh approximation) per hidden layer, Xavier-uniform kernels,
    zero biases; the inputs are concatenated."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, num_layers: int):
        super().__init__()
        layers, dim, self.out_dim = [], in_dim, out_dim
        for _ in range(num_layers):
            layers, dim = layers + [nn.Linear(dim, hidden_dim), nn.GELU(approximate="tanh")], hidden_dim
        self.net = nn.Sequential(*layers, nn.Linear(dim, out_dim))
        for layer in self.net[::2]:
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat(inputs, -1))


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


def make_critic(obs_dim: int, act_dim: int, args: Args) -> CriticEnsemble:
    """FQL's critic: GELU (tanh approximation), LayerNorm (eps 1e-6), Xavier-uniform kernels, zero biases."""
    return CriticEnsemble(obs_dim + act_dim, args.hidden_dim, args.num_layers, args.num_critics, nn.GELU("tanh"), True, True)


def make_nets(obs_dim: int, act_dim: int, args: Args) -> nn.ModuleDict:
    """The critic ensemble Q_phi, the BC flow v_theta(s, x, t) (raw t) and the one-step policy mu_omega(s, z)."""
    critic = make_critic(obs_dim, act_dim, args)
    flow_net = MLP(obs_dim + act_dim + 1, act_dim, args.hidden_dim, args.num_layers)
    return nn.ModuleDict(
        dict(critic=critic, flow=flow_net, onestep=MLP(obs_dim + act_dim, act_dim, args.hidden_dim, args.num_layers))
    )


# ---- ALGO LOGIC: losses and updates ---------------------------------------------------------------------------------
def noise_std(t: torch.Tensor, eta: float) -> torch.Tensor:
    """alpha_t of Eq. 7: alpha_t^2 = (eta^2 - 2 eta) t^2 + 2 eta t, which is >= 0 on [0, 1] (Prop. 1)."""
    return ((eta**2 - 2.0 * eta) * t**2 + 2.0 * eta * t).clamp_min(0.0).sqrt()


def noisy_flow_pair(x0, x1, t, noise, schedule: str, eta: float, noise_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and regression target of noise-injected flow matching; `noise` ~ N(0, I) like x0; eta = 0 is plain FM.
    code (official FINO code): input x_t + noise_scale exp(10 (t - 1)) noise, target x1 - x0.
    paper (Eq. 7): input x_t + alpha_t noise, target x1 - (1 - eta) x0. Given x1 the input is N(t x1, (1 - (1 - eta) t)^2 I),
      whose variance is never below FM's (Thm. 2); the target leaves the injected noise out, so the learned flow is not
      the sigma_min = eta path's: around a point datum it ends with std 0.21 at eta = 0.1 and 0.68 at eta = 0.5 (tested).
    """
    x_t = flow.interpolate(x0, x1, t)
    if eta == 0.0:
        return x_t, flow.target_velocity(x0, x1)
    if schedule == "paper":
        return x_t + noise_std(t, eta) * noise, x1 - (1.0 - eta) * x0
    return x_t + noise_scale * torch.exp(10.0 * (t - 1.0)) * noise, flow.target_velocity(x0, x1)


def draw_noise(batch_size: int, act_dim: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The update's random inputs, drawn outside it so that the update is a deterministic function of its batch [ours]:
    z' of the TD target's next action, x0 ~ N(0, I), t ~ U[0, 1) and xi ~ N(0, I) of L_flow, z of L_distill and L_q."""
    shape = (batch_size, act_dim)
    z_next, x0 = torch.randn(shape, device=device), torch.randn(shape, device=device)
    t = torch.rand(batch_size, 1, device=device)
    return dict(z_next=z_next, x0=x0, t=t, xi=torch.randn(shape, device=device), z=torch.randn(shape, device=device))


def aggregate(q: torch.Tensor, how: str) -> torch.Tensor:
    """Combine the ensemble axis (dim 0): mean or min (q_agg)."""
    return q.mean(0) if how == "mean" else q.min(0).values


def fql_losses(batch: dict, nets: nn.ModuleDict, target_critic: CriticEnsemble, args: Args) -> dict[str, torch.Tensor]:
    """L_Q, L_flow, L_distill and L_q from one parameter snapshot (official FQL code; L_flow: FINO's noise injection).
    Each loss reaches only its own network. `batch`: the transitions and draw_noise's draws."""
    obs, actions, critic, flow_net, onestep = batch["observations"], batch["actions"], *nets.values()
    # L_Q: y = r + gamma * mask * agg_k Qbar_k(s', clip(mu(s', z'))); the mask is 0 only at termination
    with torch.no_grad():
        next_actions = onestep(batch["next_observations"], batch["z_next"]).clamp(-1.0, 1.0)
        next_q = aggregate(target_critic(batch["next_observations"], next_actions), args.q_agg)
        target_q = batch["rewards"] + args.gamma * batch["masks"] * next_q
    q = critic(obs, actions)
    qf_loss = (q - target_q).pow(2).mean()
    # L_flow: noise-injected flow matching; eta = 0 is FQL's standard loss
    x_in, target = noisy_flow_pair(
        batch["x0"], actions, batch["t"], batch["xi"], args.noise_schedule, args.eta, args.noise_scale
    )
    flow_loss = (flow_net(obs, x_in, batch["t"]) - target).pow(2).mean()
    # L_distill (Eq. 5): the one-step policy regresses onto the clipped Euler roll-out of the (stop-gradient) flow
    with torch.no_grad():
        distill_target = flow.euler_sample(lambda x, t: flow_net(obs, x, t), batch["z"], args.flow_steps).clamp(-1.0, 1.0)
    policy_actions = onestep(obs, batch["z"])
    distill_loss = (policy_actions - distill_target).pow(2).mean()
    # L_q: -mean_k Q_k(s, clip(mu(s, z))) through the frozen critic (gradients reach the action only)
    frozen = {k: v.detach() for k, v in critic.named_parameters()}
    q_pi = torch.func.functional_call(critic, frozen, (obs, policy_actions.clamp(-1.0, 1.0))).mean(0)
    actor_q_loss = -q_pi.mean() / (q_pi.abs().mean().detach() if args.normalize_q_loss else 1.0)
    total_loss = qf_loss + flow_loss + args.alpha * distill_loss + actor_q_loss
    losses = dict(qf_loss=qf_loss, qf_values=q.mean(), flow_loss=flow_loss, distill_loss=distill_loss)
    return losses | dict(actor_q_loss=actor_q_loss, total_loss=total_loss)


def update(batch: dict, agent: dict, args: Args) -> dict[str, torch.Tensor]:
    """One update: the summed loss from one parameter snapshot, one Adam step, and the Polyak update from the pre-step
    critic, phi_bar <- tau phi + (1 - tau) phi_bar (official FQL code). Returns detached metrics."""
    losses = fql_losses(batch, agent["nets"], agent["target_critic"], args)
    agent["optimizer"].zero_grad(set_to_none=True)
    losses["total_loss"].backward()
    with torch.no_grad():
        for target_param, param in zip(agent["target_critic"].parameters(), agent["nets"]["critic"].parameters()):
            target_param.lerp_(param, args.tau)
    agent["optimizer"].step()
    return {f"losses/{name}": value.detach() for name, value in losses.items()}


@torch.no_grad()
def validation_metrics(validation, nets: nn.ModuleDict, target_critic: CriticEnsemble, args: Args, seed: int) -> dict:
    """The losses on a batch of the held-out split (OGBench's validation file), no update, as `val/<name>`; {} without
    one. Draws from a forked RNG seeded with `seed`: the training streams are untouched [ours]."""
    if validation is None:
        return {}
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        torch.manual_seed(seed)
        batch = validation.sample(args.batch_size) | draw_noise(args.batch_size, validation.act_dim, validation.actions.device)
        return {f"val/{name}": value for name, value in fql_losses(batch, nets, target_critic, args).items()}


# Entropy of the acting policy: a full-covariance Gaussian mixture per state, fitted by scikit-learn (official code)
def fit_gmm(x: torch.Tensor, num_components: int = 3, max_iter: int = 100, tol: float = 1e-3, reg: float = 1e-6):
    """One scikit-learn GaussianMixture per state of x (S, N, d), the official code's settings; its k-means starts draw
    from a generator seeded by torch's stream [ours: the official code's draw from numpy's global one, which OGBench's
    evaluation resets also use]. Returns weights (S, C), means (S, C, d), covariances (S, C, d, d), float64 tensors."""
    rng = np.random.RandomState(int(torch.randint(2**31 - 1, ())))
    gmm = partial(GaussianMixture, num_components, covariance_type="full", tol=tol, reg_covar=reg, max_iter=max_iter)
    fits = [gmm(random_state=rng).fit(samples) for samples in x.double().cpu().numpy()]
    return tuple(torch.from_numpy(np.stack([getattr(f, k) for f in fits])) for k in ("weights_", "means_", "covariances_"))


def gmm_entropy_bound(weights: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """H(s) <= -sum_j w_j log(w_j + 1e-8) + sum_j w_j [d/2 (1 + log 2 pi) + 1/2 log det Sigma_j], per state (the official
    code's upper bound on the mixture entropy)."""
    component_entropy = 0.5 * cov.shape[-1] * (1.0 + math.log(2.0 * math.pi)) + 0.5 * torch.logdet(cov)
    return -(weights * (weights + 1e-8).log()).sum(-1) + (weights * component_entropy).sum(-1)


def policy_entropy(obs: torch.Tensor, agent: dict, num_candidates: int, args: Args) -> torch.Tensor:
    """Mean over states of the mixture entropy bound of the acting policy (entropy_samples draws per state, in chunks
    of 25 as in the official code: each draw's softmax normaliser spans all states of the chunk)."""
    nets, draws = agent["nets"], []
    for start in range(0, args.entropy_samples, 25):
        n = min(25, args.entropy_samples - start)
        draws.append(
            act(obs.expand(n, *obs.shape), agent["beta"], nets["onestep"], nets["critic"], num_candidates, args.q_agg, False)
        )
    weights, _, cov = fit_gmm(
        torch.cat(draws).transpose(0, 1), args.gmm_components, args.gmm_iters, args.gmm_tol, args.gmm_reg
    )
    return gmm_entropy_bound(weights, cov).mean().float()


def update_beta(beta: torch.Tensor, entropy: torch.Tensor, target_entropy: float, lr: float) -> torch.Tensor:
    """beta <- max(0, beta + lr (H - H_target)): entropy above the target makes the softmax greedier (the official FINO
    code's sign, and the paper's prose: high entropy favours exploitation)."""
    return (beta + lr * (entropy - target_entropy)).clamp_min(0.0)


# ---- Acting and evaluation ------------------------------------------------------------------------------------------
def candidate_logits(q: torch.Tensor, beta: float | torch.Tensor) -> torch.Tensor:
    """beta Q / mean|Q| for q (..., states, K), normalised over all states and candidates of one call (the official code:
    per state when acting on one state, across the batch in the entropy estimate)."""
    return beta * q / q.abs().flatten(-2).mean(-1)[..., None, None].clamp_min(1e-8)


def select_candidates(q: torch.Tensor, beta: float | torch.Tensor, greedy: bool) -> torch.Tensor:
    """The chosen candidate per row of q (..., states, K): argmax (evaluation) or a draw from softmax(candidate_logits)
    (online) by the Gumbel-max trick [ours]: no host sync, so it runs in a CUDA graph."""
    return q.argmax(-1) if greedy else (candidate_logits(q, beta) - torch.empty_like(q).exponential_().log()).argmax(-1)


@torch.no_grad()
def act(obs, beta, onestep: MLP, critic: CriticEnsemble, num_candidates: int, q_agg: str, greedy: bool) -> torch.Tensor:
    """Actions in [-1, 1] for states obs (..., B, obs_dim); leading dimensions are independent calls. One candidate (FQL):
    clip(mu(s, z)), acting and evaluating (official FQL code). K candidates (FINO): clip(mu(s, z_i)), scored by the
    online critics with q_agg; argmax or softmax."""
    if num_candidates == 1:
        return onestep(obs, torch.randn(*obs.shape[:-1], onestep.out_dim, device=obs.device)).clamp(-1.0, 1.0)
    obs_rep = obs.unsqueeze(-2).expand(*obs.shape[:-1], num_candidates, obs.shape[-1])
    candidates = onestep(obs_rep, torch.randn(*obs_rep.shape[:-1], onestep.out_dim, device=obs.device)).clamp(-1.0, 1.0)
    q = aggregate(critic(obs_rep.reshape(-1, obs.shape[-1]), candidates.reshape(-1, onestep.out_dim)), q_agg)
    choice = select_candidates(q.view(candidates.shape[:-1]), beta, greedy)
    return torch.gather(candidates, -2, choice[..., None, None].expand(*choice.shape, 1, onestep.out_dim)).squeeze(-2)


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


# ---- Dataset, replay buffer and env ---------------------------------------------------------------------------------
class ReplayBuffer:
    """Transitions on the training device, pre-filled with the dataset; online data from position N on, then FIFO over
    the oldest rows (official FQL code); batches are uniform over everything held."""

    KEYS = ("observations", "actions", "rewards", "next_observations", "masks")

    def __init__(self, data, capacity: int, device: torch.device):
        self.capacity, self.num_data, self.added = max(capacity, len(data) + 1), len(data), 0
        self.storage = {}
        for key in self.KEYS:
            source = getattr(data, key).to(device)
            self.storage[key] = torch.zeros(self.capacity, *source.shape[1:], dtype=torch.float32, device=device)
            self.storage[key][: self.num_data] = source
        self.size, self.pos = self.num_data, self.num_data % self.capacity

    def add(self, obs, action, reward, next_obs, mask) -> None:
        for key, value in zip(self.KEYS, (obs, action, reward, next_obs, mask)):
            self.storage[key][self.pos] = torch.as_tensor(value, dtype=torch.float32)
        self.pos, self.size, self.added = (self.pos + 1) % self.capacity, min(self.size + 1, self.capacity), self.added + 1

    def online_rows(self) -> torch.Tensor:
        """The positions of the online transitions still held, oldest first."""
        return (self.num_data + torch.arange(max(0, self.added - self.capacity), self.added)) % self.capacity

    def state_dict(self) -> dict:
        """The online rows (host copies) and the count of adds; --resume reloads the dataset's rows from the dataset."""
        rows = self.online_rows().to(self.storage["masks"].device)
        return dict(added=self.added, rows={key: value[rows].cpu() for key, value in self.storage.items()})

    def load_state_dict(self, state: dict) -> None:
        self.added = state["added"]
        rows = self.online_rows()
        if len(rows) != len(state["rows"]["masks"]):
            raise ValueError(f"{len(state['rows']['masks'])} online rows for {self.added} adds")
        for key, value in self.storage.items():
            value[rows.to(value.device)] = state["rows"][key].to(value.device)
        self.pos, self.size = (self.num_data + self.added) % self.capacity, min(self.num_data + self.added, self.capacity)

    def sample(self, batch_size: int) -> dict[str, torch.Tensor]:
        """A uniform batch, drawn and gathered on the device (no host sync)."""
        idx = torch.randint(0, self.size, (batch_size,), device=self.storage["masks"].device)
        return {key: value[idx] for key, value in self.storage.items()}


def dataset_tag(name: str) -> str:
    """The run-name tag of a dataset: a file's base name without extension, else the name with '/' -> '-'."""
    is_file = os.path.exists(name) or name.endswith(FILE_SUFFIXES)
    return os.path.splitext(os.path.basename(name))[0] if is_file else name.replace("/", "-")


def online_reward_shift(dataset: str, env_id: str | None) -> float:
    """-1 for D4RL antmaze, whose dataset rewards the loader shifts to r - 1 (IQL/FQL; the official FQL code shifts the
    online rewards too); 0 for OGBench, shifted already. The loader's rule: the file's env id, else the name, has 'antmaze'."""
    return -1.0 if not is_ogbench_name(dataset) and "antmaze" in (env_id or dataset).lower() else 0.0


def training_env(data, seed: int, reward_shift: float) -> gym.Env:
    """The online env: the dataset's (its episode statistics record the raw return), rewards shifted by `reward_shift`."""
    env = data.make_env(seed)
    return gym.wrappers.TransformReward(env, lambda r: r + reward_shift) if reward_shift else env


def candidate_count(args: Args, act_dim: int) -> int:
    """K: --num-candidates, else min(10, ceil(A / 2)) (the official code's cap on the paper's A / 2); 1 without guidance."""
    k = (args.num_candidates or min(10, math.ceil(act_dim / 2))) if args.entropy_guidance else 1
    message = f"entropy guidance needs at least 2 candidates (K = {k} for A = {act_dim}); pass --num-candidates 2 or more"
    require([(k != 1 or not args.entropy_guidance, message + ", or --no-entropy-guidance")])
    return k


# ---- TRY NOT TO MODIFY: infrastructure (flag checks, speed path, checkpoints and resume, stop requests, NaN stop) ----
def resolve_args(args: Args) -> Args:
    """Fill every None flag: explicit flags win over --algo's protocol (eta, online steps, buffer, eval interval: the
    official FINO code; the FQL paper's runs) and the per-task preset, the preset over FQL's defaults (10, 0.99, mean)."""
    protocol = dict(fino=(0.1, 500_000, 1_500_000, 50_000), fql=(0.0, 1_000_000, 2_000_000, 100_000))
    fill = lambda value, default: default if value is None else value
    defaults = dict(zip(("eta", "online_steps", "buffer_size", "eval_every"), protocol[args.algo]))
    args = dataclasses.replace(args, **{key: fill(getattr(args, key), value) for key, value in defaults.items()})
    args = dataclasses.replace(args, entropy_guidance=args.entropy_guidance and args.algo == "fino")
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "fino_presets.toml"), "rb") as file:
        presets = tomllib.load(file)
    names = ["fino"] if args.algo == "fino" else ["fql_offline"] if args.online_steps == 0 else ["fql_o2o", "fql_offline"]
    tables = [presets[name] for name in names]
    name = f"{args.dataset} {args.d4rl_name or ''}".lower().replace("/", "-").replace("_", "-")
    found = [v for table in tables for k, v in table.items() if (k in name if args.preset == "auto" else k == args.preset)]
    keys = ", ".join(dict.fromkeys(k for table in tables for k in table))
    known = args.preset in ("auto", "none") or found
    require([(known, f"unknown --preset '{args.preset}' for --algo {args.algo}; use auto, none or one of: {keys}")])
    preset = found[0] if found and args.preset != "none" else (10.0, 0.99, "mean")
    alpha, gamma, q_agg = (fill(flag, value) for flag, value in zip((args.alpha, args.gamma, args.q_agg), preset))
    return dataclasses.replace(args, alpha=alpha, gamma=gamma, q_agg=q_agg)


def check_args(a: Args) -> None:
    """Range checks on the resolved flags before any data is loaded: the first failure ends the run with one line."""
    groups = {  # flags: (test of each value, rule)
        "offline_steps online_steps": (lambda v: v >= 0, "be non-negative"),
        "buffer_size batch_size hidden_dim num_layers num_critics flow_steps": (lambda v: v >= 1, "be positive"),
        "eval_every eval_episodes log_every beta_update_every": (lambda v: v >= 1, "be positive"),
        "entropy_states entropy_samples gmm_components gmm_iters": (lambda v: v >= 1, "be positive"),
        "beta beta_lr": (lambda v: 0 <= v < math.inf, "be non-negative numbers"),
    }
    for flags, (ok, rule) in groups.items():
        names = ["--" + k.replace("_", "-") for k in flags.split()]
        values = [getattr(a, k) for k in flags.split()]
        require([(all(map(ok, values)), f"{', '.join(names[:-1])} and {names[-1]} must {rule}, got {values}")])
    k, positive = a.num_candidates, lambda v: 0 < v < math.inf
    require([
        (a.offline_steps + a.online_steps >= 1, "nothing to do: --offline-steps + --online-steps is 0"),
        (positive(a.learning_rate), f"--learning-rate must be positive, got {a.learning_rate}"),
        (0.0 < a.tau <= 1.0, f"--tau must lie in (0, 1], got {a.tau}"),
        (0.0 < a.gamma <= 1.0, f"--gamma must lie in (0, 1], got {a.gamma}"),
        (0 <= a.alpha < math.inf, f"--alpha must be a non-negative number, got {a.alpha}"),
        (0.0 <= a.eta <= 1.0, f"--eta must lie in [0, 1] (Prop. 1), got {a.eta}"),
        (0 <= a.noise_scale < math.inf, f"--noise-scale must be non-negative, got {a.noise_scale}"),
        (k is None or k >= 1, f"--num-candidates must be at least 1, got {k}"),
        (a.entropy_guidance or k in (None, 1), "--num-candidates applies to entropy guidance only (not --algo fql)"),
        (not a.entropy_guidance or k != 1, "entropy guidance needs at least 2 candidates; pass --num-candidates 2 or more"),
        (a.target_entropy is None or math.isfinite(a.target_entropy), "--target-entropy must be a finite number"),
        (a.entropy_samples >= a.gmm_components, "--entropy-samples must be at least --gmm-components"),
        (positive(a.gmm_tol), f"--gmm-tol must be positive, got {a.gmm_tol}"),
        (positive(a.gmm_reg), f"--gmm-reg must be positive, got {a.gmm_reg}"),
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
    args = resolve_args(tyro.cli(Args))
    check_args(args)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    args, resumed = resume_args(args, device, "fino.py", resolve_args) if args.resume else (args, None)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    run_name = args.run_name or f"{dataset_tag(args.dataset)}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = args.resume or f"runs/{run_name}"
    checkpoint_path, buffer_path = f"{run_dir}/{args.exp_name}.pt", f"{run_dir}/buffer.pt"
    saved_path = checkpoint_path if resumed else args.load_model  # --resume continues this run, --load-model starts one
    saved = resumed or (args.load_model and load_checkpoint(args.load_model, "fino.py", device))
    online_checkpoint = resumed is not None and resumed["global_step"] > args.offline_steps
    if online_checkpoint:
        require([(os.path.isfile(buffer_path), f"no replay buffer '{buffer_path}'; run with --save-model --save-buffer")])

    # data setup: transitions on the training device, actions in [-1, 1], the replay buffer and the envs
    source, directory, download = args.dataset_source, args.dataset_dir, args.dataset_download
    data = load_dataset(args.dataset, source, directory, args.env_id, download, device, args.d4rl_name, args.clip_actions)
    num_candidates = candidate_count(args, data.act_dim)
    target_entropy = -float(data.act_dim) if args.target_entropy is None else args.target_entropy

    # ALGO LOGIC: networks, one Adam, beta; the update and acting functions (compiled / CUDA-graphed on request)
    nets = make_nets(data.obs_dim, data.act_dim, args).to(device)
    target_critic = make_critic(data.obs_dim, data.act_dim, args).to(device)
    target_critic.load_state_dict(nets["critic"].state_dict())
    optimizer = torch.optim.Adam(nets.parameters(), lr=args.learning_rate, capturable=args.cudagraphs)
    agent = dict(nets=nets, target_critic=target_critic, optimizer=optimizer, beta=torch.tensor(args.beta, device=device))
    start_step = restore(saved, agent, saved_path) if saved else 0
    train_step = speed_up(partial(update, agent=agent, args=args), args)
    acting_args = dict(onestep=nets["onestep"], critic=nets["critic"], num_candidates=num_candidates, q_agg=args.q_agg)
    acting = {greedy: speed_up(partial(act, **acting_args, greedy=greedy), args) for greedy in (False, True)}
    to_obs = lambda o: torch.as_tensor(o, dtype=torch.float32, device=device).view(1, -1)
    policy = lambda o, greedy: acting[greedy](to_obs(o), agent["beta"])[0].cpu().numpy()  # greedy: evaluation
    total_steps, buffer = args.offline_steps + args.online_steps, ReplayBuffer(data, args.buffer_size, device)
    if online_checkpoint:  # the online part of the replay buffer, of the checkpoint's step
        try:
            buffer.load_state_dict(load_checkpoint(buffer_path, "fino.py", torch.device("cpu"), start_step)["buffer"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise SystemExit(
                f"error: '{buffer_path}' does not fit this run's replay buffer ({type(e).__name__}: {e})"
            ) from None
    env = training_env(data, args.seed, online_reward_shift(args.dataset, args.env_id))
    eval_env = data.make_env(args.seed + 10_000)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2):
        signal.signal(signum, request_stop)  # before the run folder appears: a stop request sent once it exists is caught
    writer = SummaryWriter(run_dir, purge_step=start_step + 1 if resumed else None)  # a resume drops later events
    if not resumed:
        hyperparameters = vars(args) | dict(num_candidates=num_candidates)
        writer.add_text(
            "hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in hyperparameters.items())
        )
    env_generators = lambda: [env.unwrapped.np_random, env.action_space.np_random]  # reset noise; OGBench's reset steps
    obs, _ = env.reset(seed=args.seed)
    if resumed:  # every random stream as the checkpoint left it (set last: building the networks drew from torch's)
        rng_states(env_generators(), resumed["rng"])
        obs = env.reset()[0] if online_checkpoint else obs  # online checkpoints fall between episodes
    first_bad, sps_start, checkpoint_due, global_step = {}, None, False, start_step
    steps_left = range(start_step + 1, total_steps + 1)  # the bar counts from start_step to total_steps
    progress = tqdm(steps_left, run_name, initial=start_step, total=total_steps, mininterval=5, disable=None)
    try:
        for global_step in progress:
            online, episode_done = global_step > args.offline_steps, False
            # ALGO LOGIC: online, one env step with the acting policy (FINO: softmax over K), stored in the buffer
            if online:
                action = policy(obs, greedy=False)
                next_obs, reward, terminated, truncated, info = env.step(action)
                buffer.add(obs, action, reward, next_obs, 1.0 - float(terminated))  # truncation bootstraps
                episode_done = terminated or truncated
                if episode_done:
                    writer.add_scalar("charts/episodic_return", info["episode"]["r"], global_step)
                    writer.add_scalar("charts/episodic_length", info["episode"]["l"], global_step)
            # ALGO LOGIC: one update on a uniform batch of the buffer
            batch = buffer.sample(args.batch_size) | draw_noise(args.batch_size, data.act_dim, device)
            metrics = train_step(batch)
            check_finite(first_bad, run_dir, metrics, global_step)
            if global_step in (start_step + 4, args.offline_steps + 4):  # SPS after a 3-update burn-in (LeanRL), per phase
                sps_start, sps_step = time.time(), global_step
            sps_start = None if global_step == args.offline_steps + 1 else sps_start  # online SPS counts env steps [ours]

            # TRY NOT TO MODIFY: logging, evaluation (every --eval-every and at the end of each phase), checkpoints
            if global_step % args.log_every == 0:
                check_finite(first_bad, run_dir)
                metrics |= {"charts/beta": agent["beta"]} if args.algo == "fino" else {}
                metrics |= validation_metrics(data.validation, nets, target_critic, args, args.seed + global_step)
                for name, value in zip(metrics, torch.stack([v.float() for v in metrics.values()]).tolist()):
                    writer.add_scalar(name, value, global_step)  # one device-to-host copy above
                if sps_start is not None and global_step > sps_step:
                    writer.add_scalar("charts/SPS", (global_step - sps_step) / (time.time() - sps_start), global_step)
                if device.type == "cuda":
                    writer.add_scalar("charts/gpu_memory_mb", torch.cuda.max_memory_allocated() / 2**20, global_step)
            # ALGO LOGIC: every --beta-update-every online steps, the acting policy's entropy (GMM), then beta
            if online and args.algo == "fino" and (global_step - args.offline_steps) % args.beta_update_every == 0:
                entropy = policy_entropy(batch["observations"][: args.entropy_states], agent, num_candidates, args)
                if args.entropy_guidance:
                    agent["beta"].copy_(update_beta(agent["beta"], entropy, target_entropy, args.beta_lr))
                writer.add_scalar("charts/entropy", entropy.item(), global_step)
                writer.add_scalar("charts/beta", agent["beta"].item(), global_step)
            if global_step % args.eval_every == 0 or global_step in (args.offline_steps, total_steps):
                evaluation_policy = lambda o: policy(o, args.entropy_guidance)  # FINO: argmax of K; FQL: one sample
                result = evaluate(evaluation_policy, eval_env, args.eval_episodes, args.seed + 10_000 + global_step)
                if data.normalize_score is not None:
                    result["eval/normalized_score"] = float(data.normalize_score(result["eval/episodic_return"]))
                for name, value in result.items():
                    writer.add_scalar(name, value, global_step)
                checkpoint_due = args.save_model
            # checkpoints after an evaluation or a stop request: offline at once, online at the next episode end
            between_episodes = episode_done or not online
            if args.save_model and ((checkpoint_due or STOP) and between_episodes or global_step == total_steps):
                check_finite(first_bad, run_dir)
                state = dict(
                    agent, script="fino.py", global_step=global_step, args=vars(args), rng=rng_states(env_generators())
                )
                online_rows = [(buffer_path, dict(script="fino.py", global_step=global_step, buffer=buffer))] * (
                    args.save_buffer and online
                )
                offline_copy = [(checkpoint_path.replace(".pt", "_offline.pt"), state)] * (global_step == args.offline_steps)
                save_checkpoint(*online_rows, (checkpoint_path, state), *offline_copy)
                checkpoint_due = False
            if STOP and (between_episodes or not args.save_model):
                break
            obs = env.reset()[0] if episode_done else next_obs if online else obs
        check_finite(first_bad, run_dir)
    except KeyboardInterrupt:  # a second Ctrl-C
        print(f"interrupted at step {global_step}, no checkpoint written; TensorBoard logs kept in {run_dir}")
        raise SystemExit(128 + signal.SIGINT) from None
    finally:
        progress.close(), env.close(), eval_env.close(), writer.close()
    if STOP and global_step < total_steps:
        saved = f"checkpoint of step {global_step} in {checkpoint_path}" if args.save_model else "no checkpoint (--save-model)"
        print(f"interrupted at step {global_step} by {signal.Signals(STOP[0]).name}; {saved}; logs in {run_dir}")
        raise SystemExit(128 + STOP[0])
