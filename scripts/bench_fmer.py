"""Measure fmer.py's training speed: gradient updates per second (one per env step) and peak GPU memory.

Runs the real script for a short budget per environment, with default networks unless flags say
otherwise, and reads the rate off the TensorBoard wall times of the update phase only (the random
warm-up is excluded). Run on the machine you want figures for:

    python scripts/bench_fmer.py --env-ids Hopper-v5 Humanoid-v5 --updates 3000
    python scripts/bench_fmer.py --env-ids Pendulum-v1 --fmer-flags="--hidden-dim 64"
"""

import glob
import os
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

import tyro
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Args:
    env_ids: list[str] = field(default_factory=lambda: ["Hopper-v5", "Humanoid-v5"])
    """environments to time"""
    updates: int = 3000
    """gradient updates (= environment steps after the warm-up) to time"""
    warmup: int = 1000
    """random warm-up steps before the timed updates (not timed)"""
    fmer_flags: str = ""
    """more fmer.py flags in one string, e.g. --fmer-flags="--no-cuda --hidden-dim 64"""


if __name__ == "__main__":
    args = tyro.cli(Args)
    log_every = max(1, args.updates // 10)
    print(f"{'env':<16} {'SPS (updates/s)':>16} {'peak GPU MB':>12}")
    for env_id in args.env_ids:
        with tempfile.TemporaryDirectory() as workdir:
            command = [
                sys.executable,
                os.path.join(ROOT, "fmer.py"),
                "--env-id",
                env_id,
                "--total-timesteps",
                str(args.warmup + args.updates),
                "--learning-starts",
                str(args.warmup),
                "--eval-every",
                str(10 * (args.warmup + args.updates)),
                "--eval-episodes",
                "1",
                "--log-every",
                str(log_every),
                *shlex.split(args.fmer_flags),
            ]
            result = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
            if result.returncode != 0:
                sys.exit(f"error: fmer.py failed on {env_id}: {result.stderr.strip().splitlines()[-1]}")
            (run_dir,) = glob.glob(os.path.join(workdir, "runs", "*"))
            events = EventAccumulator(run_dir)
            events.Reload()
            updates = [e for e in events.Scalars("losses/qf_loss")]  # logged only on update steps
            rate = (updates[-1].step - updates[0].step) / (updates[-1].wall_time - updates[0].wall_time)
            memory = (
                events.Scalars("charts/gpu_memory_mb")[-1].value
                if "charts/gpu_memory_mb" in events.Tags()["scalars"]
                else float("nan")
            )
            print(f"{env_id:<16} {rate:>16.1f} {memory:>12.0f}")
