"""How fast can fino.py's FQL update be on this machine? The matrix products of one update, timed alone.

One FQL update (fino.py with --eta 0 --no-entropy-guidance: 4x512 networks, batch 256, a 10-step Euler distillation
target) is recorded once under a dispatch mode that notes every matrix product it runs (mm, addmm, bmm, baddbmm,
forward and backward). Those products, with the same shapes, strides and dtypes, are then replayed in a timed loop:

- torch's matmul-only time per update is a floor under ANY PyTorch implementation of this update that uses torch's
  GEMM (the elementwise work, the optimizer and the Python overhead come on top), so 1 / that time is a ceiling on
  its updates/s;
- with --jax-python, the same products run under jax.jit (XLA's GEMM) in that interpreter, for the same figure on the
  official code's library.

Compare with the measured updates/s of fino.py and of the official JAX FQL (docs/speed.md, "FINO against the official FQL (CPU)").

    python scripts/gemm_bound.py
    python scripts/gemm_bound.py --jax-python ~/.cache/fql-bench/jaxvenv/bin/python
"""

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import tyro
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fino  # noqa: E402

GEMMS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default, torch.ops.aten.baddbmm.default}


@dataclass
class Args:
    obs_dim: int = 29
    """observation size (antmaze-large-navigate: 29)"""
    act_dim: int = 8
    """action size (antmaze: 8)"""
    batch_size: int = 256
    """the update's batch size (FQL's default)"""
    hidden_dim: int = 512
    """width of every network (FQL's default)"""
    repeats: int = 30
    """timed replays of one update's products (after 5 untimed ones)"""
    jax_python: str | None = None
    """a Python interpreter with jax installed: also time the same products under jax.jit"""


class RecordGemms(TorchDispatchMode):
    """Notes (op name, operand shapes and strides) of every matrix product run under it, bias operands included."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in GEMMS:
            operands = [(list(a.shape), list(a.stride())) for a in args if isinstance(a, torch.Tensor)]
            self.calls.append((func.__name__.split(".")[0], operands))
        return func(*args, **(kwargs or {}))


def flops(name: str, operands: list) -> int:
    """2 m n k (per batch member for bmm / baddbmm)."""
    a, b = (shape for shape, _ in operands[-2:])
    return 2 * (a[0] if name in ("bmm", "baddbmm") else 1) * a[-2] * a[-1] * b[-1]


def record_update(args: Args) -> list:
    """The matrix products of one FQL update of fino.py, in order."""
    fino_args = fino.resolve_args(
        fino.Args(eta=0.0, entropy_guidance=False, q_agg="min", hidden_dim=args.hidden_dim, batch_size=args.batch_size)
    )
    nets = fino.make_nets(args.obs_dim, args.act_dim, fino_args)
    target_critic = fino.make_critic(args.obs_dim, args.act_dim, fino_args)
    optimizer = torch.optim.Adam(nets.parameters(), lr=fino_args.learning_rate)
    batch_size = args.batch_size
    batch = dict(
        observations=torch.randn(batch_size, args.obs_dim),
        actions=torch.rand(batch_size, args.act_dim) * 2 - 1,
        rewards=torch.randn(batch_size),
        next_observations=torch.randn(batch_size, args.obs_dim),
        masks=torch.ones(batch_size),
        **fino.draw_noise(batch_size, args.act_dim, torch.device("cpu")),
    )
    with RecordGemms() as recorder:
        fino.update(batch, dict(nets=nets, target_critic=target_critic, optimizer=optimizer), fino_args)
    return recorder.calls


def strided(shape: list, stride: list) -> torch.Tensor:
    """A random tensor of this shape and memory layout (transposed views and broadcast operands as recorded)."""
    size = 1 + sum((n - 1) * s for n, s in zip(shape, stride))
    return torch.randn(size).as_strided(shape, stride)


def time_torch(calls: list, repeats: int) -> float:
    """Seconds per update of torch's GEMMs alone, on operands of the recorded shapes and layouts."""
    ops = dict(mm=torch.mm, addmm=torch.addmm, bmm=torch.bmm, baddbmm=torch.baddbmm)
    operands = [(ops[name], [strided(*operand) for operand in operands]) for name, operands in calls]
    run = lambda: [op(*xs) for op, xs in operands]
    for _ in range(5):
        run()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - start) / repeats


JAX_TIMER = """
import json, sys, time
import jax, jax.numpy as jnp
calls, repeats = json.loads(sys.argv[1]), int(sys.argv[2])
def transposed(shape, stride):  # a transposed view in torch: XLA folds the transpose into the dot
    return len(shape) >= 2 and stride[-2] == 1 and stride[-1] != 1 and shape[-1] > 1
def operand(shape, stride):
    return jnp.ones(shape[:-2] + shape[-2:][::-1] if transposed(shape, stride) else shape, jnp.float32)
def product(name, flags, xs):
    xs = [jnp.swapaxes(x, -1, -2) if t else x for t, x in zip(flags, xs)]
    if name in ("addmm", "baddbmm"):
        return xs[0] + jnp.matmul(xs[1], xs[2])
    return jnp.matmul(xs[0], xs[1])
flags = [[transposed(*o) for o in ops] for _, ops in calls]
inputs = [[operand(*o) for o in ops] for _, ops in calls]
run = jax.jit(lambda inputs: [product(name, f, xs) for (name, _), f, xs in zip(calls, flags, inputs)])
for _ in range(5):
    jax.block_until_ready(run(inputs))
start = time.perf_counter()
for _ in range(repeats):
    out = run(inputs)
jax.block_until_ready(out)
print((time.perf_counter() - start) / repeats)
"""


if __name__ == "__main__":
    args = tyro.cli(Args)
    calls = record_update(args)
    total_flops = sum(flops(name, operands) for name, operands in calls)
    seconds = time_torch(calls, args.repeats)
    print(f"one FQL update: {len(calls)} matrix products, {total_flops / 1e9:.2f} GFLOP")
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads): {seconds * 1e3:.1f} ms per update in GEMMs alone")
    print(f"  {total_flops / seconds / 1e9:.0f} GFLOP/s; ceiling {1 / seconds:.2f} updates/s")
    if args.jax_python:
        out = subprocess.run(
            [args.jax_python, "-c", JAX_TIMER, json.dumps(calls), str(args.repeats)], capture_output=True, text=True
        )
        if out.returncode:
            raise SystemExit(f"error: the JAX timer failed: {out.stderr.strip().splitlines()[-1]}")
        jax_seconds = float(out.stdout.split()[-1])
        print(f"jax (XLA) on the same products: {jax_seconds * 1e3:.1f} ms per update in GEMMs alone")
        print(f"  {total_flops / jax_seconds / 1e9:.0f} GFLOP/s; ceiling {1 / jax_seconds:.2f} updates/s")
