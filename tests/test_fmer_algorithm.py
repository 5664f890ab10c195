"""fmer.py's update functions on small deterministic set-ups: each test pins a part of the algorithm that a wrong
implementation (a flipped sign, a dropped factor, the wrong network or states) would change."""

import functools

import numpy as np
import pytest
import torch

import fmer
from common.flow import hutchinson_divergence
from fmer import (
    VelocityField,
    candidate_weights,
    entropy_estimate,
    make_critic,
    sample_candidates,
    store_transition,
    update,
    update_actor,
    update_adv_temperature,
    update_critic,
)

OBS_DIM, ACT_DIM, BATCH, N, K = 3, 2, 16, 4, 3


def nets(seed: int = 0):
    torch.manual_seed(seed)
    return VelocityField(OBS_DIM, ACT_DIM, 8, 2), make_critic(OBS_DIM, ACT_DIM, 8, 2)


def flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def actor_step_delta(alpha: float, lr: float = 1e-3):
    """The parameter change of one plain-SGD update_actor step at the given alpha, from fixed networks, candidates
    and random draws; also the candidates, for re-evaluating the entropy estimate with the same draws."""
    actor, critic = nets()
    torch.manual_seed(1)
    obs = torch.randn(BATCH, OBS_DIM)
    obs_rep, z1, path, velocities = sample_candidates(actor, obs, N, K, return_path=True)
    before = flat(actor)
    torch.manual_seed(2)
    log_alpha = torch.tensor(float(np.log(alpha)))
    optimizer = torch.optim.SGD(actor.parameters(), lr=lr)
    agent = dict(actor=actor, critic=critic, log_alpha=log_alpha, log_beta=torch.zeros(()), actor_optimizer=optimizer)
    update_actor(obs, obs_rep, z1, path, velocities, agent, fmer.Args(adv_temperature=0.5), True)
    return flat(actor) - before, (obs, obs_rep, z1, path, velocities)


def test_actor_step_ascends_the_entropy_estimate_with_weight_alpha():
    """Eq. 6 with Eq. 15: the actor's step is -lr (grad L_WCFM + alpha grad L_H), L_H = -E[div + tanh correction].
    So the difference of the steps at alpha = 2 and alpha = 1 is exactly lr times the gradient of the entropy
    estimate: it ascends the entropy (a flipped sign of L_H descends it) and is not zero (dropping `alpha *` makes
    the two steps equal). The estimate is re-evaluated with the random draws update_actor makes, in its order."""
    lr = 1e-3
    delta_1, (obs, obs_rep, z1, path, velocities) = actor_step_delta(1.0, lr)
    delta_2, _ = actor_step_delta(2.0, lr)
    actor, _ = nets()
    torch.manual_seed(2)
    torch.randn_like(z1), torch.rand(z1.shape[0], 1)  # the weighted-CFM draws (z_0, t) come first in update_actor
    estimate = entropy_estimate(actor, obs, path, velocities, hutchinson_divergence).mean()
    grad = torch.cat([g.flatten() for g in torch.autograd.grad(estimate, list(actor.parameters()))])
    assert grad.norm() > 1e-3
    assert torch.allclose(delta_2 - delta_1, lr * grad, atol=1e-7, rtol=1e-3)


def test_critic_target_comes_from_the_target_networks():
    """Eq. 20 uses Q_target: with a target ensemble that outputs the constant c everywhere (zero kernels, output bias
    c), gamma = 1, r = 0 and d = 0, the TD target is c; the online critic (which differs) must not enter it."""
    actor, critic = nets()
    critic_target = make_critic(OBS_DIM, ACT_DIM, 8, 2)
    with torch.no_grad():
        for w, b in zip(critic_target.weights, critic_target.biases):
            w.zero_(), b.zero_()
        critic_target.biases[-1].fill_(5.0)
    torch.manual_seed(1)
    obs, actions, next_obs = torch.randn(BATCH, OBS_DIM), torch.rand(BATCH, ACT_DIM) * 2 - 1, torch.randn(BATCH, OBS_DIM)
    next_obs_rep, next_z1 = sample_candidates(actor, next_obs, N, K)
    q_before = critic(obs, actions).detach()
    optimizer = torch.optim.SGD(critic.parameters(), lr=0.0)
    agent = dict(critic=critic, critic_target=critic_target, critic_optimizer=optimizer)
    zeros = torch.zeros(BATCH)
    metrics = update_critic(obs, actions, zeros, zeros, next_obs_rep, next_z1, agent, fmer.Args(gamma=1.0, reward_scale=1.0))
    expected = torch.nn.functional.mse_loss(q_before, torch.full_like(q_before, 5.0)).item()
    assert metrics["losses/qf_loss"].item() == pytest.approx(expected, rel=1e-6)
    assert metrics["losses/qf_values"].item() == pytest.approx(q_before.mean().item(), rel=1e-6)


