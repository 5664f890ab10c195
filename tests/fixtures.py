"""Tiny offline datasets written in the libraries' real on-disk formats, for tests (shared with fino.py's tests).

- `write_minari_dataset`: a Minari dataset made with Minari's own `create_dataset_from_buffers` from
  random-action episodes on a real Gymnasium env (DataCollector would need jax);
- `write_ogbench_dataset`: `{name}.npz` and `{name}-val.npz` in OGBench's key layout (observations,
  actions, terminals as bool, qpos, qvel; one row per step, `terminals` True on each episode's last
  row), from episodes on the real OGBench env, so `ogbench.make_env_and_datasets` can relabel them;
- `write_d4rl_file`: a flat D4RL-layout .npz or .hdf5 file (observations, actions, rewards,
  terminals, timeouts, optionally next_observations).
Each returns the raw episodes (observations include the final one) so tests can compare exactly.
`FiveRows` is a five-transition dataset in memory, for fino.py's replay buffer.
"""

import os

import gymnasium as gym
import numpy as np
import torch


def rollout(env: gym.Env, num_episodes: int, max_steps: int, seed: int = 0) -> list[dict]:
    """Uniformly random-action episodes, cut after `max_steps` steps (marked as truncation).

    Each episode: observations (T + 1, ...), actions, rewards, terminations, truncations (T,), and
    infos (the list of per-step info dicts).
    """
    env.action_space.seed(seed)
    episodes = []
    for i in range(num_episodes):
        obs, _ = env.reset(seed=seed + i)
        ep = dict(observations=[obs], actions=[], rewards=[], terminations=[], truncations=[], infos=[])
        for step in range(max_steps):
            action = env.action_space.sample()
            obs, reward, terminated, truncated, info = env.step(action)
            truncated = truncated or (step == max_steps - 1 and not terminated)
            for key, value in zip(
                ("observations", "actions", "rewards", "terminations", "truncations", "infos"),
                (obs, action, reward, terminated, truncated, info),
            ):
                ep[key].append(value)
            if terminated or truncated:
                break
        episodes.append(ep)
    return episodes


def _register_robotics(env_id: str) -> None:
    """Register gymnasium-robotics' ids (AntMaze, Adroit, ...) when `env_id` is not yet known."""
    if env_id not in gym.registry:
        import gymnasium_robotics

        gym.register_envs(gymnasium_robotics)


def _stack(values: list):
    """Stack per-step values; dicts (Dict observations) are stacked per key."""
    if isinstance(values[0], dict):
        return {k: _stack([v[k] for v in values]) for k in values[0]}
    return np.stack(values)


def write_minari_dataset(
    root: str,
    dataset_id: str,
    env_id: str,
    num_episodes: int = 4,
    max_steps: int = 30,
    seed: int = 0,
    ref_min_score: float | None = None,
    ref_max_score: float | None = None,
    **make_kwargs,
) -> list[dict]:
    """Create a Minari dataset `dataset_id` under `root` (sets MINARI_DATASETS_PATH) with Minari's own API."""
    import minari
    from minari.data_collector.episode_buffer import EpisodeBuffer  # a plain dataclass; no jax needed

    os.environ["MINARI_DATASETS_PATH"] = root
    _register_robotics(env_id)
    env = gym.make(env_id, **make_kwargs)
    episodes = rollout(env, num_episodes, max_steps, seed)
    buffer = [
        EpisodeBuffer(
            observations=_stack(ep["observations"]),
            actions=np.stack(ep["actions"]),
            rewards=np.asarray(ep["rewards"], np.float64),
            terminations=np.asarray(ep["terminations"]),
            truncations=np.asarray(ep["truncations"]),
        )
        for ep in episodes
    ]
    minari.create_dataset_from_buffers(
        dataset_id,
        buffer,
        env=env,
        eval_env=env.spec,
        algorithm_name="uniform random",
        author="tests",
        author_email="tests@example.com",
        code_permalink="tests/fixtures.py",
        description="tiny test fixture",
        ref_min_score=ref_min_score,
        ref_max_score=ref_max_score,
    )
    env.close()
    return episodes


