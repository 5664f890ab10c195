"""Benchmarks comparable with the papers: D4RL reference scores, Minari's D4RL AntMaze, notices, OGBench's val split."""

import copy
import os
from types import SimpleNamespace

import gymnasium as gym
import gymnasium_robotics
import h5py
import numpy as np
import pytest
import torch

from common.datasets import ACTION_CLIP, D4RL_REF_SCORES, _d4rl_antmaze_env, load_dataset
from tests.fixtures import write_d4rl_file, write_minari_dataset, write_ogbench_dataset


def test_d4rl_reference_table_matches_d4rl_infos():
    """Spot values copied from d4rl/infos.py (REF_MIN_SCORE, REF_MAX_SCORE) and the table's coverage."""
    assert D4RL_REF_SCORES["hopper-medium-v2"] == (-20.272305, 3234.3)
    assert D4RL_REF_SCORES["halfcheetah-medium-expert-v2"] == (-280.178953, 12135.0)
    assert D4RL_REF_SCORES["walker2d-medium-replay-v2"] == (1.629008, 4592.3)
    assert D4RL_REF_SCORES["ant-random-v0"] == (-325.6, 3879.7)
    assert D4RL_REF_SCORES["pen-human-v1"] == (96.262799, 3076.8331017826877)
    assert D4RL_REF_SCORES["hammer-cloned-v0"] == (-274.856578, 12794.134825156867)
    assert D4RL_REF_SCORES["door-expert-v1"] == (-56.512833, 2880.5693087298737)
    assert D4RL_REF_SCORES["relocate-human-v1"] == (-6.425911, 4233.877797728884)
    assert D4RL_REF_SCORES["antmaze-large-diverse-v2"] == (0.0, 1.0) == D4RL_REF_SCORES["antmaze-umaze-v0"]
    assert D4RL_REF_SCORES["kitchen-mixed-v0"] == (0.0, 4.0)
    for task in ("halfcheetah", "hopper", "walker2d"):
        for kind in ("random", "medium", "medium-replay", "medium-expert", "expert"):
            assert f"{task}-{kind}-v2" in D4RL_REF_SCORES
    for maze in ("umaze", "umaze-diverse", "medium-play", "medium-diverse", "large-play", "large-diverse"):
        assert f"antmaze-{maze}-v0" in D4RL_REF_SCORES and f"antmaze-{maze}-v2" in D4RL_REF_SCORES
    assert len(D4RL_REF_SCORES) == 4 * (5 * 3 + 2) + 12 + 4 * 3 * 2 + 3


@pytest.fixture(scope="module")
def hopper_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("d4rl") / "hopper-medium-v2.hdf5")
    write_d4rl_file(path, "Hopper-v5", num_episodes=2, max_steps=10)
    return path


def test_d4rl_named_file_reports_the_normalized_score(hopper_file, capsys):
    data = load_dataset(hopper_file, env_id="Hopper-v5")
    assert data.metric == "normalized_score"
    assert data.normalize_score(3234.3) == pytest.approx(100.0) and data.normalize_score(-20.272305) == pytest.approx(0.0)
    assert data.normalize_score(1607.0) == pytest.approx(100 * (1607.0 + 20.272305) / (3234.3 + 20.272305))
    assert "note:" not in capsys.readouterr().out


def test_explicit_d4rl_name_scores_any_file(tmp_path, hopper_file, capsys):
    path = str(tmp_path / "mine.npz")
    with h5py.File(hopper_file, "r") as f:
        np.savez(path, **{k: f[k][()] for k in f.keys()})
    data = load_dataset(path, env_id="Hopper-v5", d4rl_name="hopper-expert-v2")
    assert data.metric == "normalized_score" and data.normalize_score(3234.3) == pytest.approx(100.0)

    data = load_dataset(path, env_id="Hopper-v5")  # 'mine' is no D4RL name: raw return, said once
    assert data.metric == "return" and data.normalize_score is None
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "no D4RL reference scores" in notes[0] and path in notes[0]

    with pytest.raises(SystemExit) as e:
        load_dataset(path, env_id="Hopper-v5", d4rl_name="hoper-medium-v2")
    assert str(e.value).startswith("error:") and "\n" not in str(e.value) and "hopper-medium-v2" in str(e.value)
    with pytest.raises(SystemExit, match="a walker2d dataset, but evaluated in Hopper-v5"):
        load_dataset(path, env_id="Hopper-v5", d4rl_name="walker2d-medium-v2")
    with pytest.raises(SystemExit, match="only for dataset files"):
        load_dataset("mujoco/hopper/medium-v0", d4rl_name="hopper-medium-v2", dataset_dir=str(tmp_path))