def test_actor_candidates_come_from_the_batch_states(monkeypatch):
    """The weighted CFM loss regresses onto candidates drawn at the batch's states s (Eq. 9; "states from D"), not at
    s': train_step's single ODE solve serves both, and update_actor must get the s half of it (states, latents,
    Euler states and velocities of one roll-out of the flow at s)."""
    seen = {}
    real_update_actor = fmer.update_actor

    def spy(obs, obs_rep, z1, path, velocities, *rest):
        seen.update(obs=obs, obs_rep=obs_rep, z1=z1, path=path, velocities=velocities)
        return real_update_actor(obs, obs_rep, z1, path, velocities, *rest)

    monkeypatch.setattr(fmer, "update_actor", spy)
    actor, critic = nets()
    critic_target = make_critic(OBS_DIM, ACT_DIM, 8, 2)
    log_alpha, log_beta = torch.zeros((), requires_grad=True), torch.zeros(())
    args = fmer.Args(num_candidates=N, flow_steps=K)
    torch.manual_seed(1)
    obs, next_obs = torch.randn(BATCH, OBS_DIM), 10 + torch.randn(BATCH, OBS_DIM)
    agent = dict(actor=actor, critic=critic, critic_target=critic_target, log_alpha=log_alpha, log_beta=log_beta)
    agent.update(actor_optimizer=torch.optim.SGD(actor.parameters(), lr=0.0), beta_optimizer=None)
    agent.update(
        critic_optimizer=torch.optim.SGD(critic.parameters(), lr=0.0), alpha_optimizer=torch.optim.SGD([log_alpha], lr=0.0)
    )
    step = functools.partial(update, agent=agent, args=args, entropy_on=True)  # target entropy -dim(A) = -2
    step(obs, torch.zeros(BATCH, ACT_DIM), torch.zeros(BATCH), torch.zeros(BATCH), next_obs)
    obs_rep, path, velocities = seen["obs_rep"], seen["path"], seen["velocities"]
    assert torch.equal(seen["obs"], obs) and torch.equal(obs_rep, obs.repeat_interleave(N, 0))
    with torch.no_grad():  # the Euler roll-out (Eq. 8) of the flow at s: velocities, states and latents agree
        for k in range(K):
            t = torch.full((len(obs_rep), 1), k / K)
            assert torch.allclose(velocities[k], actor(obs_rep, path[k], t), atol=1e-6)
            end = path[k + 1] if k + 1 < K else seen["z1"]
            assert torch.allclose(end, path[k] + velocities[k] / K, atol=1e-6)


def test_replay_stores_termination_not_truncation():
    """Eq. 20's d is the termination flag: a time-limit truncation is stored as d = 0 (the target bootstraps)."""
    replay = torch.zeros(4, 2 * OBS_DIM + ACT_DIM + 2)
    obs, next_obs, action = np.ones(OBS_DIM), 2 * np.ones(OBS_DIM), np.full(ACT_DIM, 0.5)
    store_transition(replay, 1, obs, next_obs, action, 1.5, terminated=False, truncated=True)
    store_transition(replay, 2, obs, next_obs, action, -1.0, terminated=True, truncated=False)
    store_transition(replay, 7, obs, next_obs, action, 0.0, terminated=True, truncated=True)  # wraps to row 2
    assert replay[0].tolist() == [1.0] * OBS_DIM + [2.0] * OBS_DIM + [0.5] * ACT_DIM + [1.5, 0.0]
    assert replay[1, -2:].tolist() == [-1.0, 1.0]
    assert replay[2, -2:].tolist() == [0.0, 1.0]