def write_ogbench_dataset(
    dataset_dir: str,
    name: str = "pointmaze-medium-navigate-singletask-v0",
    num_episodes: int = 3,
    episode_length: int = 40,
    seed: int = 0,
) -> list[dict]:
    """Write OGBench's train and val .npz files for the single-task `name` into `dataset_dir`.

    Rows follow OGBench's data-generation scripts: per step the observation before the action, the
    action, `terminals` (True on an episode's last row), and the MuJoCo state before the action
    (info['prev_qpos'], info['prev_qvel']), which OGBench uses to relabel rewards. The episode's
    final observation is not stored, so the loader keeps episode_length - 1 transitions per episode.
    """
    import ogbench

    env = ogbench.make_env_and_datasets(name, env_only=True)
    splits = name.split("-")
    pos = splits.index("singletask")
    file_name = "-".join(splits[:pos] + splits[-1:])
    os.makedirs(dataset_dir, exist_ok=True)
    all_episodes = []
    for suffix, split_seed in (("", seed), ("-val", seed + 1000)):
        episodes = rollout(env, num_episodes, episode_length, split_seed)
        rows = dict(observations=[], actions=[], terminals=[], qpos=[], qvel=[])
        for ep in episodes:
            t_len = len(ep["actions"])
            rows["observations"].append(np.stack(ep["observations"][:-1]).astype(np.float32))
            rows["actions"].append(np.stack(ep["actions"]).astype(np.float32))
            rows["terminals"].append(np.arange(t_len) == t_len - 1)
            rows["qpos"].append(np.stack([info["prev_qpos"] for info in ep["infos"]]).astype(np.float32))
            rows["qvel"].append(np.stack([info["prev_qvel"] for info in ep["infos"]]).astype(np.float32))
        np.savez_compressed(
            os.path.join(dataset_dir, f"{file_name}{suffix}.npz"), **{k: np.concatenate(v) for k, v in rows.items()}
        )
        if suffix == "":
            all_episodes = episodes
    env.close()
    return all_episodes


def write_d4rl_file(
    path: str, env_id: str, num_episodes: int = 4, max_steps: int = 30, seed: int = 0, next_observations: bool = True
) -> list[dict]:
    """Write a flat D4RL-layout dataset (.npz or .hdf5) of random-action episodes on `env_id`."""
    _register_robotics(env_id)
    env = gym.make(env_id)
    episodes = rollout(env, num_episodes, max_steps, seed)
    env.close()
    for ep in episodes:  # the flat layout stores flat observations (Dict ones in FlattenObservation's order)
        ep["observations"] = [gym.spaces.flatten(env.observation_space, o) for o in ep["observations"]]
    data = dict(
        observations=np.concatenate([np.stack(ep["observations"][:-1]) for ep in episodes]),
        actions=np.concatenate([np.stack(ep["actions"]) for ep in episodes]),
        rewards=np.concatenate([ep["rewards"] for ep in episodes]),
        terminals=np.concatenate([ep["terminations"] for ep in episodes]),
        timeouts=np.concatenate([ep["truncations"] for ep in episodes]),
    )
    if next_observations:
        data["next_observations"] = np.concatenate([np.stack(ep["observations"][1:]) for ep in episodes])
    data = {k: np.asarray(v, np.bool_ if k in ("terminals", "timeouts") else np.float32) for k, v in data.items()}
    if path.endswith(".npz"):
        np.savez(path, **data)
    else:
        import h5py

        with h5py.File(path, "w") as f:
            for k, v in data.items():
                f.create_dataset(k, data=v)
    return episodes


class FiveRows:
    """Five transitions as fino.py's ReplayBuffer reads a dataset: observation i, next observation i + 1, zero
    actions, reward -1, mask 1."""

    observations, next_observations = torch.arange(5.0)[:, None], torch.arange(1.0, 6.0)[:, None]
    actions, rewards, masks = torch.zeros(5, 2), torch.full((5,), -1.0), torch.ones(5)

    def __len__(self):
        return 5