# Minari's D4RL AntMaze umaze: the data's maze (its generation script's map, reset r below the goal g) and the
# evaluation spec's map (its EVAL_ENV_MAPS["umaze"]), which is the data's turned 180 degrees (Minari issue #304).
DATA_UMAZE = [[1, 1, 1, 1, 1], [1, "g", 0, 0, 1], [1, 1, 1, 0, 1], [1, "r", 0, 0, 1], [1, 1, 1, 1, 1]]
EVAL_UMAZE = [[1, 1, 1, 1, 1], [1, 0, 0, "r", 1], [1, 0, 1, 1, 1], [1, 0, 0, "g", 1], [1, 1, 1, 1, 1]]
# D4RL's medium maze as the eval spec stores it: the same walls as gymnasium-robotics' MEDIUM_MAZE (no turn needed)
EVAL_MEDIUM = [
    [1, 1, 1, 1, 1, 1, 1, 1],
    [1, "r", 0, 1, 1, 0, 0, 1],
    [1, 0, 0, 1, 0, 0, 0, 1],
    [1, 1, 0, 0, 0, 1, 1, 1],
    [1, 0, 0, 1, 0, 0, 0, 1],
    [1, 0, 1, 0, 0, 1, 0, 1],
    [1, 0, 0, 0, 1, 0, "g", 1],
    [1, 1, 1, 1, 1, 1, 1, 1],
]


def teleport_to_goal(env):
    """Put the ant (at rest) on the current goal of an AntMaze env."""
    maze_env = env.unwrapped
    qpos = maze_env.data.qpos.copy()
    qpos[:2] = maze_env.goal
    maze_env.ant_env.set_state(qpos, np.zeros_like(maze_env.data.qvel))


@pytest.fixture(scope="module")
def d4rl_antmaze(tmp_path_factory):
    """A 2-episode D4RL/antmaze/umaze-v1 recorded in the real AntMaze env set up as Minari's generation script does
    (continuing task, goal kept) and written by Minari's create_dataset_from_buffers (its DataCollector needs jax);
    the ant is put on the goal at step 10 of each episode and rests there."""
    import minari
    from minari.data_collector.episode_buffer import EpisodeBuffer

    root = str(tmp_path_factory.mktemp("minari"))
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = root
    gym.register_envs(gymnasium_robotics)
    env = gym.make("AntMaze_UMaze-v4", maze_map=DATA_UMAZE, continuing_task=True, reset_target=False, max_episode_steps=25)
    env.action_space.seed(0)
    buffers = []
    for episode in range(2):
        obs, _ = env.reset(seed=episode)
        steps = dict(observations=[obs], actions=[], rewards=[], terminations=[], truncations=[])
        for step in range(25):
            if step == 10:
                teleport_to_goal(env)
            action = np.zeros(8, np.float32) if step >= 10 else env.action_space.sample()
            obs, reward, terminated, truncated, _ = env.step(action)
            for key, value in zip(steps, (obs, action, reward, terminated, truncated)):
                steps[key].append(value)
            if terminated or truncated:
                break
        observations = {k: np.stack([o[k] for o in steps["observations"]]) for k in obs}
        buffers.append(
            EpisodeBuffer(observations=observations, **{k: np.asarray(v) for k, v in steps.items() if k != "observations"})
        )
    eval_spec = copy.deepcopy(env.spec)
    eval_spec.kwargs["maze_map"] = EVAL_UMAZE
    minari.create_dataset_from_buffers(
        "D4RL/antmaze/umaze-v1",
        buffers,
        env=env,
        eval_env=eval_spec,
        algorithm_name="random, put on the goal",
        author="tests",
        author_email="tests@example.com",
        code_permalink="tests/test_datasets_benchmarks.py",
        description="tiny test fixture",
    )
    env.close()
    rewards = np.concatenate([ep.rewards for ep in minari.load_dataset("D4RL/antmaze/umaze-v1").iterate_episodes()])
    yield root, rewards
    if old is None:
        os.environ.pop("MINARI_DATASETS_PATH")
    else:
        os.environ["MINARI_DATASETS_PATH"] = old