@pytest.mark.parametrize("ess_fraction, direction", [(0.2, 1.0), (0.8, -1.0)])
def test_adv_temperature_dual_step_direction(ess_fraction, direction):
    """--adv-temperature-mode ess: weights too peaked (ESS below the 0.5 target) raise beta; too flat lower it."""
    log_beta = torch.tensor(np.log(0.5), dtype=torch.float32, requires_grad=True)
    optimizer = torch.optim.SGD([log_beta], lr=0.1)
    metrics = update_adv_temperature(torch.tensor(ess_fraction), dict(log_beta=log_beta, beta_optimizer=optimizer), 0.5)
    assert metrics["charts/adv_temperature"].item() == pytest.approx(0.5)  # the temperature the weights used
    assert log_beta.item() - np.log(0.5) == pytest.approx(direction * 0.1 * abs(ess_fraction - 0.5), rel=1e-5)


def test_adv_temperature_reaches_the_target_ess():
    """Repeated dual steps on fixed candidate values bring the mean ESS fraction 1 / (N sum w^2) to the target."""
    torch.manual_seed(0)
    q = 3 * torch.randn(64, 8)
    log_beta = torch.tensor(np.log(0.5), dtype=torch.float32, requires_grad=True)
    optimizer = torch.optim.Adam([log_beta], lr=0.05)
    ess = lambda: (1.0 / candidate_weights(q, log_beta.detach().exp(), "softmax").pow(2).sum(1)).mean() / 8
    assert ess() < 0.3
    for _ in range(500):
        update_adv_temperature(ess(), dict(log_beta=log_beta, beta_optimizer=optimizer), 0.6)
    assert ess().item() == pytest.approx(0.6, abs=0.01)


@pytest.mark.parametrize("entropy, direction", [(-1.0, -1.0), (-3.0, 1.0)])
def test_alpha_dual_step_direction(entropy, direction):
    """Sec. 4.3: alpha grows while the entropy is below the target (-2 here) and shrinks above it; one SGD step on
    log alpha moves it by -lr * alpha * (H - H_target)."""
    log_alpha = torch.tensor(np.log(0.5), dtype=torch.float32, requires_grad=True)
    optimizer = torch.optim.SGD([log_alpha], lr=0.1)
    metrics = fmer.update_alpha(torch.tensor(entropy), dict(log_alpha=log_alpha, alpha_optimizer=optimizer), -2.0)
    assert metrics["losses/alpha_loss"].item() == pytest.approx(0.5 * (entropy + 2.0))
    assert log_alpha.item() - np.log(0.5) == pytest.approx(direction * 0.1 * 0.5 * abs(entropy + 2.0), rel=1e-5)


def test_update_polyak_averages_the_target_towards_the_online_critic():
    """After an update, Q_target = (1 - tau) Q_target_before + tau Q_online_after (a step of size tau towards the online
    critic, not 1 - tau)."""
    torch.manual_seed(0)
    args = fmer.Args(
        hidden_dim=8, num_layers=2, num_candidates=N, flow_steps=K, tau=0.25, batch_size=BATCH, learning_starts=BATCH
    )
    agent = fmer.make_agent(args, OBS_DIM, ACT_DIM, torch.device("cpu"))
    with torch.no_grad():
        for p in agent["critic_target"].parameters():
            p.add_(torch.randn_like(p))
    before = [p.detach().clone() for p in agent["critic_target"].parameters()]
    obs, next_obs = torch.randn(BATCH, OBS_DIM), torch.randn(BATCH, OBS_DIM)
    update(obs, torch.rand(BATCH, ACT_DIM) * 2 - 1, torch.randn(BATCH), torch.zeros(BATCH), next_obs, agent, args, True)
    for old, new, online in zip(before, agent["critic_target"].parameters(), agent["critic"].parameters()):
        assert torch.allclose(new, 0.75 * old + 0.25 * online, atol=1e-6)
