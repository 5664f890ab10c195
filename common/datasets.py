"""Offline datasets: Minari (incl. the D4RL ports), OGBench single-task, and local D4RL-layout files.

`load_dataset(name, ...)` returns an `OfflineData`: flat transition tensors that live on the training
device (moved there once), an on-device `sample(batch_size)`, the evaluation env factory and the
evaluation metric. Conventions (those of FQL's and IQL's loaders unless marked [ours]):
- actions are in [-1, 1] (rescaled from the action space's bounds when those differ; the evaluation
  env is then wrapped in `RescaleAction` so it takes the same [-1, 1] actions) and clipped to
  +-(1 - 1e-5), as FQL does;
- `terminals` = the env terminated (no bootstrap), `masks` = the bootstrap mask, `dones` = the last
  transition of an episode (termination or time limit); no transition crosses an episode end;
- D4RL antmaze (a Minari id or an env id containing "antmaze"): rewards r - 1 (IQL/FQL convention);
  Minari's `D4RL/antmaze/*` also get terminals = (r == 1) (masks 0 at the goal, as D4RL's files and
  IQL's/FQL's loaders have it), evaluation in the data's maze with D4RL's fixed reset and goal cells,
  ending at the goal (`_d4rl_antmaze_env`), and metric success with normalized score = 100 x success;
- OGBench: rewards and masks exactly as `ogbench.make_env_and_datasets` relabels them for the
  `*-singletask-*` names (no shift); the metric is the success rate;
- the D4RL normalized score 100 (R - min) / (max - min): a file named like a D4RL dataset (or given
  `d4rl_name`) uses D4RL's own reference scores (D4RL_REF_SCORES, from d4rl/infos.py), a Minari dataset
  the reference scores in its metadata; with none, one note says so and the raw return is reported.
Dict observations (e.g. Minari's AntMaze) are flattened in the observation space's key order, the
same order gymnasium's `FlattenObservation` uses on the evaluation env.
A dataset that is not on disk and may not be downloaded ends the program with one line saying which
dataset, where it was looked for and the command that downloads it.
Every dataset is checked once at load, whatever its source: required arrays present, numeric, equal
lengths, at least one transition, finite (the key and first bad row are named), 0/1 flags, observation
and action dimensions equal to the evaluation env's, actions inside its bounds up to ACTION_TOLERANCE
(clipped, with a note) or refused beyond it; a file that cannot be opened or parsed is named with the
reason. Each finding is one `error:` line (SystemExit), never a traceback or a silent NaN run.
Actions further out usually mean data in other units (wrong env, unscaled actions), hence the refusal;
raw samples of a Gaussian policy, which the simulator clips, are the other case: `clip_actions=True`
(--clip-actions) clips every action to the bounds, as IQL's and CORL's loaders do, with one note counting
the clipped transitions and entries and the largest and mean excess.
"""

import difflib
import os
import zipfile
from dataclasses import dataclass
from typing import Callable

import gymnasium as gym
import numpy as np
import torch

ACTION_CLIP = 1.0 - 1e-5
"""Dataset actions are clipped to +-ACTION_CLIP (FQL's convention, keeps atanh-style maps finite)."""
ACTION_TOLERANCE = 0.1
"""[ours] Actions outside the env's bounds by at most this fraction of the half-range are clipped; further out is an error."""

TRANSITION_KEYS = ("observations", "actions", "rewards", "next_observations", "terminals", "masks", "dones")
FILE_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")
FILE_SUFFIXES = (".npz", ".hdf5", ".h5")
OGBENCH_DEFAULT_DIR = "~/.ogbench/data"


