"""Offline datasets: Minari (incl. the D4RL ports), OGBench single-task, and local D4RL-layout files.

`load_dataset(name, ...)` returns an `OfflineData`: flat transition tensors that live on the training
device (moved there once), an on-device `sample(batch_size)`, the evaluation env factory and the
evaluation metric. Conventions (fino.md Sec. 2.2, style-anchors.md Sec. 4.2):
- actions are in [-1, 1] (rescaled from the action space's bounds when those differ; the evaluation
  env is then wrapped in `RescaleAction` so it takes the same [-1, 1] actions) and clipped to
  +-(1 - 1e-5), as FQL does;
- `terminals` = the env terminated (no bootstrap), `masks` = the bootstrap mask, `dones` = the last
  transition of an episode (termination or time limit); no transition crosses an episode end;
- D4RL antmaze (a Minari id or an env id containing "antmaze"): rewards r - 1 (IQL/FQL convention);
- OGBench: rewards and masks exactly as `ogbench.make_env_and_datasets` relabels them for the
  `*-singletask-*` names (no shift); the metric is the success rate;
- Minari datasets with reference scores report the D4RL normalized score 100 (R - min) / (max - min).
Dict observations (e.g. Minari's AntMaze) are flattened in the observation space's key order, the
same order gymnasium's `FlattenObservation` uses on the evaluation env.
A dataset that is not on disk and may not be downloaded ends the program with one line saying which
dataset, where it was looked for and the command that downloads it.
"""

import os
import urllib.error
from dataclasses import dataclass
from typing import Callable

import gymnasium as gym
import numpy as np
import torch

ACTION_CLIP = 1.0 - 1e-5
"""Dataset actions are clipped to +-ACTION_CLIP (FQL's convention, keeps atanh-style maps finite)."""

TRANSITION_KEYS = ("observations", "actions", "rewards", "next_observations", "terminals", "masks", "dones")
FILE_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")
FILE_SUFFIXES = (".npz", ".hdf5", ".h5")
OGBENCH_DEFAULT_DIR = "~/.ogbench/data"


@dataclass
class OfflineData:
    observations: torch.Tensor
    """(N, obs_dim) float32, on the training device"""
    actions: torch.Tensor
    """(N, act_dim) float32 in [-1, 1], clipped to +-(1 - 1e-5)"""
    rewards: torch.Tensor
    """(N,) float32 (D4RL antmaze: r - 1; OGBench: as relabelled)"""
    next_observations: torch.Tensor
    """(N, obs_dim) float32; a placeholder (= observations) where the env terminated and nothing follows"""
    terminals: torch.Tensor
    """(N,) float32, 1.0 where the env terminated (no bootstrap)"""
    masks: torch.Tensor
    """(N,) float32, bootstrap mask: 1 - terminals (OGBench: its own relabelled masks)"""
    dones: torch.Tensor
    """(N,) float32, 1.0 on the last transition of each episode (termination or time limit)"""
    name: str
    """the dataset id, OGBench name or file path"""
    metric: str
    """normalized_score (the dataset has reference scores), success (OGBench) or return"""
    make_env: Callable[[int], gym.Env]
    """seed -> seeded evaluation env taking actions in [-1, 1], wrapped in RecordEpisodeStatistics"""
    normalize_score: Callable[[float], float] | None = None
    """D4RL normalized score 100 (R - random) / (expert - random), when the dataset carries reference scores"""
    validation: "OfflineData | None" = None
    """a held-out split with the same fields (OGBench's `-val` file), for validation losses; None when there is none"""

    def __len__(self) -> int:
        return self.observations.shape[0]

    @property
    def obs_dim(self) -> int:
        return self.observations.shape[1]

    @property
    def act_dim(self) -> int:
        return self.actions.shape[1]

    def sample(self, batch_size: int) -> dict[str, torch.Tensor]:
        """A uniform random batch, drawn and gathered on the data's device (no host sync)."""
        idx = torch.randint(0, len(self), (batch_size,), device=self.observations.device)
        return {k: getattr(self, k)[idx] for k in TRANSITION_KEYS}


def success_from_info(info: dict) -> float:
    """OGBench's per-step success flag (read it at the episode's last step); 0.0 when absent."""
    return float(info.get("success", 0.0))


def is_ogbench_name(name: str) -> bool:
    """OGBench single-task names, e.g. antmaze-large-navigate-singletask-v0 or cube-single-play-singletask-task2-v0."""
    return "singletask" in name.split("-")


