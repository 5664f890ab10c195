"""flowq.py: the energy-guided target and actor loss, what lambda does on a Gaussian behaviour (closed form, exact
and trained flows), the learned schedule, the critic's wiring, per-domain defaults, validation, --compile, bad input,
and end-to-end runs on fixture datasets."""

import os
import runpy
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from types import SimpleNamespace

import pytest
import torch

import common.datasets
from common.datasets import TRANSITION_KEYS, OfflineData
from common.flow import interpolate, target_velocity
from flowq import (
    Args,
    LearnedSchedule,
    VelocityField,
    act,
    actor_loss,
    critic_loss,
    energy_coefficient,
    expectile_loss,
    guided_target,
    load_checkpoint,
    make_agent,
    sample_actions,
    speed_up,
    update,
    update_actor,
    update_critic,
    update_schedule,
    with_domain_defaults,
)
from tests.conftest import ROOT, assert_one_line_error, run_dirs, run_script, scalars
from tests.fixtures import write_minari_dataset, write_ogbench_dataset

SCHEDULES = ["t", "t2", "t2_over_1mt", "learned"]


def quadratic_q(obs, a):
    """A known Q(s, a) = -|a - s|^2 with grad_a Q = 2 (s - a) (the action box clamp aside)."""
    return -(a - obs).pow(2).sum(-1)


@pytest.mark.parametrize("expectile", [0.5, 0.7, 0.9])
def test_expectile_loss_is_minimised_at_the_upper_expectile(expectile):
    """The value loss L(target_q - v) is minimised by the tau-expectile of the targets: tau itself for targets
    split evenly between 0 and 1 (IQL's V sits above the mean when tau > 0.5)."""
    targets = torch.tensor([0.0, 1.0]).repeat(50)
    grid = torch.linspace(0.0, 1.0, 1001)
    losses = torch.stack([expectile_loss(targets - v, expectile) for v in grid])
    assert grid[losses.argmin()].item() == pytest.approx(expectile, abs=2e-3)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_zero_energy_scale_gives_the_conditional_flow_matching_target(schedule):
    torch.manual_seed(0)
    obs, a0, a1, t = torch.randn(64, 3), torch.randn(64, 3), torch.rand(64, 3) * 2 - 1, torch.rand(64, 1)
    coefficient = energy_coefficient(schedule, t, LearnedSchedule())
    target, a_t, _, _ = guided_target(quadratic_q, obs, a0, a1, t, 0.0, coefficient, normalize_energy=False)
    assert torch.equal(target, target_velocity(a0, a1)) and torch.equal(target, a1 - a0)
    assert torch.equal(a_t, interpolate(a0, a1, t))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_guided_target_adds_lambda_c_t_grad_q(schedule):
    torch.manual_seed(0)
    obs, a0, a1, t = torch.rand(64, 2) - 0.5, torch.randn(64, 2), torch.rand(64, 2) * 2 - 1, torch.rand(64, 1)
    coefficient = energy_coefficient(schedule, t, LearnedSchedule())
    # c(t) = h(t) (1 - t) / t (docs/flowq-reconstruction.md Sec. 3): 1 - t, t (1 - t), t; a fresh h_theta equals t
    h = {"t": t, "t2": t**2, "t2_over_1mt": t**2 / (1 - t), "learned": t}[schedule]
    torch.testing.assert_close(coefficient, h * (1 - t) / t, rtol=1e-4, atol=1e-5)
    target, a_t, grad_q, scale = guided_target(quadratic_q, obs, a0, a1, t, 0.3, coefficient, normalize_energy=False)
    expected_grad = 2.0 * (obs - a_t.clamp(-1, 1))
    torch.testing.assert_close(grad_q, expected_grad)
    torch.testing.assert_close(target, (a1 - a0) + 0.3 * coefficient * expected_grad)
    assert scale.item() == pytest.approx(0.3)
    # normalized energy (DAC): lambda / mean |Q(s, a_1)| at the DATA actions, not at the query points a_t
    target_n, _, _, scale_n = guided_target(quadratic_q, obs, a0, a1, t, 0.3, coefficient, normalize_energy=True)
    expected_scale = 0.3 / quadratic_q(obs, a1).abs().mean()
    torch.testing.assert_close(scale_n, expected_scale)
    torch.testing.assert_close(target_n, (a1 - a0) + expected_scale * coefficient * expected_grad)