def _d4rl_reference_scores() -> dict[str, tuple[float, float]]:
    """D4RL's REF_MIN_SCORE / REF_MAX_SCORE (d4rl/infos.py) for the datasets offline-RL papers report on."""
    scores = {}
    locomotion = {  # random and expert policy returns; shared by every dataset of a task and by v0, v1 and v2
        "halfcheetah": (-280.178953, 12135.0),
        "hopper": (-20.272305, 3234.3),
        "walker2d": (1.629008, 4592.3),
        "ant": (-325.6, 3879.7),
    }
    for task, ref in locomotion.items():
        for kind in ("random", "medium", "expert", "medium-replay", "medium-expert"):
            scores.update({f"{task}-{kind}-{v}": ref for v in ("v0", "v1", "v2")})
        scores.update({f"{task}-full-replay-{v}": ref for v in ("v1", "v2")})
    for maze in ("umaze", "umaze-diverse", "medium-play", "medium-diverse", "large-play", "large-diverse"):
        scores.update({f"antmaze-{maze}-{v}": (0.0, 1.0) for v in ("v0", "v2")})  # sparse goal reward: return = success
    adroit = {
        "pen": (96.262799, 3076.8331017826877),
        "hammer": (-274.856578, 12794.134825156867),
        "door": (-56.512833, 2880.5693087298737),
        "relocate": (-6.425911, 4233.877797728884),
    }
    for task, ref in adroit.items():
        scores.update({f"{task}-{kind}-{v}": ref for kind in ("human", "cloned", "expert") for v in ("v0", "v1")})
    scores.update({f"kitchen-{kind}-v0": (0.0, 4.0) for kind in ("complete", "partial", "mixed")})  # 4 subtasks
    return scores


D4RL_REF_SCORES = _d4rl_reference_scores()
"""D4RL dataset name -> (REF_MIN_SCORE, REF_MAX_SCORE); normalized score = 100 (R - min) / (max - min)."""
D4RL_ENV_WORDS = {
    "halfcheetah": "halfcheetah",
    "hopper": "hopper",
    "walker2d": "walker2d",
    "ant": "ant-",
}
D4RL_ENV_WORDS |= {t: t for t in ("pen", "hammer", "door", "relocate", "kitchen")}
"""D4RL task -> the word its Gymnasium env id must contain (lower case), e.g. hopper -> Hopper-v5, pen -> AdroitHandPen-v1."""
D4RL_HORIZON = {t: 1000 for t in ("halfcheetah", "hopper", "walker2d", "ant")}
D4RL_HORIZON |= {"pen": 100, "hammer": 200, "door": 200, "relocate": 200, "kitchen": 280}
"""D4RL's episode limits (max_episode_steps of its env registrations); the returns its reference scores normalize."""


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
    """(N,) float32, 1.0 where the env terminated (no bootstrap); Minari D4RL/antmaze: where the goal was reached"""
    masks: torch.Tensor
    """(N,) float32, bootstrap mask: 1 - terminals (OGBench: its own relabelled masks)"""
    dones: torch.Tensor
    """(N,) float32, 1.0 on the last transition of each episode (termination or time limit)"""
    name: str
    """the dataset id, OGBench name or file path"""
    metric: str
    """normalized_score (reference scores apply: D4RL-named file, Minari metadata), success (OGBench, Minari
    D4RL/antmaze: normalize_score = 100 x success) or return"""
    make_env: Callable[[int], gym.Env]
    """seed -> seeded evaluation env taking actions in [-1, 1], wrapped in RecordEpisodeStatistics"""
    normalize_score: Callable[[float], float] | None = None
    """D4RL normalized score 100 (R - ref_min) / (ref_max - ref_min) of a mean return, when reference scores apply"""
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
    clip_actions: bool = False,
) -> OfflineData:
    """Load an offline dataset as flat transitions on `device`, validated once (see `_validate`).

    source: "minari" | "ogbench" | "file" | "auto" (a path that exists or ends in .npz/.hdf5/.h5 -> file;
    an OGBench single-task name -> ogbench; else minari). `dataset_dir` overrides where Minari
    (MINARI_DATASETS_PATH) and OGBench (~/.ogbench/data) look; `env_id` is the evaluation env of a file
    dataset; `download` allows fetching a missing Minari or OGBench dataset; `d4rl_name` names the D4RL dataset
    whose reference scores normalize a file dataset's returns (default: the file's base name, when it is one);
    `clip_actions` clips actions outside the env's bounds by any amount instead of refusing them beyond ACTION_TOLERANCE.
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
    if d4rl_name is not None and source != "file":
        raise SystemExit(f"error: a D4RL name is only for dataset files; the {source} dataset '{name}' brings its own scoring")
    if source == "minari":
        label, splits, raw_env, metric, normalize_score = _load_minari(name, dataset_dir, download)
    elif source == "ogbench":
        label, splits, raw_env, metric, normalize_score = _load_ogbench(name, dataset_dir, download)
    elif source == "file":
        label, splits, raw_env, metric, normalize_score = _load_file(name, env_id, d4rl_name)
    else:
        raise SystemExit(f"error: unknown dataset source '{source}' (choose minari, ogbench, file or auto)")

    probe = raw_env()
    observation_space, action_space = probe.observation_space, probe.action_space
    env_label = probe.spec.id if probe.spec is not None else "the evaluation env"
    probe.close()

    def make_env(seed: int) -> gym.Env:
        return _eval_env(raw_env(), seed)

    def to_data(arrays: dict[str, np.ndarray], split_label: str) -> OfflineData:
        arrays = _validate(arrays, split_label, observation_space, action_space, env_label, clip_actions)
        tensors = {k: torch.as_tensor(np.ascontiguousarray(arrays[k], dtype=np.float32)).to(device) for k in TRANSITION_KEYS}
        return OfflineData(**tensors, name=name, metric=metric, make_env=make_env, normalize_score=normalize_score)

    data = to_data(splits["train"], label)
    if splits.get("validation") is not None:
        data.validation = to_data(splits["validation"], f"{label} (validation split)")
    return data


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


def _make_gym_env(env_id: str, **kwargs) -> gym.Env:
    """gym.make, registering gymnasium-robotics' ids (AntMaze, Adroit, ...) on first need; one-line error otherwise."""
    try:
        try:
            return gym.make(env_id, **kwargs)
        except gym.error.NameNotFound:
            import gymnasium_robotics

            gym.register_envs(gymnasium_robotics)
            return gym.make(env_id, **kwargs)
    except gym.error.Error as e:
        raise SystemExit(f"error: cannot make environment '{env_id}': {e}") from None