def load_dataset(
    name: str,
    source: str = "auto",
    dataset_dir: str | None = None,
    env_id: str | None = None,
    download: bool = False,
    device: str | torch.device = "cpu",
    d4rl_name: str | None = None,
) -> OfflineData:
    """Load an offline dataset as flat transitions on `device`.

    source: "minari" | "ogbench" | "file" | "auto" (a path that exists or ends in .npz/.hdf5/.h5 -> file;
    an OGBench single-task name -> ogbench; else minari). `dataset_dir` overrides where Minari
    (MINARI_DATASETS_PATH) and OGBench (~/.ogbench/data) look; `env_id` is the evaluation env of a file
    dataset; `download` allows fetching a missing Minari or OGBench dataset; `d4rl_name` names the D4RL dataset
    whose reference scores normalize a file dataset's returns (default: the file's base name, when it is one).
    """
    if source == "auto":
        if os.path.exists(name) or name.endswith(FILE_SUFFIXES):
            source = "file"
        elif is_ogbench_name(name):
            source = "ogbench"
        else:
            source = "minari"
    if env_id is not None and source != "file":
        raise SystemExit(f"error: --env-id is only for dataset files; the {source} dataset '{name}' brings its own env")
    if source == "minari":
        arrays, make_env, metric, normalize_score = _load_minari(name, dataset_dir, download)
    elif source == "ogbench":
        arrays, make_env, metric, normalize_score = _load_ogbench(name, dataset_dir, download)
    elif source == "file":
        arrays, make_env, metric, normalize_score = _load_file(name, env_id)
    else:
        raise SystemExit(f"error: unknown dataset source '{source}' (choose minari, ogbench, file or auto)")
    arrays["actions"] = np.clip(arrays["actions"], -ACTION_CLIP, ACTION_CLIP)
    tensors = {k: torch.as_tensor(np.ascontiguousarray(arrays[k], dtype=np.float32)).to(device) for k in TRANSITION_KEYS}
    return OfflineData(**tensors, name=name, metric=metric, make_env=make_env, normalize_score=normalize_score)


# ---------------------------------------------------------------------------------------------------
# shared helpers


def _flatten_batch(space: gym.Space, x) -> np.ndarray:
    """Flatten a batch of observations from a Box or (nested) Dict space to (T, dim), in the space's key order."""
    if isinstance(space, gym.spaces.Dict):
        return np.concatenate([_flatten_batch(sub, x[k]) for k, sub in space.spaces.items()], axis=-1)
    if isinstance(space, gym.spaces.Box):
        x = np.asarray(x)
        return x.reshape(x.shape[0], -1)
    raise SystemExit(f"error: unsupported observation space {space}; only Box and Dict of Box are supported")


def _action_normalizer(space: gym.Space) -> Callable[[np.ndarray], np.ndarray] | None:
    """Affine map from the action space's bounds to [-1, 1]; None when they already are +-1."""
    if not isinstance(space, gym.spaces.Box):
        raise SystemExit(f"error: unsupported action space {space}; continuous (Box) actions are required")
    low, high = space.low.astype(np.float64), space.high.astype(np.float64)
    if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
        raise SystemExit(f"error: the action space {space} is unbounded; a bounded Box is required")
    if np.all(low == -1.0) and np.all(high == 1.0):
        return None
    return lambda a: 2.0 * (a - low) / (high - low) - 1.0


def _eval_env(env: gym.Env, seed: int) -> gym.Env:
    """Flatten dict observations, rescale actions to [-1, 1] when needed, record episode statistics, seed."""
    if isinstance(env.observation_space, gym.spaces.Dict):
        env = gym.wrappers.FlattenObservation(env)
    if _action_normalizer(env.action_space) is not None:
        ones = np.ones(env.action_space.shape, np.float32)
        env = gym.wrappers.RescaleAction(env, -ones, ones)
    env = gym.wrappers.RecordEpisodeStatistics(env)
    env.action_space.seed(seed)
    env.reset(seed=seed)
    return env


def _make_gym_env(env_id: str) -> gym.Env:
    """gym.make, registering gymnasium-robotics' ids (AntMaze, Adroit, ...) on first need; one-line error otherwise."""
    try:
        try:
            return gym.make(env_id)
        except gym.error.NameNotFound:
            import gymnasium_robotics

            gym.register_envs(gymnasium_robotics)
            return gym.make(env_id)
    except gym.error.Error as e:
        raise SystemExit(f"error: cannot make environment '{env_id}': {e}") from None


