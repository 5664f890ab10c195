"""fino.py: tests that a wrong algorithm fails — the candidate softmax's normaliser scope, q_agg in the TD target,
the actor's ensemble mean, the D4RL antmaze reward shift online — plus the validation losses, the run-name tag, and
torch.compile against eager."""

import dataclasses

import gymnasium as gym
import pytest
import torch

from common.datasets import OfflineData
from fino import (
    Args,
    candidate_logits,
    dataset_tag,
    draw_noise,
    fql_losses,
    make_critic,
    make_nets,
    online_reward_shift,
    resolve_args,
    speed_up,
    training_env,
    update,
    validation_metrics,
)

TINY = Args(hidden_dim=16, num_layers=2, num_critics=2, flow_steps=3)


def setup(seed=0, obs_dim=3, act_dim=2, batch_size=32):
    torch.manual_seed(seed)
    nets = make_nets(obs_dim, act_dim, TINY)
    target = make_critic(obs_dim, act_dim, TINY)
    target.load_state_dict(nets["critic"].state_dict())
    batch = dict(
        observations=torch.randn(batch_size, obs_dim),
        actions=torch.rand(batch_size, act_dim) * 2 - 1,
        rewards=-torch.rand(batch_size),
        next_observations=torch.randn(batch_size, obs_dim),
        masks=torch.ones(batch_size),
        **draw_noise(batch_size, act_dim, torch.device("cpu")),
    )
    return nets, target, batch


def loss_args(**kw):
    return resolve_args(dataclasses.replace(TINY, **{"alpha": 10.0, "gamma": 0.99, "q_agg": "mean", **kw}))


def split_members(critic, gap: float) -> None:
    """Member 1 := member 0 - gap, exactly: so mean = Q_0 - gap / 2 and min = Q_0 - gap at every (s, a)."""
    with torch.no_grad():
        for params in (critic.weights, critic.biases, critic.ln_scales, critic.ln_biases):
            for p in params:
                p[1] = p[0]
        critic.biases[-1][1] -= gap


# ---- the candidate softmax: one normaliser per call ------------------------------------------------------------------
def test_candidate_logits_normalise_by_mean_abs_q_over_all_states_and_candidates_of_the_call():
    """The official code divides by mean|Q| over every candidate of every state in the call, not per state: here the
    two states' Q scales differ by 100x, so a per-state normaliser gives other logits."""
    q = torch.tensor([[-100.0, -101.0, -99.0], [-1.0, -2.0, -0.5]])
    logits = candidate_logits(q, 10.0)
    assert torch.allclose(logits, 10.0 * q / q.abs().mean())
    # leading dimensions are independent calls (the entropy estimate's draws): one normaliser per call
    calls = torch.stack([q, 3.0 * q])
    assert torch.allclose(candidate_logits(calls, 10.0), torch.stack([logits, logits]))


# ---- q_agg reaches the TD target, and only it -----------------------------------------------------------------------
def test_q_agg_min_takes_the_smaller_target_member():
    """With target member 1 = member 0 - 3: min = mean - 1.5, so the TD target with q_agg=min equals the one with
    q_agg=mean on rewards lowered by 1.5 gamma (same seed: same next actions and noise)."""
    nets, target, batch = setup()
    split_members(target, 3.0)
    torch.manual_seed(1)
    with_min = fql_losses(batch, nets, target, loss_args(q_agg="min"))
    torch.manual_seed(1)
    shifted = fql_losses(dict(batch, rewards=batch["rewards"] - 1.5 * 0.99), nets, target, loss_args(q_agg="mean"))
    torch.manual_seed(1)
    with_mean = fql_losses(batch, nets, target, loss_args(q_agg="mean"))
    assert with_min["qf_loss"].item() == pytest.approx(shifted["qf_loss"].item(), rel=1e-5)
    assert with_min["qf_loss"].item() != pytest.approx(with_mean["qf_loss"].item(), rel=1e-2)
    # the actor's L_q does not depend on q_agg
    assert with_min["actor_q_loss"].item() == pytest.approx(with_mean["actor_q_loss"].item(), rel=1e-6)