def test_minari_d4rl_antmaze_goal_transitions_are_terminal(d4rl_antmaze):
    root, rewards = d4rl_antmaze
    assert 0 < (rewards == 1).sum() < len(rewards)  # some steps at the goal, some not
    data = load_dataset("D4RL/antmaze/umaze-v1", dataset_dir=root)
    np.testing.assert_array_equal(data.rewards.numpy(), rewards - 1.0)  # r - 1 (IQL/FQL)
    np.testing.assert_array_equal(data.terminals.numpy(), (rewards == 1).astype(np.float32))
    np.testing.assert_array_equal(data.masks.numpy(), (rewards != 1).astype(np.float32))
    assert data.dones.sum() == 2  # episode boundaries are unchanged


def test_minari_d4rl_antmaze_evaluates_in_the_data_maze_until_the_goal(d4rl_antmaze):
    root, _ = d4rl_antmaze
    data = load_dataset("D4RL/antmaze/umaze-v1", dataset_dir=root)
    assert data.metric == "success"
    env = data.make_env(0)
    maze_env = env.unwrapped
    assert maze_env.maze.maze_map == DATA_UMAZE  # the data's maze and goal cell, not the turned evaluation map
    goal_xy = maze_env.maze.cell_rowcol_to_xy(np.array([1, 1]))
    np.testing.assert_allclose(maze_env.maze.unique_goal_locations, [goal_xy])
    assert np.abs(maze_env.goal - goal_xy).max() <= 0.25 * 4  # goal noise: +-0.25 of a 4-unit cell
    assert env.spec.max_episode_steps == 700 and maze_env.continuing_task is False

    _, reward, terminated, _, info = env.step(np.zeros(8, np.float32))
    assert not terminated and reward == 0.0 and not info["success"]
    teleport_to_goal(env)
    _, reward, terminated, _, info = env.step(np.zeros(8, np.float32))
    assert terminated and reward == 1.0 and info["success"]  # the episode ends at the goal, as in D4RL
    episode_return = float(info["episode"]["r"])
    assert episode_return == 1.0 and data.normalize_score(episode_return) == pytest.approx(100.0)
    assert data.normalize_score(0.3) == pytest.approx(30.0)  # mean return over episodes = success rate
    env.close()


def test_d4rl_antmaze_maps_are_matched_by_walls():
    """The evaluation map is used as is when its walls are the data's (medium, large), turned 180 degrees when that
    makes them so (umaze), and refused otherwise."""
    gym.register_envs(gymnasium_robotics)
    medium_spec = gym.spec("AntMaze_Medium-v4")
    umaze_spec = copy.deepcopy(gym.spec("AntMaze_UMaze-v4"))
    umaze_spec.kwargs["maze_map"] = DATA_UMAZE

    def fake_dataset(data_spec, eval_map):
        eval_spec = copy.deepcopy(data_spec)
        eval_spec.kwargs["maze_map"] = eval_map
        return SimpleNamespace(env_spec=data_spec, recover_environment=lambda eval_env: gym.make(eval_spec))

    env = _d4rl_antmaze_env(fake_dataset(medium_spec, EVAL_MEDIUM), "D4RL/antmaze/medium-play-v1")()
    assert env.unwrapped.maze.maze_map == EVAL_MEDIUM and env.spec.max_episode_steps == 1000
    env.close()
    env = _d4rl_antmaze_env(fake_dataset(umaze_spec, EVAL_UMAZE), "D4RL/antmaze/umaze-v1")()
    assert env.unwrapped.maze.maze_map == DATA_UMAZE
    env.close()
    with pytest.raises(SystemExit, match="neither as is nor turned 180 degrees"):
        _d4rl_antmaze_env(fake_dataset(medium_spec, EVAL_UMAZE), "D4RL/antmaze/medium-play-v1")


def test_d4rl_antmaze_files_are_refused_with_the_reason(tmp_path):
    """D4RL's own AntMaze hdf5 (29-d qpos+qvel, no goal) is not silently fed to Gymnasium's 31-d AntMaze."""
    path = str(tmp_path / "antmaze-umaze-v2.hdf5")
    n = 20
    with h5py.File(path, "w") as f:
        for key, value in dict(
            observations=np.random.default_rng(0).normal(size=(n, 29)).astype(np.float32),
            actions=np.zeros((n, 8), np.float32),
            rewards=np.zeros(n, np.float32),
            terminals=np.zeros(n, bool),
            timeouts=np.arange(n) == n - 1,
        ).items():
            f.create_dataset(key, data=value)
    with pytest.raises(SystemExit) as e:
        load_dataset(path, env_id="AntMaze_UMaze-v5")
    message = str(e.value)
    assert message.startswith("error:") and "\n" not in message
    assert path in message and "29-d qpos and qvel" in message and "D4RL/antmaze" in message


