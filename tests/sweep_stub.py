"""A stand-in training script for tests/test_sweep.py with the resume interface of fmer.py, fino.py and flowq.py:
counts steps, checkpoints `runs/NAME/sweep_stub.pt` (JSON: the step) every --checkpoint-every steps and at the end,
on SIGINT / SIGTERM / SIGUSR2 saves and exits 128 + the signal, continues from --resume DIR. Each start and end is a line
of `runs/NAME/progress.jsonl`."""

import argparse
import json
import os
import signal
import sys
import time

parser = argparse.ArgumentParser()
for flag in ("--env-id", "--dataset", "--run-name", "--resume"):
    parser.add_argument(flag)
parser.add_argument("--seed", type=int, default=1)
parser.add_argument("--save-model", action="store_true")
parser.add_argument("--save-buffer", action="store_true")
parser.add_argument("--exp-name", default="sweep_stub")
parser.add_argument("--total-steps", type=int, default=20)
parser.add_argument("--step-time", type=float, default=0.01)
parser.add_argument("--checkpoint-every", type=int, default=5)
parser.add_argument("--exit-code", type=int, default=0)
args = parser.parse_args()

run_dir = args.resume or f"runs/{args.run_name}"
checkpoint = f"{run_dir}/{args.exp_name}.pt"
step = json.load(open(checkpoint))["step"] if args.resume else 0
os.makedirs(run_dir, exist_ok=True)
stop = []
for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2):
    signal.signal(signum, lambda signum, frame: stop.append(signum))


def record(**entry) -> None:
    with open(f"{run_dir}/progress.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")


def save() -> None:
    with open(checkpoint + ".tmp", "w") as f:
        json.dump({"step": step}, f)
    os.replace(checkpoint + ".tmp", checkpoint)


record(start=step, pid=os.getpid(), argv=sys.argv[1:], time=time.time(), cuda=os.environ.get("CUDA_VISIBLE_DEVICES"))
while step < args.total_steps:
    time.sleep(args.step_time)
    step += 1
    if stop:
        save()
        record(interrupted=step, signal=stop[0])
        sys.exit(128 + stop[0])
    if step % args.checkpoint_every == 0:
        save()
save()
record(end=step, time=time.time())
sys.exit(args.exit_code)
