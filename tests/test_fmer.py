"""Behaviour of fmer.py's pieces, and end-to-end smoke runs of the script on CPU."""

import glob
import math
import os
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_dirs, run_script, scalars

from common.envs import KITCHEN_TASK_SETS, KitchenTaskMetrics, make_env
from common.flow import hutchinson_divergence
from fmer import (
    VelocityField,
    best_of_candidates,
    candidate_weights,
    entropy_estimate,
    load_checkpoint,
    make_critic,
    sample_candidates,
    td_target,
)

TINY = [
    "--hidden-dim",
    "16",
    "--num-layers",
    "2",
    "--batch-size",
    "32",
    "--learning-starts",
    "64",
    "--log-every",
    "20",
    "--num-candidates",
    "4",
    "--flow-steps",
    "3",
]


def test_softmax_weights_sum_to_one_and_ignore_the_baseline():
    torch.manual_seed(0)
    q = 3 * torch.randn(64, 8)
    w = candidate_weights(q, 0.5, "softmax")
    assert torch.allclose(w.sum(1), torch.ones(64))
    assert (w > 0).all()
    assert torch.allclose(candidate_weights(q + 7.0, 0.5, "softmax"), w, atol=1e-5)  # per-state baseline cancels
    assert torch.allclose(w, torch.softmax(q / 0.5, 1), atol=1e-6)