def _episode_arrays(episodes: list[dict]) -> dict[str, np.ndarray]:
    """Concatenate per-episode transitions (each a dict of equal-length arrays) and mark each episode's last one."""
    arrays = {k: np.concatenate([ep[k] for ep in episodes]) for k in episodes[0]}
    dones = np.zeros(len(arrays["rewards"]), np.float32)
    dones[np.cumsum([len(ep["rewards"]) for ep in episodes]) - 1] = 1.0
    arrays["dones"] = dones
    return arrays


def _one_line(e: Exception) -> str:
    """An exception as `Type: message` on one line (library messages may span several)."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _check_arrays(
    arrays: dict[str, np.ndarray],
    required: tuple[str, ...],
    label: str,
    row: str = "row",
    locate: Callable[[int], str] | None = None,
) -> None:
    """Every required array present, numeric, at least 1-d with equal lengths and >= 1 row, and finite.

    Checks every array in `arrays` (not only the required ones); a finding ends the program with one line
    naming `label`, the key and, for a non-finite value, the first bad `row` (`locate(i)` describes row i).
    """
    missing = [k for k in required if k not in arrays]
    if missing:
        present = ", ".join(sorted(arrays)) or "nothing"
        raise SystemExit(f"error: {label} lacks {', '.join(missing)} (it has {present}; required: {', '.join(required)})")
    for k, a in arrays.items():
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
            raise SystemExit(f"error: {label}: '{k}' has non-numeric dtype {a.dtype}")
        if a.ndim == 0:
            raise SystemExit(f"error: {label}: '{k}' is a scalar, not an array with one entry per {row}")
    lengths = {k: len(a) for k, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise SystemExit(
            f"error: {label}: arrays have different lengths ({', '.join(f'{k} {n}' for k, n in lengths.items())})"
        )
    if not next(iter(lengths.values()), 0):
        raise SystemExit(f"error: {label} has no {row}s (its arrays are empty)")
    for k, a in arrays.items():
        if np.issubdtype(a.dtype, np.floating):
            bad = ~np.isfinite(a.reshape(len(a), -1)).all(axis=1)
            if bad.any():
                i = int(np.argmax(bad))
                value = a.reshape(len(a), -1)[i][~np.isfinite(a.reshape(len(a), -1)[i])][0]
                where = locate(i) if locate else f"{row} {i}"
                raise SystemExit(
                    f"error: {label}: '{k}' has a non-finite value ({value}) at {where} ({int(bad.sum())} {row}(s) in all)"
                )


def _check_binary(arrays: dict[str, np.ndarray], keys: tuple[str, ...], label: str) -> None:
    """Flags (terminals, timeouts) must be 0/1; anything else is a layout error, not a flag to round."""
    for k in keys:
        flags = arrays[k].reshape(len(arrays[k]), -1)
        bad = ((flags != 0) & (flags != 1)).any(axis=1)
        if bad.any():
            i = int(np.argmax(bad))
            value = flags[i][(flags[i] != 0) & (flags[i] != 1)][0]
            raise SystemExit(f"error: {label}: '{k}' must hold 0/1 flags but has {value} at row {i}")


def _validate(
    arrays: dict[str, np.ndarray],
    label: str,
    observation_space: gym.Space,
    action_space: gym.Space,
    env_label: str,
    clip_actions: bool = False,
) -> dict[str, np.ndarray]:
    """Check the transitions against each other and the evaluation env, then map actions to [-1, 1] and clip.

    Arrays: all of TRANSITION_KEYS, equal lengths, >= 1 transition, finite. Dimensions: observations and
    next_observations match the env's flattened observation space, actions its action space. Actions
    (in the env's units) are mapped to [-1, 1]; values outside by at most ACTION_TOLERANCE are clipped
    (FQL's loaders clip every action; a note counts them), values further out end
    the program: such data is not in this env's action units (wrong --env-id or unscaled actions) [ours],
    unless `clip_actions`: then every action is clipped, with a note counting them.
    """
    _check_arrays(arrays, TRANSITION_KEYS, label, row="transition")
    n = len(arrays["rewards"])
    obs_dim = gym.spaces.flatdim(observation_space)
    for k in ("observations", "next_observations"):
        dim = int(np.prod(arrays[k].shape[1:]))
        if dim != obs_dim:
            raise SystemExit(f"error: {label} has {dim}-d {k} but {env_label} has {obs_dim}-d observations")
    if not isinstance(action_space, gym.spaces.Box):
        raise SystemExit(f"error: unsupported action space {action_space}; continuous (Box) actions are required")
    actions = arrays["actions"].reshape(n, -1).astype(np.float64)
    if actions.shape[1] != int(np.prod(action_space.shape)):
        raise SystemExit(
            f"error: {label} has {actions.shape[1]}-d actions but {env_label} has {int(np.prod(action_space.shape))}-d ones"
        )
    normalize_action = _action_normalizer(action_space)
    if normalize_action is not None:
        actions = normalize_action(actions)
    entry_excess = np.abs(actions) - 1.0  # in half-ranges of the bounds
    excess = entry_excess.max(axis=1)
    outside = int((excess > 0).sum())
    bounds = f"[{action_space.low.min():g}, {action_space.high.max():g}]"
    if clip_actions:
        if outside:
            clipped = entry_excess[entry_excess > 0]
            print(
                f"note: {label}: --clip-actions clipped the actions of {outside} of {n} transitions ({clipped.size} of "
                f"{actions.size} entries) to {env_label}'s action bounds {bounds}, by up to {clipped.max():.3g} of the "
                f"half-range (mean {clipped.mean():.3g} over the clipped entries)"
            )
        else:
            print(
                f"note: {label}: --clip-actions: every action lies within {env_label}'s action bounds {bounds}; none clipped"
            )
    elif outside:
        if excess.max() > ACTION_TOLERANCE:
            raise SystemExit(
                f"error: {label}: {outside} of {n} transitions have actions outside {env_label}'s action bounds {bounds}, by up to "
                f"{excess.max():.3g} of the half-range (first at transition {int(np.argmax(excess > 0))}; clipping tolerance "
                f"{ACTION_TOLERANCE}): the actions are not in this env's units (or are raw actions the simulator clips: "
                "rerun with --clip-actions)"
            )
        print(
            f"note: {label}: {outside} of {n} transitions have actions outside {env_label}'s action bounds {bounds} by at most "
            f"{excess.max():.3g} of the half-range (tolerance {ACTION_TOLERANCE}); clipped"
        )
    arrays = dict(arrays, actions=np.clip(actions, -ACTION_CLIP, ACTION_CLIP))
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
        data_path = os.path.join(get_dataset_path(name), "data")
    except ValueError as e:
        raise SystemExit(f"error: '{name}' is not a Minari dataset id ({e})") from None
    if not os.path.exists(data_path):
        command = f"MINARI_DATASETS_PATH={root} minari download {name}"
        if not download:
            raise SystemExit(
                f"error: Minari dataset '{name}' not found in {root}; download it with `{command}` or rerun with --dataset-download"
            )
        try:
            minari.download_dataset(name)
        except Exception as e:  # network, unknown id or incompatible version: one line, not a traceback
            raise SystemExit(
                f"error: cannot download Minari dataset '{name}' into {root} ({_one_line(e)}); try `{command}`"
            ) from None
    label = f"Minari dataset '{name}'"
    try:
        dataset = minari.load_dataset(name)
        episodes = []
        for ep in dataset.iterate_episodes():
            # (T + 1, obs_dim): includes the final observation
            obs = _flatten_batch(dataset.observation_space, ep.observations)
            terminals = np.asarray(ep.terminations, np.float32)
            episodes.append(
                dict(
                    observations=obs[:-1],
                    next_observations=obs[1:],
                    actions=np.asarray(ep.actions, np.float64).reshape(len(ep.rewards), -1),  # env units; mapped in _validate
                    rewards=np.asarray(ep.rewards, np.float32),
                    terminals=terminals,
                    masks=1.0 - terminals,
                )
            )
        metadata = dataset.storage.metadata
    except Exception as e:  # a damaged or foreign file under the dataset's folder: one line naming it
        raise SystemExit(f"error: {label} in {data_path} cannot be read ({_one_line(e)})") from None
    if not episodes:
        raise SystemExit(f"error: {label} has no episodes")
    arrays = _episode_arrays(episodes)
    starts = np.cumsum([0] + [len(ep["rewards"]) for ep in episodes])

    def locate(i: int) -> str:
        episode = int(np.searchsorted(starts, i, side="right")) - 1
        return f"episode {episode}, step {i - starts[episode]}"

    _check_arrays(arrays, tuple(arrays), label, row="transition", locate=locate)
    if name.startswith(D4RL_ANTMAZE_PREFIX):
        # D4RL's AntMaze files mark the goal-reaching steps (reward 1) terminal, and IQL's and FQL's loaders
        # use masks = 1 - terminals: no bootstrap from the goal. Minari's port collected the data in a
        # continuing task (no termination), so the flag is rebuilt from the reward.
        arrays["terminals"] = (arrays["rewards"] == 1.0).astype(np.float32)
        arrays["masks"] = 1.0 - arrays["terminals"]
    if "antmaze" in name.lower():
        arrays["rewards"] = arrays["rewards"] - 1.0  # D4RL antmaze: r - 1 (IQL/FQL convention)

    if name.startswith(D4RL_ANTMAZE_PREFIX):
        raw_env = _d4rl_antmaze_env(dataset, name)
        return label, {"train": arrays}, raw_env, "success", lambda ret: 100.0 * ret  # D4RL refs (0, 1): 100 x success
    ref_min, ref_max = metadata.get("ref_min_score"), metadata.get("ref_max_score")
    if ref_min is not None and ref_max is not None:
        metric = "normalized_score"
        normalize_score = lambda ret: 100.0 * (ret - ref_min) / (ref_max - ref_min)  # D4RL's get_normalized_score x 100
    else:
        metric, normalize_score = "return", None
        print(f"note: {label} carries no reference scores; evaluation reports the raw return")
    if name.startswith("mujoco/"):
        print(
            f"note: {label} is Minari's own data with Minari's reference scores on Gymnasium v5 envs, not D4RL's: "
            "its scores are not comparable with the D4RL tables of papers; for those, load D4RL's hdf5 files "
            "(e.g. hopper-medium-v2.hdf5 with --env-id Hopper-v5)"
        )
    raw_env = lambda: dataset.recover_environment(eval_env=True)
    return label, {"train": arrays}, raw_env, metric, normalize_score


D4RL_ANTMAZE_PREFIX = "D4RL/antmaze/"
D4RL_ANTMAZE_OBS_DIM = 29
"""D4RL's AntMaze files store qpos (15: xy first) and qvel (14) of its own ant; Gymnasium's AntMaze has 27 + 2 + 2."""
D4RL_ANTMAZE_HORIZON = {"umaze": 700, "medium": 1000, "large": 1000}
"""D4RL's AntMaze episode limits (its env registrations), by maze size."""


def _same_walls(map_a: list, map_b: list) -> bool:
    """Whether two gymnasium-robotics maze maps have the same walls (cells equal to 1; r, g, c and 0 are free)."""
    walls_a, walls_b = (np.array([[cell == 1 for cell in row] for row in m]) for m in (map_a, map_b))
    return walls_a.shape == walls_b.shape and bool((walls_a == walls_b).all())


def _d4rl_antmaze_env(dataset, name: str) -> Callable[[], gym.Env]:
    """D4RL's AntMaze evaluation task in the maze the data was collected in, ending at the goal.

    Minari's evaluation spec holds D4RL's task (fixed reset cell r and goal cell g) but, for umaze, in a map
    turned 180 degrees relative to the data's maze (Minari issue #304: it is D4RL's U_MAZE_EVAL, not
    U_MAZE_TEST); that map, turned back when needed so that its walls equal the data's, goes into the data's
    env spec with continuing_task=False (the episode terminates at the goal, as D4RL's eval envs do; radius
    0.45 here, 0.5 in D4RL) and D4RL's episode limit. Return = success for this 0/1 reward, so the normalized
    score is 100 x success.
    """
    data_spec = dataset.env_spec
    eval_env = dataset.recover_environment(eval_env=True)
    eval_map = eval_env.spec.kwargs.get("maze_map")
    eval_env.close()
    data_map = data_spec.kwargs.get("maze_map")
    if eval_map is None or data_map is None:
        raise SystemExit(f"error: Minari dataset '{name}' does not record the maze maps of its data and evaluation envs")
    turned = [list(reversed(row)) for row in reversed(eval_map)]
    if _same_walls(eval_map, data_map):
        task_map = eval_map
    elif _same_walls(turned, data_map):
        task_map = turned
    else:
        raise SystemExit(
            f"error: Minari dataset '{name}': its evaluation maze matches the data's maze neither as is nor turned 180 degrees"
        )
    size = name[len(D4RL_ANTMAZE_PREFIX) :].split("-")[0]
    horizon = D4RL_ANTMAZE_HORIZON.get(size, data_spec.max_episode_steps)
    return lambda: gym.make(data_spec, maze_map=task_map, continuing_task=False, reset_target=False, max_episode_steps=horizon)


# ---------------------------------------------------------------------------------------------------
# OGBench

OGBENCH_KEYS = ("observations", "actions", "terminals")
"""The arrays every OGBench dataset file holds (plus qpos/qvel/button_states, which the relabelling reads)."""


def _load_ogbench(name: str, dataset_dir: str | None, download: bool):
    import ogbench

    words = name.split("-")
    if "singletask" not in words:
        raise SystemExit(
            f"error: '{name}' is not an OGBench single-task name (e.g. antmaze-large-navigate-singletask-v0); "
            "goal-conditioned OGBench datasets have no rewards"
        )
    pos = words.index("singletask")
    file_name = "-".join(words[:pos] + words[-1:])  # the mapping ogbench.make_env_and_datasets uses
    dataset_dir = os.path.abspath(os.path.expanduser(dataset_dir or OGBENCH_DEFAULT_DIR))
    files = [os.path.join(dataset_dir, f"{file_name}{suffix}.npz") for suffix in ("", "-val")]
    if not all(os.path.exists(f) for f in files):
        command = f"python -c \"import ogbench; ogbench.download_datasets(['{file_name}'], '{dataset_dir}')\""
        if not download:
            raise SystemExit(
                f"error: OGBench dataset '{file_name}' (for {name}) not found in {dataset_dir}; "
                f"download it with `{command}` or rerun with --dataset-download"
            )
        try:
            ogbench.download_datasets([file_name], dataset_dir)
        except Exception as e:  # network or unknown name: one line, not a traceback
            raise SystemExit(
                f"error: cannot download OGBench dataset '{file_name}' into {dataset_dir} ({_one_line(e)})"
            ) from None
    for f in files:  # the raw files, checked with their own row numbers before OGBench reads them
        raw = _read_file(f, "OGBench dataset file")
        _check_arrays(raw, OGBENCH_KEYS, f"OGBench dataset file {f}")
        _check_binary(raw, ("terminals",), f"OGBench dataset file {f}")
    try:
        env, train, val = ogbench.make_env_and_datasets(name, dataset_dir=dataset_dir, compact_dataset=False)
    except gym.error.Error as e:
        raise SystemExit(f"error: cannot make the OGBench environment for '{name}': {e}") from None
    except KeyError as e:  # the relabelling reads qpos / button_states
        raise SystemExit(
            f"error: OGBench dataset '{file_name}' in {dataset_dir} lacks {e}, which OGBench needs to relabel {name}"
        ) from None
    env.close()
    # OGBench's `terminals` mark trajectory ends (dones); its relabelled `masks` = 1 - success are the
    # bootstrap masks, and success ends an online episode, so terminals = 1 - masks.
    # The `-val` file, relabelled by OGBench the same way, is the held-out split (FQL's validation losses).
    splits = {
        split: dict(
            observations=d["observations"],
            actions=d["actions"],
            rewards=d["rewards"],
            next_observations=d["next_observations"],
            terminals=1.0 - d["masks"],
            masks=d["masks"],
            dones=d["terminals"],
        )
        for split, d in (("train", train), ("validation", val))
    }
    raw_env = lambda: ogbench.make_env_and_datasets(name, env_only=True)
    return f"OGBench dataset '{name}'", splits, raw_env, "success", None


# ---------------------------------------------------------------------------------------------------
# local file in D4RL's flat layout


def _read_file(path: str, what: str = "dataset file") -> dict[str, np.ndarray]:
    """Every top-level array of an .npz or HDF5 file; a file that cannot be opened or parsed is one error line."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: {what} {path} " + ("is a directory, not a file" if os.path.isdir(path) else "not found"))
    if path.endswith(".npz"):
        if not zipfile.is_zipfile(path):
            raise SystemExit(f"error: {what} {path} is not an .npz archive (no zip structure; truncated, or another format)")
        try:
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        except Exception as e:  # damaged member, pickled objects, ...: one line naming the file
            raise SystemExit(f"error: {what} {path} cannot be read as an .npz archive ({_one_line(e)})") from None
    if path.endswith((".hdf5", ".h5")):
        import h5py

        try:
            with h5py.File(path, "r") as f:
                raw = {k: f[k][()] for k in f.keys() if isinstance(f[k], h5py.Dataset)}
        except Exception as e:  # not HDF5, truncated, damaged chunk: one line naming the file
            raise SystemExit(f"error: {what} {path} cannot be read as an HDF5 file ({_one_line(e)})") from None
        if not raw:
            raise SystemExit(f"error: {what} {path} is an HDF5 file without top-level arrays (empty, or not D4RL's layout)")
        return {k: np.asarray(v) for k, v in raw.items()}
    raise SystemExit(f"error: {what} {path} must end in {', '.join(FILE_SUFFIXES)}")


def _d4rl_reference(path: str, env_id: str, d4rl_name: str | None) -> tuple[str, float, float] | None:
    """The D4RL dataset whose reference scores apply to a file: `d4rl_name`, else the file's base name if it is one."""
    if d4rl_name is not None:
        if d4rl_name not in D4RL_REF_SCORES:
            close = difflib.get_close_matches(d4rl_name, D4RL_REF_SCORES, n=4, cutoff=0.6)
            raise SystemExit(
                f"error: '{d4rl_name}' is not a D4RL dataset with reference scores; closest: {', '.join(close) or 'none'}"
            )
        name = d4rl_name
    else:
        name = os.path.splitext(os.path.basename(path))[0]
        if name not in D4RL_REF_SCORES:
            print(
                f"note: dataset file {path}: no D4RL reference scores apply ('{name}' is not a D4RL dataset name; "
                "name the D4RL dataset to normalize); evaluation reports the raw return"
            )
            return None
    task = name.split("-")[0]
    if task == "antmaze":  # return = success only when the episode ends at the goal, which --env-id does not set up
        raise SystemExit(
            f"error: dataset file {path}: D4RL's AntMaze scores ({name}) need D4RL's evaluation task (the episode ends at "
            "the goal); a file's --env-id env does not set it up: use Minari's D4RL/antmaze/* datasets"
        )
    if D4RL_ENV_WORDS[task] not in env_id.lower():
        raise SystemExit(f"error: dataset file {path} is scored as D4RL's {name}, a {task} dataset, but evaluated in {env_id}")
    return name, *D4RL_REF_SCORES[name]


def _load_file(path: str, env_id: str | None, d4rl_name: str | None):
    if env_id is None:
        raise SystemExit(f"error: the dataset file {path} needs --env-id (the Gymnasium id to evaluate in)")
    label = f"dataset file {path}"
    raw = _read_file(path)
    keys = FILE_KEYS + (("next_observations",) if "next_observations" in raw else ())
    raw = {k: raw[k] for k in keys if k in raw}  # other arrays (D4RL's infos/*, qpos, ...) are not used
    _check_arrays(raw, FILE_KEYS, label)
    _check_binary(raw, ("terminals", "timeouts"), label)
    if (
        "antmaze" in env_id.lower()
        and raw["observations"].reshape(len(raw["observations"]), -1).shape[1] == D4RL_ANTMAZE_OBS_DIM
    ):
        raise SystemExit(
            f"error: {label} holds D4RL AntMaze observations (the ant's {D4RL_ANTMAZE_OBS_DIM}-d qpos and qvel in D4RL's "
            f"maze frame, no goal), which do not map onto {env_id}'s observation (its goal, its maze frame, "
            "its ant model) [ours: refused, not converted]; use Minari's D4RL/antmaze/* datasets"
        )
    raw_env = lambda: _make_gym_env(env_id)
    n = len(raw["observations"])
    observations = raw["observations"].reshape(n, -1).astype(np.float64)
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
    if not keep.any():
        raise SystemExit(
            f"error: {label} has no transition: every row ends an episode by time limit and has no next_observations"
        )
    episode_id = np.concatenate([[0], np.cumsum(ends[:-1])])[keep]
    dones = np.append(episode_id[1:] != episode_id[:-1], True).astype(np.float32)
    rewards = raw["rewards"].reshape(n).astype(np.float32)
    if "antmaze" in env_id.lower():
        rewards = rewards - 1.0  # D4RL antmaze: r - 1 (IQL/FQL convention)
    terminals = terminals.astype(np.float32)
    arrays = dict(
        observations=observations[keep],
        next_observations=next_observations[keep],
        actions=raw["actions"].reshape(n, -1)[keep],
        rewards=rewards[keep],
        terminals=terminals[keep],
        masks=1.0 - terminals[keep],
        dones=dones,
    )
    reference = _d4rl_reference(path, env_id, d4rl_name)
    if reference is None:
        return label, {"train": arrays}, raw_env, "return", None
    d4rl, ref_min, ref_max = reference
    horizon = D4RL_HORIZON[d4rl.split("-")[0]]
    probe = _make_gym_env(env_id)
    own_limit = probe.spec.max_episode_steps
    probe.close()
    if own_limit != horizon:  # e.g. AdroitHandPen-v1: 200 steps, D4RL's pen: 100
        print(f"note: {label}: evaluation episodes last D4RL's {horizon} steps ({env_id}'s own limit: {own_limit})")
    raw_env = lambda: _make_gym_env(env_id, max_episode_steps=horizon)
    normalize_score = lambda ret: 100.0 * (ret - ref_min) / (ref_max - ref_min)  # D4RL's get_normalized_score x 100
    return label, {"train": arrays}, raw_env, "normalized_score", normalize_score