def train_toy_policy(energy_scale: float, steps: int = 1500, seed: int = 0) -> float:
    """1-D bimodal behaviour data (modes -0.5 and +0.5, equal mass) and the known Q(s, a) = a.

    Trains u_theta on the guided target and returns the fraction of Euler samples in the high-Q (right) mode.
    """
    torch.manual_seed(seed)
    actor = VelocityField(1, 1, 64, 2)
    optimizer = torch.optim.Adam(actor.parameters(), lr=2e-3)
    obs = torch.zeros(512, 1)
    linear_q = lambda o, a: a.sum(-1)
    for _ in range(steps):
        modes = torch.where(torch.rand(512, 1) < 0.5, -0.5, 0.5)
        a1 = modes + 0.1 * torch.randn(512, 1)
        a0, t = torch.randn(512, 1), torch.rand(512, 1)
        target, a_t, _, _ = guided_target(
            linear_q, obs, a0, a1, t, energy_scale, energy_coefficient("t", t), normalize_energy=False
        )
        loss = (actor(obs, a_t, t) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    samples = sample_actions(actor, torch.zeros(4000, 1), flow_steps=20)
    return (samples > 0).float().mean().item()


def test_toy_policy_moves_mass_to_the_high_q_mode_more_as_lambda_grows():
    behaviour, mild, strong = (train_toy_policy(lam) for lam in (0.0, 0.5, 1.5))
    assert abs(behaviour - 0.5) < 0.06  # lambda = 0 reproduces the data's 50/50 split
    assert mild > behaviour + 0.1
    assert strong > mild + 0.1


TINY = ("--hidden-dim", "32", "--num-layers", "2", "--batch-size", "64", "--log-every", "50", "--no-cuda")


def run_flowq(tmp_path, *flags, **kwargs):
    """Run flowq.py in tmp_path (its runs/ go there) with tiny networks and budgets."""
    return run_script(tmp_path, "flowq.py", *TINY, *flags, **kwargs)


def only_run(tmp_path):
    """The single run directory under tmp_path/runs and its scalars."""
    (run_dir,) = run_dirs(tmp_path)
    return run_dir, scalars(run_dir)


def test_flowq_end_to_end_on_a_minari_dataset(tmp_path, monkeypatch):
    root = str(tmp_path / "minari")
    monkeypatch.setenv("MINARI_DATASETS_PATH", root)
    write_minari_dataset(
        root, "test/hopper/random-v0", "Hopper-v5", num_episodes=5, max_steps=40, ref_min_score=0.0, ref_max_score=100.0
    )
    result = run_flowq(
        tmp_path,
        "--dataset",
        "test/hopper/random-v0",
        "--dataset-dir",
        root,
        "--total-steps",
        "300",
        "--eval-every",
        "150",
        "--eval-episodes",
        "1",
        "--save-model",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir, logged = only_run(tmp_path)
    for tag in (
        "charts/SPS",
        "losses/actor_loss",
        "losses/flow_loss",
        "losses/qf_loss",
        "losses/vf_loss",
        "charts/guidance_norm",
    ):
        assert [s for s, _ in logged[tag]] == [50, 100, 150, 200, 250, 300], tag
    assert [s for s, _ in logged["eval/episodic_return"]] == [150, 300]
    # the normalized score is 100 (R - 0) / (100 - 0) of the same evaluation
    for (_, ret), (_, score) in zip(logged["eval/episodic_return"], logged["eval/normalized_score"]):
        assert score == pytest.approx(ret, rel=1e-4)
    assert logged["charts/guidance_norm"][-1][1] > 0.0  # lambda > 0: the target differs from plain CFM
    checkpoint = load_checkpoint(os.path.join(run_dir, "flowq.pt"), "flowq.py", torch.device("cpu"))
    assert checkpoint["global_step"] == 300 and not os.path.exists(os.path.join(run_dir, "flowq.pt.tmp"))
    actor = VelocityField(11, 3, 32, 2)
    actor.load_state_dict(checkpoint["actor"])


def test_flowq_ogbench_success_with_learned_schedule(tmp_path):
    dataset_dir = str(tmp_path / "ogbench")
    write_ogbench_dataset(dataset_dir, "pointmaze-medium-navigate-singletask-v0", num_episodes=3, episode_length=40)
    result = run_flowq(
        tmp_path,
        "--dataset",
        "pointmaze-medium-navigate-singletask-v0",
        "--dataset-dir",
        dataset_dir,
        "--schedule",
        "learned",
        "--total-steps",
        "100",
        "--eval-every",
        "100",
        "--eval-episodes",
        "1",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    _, logged = only_run(tmp_path)
    assert [s for s, _ in logged["eval/success"]] == [100] and 0.0 <= logged["eval/success"][0][1] <= 1.0
    assert "eval/normalized_score" not in logged
    h_half = logged["charts/h_at_half"][-1][1]
    assert 0.0 <= h_half <= 1.0 and h_half != 0.5  # h_theta(1/2) starts at 1/2 and is trained within [0, 2t]


def test_flowq_missing_dataset_is_one_line(tmp_path):
    result = run_flowq(tmp_path, "--dataset", "mujoco/hopper/medium-v0", "--dataset-dir", str(tmp_path / "none"))
    assert_one_line_error(result, "error: Minari dataset 'mujoco/hopper/medium-v0' not found")
    assert "minari download mujoco/hopper/medium-v0" in result.stderr


# ---- What lambda does: the realised shift on a Gaussian behaviour policy (docs/flowq-reconstruction.md Sec. 4) ----


def spread(t: torch.Tensor, s: float) -> torch.Tensor:
    """sigma_t of the linear path from N(0, 1) to a Gaussian behaviour N(mu, s^2): sqrt(t^2 s^2 + (1 - t)^2)."""
    return (t**2 * s**2 + (1 - t) ** 2).sqrt()


def shift_factor(coefficient, s: float) -> float:
    """J = s int_0^1 c(t) / sigma_t dt: the guided flow moves each sample by lambda g J (recon Sec. 4)."""
    t = torch.linspace(0.0, 1.0, 200_001, dtype=torch.float64)
    return float(s * torch.trapezoid(coefficient(t) / spread(t, s), t))


def exact_guided_flow(mu: float, s: float, guidance, steps: int = 4000, n: int = 20_000) -> torch.Tensor:
    """Samples of the minimiser of the guided FM loss for a_1 ~ N(mu, s^2) and a linear Q with grad g:
    v_hat_t(x) = mu + (d sigma_t/dt / sigma_t) (x - t mu) + guidance(t), integrated with Euler in float64."""
    gen = torch.Generator().manual_seed(0)
    x, dt = torch.randn(n, dtype=torch.float64, generator=gen), 1.0 / steps
    for k in range(steps):
        t = torch.tensor(k * dt, dtype=torch.float64)
        dlog_sigma = (t * s**2 - (1 - t)) / spread(t, s) ** 2
        x = x + dt * (mu + dlog_sigma * (x - t * mu) + guidance(t))
    return x


@pytest.mark.parametrize("s, expected_j", [(0.3, 0.245), (0.1, 0.092)])
def test_lambda_is_not_a_temperature_the_shift_scales_with_the_behaviour_spread(s, expected_j):
    """h = t: the exact guided flow moves N(mu, s^2) by lambda g J(s), J(0.3) = 0.245 and J(0.1) = 0.092 (closed
    form and ODE agree); neither lambda g / 2 (the old docstring's claim) nor the exact tilt's lambda g s^2. With the
    Gaussian-matched schedule h*(t) = t s^2 / sigma_t^2 the same flow realises the exact tilt lambda g s^2."""
    mu, lam_g = 0.1, 1.0
    j = shift_factor(lambda t: 1 - t, s)
    assert j == pytest.approx(expected_j, abs=2e-3)
    behaviour = exact_guided_flow(mu, s, lambda t: 0.0 * t)  # lambda = 0, the same noise samples
    assert behaviour.mean().item() == pytest.approx(mu, abs=0.01) and behaviour.std().item() == pytest.approx(s, rel=0.02)
    shift = exact_guided_flow(mu, s, lambda t: lam_g * (1 - t)) - behaviour
    assert shift.mean().item() == pytest.approx(lam_g * j, rel=0.01)
    assert shift.std().item() < 1e-3  # a translation: the spread is kept
    assert lam_g * j < 0.5 * lam_g - 0.2 and lam_g * j > 2 * lam_g * s**2  # not lambda g / 2, not the exact tilt
    matched = exact_guided_flow(mu, s, lambda t: lam_g * s**2 * (1 - t) / spread(t, s) ** 2) - behaviour
    assert matched.mean().item() == pytest.approx(lam_g * s**2, rel=0.01)


def test_trained_flow_realises_the_closed_form_shift():
    """u_theta trained on flowq's guided target (h = t, lambda = 1, Q = a) for a_1 ~ N(-0.2, 0.3^2) moves the
    behaviour mean by J(0.3) = 0.245, not by lambda / 2 = 0.5 nor by the exact tilt lambda s^2 = 0.09."""
    torch.manual_seed(0)
    mu, s = -0.2, 0.3
    actor = VelocityField(1, 1, 64, 2)
    optimizer = torch.optim.Adam(actor.parameters(), lr=2e-3)
    obs, linear_q = torch.zeros(512, 1), lambda o, a: a.sum(-1)
    for step in range(2000):
        for group in optimizer.param_groups:
            group["lr"] = 2e-3 if step < 1500 else 5e-4
        a1, a0, t = mu + s * torch.randn(512, 1), torch.randn(512, 1), torch.rand(512, 1)
        target, a_t, _, _ = guided_target(linear_q, obs, a0, a1, t, 1.0, energy_coefficient("t", t), normalize_energy=False)
        loss = (actor(obs, a_t, t) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    shift = sample_actions(actor, torch.zeros(20_000, 1), flow_steps=50).mean().item() - mu
    assert shift == pytest.approx(shift_factor(lambda t: 1 - t, s), abs=0.04)


def test_learned_schedule_fits_the_gaussian_matched_schedule_and_realises_the_exact_tilt():
    """Training u_theta and h_theta together (flowq's update_actor and update_schedule, lambda = 1, Q = a) on
    a_1 ~ N(-0.2, 0.3^2): h_theta(t) / t approaches s^2 / sigma_t^2 (the Gaussian-matched h*(t) / t) and the flow
    moves the behaviour mean by the exact tilt lambda s^2 = 0.09, where h = t moves it by J(0.3) = 0.245."""
    torch.manual_seed(0)
    mu, s = -0.2, 0.3
    actor, schedule = VelocityField(1, 1, 64, 2), LearnedSchedule()
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=2e-3)
    schedule_optimizer = torch.optim.Adam(schedule.parameters(), lr=1e-2)
    obs, linear_q = torch.zeros(512, 1), lambda o, a: a.sum(-1)
    args = Args(energy_scale=1.0, normalize_energy=False, schedule="learned")
    agent = dict(actor=actor, schedule=schedule, actor_optimizer=actor_optimizer, schedule_optimizer=schedule_optimizer)
    agent["critic_target"] = lambda o, a: linear_q(o, a).unsqueeze(0)  # a one-member "ensemble" with Q = a
    for step in range(2000):
        for group in actor_optimizer.param_groups:
            group["lr"] = 2e-3 if step < 1500 else 5e-4
        a1, a0, t = mu + s * torch.randn(512, 1), torch.randn(512, 1), torch.rand(512, 1)
        update_actor(obs, a1, a0, t, agent, args)
        update_schedule(obs, a1, a0, t, agent, args)
    t = torch.tensor([[0.1], [0.3], [0.5], [0.7], [0.9]])
    with torch.no_grad():
        torch.testing.assert_close(schedule.ratio(t), s**2 / spread(t, s) ** 2, rtol=0.15, atol=0.02)
    shift = sample_actions(actor, torch.zeros(20_000, 1), flow_steps=50).mean().item() - mu
    assert shift == pytest.approx(s**2, abs=0.03)


# ---- The wiring of the critic and target critic, masks, Polyak (what a wrong algorithm breaks) ----


def tiny_agent(**flags):
    """flowq's agent dict, with its args and its update and acting functions as the script binds them."""
    torch.manual_seed(0)
    args = with_domain_defaults(Args(hidden_dim=16, num_layers=2, batch_size=8, cuda=False, **flags))
    agent = make_agent(args, 3, 2, torch.device("cpu"))
    train_step = speed_up(partial(update, agent=agent, args=args), args)
    policy_step = speed_up(partial(act, agent["actor"], flow_steps=args.flow_steps), args)
    return SimpleNamespace(**agent, args=args, train_step=train_step, policy_step=policy_step, dict=agent)


def tiny_batch(seed: int = 1) -> dict[str, torch.Tensor]:
    """A batch whose bootstrap masks disagree with 1 - terminals (as OGBench's relabelled masks can)."""
    gen = torch.Generator().manual_seed(seed)
    batch = {
        "observations": torch.randn(8, 3, generator=gen),
        "actions": torch.rand(8, 2, generator=gen) * 2 - 1,
        "rewards": torch.randn(8, generator=gen),
        "next_observations": torch.randn(8, 3, generator=gen),
        "terminals": torch.tensor([1.0, 0, 0, 0, 1, 0, 0, 0]),
        "masks": torch.tensor([0.0, 1, 0, 1, 1, 1, 0, 1]),
    }
    batch["dones"] = batch["terminals"]
    return batch


def perturb(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))


def test_critic_loss_is_iql_with_the_target_critic_in_v_and_masks_in_the_backup():
    agent, batch, gamma, tau = tiny_agent(), tiny_batch(), 0.9, 0.7
    perturb(agent.critic_target)  # critic and target differ, so a swap changes the losses
    loss, metrics = critic_loss(batch, agent.dict, Args(gamma=gamma, expectile=tau))
    obs, actions = batch["observations"], batch["actions"]
    with torch.no_grad():
        v = agent.value(obs)
        target_q = agent.critic_target(obs, actions).min(0).values
        diff = target_q - v
        vf = (torch.where(diff < 0, 1 - tau, tau) * diff**2).mean()
        backup = batch["rewards"] + gamma * batch["masks"] * agent.value(batch["next_observations"])
        qf = (agent.critic(obs, actions) - backup).pow(2).mean()
    torch.testing.assert_close(metrics["losses/vf_loss"], vf)
    torch.testing.assert_close(metrics["losses/qf_loss"], qf)
    torch.testing.assert_close(loss.detach(), vf + qf)


def test_critic_step_trains_the_critic_and_polyak_averages_the_target():
    agent, batch = tiny_agent(tau=0.25), tiny_batch()
    critic_before = [p.detach().clone() for p in agent.critic.parameters()]
    target_before = [p.detach().clone() for p in agent.critic_target.parameters()]
    update_critic(batch, agent.dict, agent.args)
    for before, after in zip(critic_before, agent.critic.parameters()):
        assert not torch.equal(before, after)  # the online critic is the one regressed
    for before, critic_p, target_p in zip(target_before, agent.critic.parameters(), agent.critic_target.parameters()):
        torch.testing.assert_close(target_p, 0.75 * before + 0.25 * critic_p)  # Qbar <- (1 - tau) Qbar + tau Q


def actor_after_one_step(perturbed: str | None) -> list[torch.Tensor]:
    agent, batch = tiny_agent(), tiny_batch()
    if perturbed:
        perturb(getattr(agent, perturbed))
    a0, t = torch.randn(8, 2, generator=torch.Generator().manual_seed(2)), torch.linspace(0.05, 0.95, 8).unsqueeze(-1)
    update_actor(batch["observations"], batch["actions"], a0, t, agent.dict, agent.args)
    return [p.detach().clone() for p in agent.actor.parameters()]


def test_actor_takes_its_guidance_from_the_target_critic():
    base = actor_after_one_step(None)
    assert all(torch.equal(a, b) for a, b in zip(base, actor_after_one_step("critic")))
    assert not all(torch.equal(a, b) for a, b in zip(base, actor_after_one_step("critic_target")))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_actor_loss_regresses_u_theta_at_a_t_onto_the_guided_target(schedule):
    """L_pi = || u_theta(a_t, t, s) - (a_1 - a_0) - lambda / mean|Qbar(s, a_1)| c(t) grad_a Qbar(s, a_t) ||^2 with the
    schedule's own c(t) (docs/flowq-reconstruction.md Sec. 2-4), written out independently of flowq.py."""
    agent, batch = tiny_agent(schedule=schedule, energy_scale=0.7), tiny_batch()
    perturb(agent.critic_target)
    obs, a1 = batch["observations"], batch["actions"]
    a0, t = torch.randn(8, 2, generator=torch.Generator().manual_seed(2)), torch.linspace(0.05, 0.95, 8).unsqueeze(-1)
    loss, metrics = actor_loss(obs, a1, a0, t, agent.dict, agent.args)
    a_t = t * a1 + (1 - t) * a0
    query = a_t.clamp(-1, 1).requires_grad_(True)
    (grad_q,) = torch.autograd.grad(agent.critic_target(obs, query).min(0).values.sum(), query)
    with torch.no_grad():
        scale = 0.7 / agent.critic_target(obs, a1).min(0).values.abs().mean()
        h = {"t": t, "t2": t**2, "t2_over_1mt": t**2 / (1 - t), "learned": t}[schedule]  # a fresh h_theta is t
        target = (a1 - a0) + scale * h * (1 - t) / t * grad_q
        velocity = agent.actor(obs, a_t, t)
    torch.testing.assert_close(loss.detach(), (velocity - target).pow(2).mean())
    torch.testing.assert_close(metrics["losses/flow_loss"], (velocity - (a1 - a0)).pow(2).mean())
    torch.testing.assert_close(metrics["charts/effective_energy_scale"], scale)


# ---- Per-domain defaults and the validation split ----


@pytest.mark.parametrize(
    "flags, expectile, episodes",
    [
        (dict(dataset="D4RL/antmaze/umaze-v1"), 0.9, 100),  # IQL's AntMaze expectile and 100 episodes
        (dict(dataset="antmaze-large-navigate-singletask-v0"), 0.9, 50),  # OGBench AntMaze: FQL's 50 episodes
        (dict(dataset="/tmp/data.npz", env_id="AntMaze_UMaze-v5"), 0.9, 100),
        (dict(dataset="mujoco/hopper/medium-v0"), 0.7, 50),
        (dict(dataset="cube-single-play-singletask-v0"), 0.7, 50),
        (dict(dataset="D4RL/antmaze/umaze-v1", expectile=0.8, eval_episodes=7), 0.8, 7),  # explicit flags win
    ],
)
def test_domain_defaults(flags, expectile, episodes):
    args = with_domain_defaults(Args(**flags))
    assert (args.expectile, args.eval_episodes) == (expectile, episodes)


def test_validation_losses_are_logged_without_updating(tmp_path, monkeypatch):
    """With data.validation set (an OfflineData built by hand here; the OGBench loader fills it), every log step
    writes val/<loss> on a held-out batch, and the training losses are those of a run without validation."""
    root = str(tmp_path / "minari")
    write_minari_dataset(root, "test/hopper/random-v0", "Hopper-v5", num_episodes=4, max_steps=40)
    flags = ["--dataset", "test/hopper/random-v0", "--dataset-dir", root, "--total-steps", "100", "--eval-every", "100"]
    flags += ["--eval-episodes", "1"]
    real_load = common.datasets.load_dataset

    def load_with_validation(*args, **kwargs):
        data = real_load(*args, **kwargs)
        held_out = {k: getattr(data, k)[:60].clone() for k in TRANSITION_KEYS}
        data.validation = OfflineData(**held_out, name="held-out", metric=data.metric, make_env=data.make_env)
        return data

    logged = {}
    for name, loader in (("plain", real_load), ("validation", load_with_validation)):
        os.makedirs(tmp_path / name)
        monkeypatch.chdir(tmp_path / name)
        monkeypatch.setattr(common.datasets, "load_dataset", loader)
        monkeypatch.setattr(sys, "argv", ["flowq.py", *TINY, *flags])
        runpy.run_path(os.path.join(ROOT, "flowq.py"), run_name="__main__")
        (run_dir,) = run_dirs(tmp_path / name)
        logged[name] = scalars(run_dir)
    plain, validated = logged["plain"], logged["validation"]
    for tag in ("val/qf_loss", "val/vf_loss", "val/actor_loss", "val/flow_loss"):
        assert [s for s, _ in validated[tag]] == [50, 100] and tag not in plain, tag
    for tag in ("losses/qf_loss", "losses/actor_loss", "losses/vf_loss", "eval/episodic_return"):
        assert validated[tag] == plain[tag], tag  # validation neither updates nor shifts the random streams


# ---- --compile: the same step as eager ----


def test_compile_matches_eager_flowq():
    """One training iteration (critic, actor and h_theta steps, with grad_a Q) and acting under torch.compile give the
    eager losses, parameters and actions from the same seed and batch, within float tolerance."""
    batch, t = tiny_batch(), torch.linspace(0.05, 0.95, 8).unsqueeze(-1)
    a0 = torch.randn(8, 2, generator=torch.Generator().manual_seed(2))
    results = []
    for compiled in (False, True):
        agent = tiny_agent(compile=compiled, flow_steps=2, schedule="learned")
        metrics = agent.train_step(batch, a0, t)
        params = [
            p.detach().clone() for m in (agent.actor, agent.critic, agent.critic_target, agent.value) for p in m.parameters()
        ]
        results.append((metrics, params, agent.policy_step(batch["observations"], a0)))
    (eager_metrics, eager_params, eager_actions), (compiled_metrics, compiled_params, compiled_actions) = results
    assert set(eager_metrics) == set(compiled_metrics)
    for name in eager_metrics:
        torch.testing.assert_close(compiled_metrics[name], eager_metrics[name], rtol=1e-4, atol=1e-5, msg=name)
    for eager_p, compiled_p in zip(eager_params, compiled_params):
        torch.testing.assert_close(compiled_p, eager_p, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled_actions, eager_actions, rtol=1e-4, atol=1e-5)


# ---- Bad input: one `error:` line, no traceback, before any dataset is loaded ----

BAD_INPUTS = [
    (("--total-steps", "0"), "--total-steps must be a positive integer"),
    (("--batch-size", "0"), "--batch-size must be a positive integer"),
    (("--batch-size", "-3"), "--batch-size must be a positive integer"),
    (("--hidden-dim", "0"), "--hidden-dim must be a positive integer"),
    (("--num-layers", "0"), "--num-layers must be a positive integer"),
    (("--flow-steps", "0"), "--flow-steps must be a positive integer"),
    (("--eval-every", "0"), "--eval-every must be a positive integer"),
    (("--eval-episodes", "0"), "--eval-episodes must be a positive integer"),
    (("--log-every", "-1"), "--log-every must be a positive integer"),
    (("--actor-lr", "0"), "--actor-lr must be positive and finite"),
    (("--critic-lr", "-1e-3"), "--critic-lr must be positive and finite"),
    (("--critic-lr", "inf"), "--critic-lr must be positive and finite"),
    (("--schedule-lr", "nan"), "--schedule-lr must be positive and finite"),
    (("--gamma", "0"), "--gamma must lie in (0, 1]"),
    (("--gamma", "1.5"), "--gamma must lie in (0, 1]"),
    (("--tau", "0"), "--tau must lie in (0, 1]"),
    (("--tau", "1.01"), "--tau must lie in (0, 1]"),
    (("--expectile", "0"), "--expectile must lie in (0, 1)"),
    (("--expectile", "1"), "--expectile must lie in (0, 1)"),
    (("--expectile", "nan"), "--expectile must lie in (0, 1)"),
    (("--energy-scale", "-0.5"), "--energy-scale must be finite and >= 0"),
    (("--energy-scale", "inf"), "--energy-scale must be finite and >= 0"),
    (("--seed", "-1"), "--seed must lie in [0, 2**32)"),
    (("--dataset", " "), "--dataset must name a dataset"),
    (("--cudagraphs",), "--cudagraphs needs a CUDA device"),
]


def test_bad_input_ends_in_one_error_line(tmp_path):
    """Every case fails in check_args: the dataset named here does not exist, so a check that let a value through
    would end in the loader's different error instead."""
    missing = ("--dataset", "mujoco/none/missing-v0", "--dataset-dir", str(tmp_path / "none"))
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda case: run_flowq(tmp_path, *missing, *case[0]), BAD_INPUTS))
    for (flags, fragment), result in zip(BAD_INPUTS, results):
        assert_one_line_error(result, fragment)
    assert not os.path.exists(tmp_path / "runs")