def test_minari_mujoco_datasets_say_once_that_they_are_not_d4rl(tmp_path, monkeypatch, capsys):
    root = str(tmp_path / "minari")
    monkeypatch.setenv("MINARI_DATASETS_PATH", root)
    write_minari_dataset(
        root, "mujoco/hopper/medium-v0", "Hopper-v5", num_episodes=2, max_steps=8, ref_min_score=-20.0, ref_max_score=3000.0
    )
    capsys.readouterr()
    data = load_dataset("mujoco/hopper/medium-v0", dataset_dir=root)
    assert data.metric == "normalized_score"  # Minari's own reference scores
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "not D4RL's" in notes[0] and "hopper-medium-v2.hdf5" in notes[0]

    write_minari_dataset(root, "test/hopper/medium-v0", "Hopper-v5", num_episodes=2, max_steps=8)
    capsys.readouterr()
    load_dataset("test/hopper/medium-v0", dataset_dir=root)
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "no reference scores" in notes[0]  # no D4RL notice outside mujoco/*


def test_ogbench_validation_split_is_the_val_file_processed_alike(tmp_path):
    dataset_dir = str(tmp_path / "ogbench")
    name = "pointmaze-medium-navigate-singletask-v0"
    train_episodes = write_ogbench_dataset(dataset_dir, name, num_episodes=2, episode_length=30)
    path = os.path.join(dataset_dir, "pointmaze-medium-navigate-v0-val.npz")
    with np.load(path) as f:
        raw = {k: f[k] for k in f.files}
    env = gym.make("pointmaze-medium-singletask-v0")
    env.reset(seed=0)
    goal_rows = [3, 40]  # put two val rows on the task's goal: relabelled successes (reward 0, mask 0)
    raw["qpos"][goal_rows, :2] = np.asarray(env.unwrapped.cur_goal_xy, np.float32)
    env.close()
    np.savez_compressed(path, **raw)

    data = load_dataset(name, dataset_dir=dataset_dir)
    val = data.validation
    assert val is not None and val.validation is None and len(val) == len(data) == 2 * (30 - 1)
    assert val.metric == data.metric == "success" and val.make_env is data.make_env
    kept = np.flatnonzero(~raw["terminals"])  # OGBench drops each episode's last row
    np.testing.assert_allclose(val.observations.numpy(), raw["observations"][kept], rtol=1e-6)
    np.testing.assert_allclose(val.actions.numpy(), np.clip(raw["actions"][kept], -ACTION_CLIP, ACTION_CLIP), rtol=1e-6)
    success = np.isin(kept, goal_rows).astype(np.float32)
    np.testing.assert_array_equal(val.rewards.numpy(), success - 1.0)
    np.testing.assert_array_equal(val.masks.numpy(), 1.0 - success)
    np.testing.assert_array_equal(val.terminals.numpy(), success)
    assert val.dones.sum() == 2
    assert not torch.equal(val.observations, data.observations)  # a different split, not a copy of train
    np.testing.assert_allclose(data.observations[0].numpy(), train_episodes[0]["observations"][0], rtol=1e-6)


def test_d4rl_antmaze_scores_are_not_given_to_files(tmp_path):
    path = str(tmp_path / "my_antmaze.npz")
    write_d4rl_file(path, "AntMaze_UMaze-v5", num_episodes=1, max_steps=5)
    with pytest.raises(SystemExit, match="need D4RL's evaluation task"):
        load_dataset(path, env_id="AntMaze_UMaze-v5", d4rl_name="antmaze-umaze-v2")


def test_d4rl_scored_files_evaluate_over_d4rl_episode_limits(tmp_path, capsys):
    """D4RL's pen episodes last 100 steps (its registration), AdroitHandPen-v1's 200: returns, and so normalized
    scores, are only comparable over D4RL's limit."""
    path = str(tmp_path / "pen-human-v1.npz")
    write_d4rl_file(path, "AdroitHandPen-v1", num_episodes=1, max_steps=5)
    capsys.readouterr()
    data = load_dataset(path, env_id="AdroitHandPen-v1")
    assert data.metric == "normalized_score"
    env = data.make_env(0)
    assert env.spec.max_episode_steps == 100
    env.close()
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "D4RL's 100 steps" in notes[0]

    hopper = str(tmp_path / "hopper-medium-v2.npz")
    write_d4rl_file(hopper, "Hopper-v5", num_episodes=1, max_steps=5)
    data = load_dataset(hopper, env_id="Hopper-v5")
    assert data.make_env(0).spec.max_episode_steps == 1000
    assert "note:" not in capsys.readouterr().out  # the same limit: nothing to say