def _episode_arrays(episodes: list[dict]) -> dict[str, np.ndarray]:
    """Concatenate per-episode transitions (each a dict of equal-length arrays) and mark each episode's last one."""
    arrays = {k: np.concatenate([ep[k] for ep in episodes]) for k in episodes[0]}
    dones = np.zeros(len(arrays["rewards"]), np.float32)
    dones[np.cumsum([len(ep["rewards"]) for ep in episodes]) - 1] = 1.0
    arrays["dones"] = dones
    return arrays


# ---------------------------------------------------------------------------------------------------
# Minari


def _load_minari(name: str, dataset_dir: str | None, download: bool):
    import minari
    from minari.storage.datasets_root_dir import get_dataset_path

    if dataset_dir is not None:
        os.environ["MINARI_DATASETS_PATH"] = os.path.abspath(os.path.expanduser(dataset_dir))  # Minari's own search location
    root = get_dataset_path()
    try:
        present = os.path.exists(os.path.join(get_dataset_path(name), "data"))
    except ValueError as e:
        raise SystemExit(f"error: '{name}' is not a Minari dataset id ({e})") from None
    if not present:
        command = f"MINARI_DATASETS_PATH={root} minari download {name}"
        if not download:
            raise SystemExit(
                f"error: Minari dataset '{name}' not found in {root}; download it with `{command}` or rerun with --dataset-download"
            )
        try:
            minari.download_dataset(name)
        except Exception as e:  # network, unknown id or incompatible version: one line, not a traceback
            raise SystemExit(
                f"error: cannot download Minari dataset '{name}' into {root} ({type(e).__name__}: {e}); try `{command}`"
            ) from None
    dataset = minari.load_dataset(name)

    normalize_action = _action_normalizer(dataset.action_space)
    episodes = []
    for ep in dataset.iterate_episodes():
        obs = _flatten_batch(dataset.observation_space, ep.observations)  # (T + 1, obs_dim): includes the final observation
        actions = np.asarray(ep.actions, np.float64).reshape(len(ep.rewards), -1)
        terminals = np.asarray(ep.terminations, np.float32)
        episodes.append(
            dict(
                observations=obs[:-1],
                next_observations=obs[1:],
                actions=normalize_action(actions) if normalize_action else actions,
                rewards=np.asarray(ep.rewards, np.float32),
                terminals=terminals,
                masks=1.0 - terminals,
            )
        )
    if not episodes:
        raise SystemExit(f"error: Minari dataset '{name}' has no episodes")
    arrays = _episode_arrays(episodes)
    if "antmaze" in name.lower():
        arrays["rewards"] = arrays["rewards"] - 1.0  # D4RL antmaze: r - 1 (IQL/FQL convention, fino.md Sec. 2.2)

    metadata = dataset.storage.metadata
    ref_min, ref_max = metadata.get("ref_min_score"), metadata.get("ref_max_score")
    if ref_min is not None and ref_max is not None:
        metric = "normalized_score"
        normalize_score = lambda ret: 100.0 * (ret - ref_min) / (ref_max - ref_min)  # D4RL's get_normalized_score x 100
    else:
        metric, normalize_score = "return", None
    make_env = lambda seed: _eval_env(dataset.recover_environment(eval_env=True), seed)
    return arrays, make_env, metric, normalize_score


# ---------------------------------------------------------------------------------------------------
# OGBench