def test_eval_episodes_do_not_change_the_training_losses(tmp_path):
    """Evaluation reseeds its env and forks the torch RNG, so two runs differing only in --eval-episodes log the
    same losses and charts at every log step (SPS aside)."""
    root = str(tmp_path / "minari")
    write_minari_dataset(root, "test/hopper/random-v0", "Hopper-v5", num_episodes=4, max_steps=40)
    logged = []
    for episodes in ("1", "3"):
        cwd = tmp_path / f"episodes{episodes}"
        os.makedirs(cwd)
        result = run_flowq(
            cwd, "--dataset", "test/hopper/random-v0", "--dataset-dir", root, "--total-steps", "150", "--eval-every", "50",
            "--eval-episodes", episodes,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        (run_dir,) = run_dirs(cwd)
        logged.append(scalars(run_dir))
    training = [tag for tag in logged[0] if tag.startswith(("losses/", "charts/")) and tag != "charts/SPS"]
    assert {"losses/qf_loss", "losses/vf_loss", "losses/actor_loss", "losses/flow_loss"} <= set(training)
    for tag in training:
        assert logged[0][tag] == logged[1][tag], tag
    assert [s for s, _ in logged[0]["eval/episodic_return"]] == [50, 100, 150]


def test_a_non_finite_loss_stops_the_run_with_one_line(tmp_path):
    """A diverging critic (absurd learning rate) is caught at the step it first appears, reported at the next log
    step as one line naming the metric and that step."""
    root = str(tmp_path / "minari")
    write_minari_dataset(root, "test/hopper/random-v0", "Hopper-v5", num_episodes=2, max_steps=40)
    result = run_flowq(
        tmp_path, "--dataset", "test/hopper/random-v0", "--dataset-dir", root, "--total-steps", "100", "--critic-lr", "1e30"
    )
    assert_one_line_error(result, "became non-finite at step 1; stopping (logs kept in runs/test-hopper-random-v0__flowq__1__")
    assert len(run_dirs(tmp_path)) == 1


def test_learned_schedule_regresses_onto_the_per_dimension_variance():
    """h_theta(t) / t is regressed onto the residual ||u_theta - u_hat_t||^2 averaged over the action dimensions: with
    the exact velocity field of a 3-D Gaussian behaviour N(mu, s^2 I) as u_theta, h_theta(t) / t learns the
    per-dimension Var(a_1 - a_0 | a_t) = s^2 / sigma_t^2 (recon Sec. 5), not d = 3 times it."""
    mu, s = 0.2, 0.3

    class ExactField(torch.nn.Module):  # E[a_1 - a_0 | a_t] of the linear path from N(0, I) to N(mu, s^2 I)
        def forward(self, obs, a, t):
            return mu + (t * s**2 - (1 - t)) / spread(t, s) ** 2 * (a - t * mu)

    torch.manual_seed(0)
    schedule = LearnedSchedule()
    agent = dict(actor=ExactField(), schedule=schedule, schedule_optimizer=torch.optim.Adam(schedule.parameters(), lr=1e-2))
    args = Args(energy_scale=0.0, schedule="learned")  # no guidance: the residual's variance is the behaviour's own
    obs = torch.zeros(1024, 1)
    for _ in range(800):
        a1, a0, t = mu + s * torch.randn(1024, 3), torch.randn(1024, 3), torch.rand(1024, 1)
        update_schedule(obs, a1, a0, t, agent, args)
    t = torch.tensor([[0.1], [0.3], [0.5], [0.7], [0.9]])
    with torch.no_grad():
        torch.testing.assert_close(schedule.ratio(t), s**2 / spread(t, s) ** 2, rtol=0.1, atol=0.01)
