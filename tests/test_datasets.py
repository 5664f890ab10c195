"""common/datasets.py on tiny datasets written in the libraries' real formats (tests/fixtures.py)."""

import os

import gymnasium as gym
import numpy as np
import pytest
import torch

from common.datasets import ACTION_CLIP, TRANSITION_KEYS, load_dataset, success_from_info
from tests.fixtures import write_d4rl_file, write_minari_dataset, write_ogbench_dataset

OGBENCH_NAME = "pointmaze-medium-navigate-singletask-v0"


@pytest.fixture
def minari_root(tmp_path, monkeypatch):
    """A fresh MINARI_DATASETS_PATH, restored after the test."""
    root = str(tmp_path / "minari")
    monkeypatch.setenv("MINARI_DATASETS_PATH", root)
    return root


def raw_transitions(episodes, flatten=lambda o: np.asarray(o, np.float64).ravel()):
    """The transitions a correct loader must return, built episode by episode (never across episodes)."""
    obs, next_obs, dones = [], [], []
    for ep in episodes:
        flat = [flatten(o) for o in ep["observations"]]
        obs += flat[:-1]
        next_obs += flat[1:]
        dones += [0.0] * (len(flat) - 2) + [1.0]
    return np.array(obs), np.array(next_obs), np.array(dones)


