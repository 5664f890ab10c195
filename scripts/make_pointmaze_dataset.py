"""Write an OGBench-format navigation dataset for a point maze, collected by a noisy scripted controller.

No trained expert is needed: the controller runs a breadth-first search on the maze grid from the goal
cell, heads for the centre of the next cell on a shortest path, and adds Gaussian noise to the action.
As in OGBench's `navigate` datasets, every episode starts in a random free cell, and a new random goal
cell is drawn whenever the current one is reached, so the data covers the maze without being aimed at
any evaluation task. The files follow OGBench's own layout, so `ogbench.make_env_and_datasets` (and
`common/datasets.py`) load them unchanged and relabel rewards for any `*-singletask-*` name:

    {out_dir}/pointmaze-{maze}-{dataset_type}-v0.npz and ...-val.npz
    observations (T, 2) float32, actions (T, 2) float32, terminals (T,) float32 (1 on an episode's last row),
    qpos (T, 2), qvel (T, 2)   (each episode's last row has an action that no transition uses, as in OGBench)

    python scripts/make_pointmaze_dataset.py --out-dir /tmp/ogbench-data
    python fino.py --dataset pointmaze-medium-navigate-singletask-task1-v0 --dataset-dir /tmp/ogbench-data ...
"""

import os
from collections import deque
from dataclasses import dataclass

import gymnasium
import numpy as np
import ogbench  # noqa: F401  (registers the OGBench environments)
import tyro


@dataclass
class Args:
    out_dir: str = "/tmp/ogbench-data"
    """folder to write the .npz files into (pass it to fino.py as --dataset-dir)"""
    maze: str = "medium"
    """maze size: medium, large or giant"""
    dataset_type: str = "navigate"
    """the dataset-type word of the file name (OGBench's name for this kind of data is `navigate`)"""
    episodes: int = 100
    """training episodes"""
    val_episodes: int = 10
    """validation episodes (the -val.npz file OGBench's loader also reads)"""
    episode_length: int = 1000
    """rows per episode (OGBench's navigate datasets use 1000)"""
    action_noise: float = 0.5
    """standard deviation of the Gaussian noise added to the controller's unit-length action"""
    seed: int = 0
    """seed of the start cells, goals and noise"""


def free_cells(maze_map: np.ndarray) -> list[tuple[int, int]]:
    return [(int(i), int(j)) for i, j in zip(*np.nonzero(maze_map == 0))]


def bfs_distances(maze_map: np.ndarray, goal: tuple[int, int]) -> np.ndarray:
    """Grid distance (4-connected, through free cells) from every cell to `goal`; inf where unreachable."""
    dist = np.full(maze_map.shape, np.inf)
    dist[goal] = 0
    queue = deque([goal])
    while queue:
        i, j = queue.popleft()
        for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            ni, nj = i + di, j + dj
            if maze_map[ni, nj] == 0 and dist[ni, nj] == np.inf:
                dist[ni, nj] = dist[i, j] + 1
                queue.append((ni, nj))
    return dist


def controller_action(env, xy: np.ndarray, goal_ij: tuple[int, int], dist: np.ndarray) -> np.ndarray:
    """Unit-length step towards the centre of the neighbouring cell closest to the goal (the goal itself in its cell).
    The straight segment stays inside the two adjacent free cells, whose union is a rectangle."""
    i, j = env.xy_to_ij(xy)
    if (i, j) == goal_ij:
        waypoint = np.array(env.ij_to_xy(goal_ij))
    else:
        neighbours = [(i + di, j + dj) for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1))]
        waypoint = np.array(env.ij_to_xy(min(neighbours, key=lambda c: dist[c])))
    direction = waypoint - xy
    return direction / max(np.linalg.norm(direction), 1e-6)


def collect(env, num_episodes: int, args: Args, rng: np.random.Generator) -> dict[str, np.ndarray]:
    cells = free_cells(env.maze_map)
    rows = {k: [] for k in ("observations", "actions", "terminals", "qpos", "qvel")}
    for _ in range(num_episodes):
        env.reset(seed=int(rng.integers(2**31)))
        start = cells[rng.integers(len(cells))]
        env.set_xy(np.array(env.ij_to_xy(start)) + rng.uniform(-1.0, 1.0, 2))
        goal = cells[rng.integers(len(cells))]
        dist = bfs_distances(env.maze_map, goal)
        obs = env.get_ob()
        for t in range(args.episode_length):
            xy = env.get_xy()
            if np.linalg.norm(xy - np.array(env.ij_to_xy(goal))) <= 1.0:  # reached: a new random goal
                goal = cells[rng.integers(len(cells))]
                dist = bfs_distances(env.maze_map, goal)
            action = controller_action(env, xy, goal, dist) + args.action_noise * rng.standard_normal(2)
            action = np.clip(action, -1.0, 1.0)
            rows["observations"].append(obs)
            rows["actions"].append(action)
            rows["terminals"].append(float(t == args.episode_length - 1))
            rows["qpos"].append(env.data.qpos.copy())
            rows["qvel"].append(env.data.qvel.copy())
            obs, *_ = env.step(action)
    return {k: np.asarray(v, dtype=np.float32) for k, v in rows.items()}


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.maze not in ("medium", "large", "giant"):
        raise SystemExit(f"error: --maze must be medium, large or giant, got '{args.maze}'")
    # the goal-conditioned env without a time limit; the controller sets positions directly
    env = gymnasium.make(f"pointmaze-{args.maze}-v0").unwrapped
    rng = np.random.default_rng(args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    base = os.path.join(args.out_dir, f"pointmaze-{args.maze}-{args.dataset_type}-v0")
    for path, episodes in ((f"{base}.npz", args.episodes), (f"{base}-val.npz", args.val_episodes)):
        data = collect(env, episodes, args, rng)
        tmp = path[: -len(".npz")] + ".tmp.npz"
        np.savez_compressed(tmp, **data)
        os.replace(tmp, path)
        print(f"wrote {path}: {len(data['observations'])} rows in {episodes} episodes")