def _load_ogbench(name: str, dataset_dir: str | None, download: bool):
    import ogbench

    splits = name.split("-")
    if "singletask" not in splits:
        raise SystemExit(
            f"error: '{name}' is not an OGBench single-task name (e.g. antmaze-large-navigate-singletask-v0); "
            "goal-conditioned OGBench datasets have no rewards"
        )
    pos = splits.index("singletask")
    file_name = "-".join(splits[:pos] + splits[-1:])  # the mapping ogbench.make_env_and_datasets uses
    dataset_dir = os.path.abspath(os.path.expanduser(dataset_dir or OGBENCH_DEFAULT_DIR))
    files = [os.path.join(dataset_dir, f"{file_name}{suffix}.npz") for suffix in ("", "-val")]
    if not all(os.path.exists(f) for f in files) and not download:
        command = f"python -c \"import ogbench; ogbench.download_datasets(['{file_name}'], '{dataset_dir}')\""
        raise SystemExit(
            f"error: OGBench dataset '{file_name}' (for {name}) not found in {dataset_dir}; "
            f"download it with `{command}` or rerun with --dataset-download"
        )
    try:
        env, train, _ = ogbench.make_env_and_datasets(name, dataset_dir=dataset_dir, compact_dataset=False)
    except gym.error.Error as e:
        raise SystemExit(f"error: cannot make the OGBench environment for '{name}': {e}") from None
    except (urllib.error.URLError, OSError) as e:
        raise SystemExit(f"error: cannot download OGBench dataset '{file_name}' into {dataset_dir} ({e})") from None
    env.close()
    # OGBench's `terminals` mark trajectory ends (dones); its relabelled `masks` = 1 - success are the
    # bootstrap masks, and success ends an online episode, so terminals = 1 - masks (fino.md Sec. 2.2).
    arrays = dict(
        observations=train["observations"],
        actions=train["actions"],
        rewards=train["rewards"],
        next_observations=train["next_observations"],
        terminals=1.0 - train["masks"],
        masks=train["masks"],
        dones=train["terminals"],
    )
    make_env = lambda seed: _eval_env(ogbench.make_env_and_datasets(name, env_only=True), seed)
    return arrays, make_env, "success", None


# ---------------------------------------------------------------------------------------------------
# local file in D4RL's flat layout


def _load_file(path: str, env_id: str | None):
    if env_id is None:
        raise SystemExit(f"error: the dataset file {path} needs --env-id (the Gymnasium id to evaluate in)")
    if not os.path.exists(path):
        raise SystemExit(f"error: dataset file {path} not found")
    if path.endswith(".npz"):
        with np.load(path) as f:
            raw = {k: f[k] for k in f.files}
    elif path.endswith((".hdf5", ".h5")):
        import h5py

        with h5py.File(path, "r") as f:
            raw = {k: f[k][()] for k in f.keys() if isinstance(f[k], h5py.Dataset)}
    else:
        raise SystemExit(f"error: dataset file {path} must end in {', '.join(FILE_SUFFIXES)}")
    missing = [k for k in FILE_KEYS if k not in raw]
    if missing:
        raise SystemExit(
            f"error: dataset file {path} lacks {', '.join(missing)} (D4RL layout: {', '.join(FILE_KEYS)}, optionally next_observations)"
        )

    def make_env(seed: int) -> gym.Env:
        return _eval_env(_make_gym_env(env_id), seed)

    probe = make_env(0)
    action_space, obs_dim = probe.action_space, int(np.prod(probe.observation_space.shape))
    probe.close()
    observations = raw["observations"].reshape(len(raw["observations"]), -1).astype(np.float64)
    if observations.shape[1] != obs_dim:
        raise SystemExit(
            f"error: dataset file {path} has {observations.shape[1]}-d observations but {env_id} has {obs_dim}-d ones"
        )
    n = len(observations)
    terminals = raw["terminals"].reshape(n).astype(bool)
    timeouts = raw["timeouts"].reshape(n).astype(bool)
    ends = terminals | timeouts
    ends[-1] = True  # the file's last row closes its episode
    if "next_observations" in raw:
        keep = np.ones(n, bool)
        next_observations = raw["next_observations"].reshape(n, -1)
    else:
        # D4RL's qlearning_dataset convention: s'_i = s_{i+1} inside an episode; a time-limit end has no
        # s' and is dropped; a terminal end keeps s' = s_i as a placeholder (its mask is 0).
        keep = terminals | ~ends
        next_observations = np.where(ends[:, None], observations, np.roll(observations, -1, axis=0))
    episode_id = np.concatenate([[0], np.cumsum(ends[:-1])])[keep]
    dones = np.append(episode_id[1:] != episode_id[:-1], True).astype(np.float32)
    actions = raw["actions"].reshape(n, -1).astype(np.float64)
    normalize_action = _action_normalizer(action_space)
    rewards = raw["rewards"].reshape(n).astype(np.float32)
    if "antmaze" in env_id.lower():
        rewards = rewards - 1.0  # D4RL antmaze: r - 1 (IQL/FQL convention)
    terminals = terminals.astype(np.float32)
    arrays = dict(
        observations=observations[keep],
        next_observations=next_observations[keep],
        actions=(normalize_action(actions) if normalize_action else actions)[keep],
        rewards=rewards[keep],
        terminals=terminals[keep],
        masks=1.0 - terminals[keep],
        dones=dones,
    )
    return arrays, make_env, "return", None