def test_minari_transitions_boundaries_and_normalized_score(minari_root):
    episodes = write_minari_dataset(
        minari_root,
        "test/hopper/random-v0",
        "Hopper-v5",
        num_episodes=5,
        max_steps=30,
        ref_min_score=-10.0,
        ref_max_score=90.0,
    )
    # random actions: some Hopper episodes terminate (fall), the others hit the 30-step cut
    assert any(ep["terminations"][-1] for ep in episodes) and any(ep["truncations"][-1] for ep in episodes)
    data = load_dataset("test/hopper/random-v0", dataset_dir=minari_root)
    n = sum(len(ep["actions"]) for ep in episodes)
    assert len(data) == n and data.obs_dim == 11 and data.act_dim == 3
    for k in TRANSITION_KEYS:
        assert getattr(data, k).dtype == torch.float32 and getattr(data, k).shape[0] == n
    obs, next_obs, dones = raw_transitions(episodes)
    np.testing.assert_allclose(data.observations.numpy(), obs, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(data.next_observations.numpy(), next_obs, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(data.dones.numpy(), dones)
    terminated = np.concatenate([ep["terminations"] for ep in episodes]).astype(np.float32)
    np.testing.assert_array_equal(data.terminals.numpy(), terminated)
    np.testing.assert_array_equal(data.masks.numpy(), 1.0 - terminated)
    np.testing.assert_allclose(data.rewards.numpy(), np.concatenate([ep["rewards"] for ep in episodes]), rtol=1e-6)
    # D4RL normalization from the dataset's own reference scores
    assert data.metric == "normalized_score"
    assert data.normalize_score(40.0) == pytest.approx(50.0)
    env = data.make_env(7)
    assert isinstance(env, gym.wrappers.RecordEpisodeStatistics)
    assert env.observation_space.shape == (data.obs_dim,)
    env.close()


def test_minari_antmaze_reward_shift_and_dict_observations(minari_root):
    episodes = write_minari_dataset(minari_root, "test/antmaze/umaze-v0", "AntMaze_UMaze-v5", num_episodes=2, max_steps=8)
    data = load_dataset("test/antmaze/umaze-v0", dataset_dir=minari_root)
    np.testing.assert_allclose(data.rewards.numpy(), np.concatenate([ep["rewards"] for ep in episodes]) - 1.0)
    # dict observations are flattened exactly as FlattenObservation flattens the evaluation env's
    env = data.make_env(0)
    space = env.unwrapped.observation_space
    obs, next_obs, _ = raw_transitions(episodes, flatten=lambda o: gym.spaces.flatten(space, o))
    np.testing.assert_allclose(data.observations.numpy(), obs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(data.next_observations.numpy(), next_obs, rtol=1e-5, atol=1e-5)
    assert env.observation_space.shape == (data.obs_dim,)
    assert data.metric == "return" and data.normalize_score is None
    env.close()


def test_minari_actions_rescaled_to_unit_box(minari_root):
    episodes = write_minari_dataset(minari_root, "test/pendulum/random-v0", "Pendulum-v1", num_episodes=2, max_steps=20)
    data = load_dataset("test/pendulum/random-v0", dataset_dir=minari_root)
    raw = np.concatenate([np.stack(ep["actions"]) for ep in episodes])  # Pendulum's torque in [-2, 2]
    assert np.abs(raw).max() > 1.2
    np.testing.assert_allclose(data.actions.numpy(), np.clip(raw / 2.0, -ACTION_CLIP, ACTION_CLIP), rtol=1e-6)
    env = data.make_env(0)
    assert env.action_space.low.min() == -1.0 and env.action_space.high.max() == 1.0
    env.close()


@pytest.mark.parametrize("suffix", [".npz", ".hdf5"])
@pytest.mark.parametrize("with_next", [True, False])
def test_file_layouts_and_boundaries(tmp_path, suffix, with_next):
    path = str(tmp_path / f"hopper{suffix}")
    episodes = write_d4rl_file(path, "Hopper-v5", num_episodes=5, max_steps=30, next_observations=with_next)
    data = load_dataset(path, env_id="Hopper-v5")
    assert data.metric == "return" and data.normalize_score is None
    obs, next_obs, dones = raw_transitions(episodes)
    terminated = np.concatenate([ep["terminations"] for ep in episodes]).astype(np.float32)
    if with_next:
        keep = np.ones(len(obs), bool)
    else:
        # without next_observations a time-limit end has no s' and is dropped (D4RL's qlearning_dataset)
        truncated = np.concatenate([ep["truncations"] for ep in episodes])
        keep = ~truncated
        kept_lengths = [len(ep["actions"]) - (not ep["terminations"][-1]) for ep in episodes]
        dones = np.concatenate([np.r_[np.zeros(k - 1), 1.0] for k in kept_lengths])
        next_obs = np.where(terminated[:, None] == 1.0, obs, next_obs)  # terminal s' is a placeholder: s itself
    assert len(data) == keep.sum()
    np.testing.assert_allclose(data.observations.numpy(), obs[keep], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(data.next_observations.numpy(), next_obs[keep], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(data.dones.numpy(), dones)
    np.testing.assert_array_equal(data.terminals.numpy(), terminated[keep])
    assert data.dones.sum() == len(episodes)
    # away from episode ends, s' is the next row's s: the flat layout never links two episodes
    inner = data.dones[:-1] == 0
    assert torch.equal(data.next_observations[:-1][inner], data.observations[1:][inner])


def test_file_actions_clipped_and_antmaze_shift(tmp_path):
    path = str(tmp_path / "wide.npz")
    write_d4rl_file(path, "Hopper-v5", num_episodes=2, max_steps=20)
    with np.load(path) as f:
        raw = {k: f[k] for k in f.files}
    raw["actions"] = raw["actions"] * 1.05  # just out of the [-1, 1] box: within ACTION_TOLERANCE, so clipped
    np.savez(path, **raw)
    data = load_dataset(path, env_id="Hopper-v5")
    assert data.actions.abs().max().item() == pytest.approx(ACTION_CLIP, abs=1e-7)
    assert (data.actions.abs() >= ACTION_CLIP - 1e-7).sum() > 0
    np.testing.assert_allclose(data.actions.numpy(), np.clip(raw["actions"], -ACTION_CLIP, ACTION_CLIP), rtol=1e-6)
    np.testing.assert_allclose(data.rewards.numpy(), raw["rewards"], rtol=1e-6)  # no shift outside antmaze

    # the same layout evaluated in an antmaze env: rewards become r - 1 (D4RL antmaze convention)
    ant = str(tmp_path / "antmaze.hdf5")
    episodes = write_d4rl_file(ant, "AntMaze_UMaze-v5", num_episodes=2, max_steps=6)
    data = load_dataset(ant, env_id="AntMaze_UMaze-v5")
    np.testing.assert_allclose(data.rewards.numpy(), np.concatenate([ep["rewards"] for ep in episodes]) - 1.0)
    assert data.make_env(0).observation_space.shape == (data.obs_dim,)


def test_ogbench_relabelled_rewards_masks_and_boundaries(tmp_path):
    dataset_dir = str(tmp_path / "ogbench")
    episodes = write_ogbench_dataset(dataset_dir, OGBENCH_NAME, num_episodes=3, episode_length=40)
    # move a few rows onto the task's goal so OGBench's relabelling produces successes (r = 0, mask = 0)
    env = gym.make("pointmaze-medium-singletask-v0")
    env.reset(seed=0)
    goal = np.asarray(env.unwrapped.cur_goal_xy, np.float32)
    path = os.path.join(dataset_dir, "pointmaze-medium-navigate-v0.npz")
    with np.load(path) as f:
        raw = {k: f[k] for k in f.files}
    assert set(raw) == {"observations", "actions", "terminals", "qpos", "qvel"} and raw["terminals"].dtype == bool
    goal_rows = [5, 50, 90]
    raw["qpos"][goal_rows, :2] = goal
    np.savez_compressed(path, **raw)

    data = load_dataset(OGBENCH_NAME, dataset_dir=dataset_dir)
    assert data.metric == "success" and data.normalize_score is None
    assert len(data) == 3 * (40 - 1)  # OGBench drops each episode's last row (it has no next observation)
    kept = np.flatnonzero(~raw["terminals"])
    success = np.isin(kept, goal_rows).astype(np.float32)
    np.testing.assert_array_equal(data.rewards.numpy(), success - 1.0)
    np.testing.assert_array_equal(data.masks.numpy(), 1.0 - success)
    np.testing.assert_array_equal(data.terminals.numpy(), success)
    obs, next_obs, dones = raw_transitions([dict(observations=ep["observations"][:-1]) for ep in episodes])
    np.testing.assert_allclose(data.observations.numpy(), obs, rtol=1e-6)
    np.testing.assert_allclose(data.next_observations.numpy(), next_obs, rtol=1e-6)
    np.testing.assert_array_equal(data.dones.numpy(), dones)

    env = data.make_env(0)
    _, _, _, _, info = env.step(env.action_space.sample())
    assert success_from_info(info) == 0.0 and success_from_info({"success": True}) == 1.0
    env.close()


def test_sample_is_a_batch_of_dataset_rows(minari_root):
    write_minari_dataset(minari_root, "test/hopper/random-v0", "Hopper-v5", num_episodes=3, max_steps=20)
    data = load_dataset("test/hopper/random-v0", dataset_dir=minari_root)
    batch = data.sample(64)
    assert set(batch) == set(TRANSITION_KEYS)
    assert batch["observations"].shape == (64, 11) and batch["rewards"].shape == (64,)
    rows = torch.cat([data.observations, data.actions, data.rewards[:, None], data.next_observations], 1)
    sampled = torch.cat([batch["observations"], batch["actions"], batch["rewards"][:, None], batch["next_observations"]], 1)
    assert all((rows == row).all(1).any() for row in sampled)


def test_missing_datasets_end_with_one_line(tmp_path, minari_root):
    empty = str(tmp_path / "empty")
    with pytest.raises(SystemExit) as e:
        load_dataset("mujoco/hopper/medium-v0", dataset_dir=empty)
    message = str(e.value)
    assert "\n" not in message and message.startswith("error:")
    assert "mujoco/hopper/medium-v0" in message and empty in message and "minari download mujoco/hopper/medium-v0" in message

    with pytest.raises(SystemExit) as e:
        load_dataset("antmaze-large-navigate-singletask-v0", dataset_dir=empty)
    message = str(e.value)
    assert "\n" not in message and "antmaze-large-navigate-v0" in message and empty in message
    assert "ogbench.download_datasets(['antmaze-large-navigate-v0']" in message

    with pytest.raises(SystemExit, match="not found"):
        load_dataset(str(tmp_path / "mine.hdf5"), env_id="Hopper-v5")
    path = str(tmp_path / "mine.npz")
    write_d4rl_file(path, "Hopper-v5", num_episodes=1, max_steps=5)
    with pytest.raises(SystemExit, match="needs --env-id"):
        load_dataset(path)
    with pytest.raises(SystemExit, match="observations but Pendulum-v1"):
        load_dataset(path, env_id="Pendulum-v1")


def test_incompatible_options_end_with_one_line(tmp_path):
    with pytest.raises(SystemExit, match="--env-id is only for dataset files"):
        load_dataset("mujoco/hopper/medium-v0", env_id="Hopper-v5", dataset_dir=str(tmp_path))
    with pytest.raises(SystemExit, match="not an OGBench single-task name"):
        load_dataset("antmaze-large-navigate-v0", source="ogbench", dataset_dir=str(tmp_path))
    with pytest.raises(SystemExit, match="unknown dataset source"):
        load_dataset("x", source="d4rl")
