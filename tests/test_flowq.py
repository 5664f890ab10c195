"""flowq.py: the energy-guided target, a bimodal toy with a known Q, and end-to-end runs on fixture datasets."""

import os

import pytest
import torch

from common.flow import interpolate, target_velocity
from flowq import (
    LearnedSchedule,
    VelocityField,
    energy_coefficient,
    expectile_loss,
    guided_target,
    load_checkpoint,
    sample_actions,
)
from tests.conftest import assert_one_line_error, run_dirs, run_script, scalars
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
    target, a_t, grad_q, q = guided_target(quadratic_q, obs, a0, a1, t, 0.3, coefficient, normalize_energy=False)
    expected_grad = 2.0 * (obs - a_t.clamp(-1, 1))
    torch.testing.assert_close(grad_q, expected_grad)
    torch.testing.assert_close(target, (a1 - a0) + 0.3 * coefficient * expected_grad)
    # normalized energy: lambda / mean |Q| at the query points
    target_n, _, _, _ = guided_target(quadratic_q, obs, a0, a1, t, 0.3, coefficient, normalize_energy=True)
    torch.testing.assert_close(target_n, (a1 - a0) + 0.3 / q.abs().mean() * coefficient * expected_grad)


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