def test_softmax_weights_tend_to_top1_as_temperature_goes_to_zero():
    torch.manual_seed(0)
    q = torch.randn(64, 8)
    q[torch.arange(64), q.argmax(1)] += 0.05  # a unique maximum per state, so the limit is one-hot
    top1 = candidate_weights(q, 0.5, "top1")
    assert torch.equal(top1.sum(1), torch.ones(64)) and torch.equal(top1.argmax(1), q.argmax(1))
    gaps = [(candidate_weights(q, beta, "softmax") - top1).abs().max().item() for beta in (1.0, 0.1, 1e-4)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-6
    # a high temperature flattens the weights towards uniform
    assert torch.allclose(candidate_weights(q, 1e6, "softmax"), torch.full((64, 8), 1 / 8), atol=1e-5)


def test_unnormalized_weights_are_exp_advantage():
    torch.manual_seed(0)
    q = torch.randn(16, 8)
    w = candidate_weights(q, 0.5, "unnormalized")
    assert torch.allclose(w, torch.exp((q - q.mean(1, keepdim=True)) / 0.5))
    assert not torch.allclose(w.sum(1), torch.ones(16))


def test_td_target_bootstraps_through_truncation_but_not_termination():
    rewards, next_q = torch.tensor([1.0, 1.0]), torch.tensor([10.0, 10.0])
    # a truncated (time-limit) transition is stored with terminated = 0: it bootstraps
    y = td_target(rewards, torch.tensor([0.0, 1.0]), next_q, gamma=0.99, reward_scale=2.0)
    assert y.tolist() == pytest.approx([2.0 + 9.9, 2.0])


def test_time_limit_is_truncation_not_termination():
    env = make_env("Pendulum-v1", seed=0)
    for step in range(200):
        _, _, terminated, truncated, info = env.step(env.action_space.sample())
        assert not terminated
    assert truncated and info["episode"]["l"] == 200


def test_twin_q_members_are_two_independent_mlps():
    critic = make_critic(3, 2, hidden_dim=8, num_layers=2)
    obs, act = torch.randn(5, 3), torch.randn(5, 2)
    q = critic(obs, act)
    assert q.shape == (2, 5)
    for member in range(2):  # the stacked forward equals a plain per-member MLP
        x = torch.cat([obs, act], -1)
        for layer, (w, b) in enumerate(zip(critic.weights, critic.biases)):
            x = x @ w[member] + b[member]
            x = torch.nn.functional.mish(x) if layer < len(critic.weights) - 1 else x
        assert torch.allclose(q[member], x[:, 0], atol=1e-6)
    assert not torch.allclose(q[0], q[1])


def test_candidates_and_best_of_n():
    torch.manual_seed(0)
    actor = VelocityField(3, 2, hidden_dim=8, num_layers=2)
    obs = torch.randn(4, 3)
    obs_rep, z1, path, velocities = sample_candidates(actor, obs, num_candidates=5, flow_steps=7, return_path=True)
    assert obs_rep.shape == (20, 3) and z1.shape == (20, 2) and path.shape == velocities.shape == (7, 20, 2)
    assert torch.equal(obs_rep[5:10], obs[1].expand(5, 3))
    assert not z1.requires_grad
    q = torch.randn(4, 5)
    best = best_of_candidates(q, z1)
    for state in range(4):
        assert torch.equal(best[state], z1[state * 5 + q[state].argmax()])


class GaussianOTField(torch.nn.Module):
    """The exact OT velocity field from N(0, I) to N(0, diag(scales^2)): z_t = (1 - t + t s) z_0, so
    u(z, t) = (s - 1) z / (1 - t + t s). Its flow is linear in t, so 10 Euler steps follow it exactly."""

    def __init__(self, scales):
        super().__init__()
        self.scales, self.act_dim = torch.tensor(scales), len(scales)

    def forward(self, obs, z, t):
        return (self.scales - 1) * z / (1 - t + t * self.scales)


def tanh_log_jacobian_mean(scale: float) -> float:
    """E[log(1 - tanh(scale x)^2)], x ~ N(0, 1), by 200-node Gauss-Hermite quadrature (overflow-free form)."""
    x, w = np.polynomial.hermite_e.hermegauss(200)
    y = np.abs(scale * x)
    return float(np.sum(w * (2 * np.log(2) - 2 * y - 2 * np.log1p(np.exp(-2 * y)))) / w.sum())


def test_entropy_estimator_unbiased_at_ten_euler_steps():
    """entropy_estimate, as the training step calls it (K = 10 Euler steps, N candidates), estimates the change of
    the action entropy H(tanh z_1) - H(tanh z_0) without bias on the exact Gaussian OT flow (Eqs. 13-18). A left
    Riemann sum (t only on the grid k / K) misses it by about 0.9 nats here, as the flow contracts."""
    torch.manual_seed(0)
    scales = [0.2, 0.05]
    field = GaussianOTField(scales)
    obs = torch.zeros(20_000, 1)
    _, _, path, velocities = sample_candidates(field, obs, num_candidates=2, flow_steps=10, return_path=True)
    estimate = entropy_estimate(field, obs, path, velocities, hutchinson_divergence)
    # H(tanh z) = H(z) + E[sum log(1 - tanh^2 z)], H(N(0, s^2)) - H(N(0, 1)) = log s per dimension
    true_change = sum(math.log(s) + tanh_log_jacobian_mean(s) - tanh_log_jacobian_mean(1.0) for s in scales)
    stderr = estimate.std().item() / math.sqrt(len(estimate))
    assert estimate.shape == (20_000,)
    assert estimate.mean().item() == pytest.approx(true_change, abs=4 * stderr + 0.02)


def logged_values(cwd) -> tuple[str, dict[str, list[float]]]:
    """The single run under `cwd`: its directory and every scalar's values in logging order."""
    (run_dir,) = run_dirs(cwd)
    return run_dir, {tag: [value for _, value in points] for tag, points in scalars(run_dir).items()}


def test_smoke_pendulum_updates_evaluates_and_saves(tmp_path):
    result = run_script(
        tmp_path,
        "fmer.py",
        "--env-id",
        "Pendulum-v1",
        "--total-timesteps",
        "220",
        "--eval-every",
        "110",
        "--eval-episodes",
        "1",
        "--save-model",
        *TINY,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir, logged = logged_values(tmp_path)
    for tag in [
        "losses/qf_loss",
        "losses/qf_values",
        "losses/actor_loss",
        "losses/flow_loss",
        "losses/entropy_loss",
        "losses/alpha",
        "losses/alpha_loss",
        "charts/entropy",
        "charts/weight_ess_fraction",
        "charts/SPS",
        "charts/episodic_return",
        "charts/actor_lr",
    ]:
        assert tag in logged, tag
    assert len(logged["losses/qf_loss"]) == 220 // 20 - 64 // 20  # updates ran at every step after the warm-up
    assert len(logged["eval/episodic_return"]) == 2
    assert logged["charts/actor_lr"][-1] < 3e-4  # annealing
    sps_steps = [step for step, _ in scalars(run_dir)["charts/SPS"]]
    assert sps_steps[0] == 80  # timed from the 4th update (step 68) on: the first log step after the burn-in
    assert logged["losses/alpha"][-1] < 1.0  # the entropy is above the target -dim(A) at the start: alpha shrinks
    checkpoint = load_checkpoint(os.path.join(run_dir, "fmer.pt"), "fmer.py", torch.device("cpu"))
    assert {
        "actor",
        "critic",
        "critic_target",
        "log_alpha",
        "actor_optimizer",
        "critic_optimizer",
        "alpha_optimizer",
        "global_step",
    } <= set(checkpoint)
    assert checkpoint["global_step"] == 220
    actor = VelocityField(3, 1, hidden_dim=16, num_layers=2)
    actor.load_state_dict(checkpoint["actor"])


def test_smoke_ablation_flags(tmp_path):
    """Top-1 weighting, the exact divergence, and the entropy cut-off (Fig. 6 ablations) run end to end."""
    result = run_script(
        tmp_path,
        "fmer.py",
        "--env-id",
        "InvertedPendulum-v5",
        "--total-timesteps",
        "200",
        "--eval-every",
        "200",
        "--eval-episodes",
        "1",
        "--weighting",
        "top1",
        "--divergence",
        "exact",
        "--entropy-off-step",
        "120",
        *TINY,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    _, logged = logged_values(tmp_path)
    assert len(logged["losses/flow_loss"]) == 200 // 20 - 64 // 20
    assert len(logged["losses/entropy_loss"]) == 120 // 20 - 64 // 20  # switched off after step 120
    assert logged["charts/weight_ess_fraction"][-1] == pytest.approx(1 / 4)  # top-1 keeps one of 4 candidates
    assert "charts/adv_temperature" not in logged  # fixed beta by default


def test_smoke_adaptive_temperature(tmp_path):
    """--adv-temperature-mode ess: with a young critic the softmax weights are nearly uniform (ESS fraction above
    the 0.5 target), so beta falls from 0.5 at every update."""
    flags = ["--env-id", "Pendulum-v1", "--total-timesteps", "200", "--eval-every", "200", "--eval-episodes", "1"]
    result = run_script(tmp_path, "fmer.py", *flags, "--adv-temperature-mode", "ess", "--target-ess-fraction", "0.5", *TINY)
    assert result.returncode == 0, result.stderr[-2000:]
    _, logged = logged_values(tmp_path)
    beta, ess = logged["charts/adv_temperature"], logged["charts/weight_ess_fraction"]
    assert min(ess) > 0.5 and beta[0] < 0.5 and all(b2 < b1 for b1, b2 in zip(beta, beta[1:]))


@pytest.mark.parametrize("num_tasks", sorted(KITCHEN_TASK_SETS))
def test_kitchen_task_sets_build_and_step(num_tasks):
    env = make_env("FrankaKitchen-v1", seed=0, kitchen_tasks=num_tasks)
    obs, _ = env.reset()
    assert obs.shape == (59,) and obs.dtype == np.float32
    assert env.unwrapped.tasks_to_complete == set(KITCHEN_TASK_SETS[num_tasks])
    done, steps = False, 0
    while not done:
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        done, steps = terminated or truncated, steps + 1
    assert steps == 280 and truncated
    assert 0 <= info["tasks_completed"] <= num_tasks and info["all_tasks_success"] in (0.0, 1.0)
    assert info["success_rate"] == info["tasks_completed"] / num_tasks


class StubKitchen(gym.Env):
    """One-step episodes whose final info lists `completed` of the accomplished tasks, as FrankaKitchen-v1 does."""

    observation_space = gym.spaces.Dict({"observation": gym.spaces.Box(-1, 1, (3,))})
    action_space = gym.spaces.Box(-1, 1, (2,))

    def __init__(self, completed):
        self.completed = completed

    def reset(self, seed=None, options=None):
        return {"observation": np.zeros(3)}, {}

    def step(self, action):
        info = {"episode_task_completions": ["light switch", "slide cabinet"][: self.completed]}
        return {"observation": np.zeros(3)}, float(self.completed), False, True, info


@pytest.mark.parametrize("completed, rate, all_done", [(0, 0.0, 0.0), (1, 0.5, 0.0), (2, 1.0, 1.0)])
def test_kitchen_success_rate_is_tasks_over_n(completed, rate, all_done):
    """FMER Table 1's Success Rate is 100 * tasks / N (1.26 of 2 tasks = 63 %), not the all-tasks indicator."""
    env = KitchenTaskMetrics(StubKitchen(completed), num_tasks=2)
    env.reset()
    *_, info = env.step(np.zeros(2))
    assert info["tasks_completed"] == completed
    assert info["success_rate"] == rate
    assert info["all_tasks_success"] == all_done


def test_smoke_kitchen(tmp_path):
    result = run_script(
        tmp_path,
        "fmer.py",
        "--env-id",
        "FrankaKitchen-v1",
        "--kitchen-tasks",
        "2",
        "--total-timesteps",
        "300",
        "--eval-every",
        "300",
        "--eval-episodes",
        "1",
        *TINY,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    _, logged = logged_values(tmp_path)
    assert {
        "eval/episodic_return",
        "eval/tasks_completed",
        "eval/success_rate",
        "eval/all_tasks_success",
        "charts/tasks_completed",
        "charts/success_rate",
        "losses/flow_loss",
    } <= set(logged)
    assert "eval/success" not in logged  # the all-tasks indicator has its own name
    assert 0.0 <= logged["eval/success_rate"][-1] <= 1.0


def test_non_finite_training_stops_with_one_line(tmp_path):
    """A diverging run (an absurd actor LR) stops at the step its metrics first became NaN or inf (the first update)."""
    flags = ["--env-id", "Pendulum-v1", "--total-timesteps", "100", "--actor-lr", "1e30", "--actor-lr-end", "1e30", *TINY]
    result = run_script(tmp_path, "fmer.py", *flags)
    assert_one_line_error(result, "became non-finite at step 6")


def mujoco_can_render(gl_backend: str) -> bool:
    probe = "import gymnasium as gym; e = gym.make('InvertedPendulum-v5', render_mode='rgb_array'); e.reset(); e.render()"
    return (
        subprocess.run(
            [sys.executable, "-c", probe], env=dict(os.environ, MUJOCO_GL=gl_backend), capture_output=True
        ).returncode
        == 0
    )


def test_capture_video_writes_evaluation_episodes(tmp_path, monkeypatch):
    gl_backend = os.environ.get("MUJOCO_GL", "osmesa")
    if not mujoco_can_render(gl_backend):
        pytest.skip(f"MuJoCo cannot render with MUJOCO_GL={gl_backend} here (e.g. apt-get install libosmesa6)")
    monkeypatch.setenv("MUJOCO_GL", gl_backend)  # run_script passes the environment on
    flags = ["--env-id", "InvertedPendulum-v5", "--total-timesteps", "100", "--eval-every", "100", "--eval-episodes", "1"]
    result = run_script(tmp_path, "fmer.py", *flags, "--capture-video", *TINY)
    assert result.returncode == 0, result.stderr[-2000:]
    videos = glob.glob(str(tmp_path / "videos" / "*" / "*.mp4"))
    assert videos and os.path.getsize(videos[0]) > 0


def test_entropy_gradient_is_finite_for_large_observations():
    """The Hutchinson entropy loss differentiates u_theta twice; Humanoid-v5 observations reach |3000|."""
    torch.manual_seed(0)
    actor = VelocityField(348, 17, hidden_dim=64, num_layers=3)
    obs, t = 3000 * torch.randn(32, 348), torch.rand(32, 1)
    _, div = hutchinson_divergence(lambda z: actor(obs, z, t), torch.randn(32, 17))
    (-div.mean()).backward()
    grads = torch.cat([p.grad.flatten() for p in actor.parameters() if p.grad is not None])  # not the output bias
    assert torch.isfinite(grads).all() and grads.abs().max() > 0


def test_evaluation_does_not_change_training(tmp_path):
    """Evaluation forks the torch RNG and reseeds its own env: runs that differ only in --eval-episodes (evaluating
    every 40 steps, before and during updates) log identical training losses and episodes."""
    logs = []
    for episodes in ("1", "3"):
        cwd = tmp_path / episodes
        cwd.mkdir()
        flags = ["--env-id", "Pendulum-v1", "--total-timesteps", "240", "--eval-every", "40", "--eval-episodes", episodes]
        result = run_script(cwd, "fmer.py", *flags, *TINY)
        assert result.returncode == 0, result.stderr[-2000:]
        logs.append(logged_values(cwd)[1])
    training = [tag for tag in logs[0] if tag.startswith(("losses/", "charts/")) and tag != "charts/SPS"]
    assert "losses/qf_loss" in training and "charts/episodic_return" in training and len(logs[0]["eval/episodic_return"]) == 6
    for tag in training:
        assert logs[0][tag] == logs[1][tag], tag
