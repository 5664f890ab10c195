"""Make a mixed-quality offline dataset on a real MuJoCo task, in D4RL's flat layout (for flowq.py / fino.py).

The behaviour policies are a uniformly random policy and snapshots of one Augmented Random Search
run (ARS V2-t, Mania et al. 2018: linear policy on running-normalized observations), taken at several
points of training, each executed with Gaussian action noise. No policy in the data is good, and the
learner does not choose which data it gets. The script prints the mean episode return per source
and overall (the number an offline learner has to beat) and writes an .npz with observations,
actions, rewards, next_observations, terminals, timeouts, which `flowq.py --dataset FILE --env-id ID` loads.

    python scripts/make_mixed_dataset.py            # HalfCheetah-v5 -> /tmp/halfcheetah_mixed.npz (about 3 min on CPU)

With --raw-actions the file holds the noisy policies' raw Gaussian samples (the env still receives them clipped
to [-1, 1], as without the option), i.e. data that loads only with `--clip-actions`:

    python scripts/make_mixed_dataset.py --env-id Hopper-v5 --raw-actions --action-noise 1.0 --out /tmp/hopper_raw.npz
"""

import time
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
import tyro


@dataclass
class Args:
    env_id: str = "HalfCheetah-v5"
    """Gymnasium MuJoCo task (actions in [-1, 1])"""
    out: str = "/tmp/halfcheetah_mixed.npz"
    """output .npz path (keep datasets out of the repository)"""
    seed: int = 0
    """seed of the ARS run, the noise and the environment"""
    ars_iterations: int = 60
    """ARS iterations (each runs 2 * ars_directions episodes)"""
    ars_directions: int = 8
    """random directions per ARS iteration"""
    ars_top: int = 4
    """best directions used in the ARS update"""
    ars_step: float = 0.02
    """ARS step size alpha"""
    ars_noise: float = 0.03
    """ARS exploration noise nu"""
    snapshots: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5, 1.0])
    """fractions of the ARS run at which the policy is snapshotted as a behaviour policy"""
    episodes_per_policy: int = 40
    """episodes collected from each behaviour policy (the random one included)"""
    action_noise: float = 0.2
    """std of the Gaussian noise added to the snapshots' actions (then clipped to [-1, 1])"""
    raw_actions: bool = False
    """record the behaviour policies' raw actions (before the clip to [-1, 1] the simulator applies); the env gets the
    same clipped actions either way"""


class LinearPolicy:
    """a = clip(M (s - mean) / std, -1, 1), with running observation statistics (ARS V2)."""

    def __init__(self, obs_dim: int, act_dim: int):
        self.M = np.zeros((act_dim, obs_dim))
        self.count, self.mean, self.m2 = 0, np.zeros(obs_dim), np.zeros(obs_dim)

    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / max(self.count - 1, 1)) + 1e-8 if self.count > 1 else np.ones_like(self.mean)

    def observe(self, obs: np.ndarray) -> None:  # Welford update
        self.count += 1
        delta = obs - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (obs - self.mean)

    def act(self, obs: np.ndarray, M: np.ndarray | None = None) -> np.ndarray:
        return np.clip((self.M if M is None else M) @ ((obs - self.mean) / self.std()), -1.0, 1.0)


def run_episode(env, act, rng=None, noise=0.0, observe=None, raw_actions=False):
    """One episode; returns the transitions (D4RL layout) and the return.

    The env steps with the noisy action clipped to [-1, 1]; the transitions hold that action, or with
    `raw_actions` the noisy action before the clip.
    """
    obs, _ = env.reset(seed=int(rng.integers(1 << 31)) if rng is not None else None)
    rows, ret, done = [], 0.0, False
    while not done:
        if observe is not None:
            observe(obs)
        action = raw = act(obs)
        if noise > 0.0:
            raw = action + noise * rng.standard_normal(action.shape)
            action = np.clip(raw, -1.0, 1.0)  # MuJoCo clips ctrl too, but the control cost uses the action as given
        next_obs, reward, terminated, truncated, _ = env.step(action)
        rows.append((obs, raw if raw_actions else action, reward, next_obs, terminated, truncated))
        ret += reward
        obs, done = next_obs, terminated or truncated
    return rows, ret


if __name__ == "__main__":
    args = tyro.cli(Args)
    rng = np.random.default_rng(args.seed)
    env = gym.make(args.env_id)
    env.reset(seed=args.seed)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]

    # ---- ARS V2-t: train a linear policy, snapshot it along the way ----
    policy = LinearPolicy(obs_dim, act_dim)
    snapshot_at = {max(1, round(f * args.ars_iterations)) for f in args.snapshots}
    snapshots, start = [], time.time()
    for it in range(1, args.ars_iterations + 1):
        deltas = rng.standard_normal((args.ars_directions, *policy.M.shape))
        returns = np.zeros((args.ars_directions, 2))
        for k, delta in enumerate(deltas):
            for j, sign in enumerate((1.0, -1.0)):
                M = policy.M + sign * args.ars_noise * delta
                _, returns[k, j] = run_episode(env, lambda o: policy.act(o, M), rng, observe=policy.observe)
        top = np.argsort(-returns.max(1))[: args.ars_top]
        sigma = returns[top].std() + 1e-8
        policy.M += (
            args.ars_step / (args.ars_top * sigma) * np.einsum("k,kij->ij", returns[top, 0] - returns[top, 1], deltas[top])
        )
        if it in snapshot_at:
            frozen = LinearPolicy(obs_dim, act_dim)
            frozen.M, frozen.count, frozen.mean, frozen.m2 = (
                policy.M.copy(),
                policy.count,
                policy.mean.copy(),
                policy.m2.copy(),
            )
            _, ret = run_episode(env, frozen.act, rng)
            snapshots.append((f"ars_iter{it}", frozen))
            print(f"ARS iteration {it}: noiseless return {ret:.1f} ({time.time() - start:.0f} s)")

    # ---- collect the mixed dataset ----
    sources = [("random", lambda o: rng.uniform(-1.0, 1.0, act_dim), 0.0)]
    sources += [(name, p.act, args.action_noise) for name, p in snapshots]
    data = {k: [] for k in ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")}
    all_returns = []
    for name, act, noise in sources:
        source_returns = []
        for _ in range(args.episodes_per_policy):
            rows, ret = run_episode(env, act, rng, noise, raw_actions=args.raw_actions)
            source_returns.append(ret)
            for key, column in zip(data, zip(*rows)):
                data[key].extend(column)
        all_returns += source_returns
        print(
            f"{name:>14}: {args.episodes_per_policy} episodes, mean return {np.mean(source_returns):8.1f} "
            f"(min {np.min(source_returns):.1f}, max {np.max(source_returns):.1f})"
        )
    arrays = {k: np.asarray(v, np.bool_ if k in ("terminals", "timeouts") else np.float32) for k, v in data.items()}
    if args.raw_actions:
        outside = np.abs(arrays["actions"]) > 1.0
        print(
            f"raw actions: {outside.mean():.1%} of the action entries lie outside [-1, 1] "
            f"({outside.any(axis=1).mean():.1%} of the transitions), max |a| {np.abs(arrays['actions']).max():.2f}"
        )
    np.savez(args.out, **arrays)
    print(
        f"dataset: {len(arrays['rewards'])} transitions, {len(all_returns)} episodes, "
        f"mean episode return {np.mean(all_returns):.1f}, best episode {np.max(all_returns):.1f} -> {args.out}"
    )
