"""Online environments: Gymnasium MuJoCo v5 / classic control, and FrankaKitchen-v1.

`make_env` returns one seeded, episode-statistics-wrapped env (optionally recording video) with a
flat float observation and a Box action space in [-1, 1] (gymnasium's RescaleAction maps it to the env's bounds). Gymnasium 1.x reports `terminated` and `truncated`
separately; the training scripts bootstrap through truncation and cut it only on termination.
"""

import gymnasium as gym
import numpy as np

KITCHEN_ID = "FrankaKitchen-v1"
KITCHEN_EPISODE_STEPS = 280  # FMER Sec. 5.2
KITCHEN_TASK_SETS = {  # FMER App. B.3: the N = 1, 2, 4, 7 task sets
    1: ["light switch"],
    2: ["light switch", "slide cabinet"],
    4: ["light switch", "slide cabinet", "bottom burner", "microwave"],
    7: ["light switch", "slide cabinet", "bottom burner", "microwave", "kettle", "top burner", "hinge cabinet"],
}


class KitchenTaskMetrics(gym.Wrapper):
    """Flattens FrankaKitchen's dict observation and reports accomplished tasks at episode end.

    The policy sees the 59-d `observation` entry (robot and object states); the goal entries are
    constant for a fixed task set and are dropped. At the end of an episode, `info` gains
    `tasks_completed` (count), `success_rate` (tasks_completed / N: FMER Table 1's Success Rate divided by 100)
    and `all_tasks_success` (1.0 when every task of the set was accomplished).
    """

    def __init__(self, env: gym.Env, num_tasks: int):
        super().__init__(env)
        self.num_tasks = num_tasks
        self.observation_space = env.observation_space["observation"]

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        return obs["observation"].astype(np.float32), info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        if terminated or truncated:
            completed = len(info["episode_task_completions"])
            info["tasks_completed"] = completed
            info["success_rate"] = completed / self.num_tasks
            info["all_tasks_success"] = float(completed == self.num_tasks)
        return obs["observation"].astype(np.float32), reward, terminated, truncated, info


def make_env(
    env_id: str, seed: int, capture_video: bool = False, video_folder: str = "videos", kitchen_tasks: int = 1
) -> gym.Env:
    """Build one seeded env. Raises SystemExit with one line for an unknown id or a bad task set."""
    render_mode = "rgb_array" if capture_video else None
    try:
        if env_id == KITCHEN_ID:
            import gymnasium_robotics

            gym.register_envs(gymnasium_robotics)
            if kitchen_tasks not in KITCHEN_TASK_SETS:
                raise SystemExit(f"error: --kitchen-tasks must be one of {sorted(KITCHEN_TASK_SETS)}, got {kitchen_tasks}")
            env = gym.make(
                env_id,
                tasks_to_complete=KITCHEN_TASK_SETS[kitchen_tasks],
                max_episode_steps=KITCHEN_EPISODE_STEPS,
                render_mode=render_mode,
            )
            env = KitchenTaskMetrics(env, kitchen_tasks)
        else:
            env = gym.make(env_id, render_mode=render_mode)
    except gym.error.Error as e:
        raise SystemExit(f"error: cannot make environment '{env_id}': {e}") from None
    if not isinstance(env.action_space, gym.spaces.Box):
        raise SystemExit(
            f"error: '{env_id}' has a {type(env.action_space).__name__} action space; continuous (Box) actions are required"
        )
    if not isinstance(env.observation_space, gym.spaces.Box):
        env = gym.wrappers.FlattenObservation(env)
    if not (np.all(env.action_space.low == -1) and np.all(env.action_space.high == 1)):
        env = gym.wrappers.RescaleAction(env, np.float32(-1), np.float32(1))  # the policies act in [-1, 1]
    if capture_video:
        env = gym.wrappers.RecordVideo(
            env, video_folder, disable_logger=True
        )  # cubic schedule: episodes 0, 1, 8, 27, ..., 1000, 2000, ...
    env = gym.wrappers.RecordEpisodeStatistics(env)
    env.action_space.seed(seed)
    env.reset(seed=seed)
    return env
