"""Time per policy update against the number of flow steps (FlowQ's claim: constant, Fig. 3a).

For K in --flow-steps it times, on one random batch of the given sizes:
  flowq      : flowq.py's policy update (guided target from one grad_a Q, then one u_theta regression);
               K does not enter it at all, which is the claim;
  backprop-K : the alternative the abstract contrasts, a policy loss that backpropagates Q through a
               K-step Euler sample (as Diffusion-QL / FQL-style actors do), for reference;
  sample-K   : acting, one K-step Euler sample of the batch without gradient (grows with K, expected).

    python scripts/bench_flowq.py --flow-steps 1 10 32
"""

import os
import platform
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: flowq.py, common/
from common.flow import euler_sample
from flowq import TwinQ, VelocityField, energy_coefficient, guided_target, sample_actions


@dataclass
class Args:
    flow_steps: list[int] = field(default_factory=lambda: [1, 10, 32])
    """numbers of flow (Euler) steps to time"""
    obs_dim: int = 17
    """observation size (HalfCheetah-v5: 17)"""
    act_dim: int = 6
    """action size (HalfCheetah-v5: 6)"""
    batch_size: int = 256
    """batch size of one update"""
    hidden_dim: int = 256
    """hidden width of the networks"""
    num_layers: int = 3
    """hidden layers of the networks"""
    iters: int = 100
    """timed updates per measurement (after `warmup` untimed ones)"""
    repeats: int = 3
    """interleaved rounds over all K; each cell reports the median round"""
    warmup: int = 10
    """untimed warm-up updates"""
    threads: int = 1
    """torch intra-op threads"""
    cuda: bool = True
    """use the GPU when available"""


def timed(fn, iters: int, warmup: int, device: torch.device) -> float:
    """Milliseconds per call of fn."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 1000.0 * (time.perf_counter() - start) / iters


if __name__ == "__main__":
    args = tyro.cli(Args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    actor = VelocityField(args.obs_dim, args.act_dim, args.hidden_dim, args.num_layers).to(device)
    critic = TwinQ(args.obs_dim, args.act_dim, args.hidden_dim, args.num_layers).to(device)
    optimizer = torch.optim.Adam(actor.parameters(), lr=3e-4)
    obs = torch.randn(args.batch_size, args.obs_dim, device=device)
    actions = torch.rand(args.batch_size, args.act_dim, device=device) * 2 - 1
    q_min = lambda o, a: critic(o, a).min(0).values

    def flowq_update():
        a0 = torch.randn_like(actions)
        t = torch.rand(args.batch_size, 1, device=device)
        target, a_t, _, _ = guided_target(q_min, obs, a0, actions, t, 2.5, energy_coefficient("t", t), True)
        loss = F.mse_loss(actor(obs, a_t, t), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def backprop_update(steps: int):
        a0 = torch.randn_like(actions)
        sampled = euler_sample(lambda a, t: actor(obs, a, t), a0, steps).clamp(-1.0, 1.0)  # with gradient
        loss = -q_min(obs, sampled).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    print(
        f"device {device} ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
        f"{args.threads} thread(s); batch {args.batch_size}, MLPs {args.num_layers} x {args.hidden_dim}, "
        f"obs {args.obs_dim}, act {args.act_dim}; ms per call, median of {args.repeats} rounds of {args.iters} calls "
        f"after {args.warmup} warm-up"
    )
    # interleaved rounds, median per cell: a burst of load from other processes hits all K alike
    times = {steps: [] for steps in args.flow_steps}
    for _ in range(args.repeats):
        for steps in args.flow_steps:
            times[steps].append(
                (
                    timed(flowq_update, args.iters, args.warmup, device),
                    timed(lambda: backprop_update(steps), args.iters, args.warmup, device),
                    timed(lambda: sample_actions(actor, obs, steps), args.iters, args.warmup, device),
                )
            )
    print(f"{'flow steps':>10} {'flowq update':>13} {'backprop-K update':>18} {'sample-K (acting)':>18}")
    for steps, rounds in times.items():
        flowq_ms, backprop_ms, sample_ms = np.median(np.array(rounds), axis=0)
        print(f"{steps:>10} {flowq_ms:>13.2f} {backprop_ms:>18.2f} {sample_ms:>18.2f}")