# ---- the actor's L_q averages the ensemble --------------------------------------------------------------------------
def test_actor_q_term_is_minus_the_ensemble_mean_at_the_clipped_one_step_action():
    nets, target, batch = setup()
    split_members(nets["critic"], 3.0)  # members 3 apart: min, member 0 and mean all differ
    with torch.no_grad():  # a constant one-step policy mu(s, z) = c (outside [-1, 1] in one dimension: clipped)
        for layer in nets["onestep"].net:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.zero_()
        nets["onestep"].net[-1].bias.copy_(torch.tensor([0.4, -1.7]))
    a = torch.tensor([0.4, -1.0]).expand(32, 2)
    expected = -nets["critic"](batch["observations"], a).mean().item()
    for q_agg in ("mean", "min"):
        losses = fql_losses(batch, nets, target, loss_args(q_agg=q_agg))
        assert losses["actor_q_loss"].item() == pytest.approx(expected, rel=1e-5)
    normalized = fql_losses(batch, nets, target, loss_args(normalize_q_loss=True))["actor_q_loss"]
    q_pi = nets["critic"](batch["observations"], a).mean(0)
    assert normalized.item() == pytest.approx(expected / q_pi.abs().mean().item(), rel=1e-5)


# ---- rewards online: D4RL antmaze r - 1, OGBench as it comes -------------------------------------------------------
def test_online_reward_shift_follows_the_loaders_rule():
    assert online_reward_shift("D4RL/antmaze/umaze-v1", None) == -1.0  # Minari's D4RL antmaze
    assert online_reward_shift("D4RL/antmaze/large-diverse-v1", None) == -1.0
    assert online_reward_shift("/data/antmaze-umaze-v2.hdf5", "AntMaze_UMaze-v5") == -1.0  # a file with an antmaze env
    assert online_reward_shift("/data/antmaze-umaze-v2.hdf5", "PointMaze_UMaze-v3") == 0.0  # the loader reads the env id
    assert online_reward_shift("antmaze-large-navigate-singletask-v0", None) == 0.0  # OGBench: already shifted
    assert online_reward_shift("antmaze-giant-navigate-singletask-task3-v0", None) == 0.0
    assert online_reward_shift("D4RL/pen/cloned-v2", None) == 0.0


def test_training_env_shifts_the_rewards_but_not_the_recorded_return():
    class Data:
        make_env = staticmethod(lambda seed: gym.wrappers.RecordEpisodeStatistics(gym.make("Pendulum-v1")))

    raw, shifted = Data.make_env(0), training_env(Data(), 0, -1.0)
    raw.reset(seed=3), shifted.reset(seed=3)
    total = 0.0
    for _ in range(200):
        action = [0.5]
        _, r_raw, _, trunc, _ = raw.step(action)
        _, r_shifted, _, _, info = shifted.step(action)
        assert r_shifted == pytest.approx(r_raw - 1.0)
        total += r_raw
    assert trunc and info["episode"]["r"] == pytest.approx(total, rel=1e-5)  # charts/episodic_return: the raw return
    assert not isinstance(training_env(Data(), 0, 0.0), gym.wrappers.TransformReward)


# ---- validation losses ----------------------------------------------------------------------------------------------
def hand_made_split(n=64, obs_dim=3, act_dim=2, seed=4):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(n, obs_dim, generator=g)
    return OfflineData(
        observations=obs,
        actions=torch.rand(n, act_dim, generator=g) * 2 - 1,
        rewards=-torch.rand(n, generator=g),
        next_observations=obs + 0.1,
        terminals=torch.zeros(n),
        masks=torch.ones(n),
        dones=torch.zeros(n),
        name="hand-made-val",
        metric="return",
        make_env=None,
    )


def test_validation_losses_without_an_update_and_without_touching_the_training_rng():
    nets, target, _ = setup()
    args = loss_args(batch_size=16)
    assert validation_metrics(None, nets, target, args, seed=0) == {}
    before = [p.clone() for p in [*nets.parameters(), *target.parameters()]]
    torch.manual_seed(11)
    metrics = validation_metrics(hand_made_split(), nets, target, args, seed=5)
    after_call = torch.rand(3)
    torch.manual_seed(11)
    assert torch.equal(after_call, torch.rand(3))  # the training streams did not move
    assert set(metrics) == {
        f"val/{k}" for k in ("qf_loss", "qf_values", "flow_loss", "distill_loss", "actor_q_loss", "total_loss")
    }
    assert all(torch.isfinite(v) and not v.requires_grad for v in metrics.values())
    assert all(torch.equal(a, b) for a, b in zip(before, [*nets.parameters(), *target.parameters()]))
    assert all(p.grad is None for p in nets.parameters())
    again = validation_metrics(hand_made_split(), nets, target, args, seed=5)
    assert all(torch.equal(metrics[k], again[k]) for k in metrics)  # reproducible from its seed


# ---- run names ------------------------------------------------------------------------------------------------------
def test_run_name_tag_of_a_file_is_its_base_name():
    assert dataset_tag("/tmp/x.npz") == "x"
    assert dataset_tag("data/hopper-medium-v2.hdf5") == "hopper-medium-v2"
    assert dataset_tag("D4RL/antmaze/umaze-v1") == "D4RL-antmaze-umaze-v1"
    assert dataset_tag("antmaze-large-navigate-singletask-v0") == "antmaze-large-navigate-singletask-v0"


# ---- --compile ------------------------------------------------------------------------------------------------------
def test_compile_matches_eager_fino():
    """One update under torch.compile (inductor, CPU) gives the eager update's losses and parameters from the same seed
    and batch."""
    runs = []
    for compile_it in (False, True):
        nets, target, batch = setup(batch_size=16)
        optimizer = torch.optim.Adam(nets.parameters(), lr=1e-3)
        step = speed_up(update, dataclasses.replace(TINY, compile=compile_it))
        torch.manual_seed(3)
        metrics = step(batch, dict(nets=nets, target_critic=target, optimizer=optimizer), loss_args())
        runs.append((metrics, [p.detach().clone() for p in [*nets.parameters(), *target.parameters()]]))
    (eager_metrics, eager_params), (compiled_metrics, compiled_params) = runs
    assert list(eager_metrics) == list(compiled_metrics)
    for name in eager_metrics:
        assert torch.allclose(eager_metrics[name], compiled_metrics[name], rtol=1e-4, atol=1e-5), name
    for a, b in zip(eager_params, compiled_params):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    assert not torch.equal(eager_params[0], setup(batch_size=16)[0]["critic"].weights[0])  # the step moved the critic


# ---- the update: one Adam step on the sum, Polyak from the pre-step critic ------------------------------------------
def test_update_polyak_averages_the_pre_step_critic_and_steps_every_network_once():
    nets, target, batch = setup()
    with torch.no_grad():  # a target that differs from the critic
        for p in target.parameters():
            p.add_(0.1 * torch.randn_like(p))
    args = loss_args(tau=0.3)
    critic_before = [p.detach().clone() for p in nets["critic"].parameters()]
    target_before = [p.detach().clone() for p in target.parameters()]
    all_before = [p.detach().clone() for p in nets.parameters()]
    optimizer = torch.optim.Adam(nets.parameters(), lr=1e-2)
    metrics = update(batch, dict(nets=nets, target_critic=target, optimizer=optimizer), args)
    for new, old_target, old_critic in zip(target.parameters(), target_before, critic_before):
        assert torch.allclose(new, 0.7 * old_target + 0.3 * old_critic, atol=1e-6)
    # Adam's first step moves every parameter with a non-zero gradient by lr (its first update is lr * sign(grad))
    moved = [(p - b).abs().max().item() for p, b in zip(nets.parameters(), all_before)]
    assert max(moved) == pytest.approx(1e-2, rel=1e-3) and all(m > 0 for m in moved)
    assert all(not v.requires_grad for v in metrics.values()) and set(metrics) == {
        f"losses/{k}" for k in ("qf_loss", "qf_values", "flow_loss", "distill_loss", "actor_q_loss", "total_loss")
    }
